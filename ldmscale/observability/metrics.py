"""Metrics to the console, `metrics.jsonl` and wandb (offline by default), from the main rank only."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import secrets
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "ldmscale"
    # The WANDB_MODE environment variable, when set, wins over this.
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or the process's peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def truncate_metrics(path: Path, after_step: int) -> int:
    """Drops records of steps after `after_step` (they are redone after a resume); returns how many."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            dropped += 1
            continue
        if record.get("step", 0) > after_step:
            dropped += 1
        else:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))
    return dropped


class MetricsLogger:
    """Writes one JSON object per logged step; mirrors it to wandb and a console line."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, *, enabled: bool, run_config: dict[str, Any],
                 resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        dropped = truncate_metrics(self.path, resume_step)
        if dropped:
            log.info("dropped %d metric records after step %d (redone after resume)", dropped, resume_step)
        self.file = open(self.path, "a", buffering=1)
        mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
        if cfg.wandb and mode != "disabled":
            self.wandb_run = _start_wandb(Path(run_dir), cfg.wandb_project, mode, run_config)

    def log(self, step: int, metrics: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)
        if console:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "step")
            log.info("step %d %s", step, shown)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _start_wandb(run_dir: Path, project: str, mode: str, run_config: dict[str, Any]) -> Any:
    import wandb

    # One stable id per run directory, so a resumed run continues the same wandb run.
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=project, dir=str(run_dir), mode=mode, id=run_id, resume="allow",
                      config=run_config, name=run_dir.name, settings=wandb.Settings(silent=True))


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
