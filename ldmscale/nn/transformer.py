"""Spatial transformer with cross-attention (Rombach et al. 2022 §3.3; CompVis `ldm/modules/attention.py`).

An image feature map is flattened to tokens, passed through `depth` pre-norm transformer blocks
(self-attention, cross-attention on a conditioning sequence `context`, GEGLU feed-forward), and added
back to the input. Submodule names are the original checkpoint's (`norm`, `proj_in`,
`transformer_blocks.{i}.{attn1,attn2,ff,norm1,norm2,norm3}`, `proj_out`).

Without a `context_dim` the blocks have no cross-attention (no `attn2`/`norm2`), as in diffusers'
`BasicTransformerBlock`; the original would instead run a second self-attention there.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ldmscale.nn.attention import attention
from ldmscale.nn.blocks import GroupNorm32, zero_module


class CrossAttention(nn.Module):
    """Multi-head attention of `x` (B, N, C) over `context` (B, M, C_ctx), or over itself when context is None."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, N, D)
        k = self.to_k(context).view(b, m, self.heads, -1).transpose(1, 2)  # (B, H, M, D)
        v = self.to_v(context).view(b, m, self.heads, -1).transpose(1, 2)  # (B, H, M, D)
        out = attention(q, k, v).transpose(1, 2).reshape(b, n, -1)  # (B, N, H * D)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): x W_a * GELU(x W_b), with W_a and W_b fused in `proj`."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # (B, N, dim_out) each
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with inner width 4 * dim; `net.0.proj` and `net.2` as in the original."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: x += SelfAttn(LN x); x += CrossAttn(LN x, context); x += FF(LN x)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float = 0.0,
                 gradient_checkpointing: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, dropout) if context_dim is not None else None
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim) if context_dim is not None else None
        self.norm3 = nn.LayerNorm(dim)
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C), (B, M, C_ctx) -> (B, N, C)."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """(B, C, H, W) feature map -> tokens -> `depth` transformer blocks -> (B, C, H, W) residual.

    `use_linear=False` (SD1) projects with 1x1 convolutions before flattening; `use_linear=True`
    (SD2, `use_linear_in_transformer`) projects the flattened tokens with Linear layers. Both are
    the same map; only the weight shapes in the checkpoint differ. `proj_out` starts at zero, so the
    block starts as the identity.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = False, gradient_checkpointing: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, gradient_checkpointing)
            for _ in range(depth)
        ])
        self.proj_out = zero_module(nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W), (B, M, C_ctx) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.use_linear:
            tokens = self.proj_in(tokens)  # (B, I, H, W)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, H*W, C or I)
        if self.use_linear:
            tokens = self.proj_in(tokens)  # (B, H*W, I)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)  # (B, H*W, I)
        if self.use_linear:
            tokens = self.proj_out(tokens)  # (B, H*W, C)
        tokens = tokens.transpose(1, 2).reshape(b, -1, h, w)  # (B, C or I, H, W)
        if not self.use_linear:
            tokens = self.proj_out(tokens)  # (B, C, H, W)
        return x + tokens
