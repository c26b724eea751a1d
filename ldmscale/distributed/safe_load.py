"""Loading DeepSpeed checkpoints without executing pickled code.

DeepSpeed's TorchCheckpointEngine calls `torch.load(weights_only=False)`, which runs whatever a
pickle asks for. We swap in an engine that loads with `weights_only=True` and an explicit allow-list
of the few non-tensor classes DeepSpeed itself pickles into its state files (DeepSpeed #8500).
"""

from __future__ import annotations

import functools
from typing import Any

from ldmscale.checkpoint.io import torch_load_weights_only


@functools.cache
def deepspeed_safe_globals() -> tuple[type, ...]:
    """The classes DeepSpeed pickles into model/optimizer state files, and nothing broader."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address)


def load_deepspeed_file(path: str, map_location: Any = "cpu") -> Any:
    return torch_load_weights_only(path, deepspeed_safe_globals(), map_location)


def install_safe_checkpoint_engine(engine: Any) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_deepspeed_file(path, map_location)

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}; "
                           "ldmscale only loads through its safe torch engine")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe
