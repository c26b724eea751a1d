"""PDAE heads on a frozen pre-trained latent DPM (Zhang, Zhao & Lin 2022, "Unsupervised Representation
Learning from Pre-trained Diffusion Probabilistic Models", §3.2-3.3).

Two trainable networks:
- the semantic encoder E_phi: x0 (image or latent) -> z in R^d, a plain stack of stride-2 convolutions
  with one self-attention block and a final Linear (the paper's "enough" encoder, not a half-UNet);
- the gradient estimator G_psi(x_t, z, t): a new middle block and decoder half mirroring the
  pre-trained UNet's, reading the *frozen* encoder half's bottleneck and skip features and the frozen
  time embedding, conditioned on z by AdaGN twice:
      h <- (1 + z_s) * (GN(h) * (1 + t_s) + t_b) + z_b        (the official code's form of eq. 9).
  Every residual branch and the output conv start at zero, so G == 0 at initialisation and the
  shifted model equals the pre-trained DPM exactly.

`PDAEHeads` holds E and G's new parts (what trains); `ShiftedUNet` composes it with the frozen UNet,
running the UNet's encoder half once and feeding the same features to both decoders.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ldmscale.models.unet import UNet, UNetConfig
from ldmscale.nn.attention import attention
from ldmscale.nn.blocks import GROUPS, GroupNorm32, Upsample, zero_module


@dataclasses.dataclass
class SemanticEncoderConfig:
    """E_phi. Defaults are the paper's 128 px encoder (64, 128, 256, 256, 256; attention at 16^2, 4 heads)."""

    channels: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256, 256, 256])
    attention_level: int = 2  # attention after the conv producing channels[attention_level]; -1: none
    num_heads: int = 4
    z_dim: int = 512

    def validate(self) -> list[str]:
        problems = []
        if not self.channels or any(c < 1 or c % GROUPS for c in self.channels):
            problems.append(f"channels: must be a non-empty list of multiples of {GROUPS}, got {self.channels}")
        elif not -1 <= self.attention_level < len(self.channels):
            problems.append(f"attention_level: must be -1 or in [0, {len(self.channels)}), got {self.attention_level}")
        elif self.attention_level >= 0 and self.channels[self.attention_level] % self.num_heads:
            problems.append(f"num_heads: {self.num_heads} does not divide channels[{self.attention_level}] "
                            f"= {self.channels[self.attention_level]}")
        if self.z_dim < 1:
            problems.append(f"z_dim: must be >= 1, got {self.z_dim}")
        return problems


@dataclasses.dataclass
class ShiftDecoderConfig:
    """G_psi's new parts; widths, depths and attention positions mirror the pre-trained UNet's."""

    dropout: float = 0.0
    attention_head_channels: int = 64  # head width of G's (unconditioned) self-attention blocks

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.attention_head_channels < 1:
            problems.append(f"attention_head_channels: must be >= 1, got {self.attention_head_channels}")
        return problems


class SelfAttentionBlock(nn.Module):
    """Residual spatial self-attention (ADM `AttentionBlock`): x + proj(attn(GN(x))), proj zero-initialised."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        assert channels % num_heads == 0, "heads must divide the width"
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).flatten(2))  # (B, 3C, N)
        q, k, v = qkv.view(b, 3, self.num_heads, c // self.num_heads, h * w).permute(1, 0, 2, 4, 3)  # (B, H, N, D)
        out = attention(q, k, v)  # (B, H, N, D)
        out = out.permute(0, 1, 3, 2).reshape(b, c, h * w)  # (B, C, N)
        return x + self.proj_out(out).view(b, c, h, w)


class SemanticEncoder(nn.Module):
    """E_phi: (B, C_in, R, R) -> z (B, z_dim). No time input, no normalisation of z (PDAE §3.3)."""

    def __init__(self, cfg: SemanticEncoderConfig, in_channels: int, resolution: int):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid semantic encoder config:\n  " + "\n  ".join(problems))
        side = resolution
        layers: list[nn.Module] = []
        ch = in_channels
        for level, width in enumerate(cfg.channels):
            if level:  # the first conv reads raw pixels / latents: no norm before it
                layers += [GroupNorm32(ch), nn.SiLU()]
            layers.append(nn.Conv2d(ch, width, 3, stride=2, padding=1))
            side = (side + 1) // 2
            ch = width
            if level == cfg.attention_level:
                layers.append(SelfAttentionBlock(ch, cfg.num_heads))
        layers += [GroupNorm32(ch), nn.SiLU(), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(ch * side * side, cfg.z_dim)
        self.in_channels, self.resolution = in_channels, resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.body(x))  # (B, C*s*s) -> (B, z_dim)


class ResBlockShift(nn.Module):
    """PDAE's residual block with AdaGN on both t and z (official `ResBlockShift`):

        h = conv(SiLU(GN(x)));  h = (1 + z_s) * (GN(h) * (1 + t_s) + t_b) + z_b;
        out = skip(x) + zero_conv(Dropout(SiLU(h))).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.emb_z_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = GroupNorm32(out_channels)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, z_emb: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, E), (B, E) -> (B, C_out, H, W)."""
        h = self.in_layers(x)  # (B, C_out, H, W)
        t_s, t_b = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        z_s, z_b = self.emb_z_layers(z_emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = (1 + z_s) * (self.out_norm(h) * (1 + t_s) + t_b) + z_b
        return self.skip_connection(x) + self.out_layers(h)


class ShiftSequential(nn.ModuleList):
    """One decoder block of G: ResBlockShift, then optionally self-attention and an upsampling."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, z_emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, z_emb) if isinstance(layer, ResBlockShift) else layer(x)
        return x


class ShiftDecoder(nn.Module):
    """G_psi's trainable parts: z projection, middle block, decoder half and output head (official
    `label_emb`, `shift_middle_block`, `shift_output_blocks`, `shift_out`), laid out like `unet`'s decoder."""

    def __init__(self, cfg: ShiftDecoderConfig, unet: UNetConfig, z_dim: int):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid shift decoder config:\n  " + "\n  ".join(problems))
        mc = unet.model_channels
        emb_dim = 4 * mc

        def res(ch_in: int, ch_out: int) -> ResBlockShift:
            return ResBlockShift(ch_in, emb_dim, ch_out, cfg.dropout)

        def attn(ch: int) -> SelfAttentionBlock:
            return SelfAttentionBlock(ch, max(ch // cfg.attention_head_channels, 1))

        # The skip widths of the UNet's input blocks, in order (as `UNet.__init__` builds them).
        skip_channels, ds = [mc], 1
        for level, mult in enumerate(unet.channel_mult):
            skip_channels += [mult * mc] * unet.num_res_blocks
            if level != len(unet.channel_mult) - 1:
                skip_channels.append(mult * mc)
                ds *= 2
        ch = skip_channels[-1]
        self.label_emb = nn.Linear(z_dim, emb_dim)  # projects z, despite the official name
        self.shift_middle_block = ShiftSequential([res(ch, ch), attn(ch), res(ch, ch)])
        self.shift_output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(unet.channel_mult))):
            for i in range(unet.num_res_blocks + 1):
                layers: list[nn.Module] = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in unet.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == unet.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.shift_output_blocks.append(ShiftSequential(layers))
        assert not skip_channels, "every frozen skip feature is consumed by exactly one block of G"
        self.shift_out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                       zero_module(nn.Conv2d(ch, unet.out_channels, 3, padding=1)))

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Frozen bottleneck h, frozen skips, frozen time embedding (B, E), z (B, d) -> G (B, C_out, H, W)."""
        skips = list(skips)  # the frozen decoder reads the same list
        z_emb = self.label_emb(z.to(emb.dtype))  # (B, E)
        h = self.shift_middle_block(h, emb, z_emb)
        for block in self.shift_output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, z_emb)  # (B, C + C_skip, H', W') -> (B, C', H'', W'')
        return self.shift_out(h)


@dataclasses.dataclass
class PDAEConfig:
    encoder: SemanticEncoderConfig = dataclasses.field(default_factory=SemanticEncoderConfig)
    decoder: ShiftDecoderConfig = dataclasses.field(default_factory=ShiftDecoderConfig)


class PDAEHeads(nn.Module):
    """Everything PDAE trains: `encoder` (E_phi) and `decoder` (G_psi's new parts).

    `forward(x_enc, h, skips, emb) -> (z, G)` runs both in one call, so that a ZeRO-3 engine gathers
    all parameters within its forward.
    """

    def __init__(self, cfg: PDAEConfig, unet: UNetConfig, *, encoder_channels: int, encoder_resolution: int):
        super().__init__()
        self.encoder = SemanticEncoder(cfg.encoder, encoder_channels, encoder_resolution)
        self.decoder = ShiftDecoder(cfg.decoder, unet, cfg.encoder.z_dim)

    def forward(self, x_enc: torch.Tensor, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x_enc)  # (B, d)
        return z, self.decoder(h, skips, emb, z)


class ShiftedUNet(nn.Module):
    """The frozen UNet and G sharing one encoder-half pass (official `ShiftUNet`):
    `forward(x_t, t, z, context?, y?) -> (UNet output, G)`, both (B, C_out, H, W)."""

    def __init__(self, unet: UNet, heads: PDAEHeads):
        super().__init__()
        self.unet = unet
        self.heads = heads

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, skips, emb = self.unet.encode_features(x_t, t, context, y)
        output = self.unet.decode_features(h, skips, emb, context)
        return output, self.heads.decoder(h, skips, emb, z)
