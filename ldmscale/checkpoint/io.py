"""Atomic file writes and loading that never executes pickled code.

Every file is written under a temporary name in the same folder, flushed to disk, then renamed over
its final name, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically; tensors are made contiguous CPU copies first."""
    path = Path(path)
    tmp = _tmp_name(path)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=device)


def torch_load_weights_only(path: str | os.PathLike, allowed: Iterable[type] = (), map_location: Any = "cpu") -> Any:
    """`torch.load(weights_only=True)` with an explicit allow-list; a pickle that wants more is refused."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch names the offending global in its message
        first_line = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise ValueError(f"refusing to load {path}: it asks to run code outside the allow-list of safe "
                         f"types ({first_line})") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot load {path}: the file is truncated or corrupt ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
