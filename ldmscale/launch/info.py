"""`ldmscale info`: parameter counts per component and per-GPU memory of model states under ZeRO 0-3."""

from __future__ import annotations

import json
from typing import Any

import torch

from ldmscale.config.schema import RunConfig
from ldmscale.distributed.memory import model_state_bytes
from ldmscale.training.task import TASKS


def describe(cfg: RunConfig, num_gpus: int) -> dict[str, Any]:
    """Builds the stage's networks on the meta device (no memory, no weights) and counts."""
    task_cls = TASKS.entry(cfg.stage).factory
    with torch.device("meta"):
        components = task_cls.build_components(cfg)
    rows, trainable, frozen = {}, 0, 0
    for name, comp in components.items():
        count = sum(p.numel() for p in comp.module.parameters())
        rows[name] = {"parameters": count, "tensors": len(list(comp.module.parameters())),
                      "trainable": comp.trainable}
        if comp.trainable:
            trainable += count
        else:
            frozen += count
    ema = trainable if cfg.ema.enabled else 0
    # The LDM and PDAE stages hold their frozen networks at `task.frozen_precision`; the others have no such key
    # and hold them at the training precision.
    frozen_fp32 = getattr(cfg.task, "frozen_precision", "training") == "fp32"
    memory = {}
    for stage in range(4):
        m = model_state_bytes(trainable, frozen, ema, zero_stage=stage, precision=cfg.distributed.precision,
                              num_gpus=num_gpus, frozen_fp32=frozen_fp32)
        memory[f"zero{stage}"] = {k: v / 2**30 for k, v in
                                  {"params": m.params, "grads": m.grads, "optimizer": m.optimizer,
                                   "frozen": m.frozen, "ema": m.ema, "total": m.total}.items()}
    return {"stage": cfg.stage, "precision": cfg.distributed.precision, "num_gpus": num_gpus,
            "components": rows, "total": trainable + frozen, "trainable": trainable, "frozen": frozen,
            "memory_gib_per_gpu": memory}


def render(info: dict[str, Any]) -> str:
    lines = [f"stage {info['stage']}  precision {info['precision']}  GPUs {info['num_gpus']}", "",
             f"{'component':<24}{'parameters':>16}{'tensors':>10}  trainable"]
    for name, row in info["components"].items():
        lines.append(f"{name:<24}{row['parameters']:>16,}{row['tensors']:>10}  {'yes' if row['trainable'] else 'no'}")
    lines += [f"{'total':<24}{info['total']:>16,}", f"{'  trainable':<24}{info['trainable']:>16,}",
              f"{'  frozen':<24}{info['frozen']:>16,}", "",
              "per-GPU memory of model states, GiB (activations not included)",
              f"{'':<8}" + "".join(f"{k:>11}" for k in ("params", "grads", "optimizer", "frozen", "ema", "total"))]
    for stage, m in info["memory_gib_per_gpu"].items():
        lines.append(f"{stage:<8}" + "".join(f"{m[k]:>11.3f}" for k in
                                              ("params", "grads", "optimizer", "frozen", "ema", "total")))
    return "\n".join(lines)


def info_command(cfg: RunConfig, num_gpus: int, as_json: bool) -> str:
    info = describe(cfg, num_gpus)
    return json.dumps(info, indent=1) if as_json else render(info)
