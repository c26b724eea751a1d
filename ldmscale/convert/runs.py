"""Weights out of an ldmscale run directory: committed checkpoints, DeepSpeed engines and EMA files.

A checkpoint folder (`run/checkpoints/step-XXXXXXXX/`, written by `training/trainer.py`) holds one
DeepSpeed checkpoint per engine in `<engine>/state/`, the trainer's EMA of each averaged network in
`ema-<engine>.safetensors`, the resolved run config in `config.yaml`, and the `COMMITTED` marker.
`zero-to-safetensors` turns one engine (its live weights or its EMA) into a single safetensors file
in the layout of the trainer's exports (`checkpoint/export.py`: the resolved config and a content
hash in the metadata), consolidating ZeRO partitions with `convert/deepspeed.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from ldmscale.checkpoint.export import export_weights
from ldmscale.checkpoint.io import load_safetensors
from ldmscale.checkpoint.manager import CheckpointManager, is_committed
from ldmscale.config.load import load_yaml_with_overrides
from ldmscale.convert.deepspeed import consolidate
from ldmscale.pipelines.sample import LDM_NETWORK

log = logging.getLogger(__name__)

# The network each stage trains and exports (the autoencoder stage's second engine is its discriminator).
PRIMARY_NETWORK = {"autoencoder": "autoencoder", "latent_diffusion": LDM_NETWORK}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEEPSPEED_TAG = "state"  # `Engine.save` writes `save_checkpoint(tag="state")`


def resolve_step_dir(path: str | os.PathLike) -> Path:
    """A committed checkpoint folder, or a run directory's newest one (what `checkpoints/latest` names)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (give a run directory or a checkpoints/step-XXXXXXXX folder)")
    if (path / "config.yaml").is_file() and any(path.glob(f"*/{DEEPSPEED_TAG}")):
        if not is_committed(path):
            raise ValueError(f"{path}: this checkpoint was never committed (no COMMITTED marker): it may be "
                             "partly written; use an earlier step")
        return path
    if (path / "checkpoints").is_dir():
        # Only `latest()` is used, which reads the folder; no process group is involved.
        latest = CheckpointManager(path / "checkpoints", keep_last=1, penv=None).latest()
        if latest is None:
            raise ValueError(f"{path}: the run has no committed checkpoint yet")
        return latest
    raise ValueError(f"{path}: neither a run directory (with checkpoints/) nor a checkpoint folder "
                     "(with config.yaml and <engine>/state/)")


def engine_names(step_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in step_dir.glob(f"*/{DEEPSPEED_TAG}") if p.is_dir())


def read_run_config(step_dir: Path) -> dict[str, Any]:
    """The resolved run config saved with the checkpoint, as plain data."""
    return load_yaml_with_overrides(step_dir / "config.yaml")


def pick_engine(step_dir: Path, config: dict[str, Any], engine: str | None) -> str:
    names = engine_names(step_dir)
    if engine is None:
        engine = PRIMARY_NETWORK.get(config.get("stage"))
        if engine is None and len(names) == 1:
            engine = names[0]
        if engine is None:
            raise ValueError(f"--engine: {step_dir} holds several engines; choose one of: {', '.join(names)}")
    if engine not in names:
        raise ValueError(f"--engine: no engine {engine!r} in {step_dir}; valid engines: {', '.join(names)}")
    return engine


@dataclasses.dataclass
class EngineWeights:
    raw: dict[str, torch.Tensor]  # consolidated from DeepSpeed (fp32 masters where training kept them)
    ema: dict[str, torch.Tensor] | None  # the trainer's EMA, when the run had EMA enabled
    config: dict[str, Any]  # the resolved run config
    step: int
    zero_stage: int
    world_size: int


def read_engine(step_dir: Path, engine: str, config: dict[str, Any] | None = None, with_raw: bool = True
                ) -> EngineWeights:
    """The engine's consolidated weights and its EMA file; `with_raw=False` skips the consolidation."""
    config = config if config is not None else read_run_config(step_dir)
    step = int(CheckpointManager.describe(step_dir)["step"])
    ema_path = step_dir / f"ema-{engine}.safetensors"
    ema = load_safetensors(ema_path) if ema_path.is_file() else None
    if with_raw:
        merged = consolidate(step_dir / engine / DEEPSPEED_TAG)
        return EngineWeights(merged.state, ema, config, step, merged.zero_stage, merged.world_size)
    return EngineWeights({}, ema, config, step, -1, -1)


def cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors to `dtype` (fp32 | bf16 | fp16); integer buffers keep theirs."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: invalid value {dtype!r}; valid values: {', '.join(DTYPES)}")
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}


def zero_to_safetensors(src: str | os.PathLike, out: str | os.PathLike, *, engine: str | None = None,
                        ema: bool = False, dtype: Literal["fp32", "bf16", "fp16"] = "fp32") -> Path:
    """One engine of a run's (or a checkpoint folder's) newest checkpoint -> one safetensors file.

    The live weights are consolidated from the DeepSpeed files of every rank; `ema` takes the
    trainer's EMA instead. The metadata holds the resolved config, the stage, network and step, as
    in the trainer's exports, so `load_export` reads it (and an autoencoder's carries its scale factor).
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"OUT: {out} must end in .safetensors")
    step_dir = resolve_step_dir(src)
    config = read_run_config(step_dir)
    engine = pick_engine(step_dir, config, engine)
    weights = read_engine(step_dir, engine, config, with_raw=not ema)
    if ema and weights.ema is None:
        raise ValueError(f"--ema: {step_dir} has no ema-{engine}.safetensors (EMA disabled in this run, or "
                         "this engine is not averaged); leave out --ema for the live weights")
    state = weights.ema if ema else weights.raw
    metadata: dict[str, Any] = {"stage": config.get("stage"), "network": engine, "step": weights.step, "ema": ema,
                                "source": str(step_dir)}
    if not ema:
        metadata.update(zero_stage=weights.zero_stage, world_size=weights.world_size)
    if "scale_factor" in state:  # the autoencoder's latent scale, as its export records it
        # The buffer holds it in float32; the task's own state keeps the float64 estimate.
        task_file = step_dir / "task.safetensors"
        task_state = load_safetensors(task_file) if task_file.is_file() else {}
        metadata["scale_factor"] = float(task_state.get("scale_factor", state["scale_factor"]))
    path = export_weights(cast(state, dtype), out, config=config, metadata=metadata)
    log.info("wrote %s (%s, step %d, %s)", path, engine, weights.step,
             "EMA" if ema else f"ZeRO-{weights.zero_stage} over {weights.world_size} ranks")
    return path
