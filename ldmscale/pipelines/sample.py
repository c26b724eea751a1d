"""Text- or class-conditional image sampling from a latent diffusion model: DDIM + CFG, then decode.

z_T ~ N(0, I) in the autoencoder's latent shape, DDIM (Song et al. 2021, eq. 12) through the UNet
wrapped in classifier-free guidance (Ho & Salimans 2022, eq. 6), then the frozen decoder maps the
scaled latent back to pixels (Rombach et al. 2022, §3: x = D(z / scale_factor)).

`LatentDiffusionPipeline` is what the training stage's sample grids and `ldmscale sample` share;
`load_pipeline` rebuilds one from an LDM export (the resolved run config in its metadata names
the autoencoder export and the conditioner).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ldmscale.checkpoint.export import export_file
from ldmscale.diffusion.guidance import CFGDenoiser
from ldmscale.diffusion.objectives import Prediction
from ldmscale.diffusion.samplers import SamplerStep, ddim_sample, model_denoiser
from ldmscale.diffusion.schedule import NoiseSchedule
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.models.conditioners import ClassConditioner, Conditioner, OpenCLIPConditioner
from ldmscale.models.unet import UNet
from ldmscale.observability.images import save_image_grid

# The latent diffusion stage's engine, hence its export: run_dir/export/ldm.safetensors.
LDM_NETWORK = "ldm"


@dataclasses.dataclass
class LatentDiffusionPipeline:
    """Plain (unpartitioned) modules on one device; `conditioner` encodes raw prompts or labels."""

    unet: UNet
    conditioner: Conditioner
    autoencoder: Autoencoder
    schedule: NoiseSchedule
    prediction: Prediction
    latent_shape: tuple[int, int, int]  # (E, h, w)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @torch.no_grad()
    def generate(self, raw: Any, num: int, *, steps: int = 50, eta: float = 0.0, guidance: float = 1.0,
                 generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """`num` images (num, 3, H, W) in [-1, 1] for raw conditioning (list of num prompts, (num,) labels, or None).

        guidance 1 samples the conditional model without the unconditional branch; an unconditional
        model (no conditioning keys) ignores `guidance`.
        """
        device = self.device
        cond = self.conditioner(raw) if raw is not None else {}
        cond = {k: v.to(device) for k, v in cond.items()}
        denoiser = model_denoiser(self.unet)
        if cond and guidance != 1.0:
            denoiser = CFGDenoiser(denoiser, self.conditioner.unconditional(1, device), guidance)
        z_T = torch.randn((num, *self.latent_shape), generator=generator, device=device)  # (N, E, h, w)
        bar = tqdm(total=steps, desc="sampling", unit="step", disable=not progress, dynamic_ncols=True)

        def advance(_: SamplerStep) -> None:
            bar.update(1)

        z0 = ddim_sample(denoiser, z_T, self.schedule, prediction=self.prediction, cond=cond, steps=steps,
                         generator=generator, callback=advance, eta=eta)  # (N, E, h, w)
        bar.close()
        decoder_dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.decode_from_latent(z0.to(decoder_dtype)).float().clamp(-1, 1)  # (N, 3, H, W)


def resolve_export(checkpoint: str | os.PathLike) -> Path:
    """An LDM export file, or a run directory holding `export/ldm.safetensors`."""
    return export_file(checkpoint, LDM_NETWORK, "an LDM")


def load_pipeline(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> LatentDiffusionPipeline:
    """Rebuilds the pipeline of an LDM export: networks from its embedded run config, weights strictly."""
    # The training stage imports this module for its sample grids, so its builders are imported here.
    from ldmscale.training.tasks.latent_diffusion import load_export_for_sampling

    return load_export_for_sampling(resolve_export(checkpoint), torch.device(device))


def raw_conditioning(conditioner: Conditioner, num: int, prompt: str | None = None,
                     class_label: int | None = None) -> list[str] | torch.Tensor | None:
    """The raw input for `num` samples of one prompt or one class; `ValueError` if it does not fit the model."""
    if isinstance(conditioner, OpenCLIPConditioner):
        if prompt is None:
            raise ValueError('--prompt: this model is text-conditional; give --prompt TEXT ("" for unconditional)'
                             + (", not --class" if class_label is not None else ""))
        return [prompt] * num
    if isinstance(conditioner, ClassConditioner):
        num_classes = conditioner.cfg.num_classes
        if class_label is None or not 0 <= class_label < num_classes:
            got = f"--prompt {prompt!r}" if prompt is not None else f"--class {class_label}"
            raise ValueError(f"--class: this model is class-conditional; give --class K with K in [0, {num_classes}), "
                             f"got {got}")
        return torch.full((num,), class_label, dtype=torch.long)
    if prompt is not None or class_label is not None:
        raise ValueError("--prompt/--class: this model is unconditional; leave both out")
    return None


def sample_to_png(checkpoint: str | os.PathLike, out: str | os.PathLike, *, prompt: str | None = None,
                  class_label: int | None = None, num: int = 16, steps: int = 50, eta: float = 0.0,
                  guidance: float = 3.0, seed: int = 0, device: str | None = None) -> Path:
    """`ldmscale sample`: `num` images of one prompt or class as one PNG grid (8 per row)."""
    if num < 1:
        raise ValueError(f"--num: must be >= 1, got {num}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline = load_pipeline(checkpoint, device)
    raw = raw_conditioning(pipeline.conditioner, num, prompt, class_label)
    if isinstance(raw, torch.Tensor):
        raw = raw.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    images = pipeline.generate(raw, num, steps=steps, eta=eta, guidance=guidance, generator=generator,
                               progress=True)  # (num, 3, H, W)
    return save_image_grid(images, out)
