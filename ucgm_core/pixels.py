"""Images in [-1, 1] as the 8-bit pixels a PNG holds: what is saved, and what FID's Inception reads."""

from __future__ import annotations

import torch

Tensor = torch.Tensor

UINT8_LEVELS = 255


def quantize_to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] images -> uint8 pixels p = round((x + 1) * 127.5), clamped to [0, 255]: what saving
    them as 8-bit PNG gives (the UCGM reference code truncates instead; we round)."""
    half = UINT8_LEVELS / 2.0
    return ((images.detach().float() + 1.0) * half).round().clamp(0, UINT8_LEVELS).to(torch.uint8)
