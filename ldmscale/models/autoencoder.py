"""The stage-1 autoencoder of latent diffusion (Rombach et al. 2022, §3.1 and appendix G).

A convolutional encoder E maps an image x (B, C_in, H, W) to moments; a regulariser (KL or VQ,
`models/regularizers.py`) turns them into a latent z (B, E, H/f, W/f) with f = 2^(levels - 1); the
decoder D maps z back to pixels. Module names follow CompVis `ldm/modules/diffusionmodules/model.py`
(`Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`) and `ldm/models/autoencoder.py` so that
`state_dict()` equals the original `first_stage_model.*` keys without the prefix, plus one extra
buffer, `scale_factor` (stored at the top level of an LDM checkpoint).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldmscale.config.registry import polymorphic
from ldmscale.models.regularizers import (REGULARIZERS, DiagonalGaussian, KLConfig, QuantizerOutput, Regularizer,
                                          RegularizerOutput)
from ldmscale.nn.attention import attention


@dataclasses.dataclass
class AutoencoderConfig:
    """Defaults are the Stable Diffusion KL-f8 autoencoder (CompVis `ddconfig` names in comments)."""

    in_channels: int = 3
    out_channels: int = 3  # out_ch
    base_channels: int = 128  # ch
    channel_mult: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 4])  # ch_mult
    num_res_blocks: int = 2
    attn_resolutions: list[int] = dataclasses.field(default_factory=list)  # besides the mid-block attention
    resolution: int = 256  # training resolution; only places `attn_resolutions`, the model is convolutional
    z_channels: int = 4
    embed_dim: int = 4
    dropout: float = 0.0
    # CompVis `Normalize` uses 32 groups. Tiny models need fewer: with one channel per group the norm
    # becomes instance norm, which erases each image's per-channel mean (its flat colours).
    norm_groups: int = 32
    regularizer: KLConfig = polymorphic(REGULARIZERS, "kl")
    scale_factor: float = 1.0  # latent scale for diffusion; estimate it with `estimate_scale_factor`

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def validate(self) -> list[str]:
        problems = []
        if len(self.channel_mult) not in (3, 4, 5):
            problems.append(f"channel_mult: needs 3, 4 or 5 levels (downsampling factor f = 2^(levels-1) in "
                            f"{{4, 8, 16}}), got {self.channel_mult}")
        bad = [self.base_channels * m for m in self.channel_mult
               if m <= 0 or self.norm_groups <= 0 or self.base_channels * m % self.norm_groups]
        if self.base_channels <= 0 or bad:
            problems.append(f"base_channels: base_channels * channel_mult must be positive multiples of "
                            f"norm_groups ({self.norm_groups}), got {bad or self.base_channels}")
        reached = [self.resolution // 2 ** i for i in range(len(self.channel_mult))]
        unreachable = [r for r in self.attn_resolutions if r not in reached]
        if unreachable:
            problems.append(f"attn_resolutions: {unreachable} never occur; valid resolutions: {reached}")
        if self.resolution % self.downsample_factor:
            problems.append(f"resolution: {self.resolution} is not divisible by the downsampling factor "
                            f"{self.downsample_factor}")
        for name in ("in_channels", "out_channels", "num_res_blocks", "z_channels", "embed_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must lie in [0, 1), got {self.dropout}")
        if self.scale_factor <= 0:
            problems.append(f"scale_factor: must be positive, got {self.scale_factor}")
        return problems


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """CompVis `ResnetBlock` without time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Identity has no parameters, so the state dict holds `nin_shortcut` only where CompVis has one.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (CompVis `AttnBlock`)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, C, H, W) -> (B, 1, H*W, C)

        # Scale 1/sqrt(C) as in CompVis, since the single head spans all C channels.
        out = attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))  # (B, 1, H*W, C)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CompVis pads only right and bottom before the stride-2 conv; kept for checkpoint compatibility.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    return level


def _mid(channels: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, groups)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """x (B, C_in, H, W) -> moments (B, m * z_channels, H/f, W/f)."""

    def __init__(self, cfg: AutoencoderConfig, moments_per_channel: int):
        super().__init__()
        ch, mult, groups = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, cfg.resolution
        for i, m in enumerate(mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * m, cfg.dropout, groups))
                block_in = ch * m
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, groups))
            level = _level(blocks, attns)
            last = i == len(mult) - 1
            level.downsample = nn.Identity() if last else Downsample(block_in)
            res = res if last else res // 2
            self.down.append(level)
        self.mid = _mid(block_in, cfg.dropout, groups)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, moments_per_channel * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            h = level.downsample(h)
        h = _run_mid(self.mid, h)  # (B, ch * mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> image (B, C_out, h*f, w*f); `up[i]` is stored in encoder order."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, mult, groups = cfg.base_channels, cfg.channel_mult, cfg.norm_groups
        block_in = ch * mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg.dropout, groups)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mult))):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, ch * mult[i], cfg.dropout, groups))
                block_in = ch * mult[i]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, groups))
            level = _level(blocks, attns)
            level.upsample = Upsample(block_in) if i != 0 else nn.Identity()
            res = res * 2 if i != 0 else res
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))  # (B, ch * mult[-1], h, w)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)


class Autoencoder(nn.Module):
    """Encoder, regulariser and decoder; `forward(x)` returns (reconstruction, regulariser output)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid autoencoder config:\n  " + "\n  ".join(problems))
        self.cfg = cfg
        self.quantize: Regularizer = REGULARIZERS.build(cfg.regularizer, embed_dim=cfg.embed_dim)
        m = self.quantize.moments_per_channel
        self.encoder = Encoder(cfg, m)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(m * cfg.z_channels, m * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        # Persistent: LDM stores the scale factor in its checkpoints, so latents stay interpretable.
        self.register_buffer("scale_factor", torch.tensor(float(cfg.scale_factor)))

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.cfg.embed_dim

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight, against which the adaptive GAN weight compares gradients."""
        return self.decoder.conv_out.weight

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, m * E, H/f, W/f): mean and log-variance (KL) or pre-quantisation z (VQ)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian | QuantizerOutput:
        """The posterior q(z|x) for KL models, the quantisation result for VQ models."""
        return self.quantize.encode(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) latent (already quantised for VQ) -> (B, C_out, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, RegularizerOutput]:
        reg = self.quantize(self.encode_moments(x), sample=sample, generator=generator)
        return self.decode(reg.z), reg

    def encode_to_latent(self, x: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The scaled latent a diffusion model sees: z * scale_factor (LDM `get_first_stage_encoding`)."""
        z = self.quantize.to_latent(self.encode_moments(x), sample=sample, generator=generator)
        return z * self.scale_factor.to(z.dtype)

    def decode_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_to_latent`: divides the scale back out (and quantises for VQ), then decodes."""
        z = z / self.scale_factor.to(z.dtype)
        return self.decode(self.quantize.from_latent(z))

    def set_scale_factor(self, value: float) -> None:
        self.scale_factor.fill_(float(value))


def estimate_scale_factor(latents: torch.Tensor) -> float:
    """1 / std over a sample of unscaled latents, so that scaled latents have unit variance.

    As LDM's `LatentDiffusion.on_train_batch_start` (`1 / z.flatten().std()` over the first batch);
    the paper discusses the effect of this rescaling on the signal-to-noise ratio in §4.3.2.
    """
    std = latents.detach().float().flatten().std()
    if not torch.isfinite(std) or std <= 0:
        raise ValueError(f"cannot estimate the latent scale factor: the latents' std is {float(std)}")
    return float(1.0 / std)

