"""DeepSpeed engines built from the config: ZeRO 0-3, fp32/bf16/fp16, accumulation, clipping.

A task owns one `Engine` per independently optimised network (the autoencoder stage has two:
generator and discriminator, as DeepSpeed supports one optimizer per engine). Frozen modules are
never handed to an engine, so they stay out of the optimizer and out of ZeRO partitioning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ldmscale.distributed import env as penv_mod
from ldmscale.distributed.safe_load import install_safe_checkpoint_engine

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DistributedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_minutes: int = 30
    # ZeRO-3 only: gather the full parameters for a forward on modules smaller than this.
    zero3_param_persistence_threshold: int = 100_000


def deepspeed_config(cfg: DistributedConfig, *, micro_batch_size: int, grad_accum: int, grad_clip: float,
                     world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_param_persistence_threshold
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # Dynamic loss scaling (loss_scale 0) as mixed-precision training expects.
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # Our client optimizers are torch's AdamW; DeepSpeed wraps them in its ZeRO optimizer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class Engine:
    """One trainable network under DeepSpeed, with a non-finite loss guard agreed across ranks."""

    def __init__(self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: Any, cfg: DistributedConfig, *, micro_batch_size: int, grad_accum: int,
                 grad_clip: float, world_size: int):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if cfg.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise ValueError(f"distributed.precision: fp16 is not supported by DeepSpeed's "
                             f"{get_accelerator().device_name()} accelerator; use bf16 or fp32 here")
        self.name = name
        self.cfg = cfg
        ds_config = deepspeed_config(cfg, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                                     grad_clip=grad_clip, world_size=world_size)
        self.engine, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config,
            dist_init_required=False)
        install_safe_checkpoint_engine(self.engine)
        self.last_step_skipped = False

    @property
    def module(self) -> nn.Module:
        """The plain model (under ZeRO-3 its parameters are partitioned; see `distributed.zero`)."""
        return self.engine.module

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.cfg.precision]

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def forward_for_manual_grads(self, *args: Any, **kwargs: Any) -> Any:
        """A forward whose graph may also be differentiated with `torch.autograd.grad` before `backward_step`.

        DeepSpeed's engine forward hooks its outputs so that any backward outside `engine.backward`
        is refused at ZeRO-0 (and counted as the step's backward otherwise). The autoencoder's
        adaptive GAN weight needs gradients at the decoder's last layer first, so this forward calls
        the module itself, doing the one piece of bookkeeping the engine's forward does for ZeRO.
        """
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        return self.engine.module(*args, **kwargs)

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward and (at the accumulation boundary) optimizer step, unless any rank's loss is not finite.

        The finiteness flag is reduced over ranks first: a rank skipping a backward that the others
        run would deadlock their gradient all-reduce. A skipped micro-step leaves DeepSpeed's
        micro-step counter alone, so the accumulation boundary simply moves one micro-batch later.
        """
        bad = penv_mod.all_reduce_max(0.0 if torch.isfinite(loss.detach()).all() else 1.0)
        self.last_step_skipped = bad > 0
        if self.last_step_skipped:
            return False
        self.engine.backward(loss)
        self.engine.step()
        return True

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path) -> None:
        """Collective: every rank writes its shard of model and optimizer states."""
        self.engine.save_checkpoint(str(directory), tag="state", save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="state")
        if path is None:
            raise RuntimeError(f"engine {self.name!r}: no DeepSpeed checkpoint found in {directory}")
