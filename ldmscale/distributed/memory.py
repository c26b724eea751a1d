"""Per-GPU memory of model states under ZeRO 0-3 (the arithmetic of Rajbhandari et al. 2020, §3).

Mixed precision (bf16/fp16) keeps 2-byte parameters and gradients plus fp32 master weights and
AdamW's two moments (12 bytes); fp32 keeps 4 + 4 bytes and 8 for the moments. ZeRO-1 partitions the
optimizer states over the data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the
parameters. Frozen networks are not partitioned (they stay outside ZeRO). The EMA is a full fp32
copy on every rank. Activations are not included: they depend on batch size and resolution.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelStateMemory:
    params: float
    grads: float
    optimizer: float
    frozen: float
    ema: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.frozen + self.ema


def model_state_bytes(trainable: int, frozen: int, ema: int, *, zero_stage: int, precision: str,
                      num_gpus: int, frozen_fp32: bool = False) -> ModelStateMemory:
    """Bytes per GPU of the model states. Frozen networks are held whole on every rank, at the training
    precision, or in fp32 with `frozen_fp32` (the LDM and PDAE stages' `task.frozen_precision: fp32`)."""
    half = precision in ("bf16", "fp16")
    param_b, grad_b, optim_b = (2, 2, 12) if half else (4, 4, 8)
    n = max(1, num_gpus)
    return ModelStateMemory(
        params=trainable * param_b / (n if zero_stage >= 3 else 1),
        grads=trainable * grad_b / (n if zero_stage >= 2 else 1),
        optimizer=trainable * optim_b / (n if zero_stage >= 1 else 1),
        frozen=frozen * (4 if frozen_fp32 else param_b),
        ema=ema * 4,
    )
