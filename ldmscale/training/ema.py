"""Exponential moving average of a network's weights, with warm-up, that works under ZeRO-3.

Decay follows the power warm-up of Karras et al. / k-diffusion's `EMAWarmup`:
    decay(step) = clamp(1 - (1 + step / inv_gamma) ** -power, min_decay, max_decay)
so early averages track the fast-moving weights and later ones settle near `max_decay`.
Under ZeRO-3 the parameters are gathered for the update (`distributed.zero`): every rank keeps the
full average, so sampling and export from the EMA need no further communication.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ldmscale.distributed.zero import gathered_parameters


@dataclasses.dataclass
class EMAConfig:
    enabled: bool = True
    max_decay: float = 0.9999
    min_decay: float = 0.0
    inv_gamma: float = 1.0
    power: float = 0.75
    start_step: int = 0  # steps before this copy the weights (decay 0)
    update_every: int = 1

    def validate(self) -> list[str]:
        problems = []
        if not 0 <= self.min_decay <= self.max_decay < 1:
            problems.append(f"min_decay/max_decay: need 0 <= min_decay <= max_decay < 1, "
                            f"got {self.min_decay}, {self.max_decay}")
        if self.update_every < 1:
            problems.append(f"update_every: must be >= 1, got {self.update_every}")
        return problems


def ema_decay(step: int, cfg: EMAConfig) -> float:
    if step < cfg.start_step:
        return 0.0
    value = 1 - (1 + (step - cfg.start_step) / cfg.inv_gamma) ** -cfg.power
    return min(cfg.max_decay, max(cfg.min_decay, value))


class EMA:
    """Full-precision shadow copies of a module's parameters; buffers are copied, not averaged
    (a stored statistic such as the autoencoder's latent scale factor must stay exact)."""

    def __init__(self, module: nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.param_names = {name for name, _ in module.named_parameters()}
        with gathered_parameters(module):
            self.shadow = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                           for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> float:
        """Moves the average towards the current weights; collective under ZeRO-3. Returns the decay."""
        decay = ema_decay(step, self.cfg)
        with gathered_parameters(module):
            for name, value in module.state_dict().items():
                avg = self.shadow[name]
                if name in self.param_names:
                    avg.lerp_(value.detach().float(), 1 - decay)
                else:
                    avg.copy_(value)
        return decay

    @torch.no_grad()
    def copy_buffers(self, module: nn.Module) -> None:
        """Takes the module's current buffers (statistics refreshed outside an update, e.g. before a save)."""
        for name, value in module.named_buffers():
            if name in self.shadow:
                self.shadow[name].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
