"""Improved precision and recall (k-NN manifolds of features): the definition on points whose
answer is known, the data against itself and against a copy with classes removed, and `evaluate`
computing them from the samples and the reference features `reference` kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ucgm_core.precision_recall import coverage, knn_radii, precision_recall

pytest.importorskip("digit_recognizer", reason="pip install digit-recognizer-py")


def test_balls_reach_the_kth_neighbour_and_coverage_counts_points_inside_one():
    line = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(line, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(line, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]
    # 2.5 is within 1 of 3 (radius 2); 12 is 5 from 7 (radius 4): outside
    assert coverage(torch.tensor([[2.5], [12.0]]), line, knn_radii(line, k=1)) == 0.5
    with pytest.raises(ValueError, match="more than k"):
        knn_radii(line, k=4)


@pytest.fixture(scope="module")
def digit_features():
    from ucgm_core.datasets import load_dataset
    from ucgm_core.features import DigitClassifierFeatures

    data = load_dataset("digits")
    extractor = DigitClassifierFeatures(framing="mnist_box")
    return extractor(data.images), data.labels


def test_the_data_against_itself_has_precision_and_recall_near_one(digit_features):
    features, _ = digit_features
    precision, recall = precision_recall(features[0::2], features[1::2])  # two halves of one distribution
    print(f"halves: precision {precision:.3f} recall {recall:.3f}")
    assert precision > 0.85 and recall > 0.85
    assert precision_recall(features, features) == (1.0, 1.0)  # every point lies in its own ball


def test_removing_classes_lowers_recall_and_keeps_precision(digit_features):
    features, labels = digit_features
    real, other, other_labels = features[0::2], features[1::2], labels[1::2]
    dropped = other[other_labels < 5]  # half the classes gone from the "generated" set
    full_precision, full_recall = precision_recall(real, other)
    precision, recall = precision_recall(real, dropped)
    print(f"classes 0-4 only: precision {precision:.3f} (all classes {full_precision:.3f}), recall {recall:.3f} (all {full_recall:.3f})")
    assert precision > 0.85
    assert recall < 0.7 * full_recall
