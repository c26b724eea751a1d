"""A `Task` is one training stage: it builds its networks and engines and implements one step.

The `Trainer` owns everything else (iteration, accumulation, EMA, cadence, checkpoints, signals),
so a stage changes only what differs: which modules train, with which losses.
"""

from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ldmscale.config.registry import Registry
from ldmscale.distributed.engine import Engine
from ldmscale.distributed.env import ProcessEnv
from ldmscale.training.ema import EMA
from ldmscale.training.optim import OptimConfig, build_lr_scheduler, build_optimizer

if TYPE_CHECKING:
    from ldmscale.config.schema import RunConfig

# kind -> (task config class, Task subclass); the run's `stage` selects the kind.
TASKS = Registry("stage", kind_field=False)


@dataclasses.dataclass
class Component:
    """A named network of a stage, for `ldmscale info`: its module and whether it is trained."""

    module: nn.Module
    trainable: bool


class Task(abc.ABC):
    def __init__(self, cfg: RunConfig, *, penv: ProcessEnv, run_dir: Path):
        self.cfg = cfg
        self.penv = penv
        self.run_dir = run_dir
        self.engines: dict[str, Engine] = {}
        # The trainer's EMA of each `ema_targets()` network (full weights on every rank), set by the
        # Trainer once built; empty when EMA is off. Sample grids read the averaged weights from it.
        self.emas: dict[str, EMA] = {}

    @classmethod
    @abc.abstractmethod
    def build_components(cls, cfg: RunConfig) -> dict[str, Component]:
        """Builds every network of the stage with the config's architecture (weights random).

        Called on the meta device by `ldmscale info`, so it must not load files or touch data.
        """

    @abc.abstractmethod
    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        """One micro-batch: forward, `engine.backward_step(loss)` per engine; returns scalars to log."""

    def ema_targets(self) -> dict[str, nn.Module]:
        """The networks whose weights are averaged (by default every engine's)."""
        return {name: engine.module for name, engine in self.engines.items()}

    def log_images(self, batch: dict[str, Any], step: int, images_dir: Path) -> None:
        """Writes PNGs a person would look at; runs on every rank (collectives), writes on the main one."""

    def validate(self, step: int) -> dict[str, float]:
        return {}

    def before_save(self, step: int) -> None:
        """Runs on every rank right before a checkpoint is written (statistics to refresh)."""

    def export_metadata(self) -> dict[str, Any]:
        """Extra metadata for the exported weights (for example the latent scale factor)."""
        return {}

    def export_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adjusts the exported weights of network `name` (by default unchanged)."""
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Extra tensors a checkpoint must carry (the same on every rank)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no extra state, got keys {sorted(state)}")

    def make_engine(self, name: str, module: nn.Module, optim: OptimConfig) -> Engine:
        cfg = self.cfg
        optimizer = build_optimizer(module.parameters(), optim)
        scheduler = build_lr_scheduler(optimizer, optim, cfg.train.max_steps)
        engine = Engine(name, module, optimizer, scheduler, cfg.distributed,
                        micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                        grad_clip=optim.grad_clip, world_size=self.penv.world_size)
        self.engines[name] = engine
        return engine

    @property
    def device(self) -> torch.device:
        return self.penv.device
