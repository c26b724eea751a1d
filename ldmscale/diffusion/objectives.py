"""What the network predicts (eps, v or x0), its regression target, and the loss weighting.

With x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (DDPM eq. 4), the three parameterisations are affine maps
of one another given (x_t, t):
- eps (Ho et al. 2020, eq. 12's simple loss);
- x0, the clean sample;
- v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022, §4 / App. D), so that
  x0 = sqrt(ab) x_t - sqrt(1 - ab) v and eps = sqrt(1 - ab) x_t + sqrt(ab) v.

Each kind is a `Registry("prediction")` entry; the loss weightings (uniform, min-SNR-gamma of
Hang et al. 2023) are a `Registry("loss_weighting")`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod

import torch

from ldmscale.config.registry import Registry
from ldmscale.diffusion.schedule import NoiseSchedule

PREDICTIONS = Registry("prediction")
LOSS_WEIGHTINGS = Registry("loss_weighting")


def _coefs(schedule: NoiseSchedule, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(ab_t), sqrt(1 - ab_t)) as (B, 1, ..., 1) in like's dtype."""
    return schedule.gather("sqrt_alphas_cumprod", t, like), schedule.gather("sqrt_one_minus_alphas_cumprod", t, like)


def x0_from_eps(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    a, s = _coefs(schedule, t, x_t)
    return (x_t - s * eps) / a


def eps_from_x0(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    a, s = _coefs(schedule, t, x_t)
    return (x_t - a * x0) / s


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    a, s = _coefs(schedule, t, x0)
    return a * eps - s * x0


class Prediction(ABC):
    """One parameterisation of the network output; all methods take (B, ...) tensors and (B,) timesteps."""

    kind: str

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """The regression target for x_t = q_sample(x0, t, noise)."""

    @abstractmethod
    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the network `output` at (x_t, t)."""

    def to_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        return self.to_x0_eps(output, x_t, t, schedule)[0]

    def to_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        return self.to_x0_eps(output, x_t, t, schedule)[1]

    def to_v(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        return v_from_x0_eps(*self.to_x0_eps(output, x_t, t, schedule), t, schedule)


class EpsPrediction(Prediction):
    kind = "eps"

    def target(self, x0, noise, t, schedule):
        return noise

    def to_x0_eps(self, output, x_t, t, schedule):
        return x0_from_eps(output, x_t, t, schedule), output


class VPrediction(Prediction):
    kind = "v"

    def target(self, x0, noise, t, schedule):
        return v_from_x0_eps(x0, noise, t, schedule)

    def to_x0_eps(self, output, x_t, t, schedule):
        a, s = _coefs(schedule, t, x_t)
        return a * x_t - s * output, s * x_t + a * output


class X0Prediction(Prediction):
    kind = "x0"

    def target(self, x0, noise, t, schedule):
        return x0

    def to_x0_eps(self, output, x_t, t, schedule):
        return output, eps_from_x0(output, x_t, t, schedule)


@dataclasses.dataclass
class EpsPredictionConfig:
    kind: str = "eps"


@dataclasses.dataclass
class VPredictionConfig:
    kind: str = "v"


@dataclasses.dataclass
class X0PredictionConfig:
    kind: str = "x0"


PREDICTIONS.register("eps", EpsPredictionConfig, lambda cfg: EpsPrediction())
PREDICTIONS.register("v", VPredictionConfig, lambda cfg: VPrediction())
PREDICTIONS.register("x0", X0PredictionConfig, lambda cfg: X0Prediction())


def build_prediction(cfg) -> Prediction:
    """`cfg` is one of the prediction configs (or a kind string)."""
    if isinstance(cfg, str):
        cfg = PREDICTIONS.config_class(cfg)()
    return PREDICTIONS.build(cfg)


class LossWeighting(ABC):
    """Per-sample loss weights w(t) (B,) for `diffusion_loss`."""

    @abstractmethod
    def __call__(self, t: torch.Tensor, schedule: NoiseSchedule, prediction: Prediction) -> torch.Tensor: ...


class UniformWeighting(LossWeighting):
    def __call__(self, t, schedule, prediction):
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023, eq. 9): the x0-space weight min(SNR, gamma), rewritten per target.

    An eps loss equals an x0 loss times 1/SNR and a v loss equals it times 1/(SNR + 1), so the weight
    applied to the MSE of each target is min(SNR, gamma) divided by that factor's inverse.
    """

    def __init__(self, gamma: float):
        self.gamma = gamma

    def __call__(self, t, schedule, prediction):
        snr = schedule.snr(t)  # (B,) float64
        clipped = snr.clamp(max=self.gamma)
        if prediction.kind == "eps":
            w = clipped / snr
        elif prediction.kind == "v":
            w = clipped / (snr + 1)
        else:
            w = clipped
        return w.float()


@dataclasses.dataclass
class UniformWeightingConfig:
    kind: str = "uniform"


@dataclasses.dataclass
class MinSNRWeightingConfig:
    kind: str = "min_snr"
    gamma: float = 5.0

    def validate(self) -> list[str]:
        return [] if self.gamma > 0 else [f"gamma: must be positive, got {self.gamma}"]


LOSS_WEIGHTINGS.register("uniform", UniformWeightingConfig, lambda cfg: UniformWeighting())
LOSS_WEIGHTINGS.register("min_snr", MinSNRWeightingConfig, lambda cfg: MinSNRWeighting(cfg.gamma))


def per_sample_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all but the batch dimension, in float32: (B, ...) -> (B,)."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def diffusion_loss(output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of w_b * MSE_b (DDPM eq. 14 with per-sample weights; PDAE passes its own lambda_t)."""
    mse = per_sample_mse(output, target)  # (B,)
    if weights is not None:
        assert weights.shape == mse.shape, f"weights must be (B,) = {tuple(mse.shape)}, got {tuple(weights.shape)}"
        mse = mse * weights.to(mse)
    return mse.mean()
