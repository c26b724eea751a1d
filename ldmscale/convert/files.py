"""Reading and writing whole-model weight files for conversion, never running pickled code.

Formats: `.safetensors`, and torch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) read with
`torch.load(weights_only=True)` and a small allow-list. A Lightning training checkpoint (CompVis
LDM and Stable Diffusion releases) wraps its weights in `state_dict` beside counters and callback
states; early Lightning keyed those callback states by the `ModelCheckpoint` class itself, so the
class name appears in the pickle as a global. It is allowed here as an inert stand-in (it is only
ever a dictionary key), together with the NumPy scalar types a callback's `best_model_score` may
use; anything else a pickle asks for (os.system, eval, ...) is refused.

A truncated or corrupt file is reported as such, not as an unsafe pickle: a torch file is a zip
archive whose central directory sits at its end, so a truncated one is no longer a zip file.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from ldmscale.checkpoint.io import atomic_write_bytes, save_safetensors, torch_load_weights_only

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# `torch.save` before torch 1.6 wrote a bare pickle that starts with this magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class InertLightningObject:
    """Stands in for a Lightning class named in a checkpoint's callback states; does nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass


def _original_safe_globals() -> list[Any]:
    import numpy as np

    names = ("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
             "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint")
    allowed: list[Any] = [(InertLightningObject, name) for name in names]
    # NumPy scalars rebuild from (dtype, raw bytes): data only, no code. NumPy 2 renamed the module.
    scalar = np._core.multiarray.scalar
    allowed += [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType",
                                                      "Int32DType", "BoolDType")]
    return allowed


def _is_safetensors(path: Path) -> bool:
    """safetensors starts with a little-endian u64 header length and a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100_000_000


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file; it is truncated or corrupt ({e})") from e


def read_torch_file(path: str | os.PathLike, allowed: list[Any] | None = None) -> Any:
    """`torch.load(weights_only=True)` with the allow-list; clear errors for damaged files."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            legacy = f.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC
        if not legacy:
            raise ValueError(f"{path}: not a readable torch checkpoint; it is truncated or corrupt "
                             "(a torch file is a zip archive, and this one has no intact central directory)")
    try:
        return torch_load_weights_only(path, allowed or [])
    except ValueError as e:
        if isinstance(e.__cause__, pickle.UnpicklingError):
            # torch's own message suggests weights_only=False, the one thing not to do with an unknown file.
            found = re.search(r"GLOBAL ([\w.]+)", str(e.__cause__))
            what = f"`{found.group(1)}`" if found else "a global outside the allow-list"
            raise ValueError(f"refusing to load {path}: its pickle asks for {what}, which is code, not data; "
                             "loading it would run that code. Only convert files from a source you trust, "
                             "and prefer .safetensors") from e
        raise ValueError(f"{path}: not a readable torch checkpoint; it is truncated or corrupt "
                         f"({e.__cause__ or e})") from e


def unwrap_state_dict(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a (possibly Lightning-wrapped) checkpoint: nested `state_dict` entries are unwrapped."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a mapping of names to tensors, got {type(obj).__name__}")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{path}: its state dict holds non-tensor entries {bad[:10]}")
    return dict(obj)


def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A weight file (.safetensors or a torch pickle) as one flat name -> tensor mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".safetensors" or _is_safetensors(path):
        return read_safetensors(path)
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"{path}: unknown weight file type {path.suffix!r}; valid: .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)}")
    return unwrap_state_dict(read_torch_file(path, _original_safe_globals()), path)


def write_state_file(state: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None, global_step: int | None = None) -> Path:
    """Writes `.safetensors` (with string metadata) or a `.ckpt` Lightning-style `{"state_dict": ...}`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_safetensors(state, path, metadata=metadata)
    elif path.suffix in TORCH_SUFFIXES:
        buffer = io.BytesIO()
        payload: dict[str, Any] = {"state_dict": {k: v.detach().contiguous().cpu() for k, v in state.items()}}
        if global_step is not None:
            payload["global_step"] = global_step
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    else:
        raise ValueError(f"{path}: unknown output type {path.suffix!r}; valid: .safetensors, "
                         f"{', '.join(TORCH_SUFFIXES)}")
    return path
