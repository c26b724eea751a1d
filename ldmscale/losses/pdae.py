"""The PDAE training objective (Zhang, Zhao & Lin 2022, eq. 7 with the eq. 10 weighting):

    L(psi, phi) = E_{x0, t ~ U{0..T-1}, eps} [ lambda_t || eps - (eps_theta(x_t, t) + c_t G(x_t, E(x0), t)) ||^2 ]

with c_t and lambda_t from `diffusion.pdae` on the pre-trained model's own schedule. As the official
code: lambda_t multiplies the element-wise squared error, then a plain mean over all elements
(lambda is never renormalised). eps_theta comes from the frozen network, already converted to eps.
"""

from __future__ import annotations

import torch

from ldmscale.diffusion.pdae import pdae_weight, shift_coefficient
from ldmscale.diffusion.schedule import NoiseSchedule


def pdae_loss(noise: torch.Tensor, eps_theta: torch.Tensor, g: torch.Tensor, t: torch.Tensor,
              schedule: NoiseSchedule, gamma: float = 0.1) -> torch.Tensor:
    """noise, eps_theta, G: (B, C, H, W); t: (B,) -> scalar float32 loss (gradients reach G only)."""
    g = g.float()
    c = shift_coefficient(schedule, t).to(g).view(-1, *([1] * (g.ndim - 1)))  # (B, 1, 1, 1)
    w = pdae_weight(schedule, t, gamma).to(g).view(-1, *([1] * (g.ndim - 1)))
    eps_hat = eps_theta.detach().float() + c * g  # (B, C, H, W)
    return (w * (noise.float() - eps_hat).pow(2)).mean()
