"""Convolutional building blocks of the LDM UNet (CompVis `openaimodel.py`, after Dhariwal & Nichol 2021).

Submodule names follow the original checkpoints (`in_layers`, `emb_layers`, `out_layers`,
`skip_connection`, `op`, `conv`) so that a state dict converts to and from the original Stable
Diffusion layout by a prefix map alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

GROUPS = 32  # every GroupNorm of the SD UNet uses 32 groups


def zero_module(module: nn.Module) -> nn.Module:
    """Zeroes a module's parameters in place and returns it.

    Used on the last layer of every residual branch (and the UNet output) so that each block starts
    as the identity and the network's initial output is zero (Goyal et al. 2017; Dhariwal & Nichol 2021).
    """
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and parameter dtypes.

    Statistics over large spatial maps lose precision in fp16/bf16; the original casts the input to
    float32 for the same reason. The affine parameters are upcast too, because under a bf16 engine
    they are stored in bf16.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(GROUPS, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Residual block with an additive timestep embedding (Ho et al. 2020 App. B; SD's `use_scale_shift_norm=False`).

    h = conv(SiLU(GN(x))) + Linear(SiLU(emb)); out = skip(x) + zero_conv(Dropout(SiLU(GN(h)))).
    The skip is the identity when the width is unchanged and a 1x1 conv otherwise.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 gradient_checkpointing: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, E) -> (B, C_out, H, W)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C_out, 1, 1) broadcast over space
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
