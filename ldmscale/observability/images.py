"""PNG grids of images in [-1, 1] (samples, reconstructions, interpolations)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, C, H, W)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Writes (B, C, H, W) images in [-1, 1] as one PNG grid, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from torchvision.utils import make_grid  # lazily: importing torchvision costs ~2 s of start-up

    grid = make_grid(to_uint8(images), nrow=nrow, padding=2, pad_value=255)  # (C, H', W')
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_rows(rows: list[torch.Tensor], path: str | os.PathLike) -> Path:
    """Each tensor (B, C, H, W) becomes one row: inputs above reconstructions, and so on."""
    batch = min(r.shape[0] for r in rows)
    return save_image_grid(torch.cat([r[:batch] for r in rows]), path, nrow=batch)


def save_curve(steps: list[int], values: list[float], path: str | os.PathLike, title: str,
               size: tuple[int, int] = (640, 360)) -> Path:
    """A line plot of `values` against `steps` as PNG (PIL only; a training curve at a glance)."""
    from PIL import ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    margin = 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(values), max(values)
    span_y = (hi - lo) or 1.0
    span_x = (max(steps) - min(steps)) or 1

    def point(s: int, v: float) -> tuple[float, float]:
        return (margin + (s - min(steps)) / span_x * (width - 2 * margin),
                height - margin - (v - lo) / span_y * (height - 2 * margin))

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.line([point(s, v) for s, v in zip(steps, values)], fill=(31, 119, 180), width=2)
    draw.text((margin, 12), title, fill="black")
    draw.text((4, margin - 6), f"{hi:.4g}", fill="black")
    draw.text((4, height - margin - 6), f"{lo:.4g}", fill="black")
    draw.text((margin, height - margin + 8), str(min(steps)), fill="black")
    draw.text((width - margin - 24, height - margin + 8), str(max(steps)), fill="black")
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
