"""Sinusoidal timestep embeddings (Vaswani et al. 2017 §3.5, as used by Ho et al. 2020 and the LDM UNet).

Matches CompVis `openaimodel.timestep_embedding` exactly: frequencies
`exp(-log(max_period) * i / half)` for `i = 0 .. half-1`, cosines first then sines, and a zero
column appended when `dim` is odd. diffusers calls this ordering `flip_sin_to_cos=True` (with
`downscale_freq_shift=0`), which is what its Stable Diffusion UNets use.
"""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = True) -> torch.Tensor:
    """(B,) timesteps (integer or fractional) -> (B, dim) float32 embedding.

    `flip_sin_to_cos=True` gives `[cos, sin]` (the original LDM/SD layout); False gives `[sin, cos]`
    (the layout of the original DDPM TensorFlow code).
    """
    half = dim // 2
    # Same operation order as the original ((-log P * i) / half), so float32 results match it bit for bit.
    exponents = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half  # (half,)
    freqs = torch.exp(exponents)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat(parts, dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb
