"""The latent-diffusion UNet (Rombach et al. 2022; CompVis `openaimodel.UNetModel`, SD1/SD2 variant).

Encoder: a 3x3 input conv, then per resolution level `num_res_blocks` ResBlocks (each followed by a
SpatialTransformer where the downsampling factor is in `attention_resolutions`) and a stride-2
Downsample except at the last level. Middle: ResBlock, SpatialTransformer, ResBlock. Decoder:
the mirror image with `num_res_blocks + 1` blocks per level, each concatenating one encoder skip
feature. The timestep enters every ResBlock through a sinusoidal embedding and a 2-layer MLP,
plus a class embedding (`label_emb`) when `num_classes` is set; text or class sequences enter
through cross-attention on `context`.

Module names equal the original checkpoint's `model.diffusion_model.*` keys without that prefix.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ldmscale.nn.blocks import GROUPS, Downsample, GroupNorm32, ResBlock, Upsample, zero_module
from ldmscale.nn.embeddings import timestep_embedding
from ldmscale.nn.transformer import SpatialTransformer


@dataclasses.dataclass
class UNetConfig:
    """Defaults are Stable Diffusion 1.x (`v1-inference.yaml`), 859,520,964 parameters."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    num_res_blocks: int = 2
    attention_resolutions: list[int] = dataclasses.field(default_factory=lambda: [4, 2, 1])  # downsampling factors
    channel_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 4])
    num_heads: int = 8  # -1 when num_head_channels sets the head width instead
    num_head_channels: int = -1  # -1 when num_heads sets the head count instead
    transformer_depth: int = 1
    context_dim: int | None = 768  # None: no cross-attention
    use_linear_in_transformer: bool = False  # SD2: Linear proj_in/proj_out instead of 1x1 convs
    num_classes: int | None = None  # an int adds the class-embedding table `label_emb`
    gradient_checkpointing: bool = False
    dropout: float = 0.0

    def validate(self) -> list[str]:
        problems = []
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "transformer_depth"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            problems.append(f"channel_mult: must be a non-empty list of positive ints, got {self.channel_mult}")
        heads_ok = (self.num_heads == -1) != (self.num_head_channels == -1)
        if not heads_ok:
            problems.append(f"num_heads: exactly one of num_heads ({self.num_heads}) and num_head_channels "
                            f"({self.num_head_channels}) must be -1")
        elif max(self.num_heads, self.num_head_channels) < 1:
            problems.append("num_heads: num_heads and num_head_channels must be positive or -1")
            heads_ok = False
        if self.context_dim is not None and self.context_dim < 1:
            problems.append(f"context_dim: must be positive or null, got {self.context_dim}")
        if self.num_classes is not None and self.num_classes < 1:
            problems.append(f"num_classes: must be positive or null, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        for ch in sorted({self.model_channels * m for m in self.channel_mult}):
            if ch % GROUPS:
                problems.append(f"model_channels: every level width model_channels * channel_mult must be divisible "
                                f"by {GROUPS} (GroupNorm groups), got {ch}")
            elif heads_ok and ch % max(self.num_heads, self.num_head_channels):
                key = "num_heads" if self.num_heads != -1 else "num_head_channels"
                problems.append(f"{key}: {getattr(self, key)} does not divide level width {ch}")
        reachable = [2 ** i for i in range(len(self.channel_mult))]
        for r in self.attention_resolutions:
            if r not in reachable:
                problems.append(f"attention_resolutions: {r} is not a downsampling factor of this UNet; "
                                f"valid values: {', '.join(map(str, reachable))}")
        return problems

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of an attention layer at `channels` wide features."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers called with what each needs: ResBlocks get `emb`, transformers get `context`."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """eps/v/x0 network of the latent DPM: `forward(x (B,C,H,W), t (B,), context (B,M,D)?, y (B,)?) -> (B,C_out,H,W)`.

    `encode_features` / `decode_features` split the forward pass after the input blocks, so that
    PDAE can run the frozen encoder half once and feed its bottleneck and skip features to a
    second decoder.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid UNet config:\n  " + "\n  ".join(problems))
        self.cfg = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        def res(ch_in: int, ch_out: int) -> ResBlock:
            return ResBlock(ch_in, emb_dim, ch_out, cfg.dropout, cfg.gradient_checkpointing)

        def attn(ch: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.transformer_depth, cfg.context_dim, cfg.dropout,
                                      cfg.use_linear_in_transformer, cfg.gradient_checkpointing)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        assert not skip_channels, "every encoder skip feature is consumed by exactly one decoder block"

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def embed(self, t: torch.Tensor, y: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        """Timestep (and class) embedding: (B,) -> (B, 4 * model_channels)."""
        if t.ndim == 0:
            t = t.expand(batch_size if batch_size is not None else 1)
        if (y is not None) != (self.cfg.num_classes is not None):
            raise ValueError("UNet: pass class labels `y` exactly when the config sets num_classes "
                             f"(num_classes={self.cfg.num_classes}, y given: {y is not None})")
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.dtype))  # (B, E)
        if y is not None:
            emb = emb + self.label_emb(y)  # (B, E)
        return emb

    def encode_features(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                        y: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Runs the input blocks: returns (h, skips, emb).

        h (B, C_bottom, H/2^L, W/2^L) is the last input block's output (the middle block's input),
        skips are all input-block outputs in order (h is the last of them), emb is (B, E).
        """
        if (context is not None) != (self.cfg.context_dim is not None):
            raise ValueError("UNet: pass `context` exactly when the config sets context_dim "
                             f"(context_dim={self.cfg.context_dim}, context given: {context is not None})")
        emb = self.embed(t, y, batch_size=x.shape[0])
        context = context.to(self.dtype) if context is not None else None
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        return h, skips, emb

    def decode_features(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
                        context: torch.Tensor | None = None) -> torch.Tensor:
        """Middle block, output blocks (each consuming the last remaining skip) and the output head."""
        context = context.to(self.dtype) if context is not None else None
        skips = list(skips)  # the caller's list stays intact (PDAE feeds the same skips to two decoders)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # (B, C + C_skip, H', W') -> (B, C', H'', W'')
        return self.out(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        h, skips, emb = self.encode_features(x, t, context, y)
        return self.decode_features(h, skips, emb, context)

