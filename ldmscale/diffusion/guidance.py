"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, eq. 6).

    out = out_uncond + scale * (out_cond - out_uncond)

applied to the network output. For eps this is the paper's formula; for v and x0 outputs it is the
same guidance, because given (x_t, t) each parameterisation is an affine function of eps with the
same coefficients for both branches. scale = 1 is the conditional model, scale = 0 the
unconditional one. Both branches run in one batched forward pass.
"""

from __future__ import annotations

import torch

from ldmscale.diffusion.samplers import Cond, Denoiser


def _expand(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    assert tensor.shape[0] == 1, f"unconditional batch must be 1 or {batch}, got {tensor.shape[0]}"
    return tensor.expand(batch, *tensor.shape[1:])


def concat_cond(a: Cond, b: Cond) -> dict[str, torch.Tensor]:
    """Concatenates two conditionings along the batch; their keys must agree."""
    if set(a) != set(b):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(a)} and {sorted(b)}")
    return {k: torch.cat([a[k], b[k]]) for k in a}


class CFGDenoiser:
    """Wraps `denoiser(x, t, cond)`; calls with the same signature return the guided output.

    `uncond` is the unconditional conditioning (empty prompt, null class) for a batch of 1 or B.
    """

    def __init__(self, denoiser: Denoiser, uncond: Cond, scale: float):
        self.denoiser = denoiser
        self.uncond = uncond
        self.scale = scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        b = x.shape[0]
        uncond = {k: _expand(v, b) for k, v in self.uncond.items()}
        out = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), concat_cond(cond, uncond))  # (2B, ...)
        out_cond, out_uncond = out.chunk(2)  # (B, ...) each
        return out_uncond + self.scale * (out_cond - out_uncond)
