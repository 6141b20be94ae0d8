"""Sample grids as PNG bytes, for run folders and experiment tracking."""

from __future__ import annotations

import io
import math

import torch
from PIL import Image
from torchvision.utils import make_grid


def grid_png(images: torch.Tensor, columns: int | None = None) -> bytes:
    """A PNG of images in [-1, 1] (B, C, H, W), laid out `columns` wide (square by default);
    small images are scaled up with nearest-neighbour so an 8x8 digit stays readable."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=columns, padding=1, normalize=True, value_range=(-1, 1))
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    scale = max(1, 256 // max(images.shape[-1], 1) // 4)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
