"""A class-conditional Diffusion Transformer (DiT) with adaLN-Zero blocks, built from timm layers.

The network F(x_t, t, labels[, r]) reads an image-shaped tensor (B, C, H, W) and returns a tensor of
the same shape (whatever the transport says F predicts). Its pieces, in order:

    tokens = PatchEmbed(x) + P                      P: fixed 2-D sin-cos positions (not learned)
    c      = T(t) + Y(labels) [+ R(r)]              timestep, label (and second-time) embeddings
    for each block:                                 adaLN-Zero (Peebles & Xie, 2023)
        (s1, b1, g1, s2, b2, g2) = Linear(SiLU(c))
        tokens += g1 * Attention(LN(tokens) * (1 + s1) + b1)
        tokens += g2 * Mlp(LN(tokens) * (1 + s2) + b2)
    F      = unpatchify(Linear(LN(tokens) * (1 + s) + b)),  (s, b) = Linear(SiLU(c))

Every modulation layer and the output projection start at zero, so an untrained model outputs
exactly 0 and every block starts as the identity.

Example::

    settings = DiTSettings(size="tiny", patch_size=2)
    model = build_dit(settings, input_size=8, in_channels=1, num_classes=10)
    out = model(x, t, labels)          # x: (B, 1, 8, 8), t: (B,) in [0, 1], labels: (B,) in [0, 10]
    model.set_attention("math")       # before torch.func.jvp through the model
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn

Tensor = torch.Tensor

AttentionMode = Literal["fused", "math"]
ATTENTION_MODES: tuple[str, ...] = ("fused", "math")


class DiTDimensions(NamedTuple):
    """The three numbers that fix a transformer's width and depth."""

    hidden_size: int
    depth: int
    num_heads: int


# Presets: S/B/L/XL are the DiT paper's; "tiny" is ours, sized to train 8x8 digits in minutes on
# two CPU cores (about 1.2M parameters at patch 2).
DIT_PRESETS: dict[str, DiTDimensions] = {
    "tiny": DiTDimensions(hidden_size=128, depth=4, num_heads=4),
    "S": DiTDimensions(hidden_size=384, depth=12, num_heads=6),
    "B": DiTDimensions(hidden_size=768, depth=12, num_heads=12),
    "L": DiTDimensions(hidden_size=1024, depth=24, num_heads=16),
    "XL": DiTDimensions(hidden_size=1152, depth=28, num_heads=16),
}

# The sinusoidal time embedding is written for DiT's integer timesteps 0..999; see
# `sinusoidal_time_embedding` for why our t in [0, 1] is scaled by this factor.
TIME_EMBEDDING_SCALE = 1000.0
TIME_FREQUENCY_DIM = 256
SINUSOID_MAX_PERIOD = 10000.0
LAYER_NORM_EPS = 1e-6
EMBEDDING_INIT_STD = 0.02


@dataclass(frozen=True)
class DiTSettings:
    """Architecture of a DiT. Input size, channels and classes come from the data, not from here.

    size: a preset in DIT_PRESETS ("tiny", "S", "B", "L", "XL"); hidden_size/depth/num_heads
    override single preset values. two_time adds an embedder for a second time r (shortcut / ESC
    style networks F(x_t, t, r)). attention: "fused" uses torch's scaled_dot_product_attention,
    "math" the explicit softmax(q k^T / sqrt(d)) v that forward-mode autodiff can pass through.
    """

    size: str = "tiny"
    patch_size: int = 2
    hidden_size: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    two_time: bool = False
    attention: AttentionMode = "fused"

    def __post_init__(self) -> None:
        if self.size not in DIT_PRESETS:
            raise ValueError(f"size must be one of {sorted(DIT_PRESETS)}, got {self.size!r}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {self.patch_size}; DiT uses 2, 4 or 8")
        for field_name in ("hidden_size", "depth", "num_heads"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise ValueError(
                    f"{field_name} must be a positive integer or None (to use the preset), got {value}"
                )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}; DiT uses 4.0")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        dims = self.dimensions
        if dims.hidden_size % dims.num_heads != 0:
            raise ValueError(
                f"hidden_size ({dims.hidden_size}) must be divisible by num_heads ({dims.num_heads}); "
                "change hidden_size or num_heads"
            )
        # The 2-D sin-cos position table splits the width into (row, col) x (sin, cos).
        if dims.hidden_size % 4 != 0:
            raise ValueError(
                f"hidden_size must be a multiple of 4 for the 2-D sin-cos positions, got {dims.hidden_size}"
            )

    @property
    def dimensions(self) -> DiTDimensions:
        """The preset's (hidden_size, depth, num_heads) with any explicit overrides applied."""
        preset = DIT_PRESETS[self.size]
        return DiTDimensions(
            hidden_size=self.hidden_size if self.hidden_size is not None else preset.hidden_size,
            depth=self.depth if self.depth is not None else preset.depth,
            num_heads=self.num_heads if self.num_heads is not None else preset.num_heads,
        )


def sinusoidal_time_embedding(t: Tensor, dim: int = TIME_FREQUENCY_DIM) -> Tensor:
    """[cos(1000 t w_k), sin(1000 t w_k)], w_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1.

    Why 1000 t: the frequencies w_k run from 1 down to 1e-4. With t in [0, 1] unscaled every phase
    t w_k would stay below one radian, so the embedding would be almost linear in t and nearby
    times would be hard to tell apart. DiT (and the UCGM reference) feed integer-like timesteps in
    [0, 1000); scaling by 1000 restores that range: the fastest component turns ~160 times over
    [0, 1] and the slowest still moves by 0.1 rad.

    Computed in float64 when t is float64 (precision tests, JVP checks), otherwise in float32, so
    bf16 autocast never sees a low-precision phase (1000 t in bf16 would lose whole radians).
    """
    compute_dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    exponent = torch.arange(half, dtype=compute_dtype, device=t.device) / half
    frequencies = torch.exp(-math.log(SINUSOID_MAX_PERIOD) * exponent)
    phase = (TIME_EMBEDDING_SCALE * t.to(compute_dtype))[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def sincos_position_embedding_2d(hidden_size: int, grid_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed positions for a grid_size x grid_size token grid, shape (grid_size^2, hidden_size).

    Token (i, j) (row-major) gets [sin(i w), cos(i w), sin(j w), cos(j w)] with
    w_k = 10000^(-k / (hidden_size/4)), k = 0 .. hidden_size/4 - 1.
    """
    if hidden_size % 4 != 0:
        raise ValueError(f"hidden_size must be a multiple of 4, got {hidden_size}")
    quarter = hidden_size // 4
    frequencies = 1.0 / SINUSOID_MAX_PERIOD ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    positions = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")

    def axis_embedding(coordinate: Tensor) -> Tensor:
        phase = coordinate.reshape(-1, 1) * frequencies.reshape(1, -1)
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=1)

    return torch.cat([axis_embedding(rows), axis_embedding(cols)], dim=1).to(dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift, with per-sample (B, D) shift/scale broadcast over the tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimeEmbedder(nn.Module):
    """Scalar time in [0, 1] -> sinusoidal features (see `sinusoidal_time_embedding`) -> 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_dim: int = TIME_FREQUENCY_DIM) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        features = sinusoidal_time_embedding(t, self.frequency_dim)
        # Match the parameters' dtype (float64 test models, bf16 models); under autocast the
        # parameters stay float32 and autocast itself chooses the matmul precision.
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """One transformer block with adaLN-Zero conditioning (see the module docstring)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=partial(nn.GELU, approximate="tanh"),
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_attn.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_attn, scale_attn))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to its patch of pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT: forward(x, t, labels, r=None) -> F with F.shape == x.shape.

    labels are in [0, num_classes]; the value num_classes is the null ("unconditional") label and
    has its own embedding row. t (and r) are times in [0, 1], shape (B,) or scalar.
    For a two-time network r defaults to t when not given (the instantaneous case r = t);
    a one-time network ignores r.
    """

    def __init__(self, settings: DiTSettings, *, input_size: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if input_size < 1 or in_channels < 1:
            raise ValueError(f"input_size and in_channels must be positive, got {input_size}, {in_channels}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if input_size % settings.patch_size != 0:
            raise ValueError(
                f"input_size {input_size} is not divisible by patch_size {settings.patch_size}; "
                "choose a patch_size that divides the image side (or resize the data)"
            )
        dims = settings.dimensions
        self.settings = settings
        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.patch_size = settings.patch_size
        self.grid_size = input_size // settings.patch_size

        self.x_embedder = PatchEmbed(
            img_size=input_size,
            patch_size=settings.patch_size,
            in_chans=in_channels,
            embed_dim=dims.hidden_size,
            bias=True,
        )
        self.t_embedder = TimeEmbedder(dims.hidden_size)
        self.r_embedder = TimeEmbedder(dims.hidden_size) if settings.two_time else None
        # One extra row: index num_classes is the null label used for classifier-free guidance.
        self.y_embedder = nn.Embedding(num_classes + 1, dims.hidden_size)
        # Fixed, not learned: a float32 buffer (follows .to(dtype) and .to(device) like a weight).
        self.register_buffer(
            "pos_embed",
            sincos_position_embedding_2d(dims.hidden_size, self.grid_size).unsqueeze(0),
            persistent=False,
        )
        self.blocks = nn.ModuleList(
            [DiTBlock(dims.hidden_size, dims.num_heads, settings.mlp_ratio) for _ in range(dims.depth)]
        )
        self.final_layer = FinalLayer(dims.hidden_size, settings.patch_size, in_channels)
        self._initialize_weights()
        self.set_attention(settings.attention)

    def _initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # The patch projection is a linear map on flattened patches: initialise it as one.
        projection = self.x_embedder.proj
        nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
        nn.init.zeros_(projection.bias)
        nn.init.normal_(self.y_embedder.weight, std=EMBEDDING_INIT_STD)
        for embedder in (self.t_embedder, self.r_embedder):
            if embedder is None:
                continue
            nn.init.normal_(embedder.mlp[0].weight, std=EMBEDDING_INIT_STD)
            nn.init.normal_(embedder.mlp[2].weight, std=EMBEDDING_INIT_STD)
        if self.r_embedder is not None:
            # Zero output: a fresh two-time model conditions exactly like a one-time one, so
            # multi-step weights can be loaded into it and continue unchanged.
            nn.init.zeros_(self.r_embedder.mlp[2].weight)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def attention_mode(self) -> str:
        """"fused" or "math", as last set by `set_attention`."""
        return self._attention_mode

    def set_attention(self, mode: AttentionMode) -> None:
        """Switch every attention layer between fused SDPA kernels and explicit math attention.

        Forward-mode autodiff (torch.func.jvp, used by continuous-time consistency objectives)
        has no rule for the fused SDPA kernels on CPU; "math" computes softmax(q k^T / sqrt(d)) v
        with ordinary ops, which it can differentiate. Both give the same numbers.
        """
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {mode!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused_attn = mode == "fused"
        self._attention_mode = mode

    def _check_inputs(self, x: Tensor, labels: Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"DiT was built for inputs of shape (B, {expected[0]}, {expected[1]}, {expected[2]}); "
                f"got {tuple(x.shape)}. Build the model with the data's input_size and in_channels."
            )
        if labels.ndim != 1 or labels.shape[0] != x.shape[0]:
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor (torch.long), got {labels.dtype}")
        # The range check reads the values (a device sync); skip it while being compiled.
        if not torch.compiler.is_compiling() and labels.numel() > 0:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high > self.num_classes:
                raise ValueError(
                    f"labels must be in [0, {self.num_classes}] ({self.num_classes} is the null label), "
                    f"got values in [{low}, {high}]"
                )

    def _batch_time(self, t: Tensor | float, x: Tensor, name: str) -> Tensor:
        if not isinstance(t, torch.Tensor):
            # A Python number: keep full precision for float64 models, float32 otherwise.
            t = torch.as_tensor(t, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        t = t.to(x.device)
        if not torch.is_floating_point(t):
            t = t.to(torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"{name} must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p); token (i, j) holds pixel block (i, j), channels last."""
        batch = tokens.shape[0]
        p, grid, channels = self.patch_size, self.grid_size, self.in_channels
        tokens = tokens.reshape(batch, grid, grid, p, p, channels)
        return torch.einsum("bhwpqc->bchpwq", tokens).reshape(batch, channels, grid * p, grid * p)

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor, r: Tensor | float | None = None) -> Tensor:
        self._check_inputs(x, labels)
        t = self._batch_time(t, x, "t")
        tokens = self.x_embedder(x) + self.pos_embed
        conditioning = self.t_embedder(t) + self.y_embedder(labels)
        if self.r_embedder is not None:
            r = t if r is None else self._batch_time(r, x, "r")
            conditioning = conditioning + self.r_embedder(r)
        for block in self.blocks:
            tokens = block(tokens, conditioning)
        return self.unpatchify(self.final_layer(tokens, conditioning))


def build_dit(settings: DiTSettings, *, input_size: int, in_channels: int, num_classes: int) -> DiT:
    """A freshly initialised DiT for images (in_channels, input_size, input_size) and num_classes classes."""
    return DiT(settings, input_size=input_size, in_channels=in_channels, num_classes=num_classes)


def dit_parameter_count(settings: DiTSettings, *, input_size: int, in_channels: int, num_classes: int) -> int:
    """Number of trainable parameters, counted on the meta device (no memory is allocated).

    The fixed positional table is a buffer and is not counted.
    """
    with torch.device("meta"):
        model = build_dit(settings, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    return sum(parameter.numel() for parameter in model.parameters())
