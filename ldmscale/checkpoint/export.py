"""Exported models: one safetensors file of full weights with the resolved config in its metadata.

The later stages (latent diffusion, PDAE, cached latents) load a trained network from an export,
rebuilding it from the embedded config, so no second copy of the hyper-parameters can drift.
`content_hash` identifies the weights (cached latent shards record it, to refuse a mismatch).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ldmscale.checkpoint.io import load_safetensors, save_safetensors

CONFIG_KEY = "ldmscale_config"


def content_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in key order; independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, *, config: dict[str, Any],
                   metadata: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {CONFIG_KEY: json.dumps(config), "content_hash": content_hash(state_dict)}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    save_safetensors(state_dict, path, metadata=meta)
    return path


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if CONFIG_KEY not in raw:
        raise ValueError(f"{path} is not an ldmscale export: its metadata has no {CONFIG_KEY!r}")
    out = {k: json.loads(v) for k, v in raw.items() if k != "content_hash"}
    out["content_hash"] = raw["content_hash"]
    out["config"] = out.pop(CONFIG_KEY)
    return out


def export_file(checkpoint: str | os.PathLike, network: str, what: str) -> Path:
    """An export file, or a run directory holding `export/<network>.safetensors`; `what` names the export in
    the error (e.g. "an LDM")."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "export" / f"{network}.safetensors"
    if not path.is_file():
        raise ValueError(f"CHECKPOINT: {checkpoint} is neither {what} export (.safetensors) nor a run directory "
                         f"with export/{network}.safetensors")
    return path


def load_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_safetensors(path), read_export_metadata(path)
