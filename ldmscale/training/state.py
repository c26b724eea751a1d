"""Per-rank training state that a checkpoint must carry for exact resumption.

Besides the step counters this is every random number generator the rank draws from (torch CPU and
CUDA, NumPy, Python) and the data loader's position: restoring them makes step N+1 after a resume
see the same batch and the same noise as in an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmscale.checkpoint.io import atomic_write_json, load_safetensors, save_safetensors


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    samples_seen: int = 0  # over all ranks
    nonfinite_skipped: int = 0  # micro-steps skipped for a non-finite loss, in total
    consecutive_nonfinite: int = 0


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    plain = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": _jsonable(random.getstate())}
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_tupled(plain["python"]))


def _jsonable(obj: Any) -> Any:
    return [_jsonable(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _tupled(obj: Any) -> Any:
    return tuple(_tupled(o) for o in obj) if isinstance(obj, list) else obj


def save_rank_state(directory: Path, rank: int, state: TrainState, data_state: dict[str, Any]) -> None:
    tensors, plain = capture_rng()
    save_safetensors(tensors, directory / f"rng-rank{rank:05d}.safetensors")
    atomic_write_json(directory / f"state-rank{rank:05d}.json",
                      {"train": dataclasses.asdict(state), "rng": plain, "data": data_state})


def load_rank_state(directory: Path, rank: int) -> tuple[TrainState, dict[str, Any]]:
    """Restores this rank's RNGs and returns its train state and data position."""
    path = directory / f"state-rank{rank:05d}.json"
    if not path.exists():
        raise RuntimeError(f"{directory} has no state for rank {rank}: the checkpoint was written by a job "
                           "with fewer ranks; resume with the same world size, or start a new run from "
                           "exported weights")
    record = json.loads(path.read_text())
    restore_rng(load_safetensors(directory / f"rng-rank{rank:05d}.safetensors"), record["rng"])
    return TrainState(**record["train"]), record["data"]
