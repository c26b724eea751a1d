"""`RunConfig`: the sections every run has, composed from the components' own config classes."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import ldmscale.training.tasks  # noqa: F401  (registers the stages)
from ldmscale.config.load import load_config
from ldmscale.config.registry import polymorphic
from ldmscale.data.shards import DATA_SOURCES, ImageDataConfig
from ldmscale.distributed.engine import DistributedConfig
from ldmscale.observability.metrics import LoggingConfig
from ldmscale.training.ema import EMAConfig
from ldmscale.training.optim import OptimConfig
from ldmscale.training.task import TASKS


@dataclasses.dataclass
class RunDirConfig:
    dir: str = "runs/default"


@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    log_every: int = 10
    image_every: int = 500  # 0 disables image grids
    validate_every: int = 1000  # 0 disables validation
    max_consecutive_nonfinite: int = 10  # abort after this many non-finite losses in a row
    progress: bool = True

    def validate(self) -> list[str]:
        problems = []
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("image_every", "validate_every"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        return problems


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3

    def validate(self) -> list[str]:
        problems = []
        if self.every_steps < 1:
            problems.append(f"every_steps: must be >= 1, got {self.every_steps}")
        if self.keep_last < 1:
            problems.append(f"keep_last: must be >= 1, got {self.keep_last}")
        return problems


@dataclasses.dataclass
class RunConfig:
    stage: str  # selects the class of `task`: autoencoder | latent_diffusion | pdae
    seed: int = 0
    attention: Literal["auto", "xformers", "sdpa", "math"] = "auto"
    run: RunDirConfig = dataclasses.field(default_factory=RunDirConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    data: ImageDataConfig = polymorphic(DATA_SOURCES, "images")
    task: Any = polymorphic(TASKS, "autoencoder", kind_from="stage")


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """The run config from a YAML file and `key.sub=value` overrides; `ValueError` lists every problem."""
    return load_config(RunConfig, path, overrides)
