"""Full parameter values under ZeRO-3, for EMA updates, sampling and export.

Under ZeRO-3 each rank holds only a partition of every parameter and `param.data` is an empty
placeholder outside a forward pass; reading it silently gives nothing (DeepSpeed #6987, the reason
naive EMA breaks there). These helpers gather the full tensors for the duration of a block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


def is_zero3_partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered_parameters(module: nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """Inside the block every parameter of `module` holds its full value (a no-op below ZeRO-3).

    With `modifier_rank` set, that rank's in-place changes are re-partitioned on exit.
    """
    if not is_zero3_partitioned(module):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
        yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter and buffer, gathered if partitioned (collective under ZeRO-3)."""
    with gathered_parameters(module):
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
