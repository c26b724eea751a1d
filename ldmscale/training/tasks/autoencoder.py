"""Stage 1: the perceptual autoencoder (KL or VQ), L1 + LPIPS + PatchGAN (Rombach et al. 2022, §3.1).

Generator (the autoencoder) and discriminator are two DeepSpeed engines stepped alternately on each
micro-batch, as in taming-transformers' two optimizers: DeepSpeed supports one optimizer per
engine. The discriminator's parameters are frozen during the generator's step so that its backward
neither computes nor reduces discriminator gradients.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ldmscale.data.shards import DATA_SOURCES
from ldmscale.distributed import env as dist_env
from ldmscale.losses.autoencoder import AutoencoderLoss, AutoencoderLossConfig
from ldmscale.losses.discriminator import NLayerDiscriminator
from ldmscale.losses.lpips import LPIPS
from ldmscale.losses.metrics import psnr, ssim
from ldmscale.models.autoencoder import Autoencoder, AutoencoderConfig
from ldmscale.observability.images import save_rows
from ldmscale.training.optim import OptimConfig
from ldmscale.training.task import TASKS, Component, Task


@dataclasses.dataclass
class AutoencoderTaskConfig:
    model: AutoencoderConfig = dataclasses.field(default_factory=AutoencoderConfig)
    loss: AutoencoderLossConfig = dataclasses.field(default_factory=AutoencoderLossConfig)
    # The generator uses the run's `optim`; the discriminator has its own (LDM uses the same lr).
    disc_optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    validation_batches: int = 4  # batches of `data.validation_shards` per validation (per rank)
    scale_by_std: bool = True  # latent scale factor = 1 / std of latents (LDM), else 1
    scale_factor_batches: int = 4  # batches the scale factor is estimated from
    image_rows: int = 8  # images per row of the input-vs-reconstruction grid


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


class AutoencoderTask(Task):
    @classmethod
    def build_components(cls, cfg) -> dict[str, Component]:
        task: AutoencoderTaskConfig = cfg.task
        components = {"autoencoder": Component(Autoencoder(task.model), trainable=True),
                      "discriminator": Component(NLayerDiscriminator(task.loss.discriminator), trainable=True)}
        if task.loss.perceptual_weight > 0:
            components["lpips"] = Component(LPIPS(dataclasses.replace(task.loss.lpips, pretrained=False)),
                                            trainable=False)
        return components

    def __init__(self, cfg, *, penv, run_dir: Path):
        super().__init__(cfg, penv=penv, run_dir=run_dir)
        task: AutoencoderTaskConfig = cfg.task
        self.task_cfg = task
        self.generator = self.make_engine("autoencoder", Autoencoder(task.model), cfg.optim)
        self.discriminator = self.make_engine("discriminator", NLayerDiscriminator(task.loss.discriminator),
                                              task.disc_optim)
        self.loss = AutoencoderLoss(task.loss).to(self.generator.device).eval()
        self.scale_factor = 1.0
        self.recent_images: deque[torch.Tensor] = deque(maxlen=task.scale_factor_batches)

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.generator.module}

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["image"].to(self.generator.device, self.generator.dtype)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        x = self._images(batch)  # (B, 3, H, W) in [-1, 1]
        self.recent_images.append(batch["image"][: self.task_cfg.image_rows])
        gen, disc = self.generator, self.discriminator
        set_requires_grad(disc.module, False)
        reconstruction, reg_out = gen.forward_for_manual_grads(x)
        g_loss, logs = self.loss.generator_loss(x.float(), reconstruction.float(), reg_out, step,
                                                last_layer=gen.module.last_layer, discriminator=disc.module)
        set_requires_grad(disc.module, True)
        gen.backward_step(g_loss)
        logs = {"loss": g_loss.detach(), **logs}
        if step >= self.task_cfg.loss.disc_start:
            d_loss, d_logs = self.loss.discriminator_loss(x.detach().float(), reconstruction.detach().float(),
                                                          step, disc.module)
            disc.backward_step(d_loss)
            d_logs["d_total"] = d_logs.pop("loss")
            logs.update(d_logs)
        return {k: float(v) for k, v in logs.items()}

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], step: int, images_dir: Path) -> None:
        x = self._images(batch)[: self.task_cfg.image_rows]
        reconstruction, _ = self.generator(x)
        if self.penv.is_main:
            save_rows([x.float(), reconstruction.float()], images_dir / f"reconstructions-{step:08d}.png")

    def _validation_loader(self):
        """A fresh single pass over the held-out shards: the same samples at every validation."""
        if not self.cfg.data.validation_shards:
            return None
        val_cfg = dataclasses.replace(self.cfg.data, shuffle=False, flip=False, crop="center", num_workers=0)
        return DATA_SOURCES.build(val_cfg, batch_size=self.cfg.train.micro_batch_size, rank=self.penv.rank,
                                  world_size=self.penv.world_size, seed=self.cfg.seed, epochs=1,
                                  split="validation")

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """PSNR, SSIM and LPIPS of reconstructions on the held-out shards, averaged over all ranks."""
        loader = self._validation_loader()
        if loader is None:
            return {}
        lpips = self.loss.lpips
        totals = torch.zeros(4, dtype=torch.float64)  # psnr, ssim, lpips sums, count
        batches = iter(loader)
        for _ in range(self.task_cfg.validation_batches):
            batch = next(batches, None)
            # Every rank runs the same number of forwards (ZeRO-3 gathers are collective).
            x = self._images(batch) if batch is not None else None
            if x is None:
                x = torch.zeros(1, 3, self.cfg.data.resolution, self.cfg.data.resolution,
                                device=self.generator.device, dtype=self.generator.dtype)
            reconstruction, _ = self.generator(x)
            if batch is None:
                continue
            x, reconstruction = x.float(), reconstruction.float().clamp(-1, 1)
            totals += torch.tensor([psnr(reconstruction, x).sum().item(), ssim(reconstruction, x).sum().item(),
                                    lpips(reconstruction, x).sum().item() if lpips is not None else 0.0,
                                    x.shape[0]], dtype=torch.float64)
        sums = [dist_env.all_reduce_sum(float(v)) for v in totals]
        count = max(sums[3], 1.0)
        metrics = {"psnr": sums[0] / count, "ssim": sums[1] / count, "samples": sums[3]}
        if lpips is not None:
            metrics["lpips"] = sums[2] / count
        return metrics

    @torch.no_grad()
    def before_save(self, step: int) -> None:
        if self.task_cfg.scale_by_std and self.recent_images:
            self.scale_factor = self.estimate_scale_factor(step)
            self.generator.module.set_scale_factor(self.scale_factor)

    def estimate_scale_factor(self, step: int) -> float:
        """1 / std of the latents over the recent batches, over all ranks (LDM's `scale_by_std`)."""
        generator = torch.Generator(device=self.generator.device).manual_seed(step)
        total = torch.zeros(3, dtype=torch.float64)  # sum, sum of squares, count
        for images in self.recent_images:
            x = images.to(self.generator.device, self.generator.dtype)
            module = self.generator.module
            z = (module.encode_to_latent(x, sample=True, generator=generator) / module.scale_factor).double().cpu()
            total += torch.tensor([z.sum().item(), (z * z).sum().item(), z.numel()], dtype=torch.float64)
        s, sq, n = (dist_env.all_reduce_sum(float(v)) for v in total)
        variance = sq / n - (s / n) ** 2
        return float(1.0 / max(variance, 1e-12) ** 0.5)

    def export_metadata(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor}

    def export_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "scale_factor" in state:
            state["scale_factor"] = torch.tensor(self.scale_factor, dtype=state["scale_factor"].dtype)
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale_factor": torch.tensor(self.scale_factor, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.scale_factor = float(state["scale_factor"]) if "scale_factor" in state else 1.0


TASKS.register("autoencoder", AutoencoderTaskConfig, AutoencoderTask)
