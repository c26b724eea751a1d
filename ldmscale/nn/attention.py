"""One `attention(q, k, v)` for every attention layer, dispatched to xformers, SDPA or plain math.

Shapes: B batch, H heads, N query tokens, M key tokens, D head dim. Inputs are (B, H, N, D) /
(B, H, M, D) and the output is (B, H, N, D), whatever the backend.

`auto` picks xformers' memory-efficient kernel when xformers is installed and the tensors live on a
GPU (it has no CPU kernels), and torch's scaled_dot_product_attention otherwise. The backend is a
process-wide setting chosen from the config (`set_attention_backend`), so model code stays unaware
of it; the backend actually used is logged once.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "xformers", "sdpa", "math"]
BACKENDS: tuple[str, ...] = ("auto", "xformers", "sdpa", "math")

log = logging.getLogger(__name__)
_backend: str = "auto"
_logged: set[str] = set()


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def set_attention_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "xformers" and not xformers_available():
        raise ValueError("attention backend 'xformers' requested but xformers is not installed "
                         "(pip install 'ldmscale[xformers]'), or use 'auto'")
    global _backend
    _backend = backend


def get_attention_backend() -> str:
    return _backend


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if backend == "xformers" and device.type != "cuda":
        raise ValueError("attention backend 'xformers' has no CPU kernels; use 'auto' or 'sdpa' on a CPU")
    return backend


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    weights = torch.einsum("bhnd,bhmd->bhnm", q.float(), k.float()) * scale  # (B, H, N, M) in fp32
    return torch.einsum("bhnm,bhmd->bhnd", weights.softmax(dim=-1), v.float()).to(q.dtype)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    import xformers.ops

    # xformers expects (B, N, H, D).
    out = xformers.ops.memory_efficient_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Softmax attention softmax(q k^T / sqrt(D)) v; (B, H, N, D), (B, H, M, D) -> (B, H, N, D)."""
    chosen = resolve_backend(backend or _backend, q.device)
    if chosen not in _logged:
        _logged.add(chosen)
        log.info("attention backend: %s", chosen)
    if chosen == "xformers":
        return _xformers(q, k, v)
    if chosen == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    return _math(q, k, v)
