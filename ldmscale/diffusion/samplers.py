"""Samplers of the discrete-time DPM: DDPM ancestral sampling, DDIM (with eta) and DDIM inversion.

All samplers share one call signature,

    sampler(denoiser, x, schedule, *, prediction, cond=None, steps=None, generator=None, callback=None, ...)

where `denoiser(x_t (B,...), t (B,) long, cond) -> network output` is any callable (a UNet adapter,
a `CFGDenoiser`, an analytic model in tests) and `prediction` converts its output to (x0, eps).
`callback(SamplerStep)` is called after every step. Nothing is clamped unless `clip_x0` is given
(latents are not bounded).

References: Ho et al. 2020 (DDPM, Alg. 2, eqs. 6-7); Song et al. 2021 (DDIM, eqs. 12 and 16,
§4.2 sub-sequences, §4.3 / eq. 13 deterministic encoding x0 -> x_T).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal, Mapping

import torch

from ldmscale.diffusion.objectives import Prediction
from ldmscale.diffusion.schedule import NoiseSchedule

Cond = Mapping[str, torch.Tensor]
Denoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
Spacing = Literal["uniform", "quadratic"]
QUADRATIC_MAX_FRACTION = 0.8  # DDIM's released code spaces quadratic sequences up to 0.8 T


@dataclasses.dataclass
class SamplerStep:
    """What a callback sees after one step: `x` is the new state at timestep `t_next` (-1: clean)."""

    index: int
    t: int
    t_next: int
    x: torch.Tensor
    x0: torch.Tensor


def model_denoiser(model: torch.nn.Module) -> Denoiser:
    """Adapts a network called as `model(x, t, **cond)` (the UNet: context=, y=) to the denoiser signature."""

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return model(x, t, **(cond or {}))

    return denoise


def timestep_sequence(num_timesteps: int, steps: int, spacing: Spacing = "uniform") -> list[int]:
    """Increasing sub-sequence tau of 0 .. T-1 with `steps` elements (DDIM §4.2 and App. D.2).

    uniform: tau_i = floor(i T / S) (= range(0, T, T // S) when S divides T);
    quadratic: tau_i = floor(c i^2) reaching 0.8 T, as DDIM's code; repeated values (small i at large
    S) are bumped up by one so that all S steps are distinct.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: must be in [1, {num_timesteps}] (the schedule's num_timesteps), got {steps}")
    if spacing == "uniform":
        return [i * num_timesteps // steps for i in range(steps)]
    if spacing == "quadratic":
        top = QUADRATIC_MAX_FRACTION * num_timesteps
        seq = [int(top * (i / max(steps - 1, 1)) ** 2) for i in range(steps)]
        for i in range(1, steps):
            seq[i] = max(seq[i], seq[i - 1] + 1)
        if seq[-1] >= num_timesteps:
            raise ValueError(f"steps: {steps} quadratic steps do not fit in {num_timesteps} timesteps; use uniform")
        return seq
    raise ValueError(f"timestep_spacing: invalid value {spacing!r}; valid values: uniform, quadratic")


def _sequence(schedule: NoiseSchedule, steps: int | None, spacing: Spacing) -> list[int]:
    """The sub-sequence for `steps` (None: every timestep)."""
    return timestep_sequence(schedule.num_timesteps, schedule.num_timesteps if steps is None else steps, spacing)


def _alpha_bar(schedule: NoiseSchedule, t: int) -> float:
    """ab_t in float64; ab_{-1} = 1 stands for the clean data at the end of sampling."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def posterior_coefs(ab_t: float, ab_s: float) -> tuple[float, float, float]:
    """q(x_s | x_t, x0) = N(c1 x0 + c2 x_t, var) for s < t, with beta' = 1 - ab_t / ab_s.

    DDPM eq. 7 with s in place of t - 1 (for s = t - 1 these are the schedule's posterior tables).
    """
    beta = 1 - ab_t / ab_s
    c1 = math.sqrt(ab_s) * beta / (1 - ab_t)
    c2 = math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)
    return c1, c2, beta * (1 - ab_s) / (1 - ab_t)


def ddim_sigma(ab_t: float, ab_prev: float, eta: float) -> float:
    """DDIM eq. 16: sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev).

    With eta = 1 and consecutive timesteps this is the DDPM posterior std sqrt(beta_tilde_t).
    """
    return eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))


def _predict(denoiser: Denoiser, prediction: Prediction, schedule: NoiseSchedule, x: torch.Tensor, t: int,
             cond: Cond | None, clip_x0: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) at (x, t); with clip_x0 the clamped x0 and the eps consistent with it and x."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    output = denoiser(x, tt, cond).to(x.dtype)
    x0, eps = prediction.to_x0_eps(output, x, tt, schedule)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        ab = _alpha_bar(schedule, t)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
    return x0, eps


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, x_T: torch.Tensor, schedule: NoiseSchedule, *, prediction: Prediction,
                cond: Cond | None = None, steps: int | None = None, generator: torch.Generator | None = None,
                callback: Callable[[SamplerStep], None] | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """Ancestral sampling x_T -> x_0 from p(x_{s} | x_t) = q(x_s | x_t, x0_hat) (DDPM Alg. 2 / eq. 7).

    `steps=None` runs the full chain t = T-1 .. 0. Fewer steps use the uniform sub-sequence with the
    respaced process beta'_t = 1 - ab_t / ab_s (Nichol & Dhariwal 2021 App. B), whose posterior is
    the same formula with s in place of t - 1; no noise is added on the last step.
    """
    seq = _sequence(schedule, steps, "uniform")
    x = x_T
    for i, (t, s) in enumerate(zip(reversed(seq), list(reversed(seq))[1:] + [-1])):
        x0, _ = _predict(denoiser, prediction, schedule, x, t, cond, clip_x0)
        c1, c2, var = posterior_coefs(_alpha_bar(schedule, t), _alpha_bar(schedule, s))
        x = c1 * x0 + c2 * x
        if s >= 0:
            x = x + math.sqrt(var) * _noise(x, generator)
        if callback is not None:
            callback(SamplerStep(i, t, s, x, x0))
    return x


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, x_T: torch.Tensor, schedule: NoiseSchedule, *, prediction: Prediction,
                cond: Cond | None = None, steps: int | None = 50, generator: torch.Generator | None = None,
                callback: Callable[[SamplerStep], None] | None = None, eta: float = 0.0,
                timestep_spacing: Spacing = "uniform", clip_x0: float | None = None) -> torch.Tensor:
    """DDIM generalised step (eq. 12) over a sub-sequence tau (§4.2):

        x_s = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma z,  sigma = sigma(eta) (eq. 16).

    eta = 0 is the deterministic DDIM sampler; eta = 1 with all timesteps is DDPM. The last step
    goes to ab = 1, i.e. returns x0_hat.
    """
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    seq = _sequence(schedule, steps, timestep_spacing)
    x = x_T
    for i, (t, s) in enumerate(zip(reversed(seq), list(reversed(seq))[1:] + [-1])):
        x0, eps = _predict(denoiser, prediction, schedule, x, t, cond, clip_x0)
        ab_t, ab_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
        sigma = ddim_sigma(ab_t, ab_s, eta)
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
        if callback is not None:
            callback(SamplerStep(i, t, s, x, x0))
    return x


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, schedule: NoiseSchedule, *, prediction: Prediction,
                cond: Cond | None = None, steps: int | None = 50, generator: torch.Generator | None = None,
                callback: Callable[[SamplerStep], None] | None = None, timestep_spacing: Spacing = "uniform",
                fixed_point_iters: int = 0) -> torch.Tensor:
    """Deterministic DDIM encoding x_0 -> x_T (Song et al. 2021 §4.3): the eta = 0 step run forwards.

    Going up from s to t (s < t, ab_{-1} = 1 for the clean start) solves
        x_s = sqrt(ab_s) x0_hat(x_t) + sqrt(1 - ab_s) eps_hat(x_t)
    for x_t, i.e. x_t = sqrt(ab_t / ab_s) x_s + (sqrt(1 - ab_t) - sqrt(ab_t / ab_s) sqrt(1 - ab_s)) eps_hat(x_t).
    The usual inversion evaluates eps_hat at (x_s, t) instead of (x_t, t); `fixed_point_iters` > 0
    re-evaluates it at the current estimate of x_t that many more times, which converges to the
    exact inverse of `ddim_sample`'s step for the same sub-sequence (x_T then samples back to x_0
    to within the fixed point's residual). `generator` is unused (the map is deterministic).
    """
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters: must be >= 0, got {fixed_point_iters}")
    seq = _sequence(schedule, steps, timestep_spacing)
    x = x0
    for i, (s, t) in enumerate(zip([-1] + seq[:-1], seq)):
        ab_t, ab_s = _alpha_bar(schedule, t), _alpha_bar(schedule, s)
        scale = math.sqrt(ab_t / ab_s)
        coef = math.sqrt(1 - ab_t) - scale * math.sqrt(1 - ab_s)
        x_t = x
        for _ in range(1 + fixed_point_iters):
            x0_hat, eps = _predict(denoiser, prediction, schedule, x_t, t, cond, None)
            x_t = scale * x + coef * eps
        x = x_t
        if callback is not None:
            callback(SamplerStep(i, s, t, x, x0_hat))
    return x

