"""The PDAE noise process: mean-shift coefficients, loss weighting and shifted samplers
(Zhang, Zhao & Lin 2022, "Unsupervised Representation Learning from Pre-trained DPMs").

The pre-trained DPM's posterior mean mu_theta(x_t, t) misses the true mu~_t(x_t, x0); PDAE fills the
gap with Sigma_t * G(x_t, z, t), z = E(x0) (§3.2). In eps-space, with the pre-trained model's own
schedule (ab_{-1} := 1):

- training / DDPM (eq. 7):  eps_hat = eps_theta + c_t G,  c_t = -sqrt(a_t) (1 - ab_{t-1}) / sqrt(1 - ab_t)
  (c_0 = 0, so G gets no gradient at t = 0);
- DDIM / ODE (eq. 6, score conditioning):  eps_hat = eps_theta - sqrt(1 - ab_t) G.
  The two differ slightly at small t; both are used exactly as written.
- loss weight (eq. 10):  lambda_t = SNR^gamma / (1 + SNR), gamma = 0.1 (peaks at SNR = gamma / (1 - gamma)).

A pre-trained model predicting v or x0 is converted to eps before the shift. Nothing clamps the
predicted x0 (the official [-1, 1] clamp is for pixels; latents are unbounded).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from ldmscale.diffusion.objectives import EpsPrediction, Prediction
from ldmscale.diffusion.samplers import Cond, SamplerStep, ddim_invert, ddim_sample, ddpm_sample
from ldmscale.diffusion.schedule import NoiseSchedule

# (x_t, t, z, cond) -> (pre-trained network output, G), e.g. `ShiftedUNet` called with **cond.
ShiftedModel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Coefficient = Literal["ddpm", "ddim"]
Z_KEY = "z"  # the cond entry holding z; every other entry goes to the UNet (context=, y=)


def shift_coefficient(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """c_t = -sqrt(a_t) (1 - ab_{t-1}) / sqrt(1 - ab_t) (PDAE eq. 7 / official `shift_coef`): (B,) float64."""
    alpha = schedule.gather("alphas", t)
    ab_prev = schedule.gather("alphas_cumprod_prev", t)  # ab_{-1} = 1
    return -alpha.sqrt() * (1 - ab_prev) / schedule.gather("sqrt_one_minus_alphas_cumprod", t)


def ddim_shift_coefficient(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """-sqrt(1 - ab_t), the coefficient of G in the shifted DDIM eps (PDAE eq. 6): (B,) float64."""
    return -schedule.gather("sqrt_one_minus_alphas_cumprod", t)


def pdae_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """lambda_t = (1 / (1 + SNR))^(1 - gamma) (SNR / (1 + SNR))^gamma = SNR^gamma / (1 + SNR) (PDAE eq. 10).

    (B,) float64."""
    snr = schedule.snr(t)
    return snr ** gamma / (1 + snr)


class ShiftedDenoiser:
    """Sampler-signature denoiser `(x_t, t, cond) -> eps_hat` of the shifted model; sample with `EpsPrediction`.

    eps_hat = eps_theta + scale * coef_t * G, coef from `coefficient` ("ddim": -sqrt(1 - ab_t); "ddpm":
    c_t). `scale` multiplies G (0: the pre-trained model; > 1: the truncation-like effect of §4.4).
    The shift is off at timesteps below `stop_below` (the official `stop_percent` for sampling from a
    generated z). `cond[Z_KEY]` is z (B, d); the rest are the UNet's keyword inputs.
    """

    def __init__(self, model: ShiftedModel, schedule: NoiseSchedule, prediction: Prediction, *,
                 coefficient: Coefficient = "ddim", scale: float = 1.0, stop_below: int = 0):
        if coefficient not in ("ddim", "ddpm"):
            raise ValueError(f"coefficient: invalid value {coefficient!r}; valid values: ddim, ddpm")
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.coefficient, self.scale, self.stop_below = coefficient, scale, stop_below

    def coef(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """scale * coef_t as (B, 1, ..., 1), zero where t < stop_below."""
        fn = ddim_shift_coefficient if self.coefficient == "ddim" else shift_coefficient
        coef = fn(self.schedule, t) * self.scale * (t >= self.stop_below).to(torch.float64)  # (B,)
        return coef.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        cond = dict(cond)
        z = cond.pop(Z_KEY)
        output, g = self.model(x_t, t, z, **cond)  # (B, C, H, W) each
        eps_theta = self.prediction.to_eps(output.to(x_t.dtype), x_t, t, self.schedule)
        return eps_theta + self.coef(t, x_t) * g.to(x_t.dtype)


def _cond(z: torch.Tensor, cond: Cond | None) -> dict[str, torch.Tensor]:
    if cond and Z_KEY in cond:
        raise ValueError(f"cond: the key {Z_KEY!r} is reserved for PDAE's z")
    return {**(cond or {}), Z_KEY: z}


def shifted_ddim_sample(model: ShiftedModel, x_T: torch.Tensor, z: torch.Tensor, schedule: NoiseSchedule, *,
                        prediction: Prediction, cond: Cond | None = None, steps: int = 100, eta: float = 0.0,
                        scale: float = 1.0, stop_below: int = 0, generator: torch.Generator | None = None,
                        callback: Callable[[SamplerStep], None] | None = None) -> torch.Tensor:
    """Decoding x_T -> x_0 given z: DDIM (Song et al. 2021 eq. 12) with the PDAE eq. 6 eps."""
    denoiser = ShiftedDenoiser(model, schedule, prediction, coefficient="ddim", scale=scale, stop_below=stop_below)
    return ddim_sample(denoiser, x_T, schedule, prediction=EpsPrediction(), cond=_cond(z, cond), steps=steps,
                       eta=eta, generator=generator, callback=callback)


def shifted_ddim_invert(model: ShiftedModel, x0: torch.Tensor, z: torch.Tensor, schedule: NoiseSchedule, *,
                        prediction: Prediction, cond: Cond | None = None, steps: int = 100, scale: float = 1.0,
                        fixed_point_iters: int = 0,
                        callback: Callable[[SamplerStep], None] | None = None) -> torch.Tensor:
    """Encoding x_0 -> x_T with the image's own z (PDAE eq. 8, DDIM §4.3, with the eq. 6 eps)."""
    denoiser = ShiftedDenoiser(model, schedule, prediction, coefficient="ddim", scale=scale)
    return ddim_invert(denoiser, x0, schedule, prediction=EpsPrediction(), cond=_cond(z, cond), steps=steps,
                       fixed_point_iters=fixed_point_iters, callback=callback)


def shifted_ddpm_sample(model: ShiftedModel, x_T: torch.Tensor, z: torch.Tensor, schedule: NoiseSchedule, *,
                        prediction: Prediction, cond: Cond | None = None, scale: float = 1.0,
                        generator: torch.Generator | None = None,
                        callback: Callable[[SamplerStep], None] | None = None) -> torch.Tensor:
    """Ancestral sampling from N(mu_theta + Sigma_t G, Sigma_t) (PDAE §3.2): the full chain, because
    c_t is defined between consecutive timesteps; Sigma_t is the fixed-small posterior variance."""
    denoiser = ShiftedDenoiser(model, schedule, prediction, coefficient="ddpm", scale=scale)
    return ddpm_sample(denoiser, x_T, schedule, prediction=EpsPrediction(), cond=_cond(z, cond), steps=None,
                       generator=generator, callback=callback)


@torch.no_grad()
def x0_prediction_errors(model: ShiftedModel, x0: torch.Tensor, z: torch.Tensor, t: int, schedule: NoiseSchedule, *,
                         prediction: Prediction, cond: Cond | None = None,
                         generator: torch.Generator | None = None) -> tuple[float, float]:
    """Mean squared error of the one-step x0 prediction at timestep `t`, (pre-trained, shifted).

    x_t = q_sample(x0, t, eps); x0_hat = (x_t - sqrt(1 - ab_t) eps_hat) / sqrt(ab_t) with eps_hat the
    pre-trained eps_theta, then eps_theta + c_t G (the training-time, posterior-mean form). The shift fills
    the posterior-mean gap (§3.2) exactly when the second error is below the first.
    """
    ts = torch.full((len(x0),), t, device=x0.device, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    x_t = schedule.q_sample(x0, ts, noise)
    output, g = model(x_t, ts, z, **(cond or {}))
    eps_theta = prediction.to_eps(output.to(x_t.dtype), x_t, ts, schedule)
    c = shift_coefficient(schedule, ts).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    ab = schedule.gather("alphas_cumprod", ts, x_t)

    def x0_error(eps: torch.Tensor) -> float:
        return float(((x_t - (1 - ab).sqrt() * eps) / ab.sqrt() - x0).pow(2).mean())

    return x0_error(eps_theta), x0_error(eps_theta + c * g.to(x_t.dtype))
