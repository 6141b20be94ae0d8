"""The feature extractor a job asks for (the digit classifier or the FID Inception), as a small
spec sent to every actor, which builds it on its own device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.config import JobConfig
from orchestrator.errors import ConfigError
from ucgm_core.features import DIGIT_CLASSIFIER_NAME, FeatureExtractor, build_feature_extractor


# Below this size an image is taken to fill its frame (sklearn's 8x8 digits) and is framed in
# MNIST's 20x20 box for the digit classifier; larger ones (MNIST itself) are stretched to 28x28.
MNIST_BOX_BELOW_SIZE = 20


@dataclass(frozen=True)
class ExtractorSpec:
    """How to build the feature extractor, small enough to send to every actor."""

    name: str
    options: dict[str, Any]

    def build(self, device: torch.device | str | None = None) -> FeatureExtractor:
        return build_feature_extractor(self.name, device=device, **self.options)


def extractor_spec(config: JobConfig, image_shape: tuple[int, int, int]) -> ExtractorSpec:
    """The job's feature extractor for images of `image_shape` (C, H, W)."""
    evaluation = config.evaluation
    channels, size, _ = image_shape
    if evaluation.extractor == DIGIT_CLASSIFIER_NAME:
        if channels != 1:
            raise ConfigError.of_job([
                f"evaluation.extractor: {DIGIT_CLASSIFIER_NAME} reads grey images but the "
                f"model makes {channels}-channel ones; use evaluation.extractor=inception-v3-tf-pool3"
            ])
        return ExtractorSpec(DIGIT_CLASSIFIER_NAME, {"framing": "mnist_box" if size < MNIST_BOX_BELOW_SIZE else "stretch"})
    if channels not in (1, 3):
        raise ConfigError.of_job([f"evaluation.extractor: Inception reads 1- or 3-channel images, the model makes {channels}"])
    return ExtractorSpec(
        evaluation.extractor,
        {"weights": evaluation.inception_weights, "expected_sha256": evaluation.inception_sha256, "resize": evaluation.inception_resize},
    )
