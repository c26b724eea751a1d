"""PNG grids of images in [-1, 1] (samples, reconstructions, interpolations)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, C, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Writes (B, C, H, W) images in [-1, 1] as one PNG grid, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(to_uint8(images), nrow=nrow, padding=2, pad_value=255)  # (C, H', W')
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_rows(rows: list[torch.Tensor], path: str | os.PathLike) -> Path:
    """Each tensor (B, C, H, W) becomes one row: inputs above reconstructions, and so on."""
    batch = min(r.shape[0] for r in rows)
    return save_image_grid(torch.cat([r[:batch] for r in rows]), path, nrow=batch)
