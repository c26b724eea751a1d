"""The one training loop, shared by every stage.

Per optimizer step: `grad_accum` micro-batches through the task's step, then EMA, then the cadence
of logging, image grids, validation and checkpoints. SIGTERM / SIGUSR1 (Slurm's warning before a
time limit or preemption) make the loop checkpoint at the next step boundary and return.
Running the same config against an existing run directory resumes from `checkpoints/latest`.
"""

from __future__ import annotations

import logging
import signal
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ldmscale.checkpoint.export import export_weights
from ldmscale.checkpoint.io import load_safetensors, save_safetensors
from ldmscale.checkpoint.manager import CheckpointManager
from ldmscale.config.load import config_to_dict, save_config
from ldmscale.config.schema import RunConfig
from ldmscale.data.shards import DATA_SOURCES
from ldmscale.distributed import env as dist_env
from ldmscale.distributed.zero import full_state_dict
from ldmscale.nn.attention import set_attention_backend
from ldmscale.observability.metrics import MetricsLogger, peak_memory_mb
from ldmscale.training.ema import EMA
from ldmscale.training.state import TrainState, load_rank_state, save_rank_state
from ldmscale.training.task import TASKS, Task

log = logging.getLogger(__name__)

# SIGUSR2 is submitit's preemption / time-limit warning (`--signal=USR2@...`, see launch/slurm.py).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: RunConfig, penv: dist_env.ProcessEnv | None = None):
        self.cfg = cfg
        self.penv = penv or dist_env.read_process_env()
        self.run_dir = Path(cfg.run.dir)
        self.images_dir = self.run_dir / "images"
        self.state = TrainState()
        self._stop_requested = False
        self.stop_signal: int | None = None  # what stopped fit(): a launcher requeues only on its own signal

    def fit(self) -> str:
        """Trains to `train.max_steps`; returns "completed", or "stopped" after a stop signal."""
        cfg, penv = self.cfg, self.penv
        dist_env.init_process_group(penv, cfg.distributed.backend, cfg.distributed.timeout_minutes)
        set_attention_backend(cfg.attention)
        if penv.is_main:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        dist_env.barrier()

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.task: Task = TASKS.entry(cfg.stage).factory(cfg, penv=penv, run_dir=self.run_dir)
        self.emas = {name: EMA(module, cfg.ema) for name, module in self.task.ema_targets().items()} \
            if cfg.ema.enabled else {}
        self.task.emas = self.emas
        self.loader = DATA_SOURCES.build(cfg.data, batch_size=cfg.train.micro_batch_size, rank=penv.rank,
                                         world_size=penv.world_size, seed=cfg.seed)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, penv)
        self.checkpoints.remove_incomplete()
        dist_env.barrier()
        latest = self.checkpoints.latest()
        if latest is not None:
            self._load(latest)
        else:
            torch.manual_seed(cfg.seed * 1000 + penv.rank)  # ranks draw different noise
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, enabled=penv.is_main,
                                     run_config=config_to_dict(cfg), resume_step=self.state.step)
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            return self._loop()
        finally:
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
            self.metrics.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: checkpointing at the next step boundary, then stopping", signum)
        self._stop_requested = True
        self.stop_signal = signum

    def _loop(self) -> str:
        cfg, state = self.cfg, self.state
        batches = iter(self.loader)
        progress = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not (self.penv.is_main and
                        cfg.train.progress), desc=f"train {cfg.stage}", unit="step", dynamic_ncols=True)
        window_start, window_samples = time.perf_counter(), 0
        while state.step < cfg.train.max_steps:
            logs: dict[str, list[float]] = defaultdict(list)
            for _ in range(cfg.train.grad_accum):
                batch = next(batches)
                out = self.task.training_step(batch, state.step)
                self._guard_nonfinite(out)
                for k, v in out.items():
                    logs[k].append(float(v))
                # A fingerprint of the batch's sample keys: resumption must replay the same data.
                logs["data_crc"].append(float(zlib.crc32("\n".join(batch["key"]).encode())))
                window_samples += len(batch["key"])
            state.step += 1
            progress.update(1)
            if self.emas and state.step % cfg.ema.update_every == 0:
                targets = self.task.ema_targets()
                for name, ema in self.emas.items():
                    logs["ema_decay"].append(ema.update(targets[name], state.step))
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                window_start, window_samples = self._log(logs, window_start, window_samples)
                progress.set_postfix(loss=f"{sum(logs['loss']) / len(logs['loss']):.4f}")
            self._images_and_validation(batch)
            stop = dist_env.all_reduce_max(1.0 if self._stop_requested else 0.0) > 0
            if state.step % cfg.checkpoint.every_steps == 0 or state.step == cfg.train.max_steps or stop:
                self._save()
            # A signal at the last step changes nothing: the run finishes (and exports) instead of asking
            # its launcher for a rerun that would only do the export.
            if stop and state.step < cfg.train.max_steps:
                progress.close()
                log.warning("stopped at step %d after a signal; rerun the same command to resume", state.step)
                return "stopped"
        progress.close()
        self._export()
        return "completed"

    def _guard_nonfinite(self, out: dict[str, float]) -> None:
        state = self.state
        if any(e.last_step_skipped for e in self.task.engines.values()):
            state.nonfinite_skipped += 1
            state.consecutive_nonfinite += 1
            log.warning("step %d: non-finite loss, micro-step skipped (%d in a row, %d in total)",
                        state.step + 1, state.consecutive_nonfinite, state.nonfinite_skipped)
            if state.consecutive_nonfinite >= self.cfg.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{state.consecutive_nonfinite} non-finite losses in a row at step {state.step + 1} "
                    f"(last: {out}); training diverged: lower optim.lr, raise optim.warmup_steps, use "
                    "distributed.precision=bf16 instead of fp16, or resume from an earlier checkpoint")
        else:
            state.consecutive_nonfinite = 0

    def _log(self, logs: dict[str, list[float]], window_start: float, window_samples: int) -> tuple[float, int]:
        now = time.perf_counter()
        samples = dist_env.all_reduce_sum(window_samples)
        self.state.samples_seen += int(samples)
        metrics = dist_env.mean_over_ranks({k: sum(v) / len(v) for k, v in logs.items()})
        metrics.update(samples_per_sec=samples / max(now - window_start, 1e-9),
                       samples_seen=self.state.samples_seen,
                       peak_memory_mb=dist_env.all_reduce_max(peak_memory_mb(self.penv.device)),
                       nonfinite_skipped=self.state.nonfinite_skipped,
                       **{f"lr_{name}": e.lr() for name, e in self.task.engines.items()},
                       **{f"data_{k}": v for k, v in self.loader.error_counts.items()})
        self.metrics.log(self.state.step, metrics, console=not self.cfg.train.progress)
        return now, 0

    def _images_and_validation(self, batch: dict[str, Any]) -> None:
        step, train = self.state.step, self.cfg.train
        if train.image_every and step % train.image_every == 0:
            self.task.log_images(batch, step, self.images_dir)
        if train.validate_every and step % train.validate_every == 0:
            metrics = self.task.validate(step)
            if metrics:
                self.metrics.log(step, {f"val/{k}": v for k, v in metrics.items()})

    def _export(self) -> None:
        """Writes `export/<network>.safetensors` (EMA weights when enabled) with the resolved config."""
        for name, module in self.task.ema_targets().items():
            state = self.emas[name].state_dict() if name in self.emas else full_state_dict(module)
            if self.penv.is_main:
                state = self.task.export_state_dict(name, dict(state))
                path = export_weights(state, self.run_dir / "export" / f"{name}.safetensors",
                                      config=config_to_dict(self.cfg),
                                      metadata={"stage": self.cfg.stage, "network": name, "step": self.state.step,
                                                "ema": name in self.emas, **self.task.export_metadata()})
                log.info("exported %s", path)
        dist_env.barrier()

    def _save(self) -> None:
        self.task.before_save(self.state.step)
        targets = self.task.ema_targets()
        for name, ema in self.emas.items():
            ema.copy_buffers(targets[name])

        def write(directory: Path) -> None:
            for name, engine in self.task.engines.items():
                engine.save(directory / name)
            save_rank_state(directory, self.penv.rank, self.state, self.loader.state_dict())
            if self.penv.is_main:
                for name, ema in self.emas.items():
                    save_safetensors(ema.state_dict(), directory / f"ema-{name}.safetensors")
                task_state = self.task.state_dict()
                if task_state:
                    save_safetensors(task_state, directory / "task.safetensors")
                save_config(self.cfg, directory / "config.yaml")

        path = self.checkpoints.save(self.state.step, write)
        log.info("checkpoint %s", path)

    def _load(self, directory: Path) -> None:
        log.info("resuming from %s", directory)
        for name, engine in self.task.engines.items():
            engine.load(directory / name)
        for name, ema in self.emas.items():
            ema.load_state_dict(load_safetensors(directory / f"ema-{name}.safetensors"))
        task_file = directory / "task.safetensors"
        self.task.load_state_dict(load_safetensors(task_file) if task_file.exists() else {})
        self.state, data_state = load_rank_state(directory, self.penv.rank)
        self.loader.load_state_dict(data_state)
