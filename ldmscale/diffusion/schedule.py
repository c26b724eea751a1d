"""Discrete Gaussian noise schedules (Ho et al. 2020, "DDPM").

Forward process q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) with ab_t = prod_{s<=t} (1 - beta_s)
(DDPM eq. 4), timesteps t = 0 .. T-1. Tables are kept in float64 (the products of 1000 factors and
the differences 1 - ab_t near t = 0 lose digits in float32) and cast to the caller's dtype on use.

Beta schedules:
- `linear`: linspace(beta_start, beta_end) (DDPM uses 1e-4 .. 2e-2);
- `scaled_linear`: linspace(sqrt(beta_start), sqrt(beta_end)) ** 2 (LDM / Stable Diffusion, which
  call it "linear"; 0.00085 .. 0.012);
- `cosine`: Nichol & Dhariwal 2021 eq. 17, ab(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2,
  s = 0.008, betas clipped at 0.999 (beta_start / beta_end are unused).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch

COSINE_OFFSET = 0.008  # Nichol & Dhariwal 2021 §3.2: keeps beta_0 from being vanishingly small
COSINE_MAX_BETA = 0.999  # ibid.: prevents singularities near t = T


@dataclasses.dataclass
class ScheduleConfig:
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def validate(self) -> list[str]:
        problems = []
        if self.num_timesteps < 2:
            problems.append(f"num_timesteps: must be >= 2, got {self.num_timesteps}")
        if self.beta_schedule != "cosine" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            problems.append(f"beta_start: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        return problems


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """(T,) float64 betas of the configured schedule."""
    n = cfg.num_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    if cfg.beta_schedule == "cosine":
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2  # (T+1,)
        return (1 - f[1:] / f[:-1]).clamp(max=COSINE_MAX_BETA)
    raise ValueError(f"beta_schedule: invalid value {cfg.beta_schedule!r}; valid values: linear, scaled_linear, cosine")


class NoiseSchedule:
    """Precomputed float64 tables of one beta schedule, indexed by integer timesteps (B,)."""

    def __init__(self, betas: torch.Tensor):
        assert betas.ndim == 1 and bool((betas > 0).all()) and bool((betas < 1).all()), "betas must lie in (0, 1)"
        self.betas = betas.to(torch.float64)
        self.num_timesteps = len(betas)
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I), DDPM eqs. 6-7.
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        # beta_tilde_0 = 0: the log is floored at 1e-20 as in LDM's register_schedule (matching SD checkpoints).
        self.posterior_log_variance_clipped = torch.log(self.posterior_variance.clamp(min=1e-20))
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)
        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> NoiseSchedule:
        return cls(make_betas(cfg))

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """Table `name` at timesteps t (B,), as (B, 1, ..., 1) broadcastable against `like` in its dtype.

        Without `like` the values come back as float64 (B,) on t's device.
        """
        key = (name, t.device)
        table = self._device_cache.get(key)
        if table is None:  # one host-to-device copy per table and device, not per call
            table = self._device_cache[key] = getattr(self, name).to(t.device)
        values = table[t.long()]  # (B,)
        if like is None:
            return values
        return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps (DDPM eq. 4); (B, ...) -> (B, ...)."""
        signal, sigma = self.gather("sqrt_alphas_cumprod", t, x0), self.gather("sqrt_one_minus_alphas_cumprod", t, x0)
        return signal * x0 + sigma * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ab_t / (1 - ab_t) (Kingma et al. 2021), (B,) float64."""
        ab = self.gather("alphas_cumprod", t)
        return ab / (1 - ab)

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, ...) and variance (B, 1, ..., 1) of q(x_{t-1} | x_t, x_0), DDPM eq. 7."""
        mean = self.gather("posterior_mean_coef1", t, x_t) * x0 + self.gather("posterior_mean_coef2", t, x_t) * x_t
        return mean, self.gather("posterior_variance", t, x_t)

    def original_buffers(self) -> dict[str, torch.Tensor]:
        """The schedule buffers an original LDM/SD checkpoint stores at its top level (float32)."""
        ab = self.alphas_cumprod
        tables = {
            "betas": self.betas,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": self.alphas_cumprod_prev,
            "sqrt_alphas_cumprod": self.sqrt_alphas_cumprod,
            "sqrt_one_minus_alphas_cumprod": self.sqrt_one_minus_alphas_cumprod,
            "log_one_minus_alphas_cumprod": torch.log(1 - ab),
            "sqrt_recip_alphas_cumprod": (1 / ab).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / ab - 1).sqrt(),
            "posterior_variance": self.posterior_variance,
            "posterior_log_variance_clipped": self.posterior_log_variance_clipped,
            "posterior_mean_coef1": self.posterior_mean_coef1,
            "posterior_mean_coef2": self.posterior_mean_coef2,
        }
        return {k: v.float() for k, v in tables.items()}
