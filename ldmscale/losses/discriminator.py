"""PatchGAN discriminator and GAN losses of the autoencoder stage.

`NLayerDiscriminator` is pix2pix's PatchGAN (Isola et al. 2017, §3.2.2) as used by taming-transformers
`discriminator/model.py` and LDM: 4x4 convs, stride 2 for the first `n_layers`, LeakyReLU(0.2), one
logit per 70x70 receptive patch (n_layers 3). Modules sit in `main.{i}` as in taming, so its
discriminator checkpoints load.

Normalisation: LDM uses BatchNorm. Under data parallelism each rank then normalises with its own
micro-batch statistics and keeps its own running statistics (buffers are not averaged), so ranks
drift apart slightly; `norm: group` avoids batch statistics altogether and is the choice for
multi-rank runs that need rank-independent behaviour.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_GROUPS = 32


@dataclasses.dataclass
class DiscriminatorConfig:
    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3
    norm: Literal["batch", "group", "none"] = "batch"

    def validate(self) -> list[str]:
        problems = []
        if self.input_nc <= 0:
            problems.append(f"input_nc: must be positive, got {self.input_nc}")
        if self.n_layers < 1:
            problems.append(f"n_layers: must be at least 1, got {self.n_layers}")
        if self.norm == "group" and self.ndf % NORM_GROUPS:
            problems.append(f"ndf: must be a multiple of {NORM_GROUPS} with norm 'group', got {self.ndf}")
        return problems


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(NORM_GROUPS, channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """(B, input_nc, H, W) -> patch logits (B, 1, H', W'); H' = H / 2^n_layers - 2 for H >= 2^(n_layers+2)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid discriminator config:\n  " + "\n  ".join(problems))
        ndf, bias = cfg.ndf, cfg.norm == "none"  # a conv followed by a norm needs no bias
        layers: list[nn.Module] = [nn.Conv2d(cfg.input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, cfg.n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < cfg.n_layers else 1  # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                       _norm(cfg.norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast so that an fp32 image batch can meet a bf16/fp16 discriminator.
        return self.main(x.to(self.main[0].weight.dtype))


def _init_weights(m: nn.Module) -> None:
    """taming `weights_init`: conv weights N(0, 0.02); norm scales N(1, 0.02), shifts 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) (Lim & Ye 2017; taming `hinge_d_loss`)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[-log sigmoid(D(x))] + E[-log(1 - sigmoid(D(G(z))))]) written with softplus."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))], the generator side of the hinge GAN (what LDM/taming use for both losses)."""
    return -logits_fake.mean()


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss E[-log sigmoid(D(G(z)))] (Goodfellow et al. 2014, §3)."""
    return F.softplus(-logits_fake).mean()


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "vanilla": vanilla_g_loss}
