"""The stage-1 objective: reconstruction + LPIPS + regulariser + adaptively weighted PatchGAN.

As LDM's `LPIPSWithDiscriminator` (KL) and taming's `VQLPIPSWithDiscriminator` (VQ), following
Esser et al. 2021 (VQGAN, eq. 7):

    nll     = |x - x̂|  (or (x - x̂)^2)  +  perceptual_weight * LPIPS(x, x̂)
    L_G     = nll + kl_weight * KL  (or codebook_weight * L_VQ)  +  disc_factor(step) * λ * g_loss
    λ       = disc_weight * clamp(||∇_L nll|| / (||∇_L g_loss|| + 1e-4), 0, 1e4)      (L: decoder's last layer)
    L_D     = disc_factor(step) * d_loss(D(x), D(x̂))

disc_factor(step) is 0 before `disc_start`. Reduction (`reduction`): `sample_sum` sums the
per-pixel nll over (C, H, W) and averages over the batch, the scale at which LDM's kl_weight 1e-6
was tuned; `mean` averages over all elements as taming's VQ loss does. The KL term is always the
per-sample sum averaged over the batch. LDM's learned output log-variance is left out: with it
initialised to 0 (as LDM does) nll is the plain reconstruction term, and it only ever rescales it.

The discriminator is passed in (it lives in its own engine); the LPIPS network is owned here,
frozen. Returned logs are detached scalar tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch
import torch.nn as nn

from ldmscale.losses.discriminator import D_LOSSES, G_LOSSES, DiscriminatorConfig
from ldmscale.losses.lpips import LPIPS, LPIPSConfig
from ldmscale.models.regularizers import RegularizerOutput

Discriminator = Callable[[torch.Tensor], torch.Tensor]
# Bounds of the adaptive weight and the epsilon of its denominator (taming `calculate_adaptive_weight`).
ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4


@dataclasses.dataclass
class AutoencoderLossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"
    reduction: Literal["sample_sum", "mean"] = "sample_sum"
    perceptual_weight: float = 1.0
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    lpips: LPIPSConfig = dataclasses.field(default_factory=LPIPSConfig)
    discriminator: DiscriminatorConfig = dataclasses.field(default_factory=DiscriminatorConfig)

    def validate(self) -> list[str]:
        problems = []
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            problems.append(f"disc_start: must be >= 0, got {self.disc_start}")
        return problems


def adopt_weight(weight: float, step: int, threshold: int) -> float:
    """`weight` from step `threshold` on, 0 before (taming `adopt_weight`)."""
    return weight if step >= threshold else 0.0


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||∇_L nll|| / (||∇_L g_loss|| + 1e-4), clamped to [0, 1e4] and detached (VQGAN eq. 7).

    Balances the GAN gradient against the reconstruction gradient at the decoder's last layer.
    The graph is retained because the caller backpropagates the total loss afterwards.
    """
    (nll_grad,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = nll_grad.float().norm() / (g_grad.float().norm() + ADAPTIVE_EPS)
    return weight.clamp(0.0, ADAPTIVE_MAX).detach()


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the autoencoder stage; see the module docstring."""

    def __init__(self, cfg: AutoencoderLossConfig):
        super().__init__()
        problems = cfg.validate()
        if problems:
            raise ValueError("invalid autoencoder loss config:\n  " + "\n  ".join(problems))
        self.cfg = cfg
        # No VGG at all when the perceptual term is off (cheap debug runs).
        self.lpips = LPIPS(cfg.lpips) if cfg.perceptual_weight > 0 else None
        self.reg_weights = {"kl": cfg.kl_weight, "codebook": cfg.codebook_weight}
        self.d_loss_fn = D_LOSSES[cfg.disc_loss]
        self.g_loss_fn = G_LOSSES[cfg.disc_loss]

    def disc_factor(self, step: int) -> float:
        return adopt_weight(self.cfg.disc_factor, step, self.cfg.disc_start)

    def _reduce(self, per_pixel: torch.Tensor) -> torch.Tensor:
        if self.cfg.reduction == "sample_sum":
            return per_pixel.sum() / per_pixel.shape[0]
        return per_pixel.mean()

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, reg_out: RegularizerOutput,
                       step: int, last_layer: torch.Tensor,
                       discriminator: Discriminator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss at `step`; inputs and reconstructions are (B, C, H, W) in [-1, 1].

        `last_layer` must be a plain tensor in the autograd graph of `reconstructions` (ZeRO 0-2).
        Without a graph (validation under no_grad) the adaptive weight is 0, as in LDM. The
        adversarial term also sends gradients into the discriminator's parameters; the caller
        freezes it (requires_grad_(False)) or discards those gradients in the generator step.
        """
        x, xr = inputs, reconstructions
        diff = xr.float() - x.float()  # (B, C, H, W)
        rec = diff.abs() if self.cfg.reconstruction == "l1" else diff.pow(2)
        per_pixel = rec
        logs: dict[str, torch.Tensor] = {"rec": rec.detach().mean()}
        if self.lpips is not None:
            p = self.lpips(x, xr)  # (B,)
            # LDM adds the per-image LPIPS to every pixel's reconstruction error before reducing.
            per_pixel = rec + self.cfg.perceptual_weight * p.view(-1, 1, 1, 1)
            logs["lpips"] = p.detach().mean()
        nll = self._reduce(per_pixel)

        reg_loss = torch.zeros((), device=nll.device)
        for name, term in reg_out.losses.items():
            assert name in self.reg_weights, f"unknown regulariser loss term {name!r}"
            reg_loss = reg_loss + self.reg_weights[name] * term.float()
            logs[name] = term.detach()
        logs.update({k: v.detach() for k, v in reg_out.stats.items()})

        factor = self.disc_factor(step)
        if factor > 0:
            g_loss = self.g_loss_fn(discriminator(xr).float())
            can_differentiate = torch.is_grad_enabled() and nll.requires_grad and g_loss.requires_grad
            d_weight = (adaptive_weight(nll, g_loss, last_layer) * self.cfg.disc_weight if can_differentiate
                        else torch.zeros((), device=nll.device))
            loss = nll + reg_loss + d_weight * factor * g_loss
        else:
            # Before disc_start the adversarial term is absent; g_loss is still measured for the logs.
            with torch.no_grad():
                g_loss = self.g_loss_fn(discriminator(xr.detach()).float())
            d_weight = torch.zeros((), device=nll.device)
            loss = nll + reg_loss
        logs.update({"nll": nll.detach(), "g_loss": g_loss.detach(), "d_weight": d_weight.detach(),
                     "disc_factor": torch.tensor(factor, device=nll.device), "loss": loss.detach()})
        return loss, logs

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int,
                           discriminator: Discriminator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss at `step`; zero-weighted (but still differentiable) before disc_start."""
        logits_real = discriminator(inputs.detach()).float()  # (B, 1, H', W')
        logits_fake = discriminator(reconstructions.detach()).float()
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        factor = self.disc_factor(step)
        loss = factor * d_loss
        logs = {"d_loss": d_loss.detach(), "disc_factor": torch.tensor(factor, device=d_loss.device),
                "loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
        return loss, logs

