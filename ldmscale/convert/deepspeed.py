"""Full weights from a DeepSpeed checkpoint of any ZeRO stage (0-3) written by any number of ranks.

Runs on one CPU process, without DeepSpeed's process groups and without knowing the training world
size in advance: the number of ranks is read from the files. Every file goes through the safe
loader (`torch.load(weights_only=True)` with DeepSpeed's own few classes allowed); DeepSpeed's
`utils/zero_to_fp32.py` would unpickle with `weights_only=False`. The file format below is the one
`DeepSpeedEngine._save_checkpoint` / `_save_zero_checkpoint` write (DeepSpeed 0.19) and
`zero_to_fp32.py` reads:

- `mp_rank_00_model_states.pt` (ZeRO 0-2, written by rank 0): `module`, the full state dict in the
  training dtype; `buffer_names`; for ZeRO 1-2 `param_shapes` (per optimizer group, name -> shape,
  in the order of the flat fp32 master vector) and `shared_params`; for ZeRO-2 also
  `frozen_param_fragments` (full tensors of parameters outside the optimizer).
- `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` (ZeRO 1-2, one per rank): under
  `optimizer_state_dict`, `single_partition_of_fp32_groups[g]` is rank r's contiguous slice of
  group g's flat fp32 master vector; concatenated over ranks the vector holds every parameter in
  `param_shapes` order, each followed by `param_alignment_paddings[g][i]` padding elements.
- ZeRO-3: `zero_pp_rank_{r}_mp_rank_00_model_states.pt` per rank (buffers are real, partitioned
  parameters are empty placeholders; `frozen_param_fragments` are rank r's slices) and the optimizer
  files' `fp32_flat_groups`: for every parameter in order, its r-th of `world_size` equal slices of
  ceil(numel / world_size) elements, the last one zero-padded.
- ZeRO-0 in bf16/fp16: `module` holds the half-precision weights and `optimizer` the fp32 masters,
  as `fp32_groups` (per group, one tensor per parameter) or `fp32_groups_flat` (one vector per group),
  in parameter order. ZeRO-0 in fp32 has only `module`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import torch

from ldmscale.convert.files import read_torch_file

_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
RANK0_MODEL_FILE = "mp_rank_00_model_states.pt"


@dataclasses.dataclass
class Consolidated:
    state: dict[str, torch.Tensor]  # every parameter and persistent buffer, in the module's key order
    zero_stage: int
    world_size: int
    step: int  # DeepSpeed's global step count at the save
    fp32_masters: bool  # parameters come from the optimizer's fp32 master copies (else from `module`)


def _load(path: Path) -> Any:
    from ldmscale.distributed.safe_load import deepspeed_safe_globals

    return read_torch_file(path, list(deepspeed_safe_globals()))


def _rank_files(folder: Path, kind: str) -> list[Path]:
    """`*_{kind}_states.pt` per data-parallel rank, in rank order; refuses gaps and model parallelism."""
    by_rank: dict[int, Path] = {}
    for path in folder.iterdir():
        match = _RANK_FILE.match(path.name)
        if match is None or match.group(3) != kind:
            continue
        if int(match.group(2)) != 0:
            raise ValueError(f"{folder}: {path.name} belongs to a model-parallel checkpoint (mp_rank > 0), "
                             "which ldmscale never writes and cannot consolidate")
        rank = int(match.group(1))
        if rank in by_rank:
            raise ValueError(f"{folder}: two {kind} state files for rank {rank} ({by_rank[rank].name}, {path.name})")
        by_rank[rank] = path
    missing = sorted(set(range(max(by_rank, default=-1) + 1)) - set(by_rank))
    if missing:
        raise ValueError(f"{folder}: {kind} state files of ranks {missing} are missing; the checkpoint is incomplete")
    return [by_rank[r] for r in range(len(by_rank))]


def _partition_count(optim_state: dict, files: list[Path]) -> int:
    count = optim_state["partition_count"]
    count = max(count) if isinstance(count, (list, tuple)) else int(count)
    if count != len(files):
        raise ValueError(f"{files[0].parent}: the optimizer was partitioned over {count} ranks but "
                         f"{len(files)} optimizer state files exist; the checkpoint is incomplete or mixed")
    return count


def _ordered(module: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`values` in the module's key order; every key of the module must be covered."""
    missing = [k for k in module if k not in values]
    assert not missing, f"consolidation left tensors without values: {missing[:10]}"
    return {k: values[k] for k in module}


def _shared(model_state: dict, values: dict[str, torch.Tensor]) -> None:
    for alias, source in (model_state.get("shared_params") or {}).items():
        values[alias] = values[source]


def _zero0(model_state: dict, path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    module = model_state["module"]
    buffers = set(model_state.get("buffer_names") or [])
    values = dict(module)
    optimizer = model_state.get("optimizer")
    if not isinstance(optimizer, dict) or not ({"fp32_groups", "fp32_groups_flat"} & set(optimizer)):
        return values, False  # fp32 training: `module` is the master copy
    # The engine's optimizer holds every parameter of the module (frozen networks are never handed
    # to an engine), in module order, so the masters line up with the non-buffer keys.
    names = [k for k in module if k not in buffers]
    if "fp32_groups" in optimizer:
        masters = [t for group in optimizer["fp32_groups"] for t in group]
    else:
        flat = torch.cat([g.reshape(-1) for g in optimizer["fp32_groups_flat"]])
        sizes = [module[k].numel() for k in names]
        if sum(sizes) != flat.numel():
            raise ValueError(f"{path}: the fp32 master vector has {flat.numel()} elements, the module's "
                             f"parameters {sum(sizes)}; cannot line them up")
        masters = list(flat.split(sizes))
    if len(masters) != len(names) or any(m.numel() != module[k].numel() for m, k in zip(masters, names)):
        raise ValueError(f"{path}: {len(masters)} fp32 master tensors do not line up with the module's "
                         f"{len(names)} parameters")
    for name, master in zip(names, masters):
        values[name] = master.reshape(module[name].shape).clone()
    return values, True


def _zero12(model_state: dict, optim_files: list[Path]) -> tuple[dict[str, torch.Tensor], int, int]:
    optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
    world_size = _partition_count(optim[0], optim_files)
    stage = int(optim[0]["zero_stage"])
    paddings = optim[0].get("param_alignment_paddings")
    values = dict(model_state["module"])  # frozen parameters (ZeRO-1) and buffers are full here
    values.update(model_state.get("frozen_param_fragments") or {})
    for g, shapes in enumerate(model_state["param_shapes"]):
        flat = torch.cat([o["single_partition_of_fp32_groups"][g] for o in optim])  # (N_g + padding,)
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            values[name] = flat[offset:offset + numel].view(shape).clone()
            offset += numel + (paddings[g][i] if paddings is not None else 0)
        # The flat vector is padded at its end to a multiple of 2 * world_size (zero_to_fp32's check).
        align = 2 * world_size
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise ValueError(f"{optim_files[0].parent}: group {g} uses {offset} of {flat.numel()} fp32 elements; "
                             "the partitions do not match the parameter shapes")
    _shared(model_state, values)
    return values, world_size, stage


def _zero3(model_files: list[Path], optim_files: list[Path]) -> tuple[dict[str, torch.Tensor], dict, int]:
    models = [_load(f) for f in model_files]
    optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
    world_size = _partition_count(optim[0], optim_files)
    if len(models) != world_size:
        raise ValueError(f"{model_files[0].parent}: {len(models)} model state files for {world_size} ranks")
    first = models[0]
    values = {name: first["module"][name] for name in first.get("buffer_names") or []}
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        numel = math.prod(shape)
        pieces = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
        values[name] = torch.cat(pieces)[:numel].view(shape).clone()
    flats = [torch.cat([g.reshape(-1) for g in o["fp32_flat_groups"]]) for o in optim]  # per rank (P,)
    offset = 0
    for shapes in first["param_shapes"]:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world_size)  # every rank's slice, the last zero-padded
            values[name] = torch.cat([f[offset:offset + part] for f in flats])[:numel].view(shape).clone()
            offset += part
    if any(f.numel() != offset for f in flats):
        raise ValueError(f"{optim_files[0].parent}: the partitions hold {[f.numel() for f in flats]} fp32 elements "
                         f"per rank, the parameter shapes need {offset}")
    _shared(first, values)
    return values, first, world_size


def consolidate(folder: str | Path) -> Consolidated:
    """The full state dict of one engine's checkpoint folder (the one holding the `*_states.pt` files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such DeepSpeed checkpoint folder")
    model_files = _rank_files(folder, "model")
    optim_files = _rank_files(folder, "optim")
    if model_files:  # ZeRO-3: per-rank model states
        if not optim_files:
            raise ValueError(f"{folder}: ZeRO-3 model states without optimizer states; the checkpoint is incomplete")
        values, first, world_size = _zero3(model_files, optim_files)
        return Consolidated(_ordered(first["module"], values), 3, world_size, int(first.get("global_steps", 0)), True)
    rank0 = folder / RANK0_MODEL_FILE
    if not rank0.is_file():
        raise ValueError(f"{folder}: neither {RANK0_MODEL_FILE} nor per-rank model states; not a DeepSpeed "
                         "checkpoint folder")
    model_state = _load(rank0)
    step = int(model_state.get("global_steps", 0))
    if optim_files:
        values, world_size, stage = _zero12(model_state, optim_files)
        return Consolidated(_ordered(model_state["module"], values), stage, world_size, step, True)
    values, masters = _zero0(model_state, rank0)
    return Consolidated(_ordered(model_state["module"], values), 0, int(model_state.get("dp_world_size", 1)),
                        step, masters)
