"""Stage 2b: PDAE heads on a frozen pre-trained latent DPM (Zhang, Zhao & Lin 2022, eq. 7 and eq. 10).

    L = E_{x, t ~ U{0..T-1}, eps} [ lambda_t || eps - (eps_theta(z_t, t) + c_t G(z_t, E(x), t)) ||^2 ],
    z0 = scale_factor * Enc(x) (a fresh posterior sample each step), z_t = q_sample(z0, t, eps)

with c_t, lambda_t from the pre-trained LDM's own schedule (`diffusion.pdae`). The LDM export (its
UNet, autoencoder, conditioner, schedule and prediction, rebuilt from the run config it embeds) is
frozen beside the engine: eval mode, no gradients, never in the optimizer or under ZeRO. It runs
under `torch.no_grad` once per step, its encoder half's features feeding both its own decoder
(eps_theta, converted to eps for v / x0 models) and G's. The engine trains `PDAEHeads` (E and G's new
parts) only, with the trainer's EMA. A text- or class-conditional LDM is used with its
unconditional conditioning (empty prompt / null class): PDAE's z replaces the condition.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from ldmscale.checkpoint.export import content_hash, export_file, load_export, read_export_metadata
from ldmscale.config.load import ConfigError, config_from_dict
from ldmscale.distributed.zero import full_state_dict
from ldmscale.losses.pdae import pdae_loss
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.models.pdae import PDAEConfig, PDAEHeads, SemanticEncoderConfig, ShiftDecoderConfig
from ldmscale.models.unet import UNet, UNetConfig
from ldmscale.observability.images import save_rows
from ldmscale.pipelines.pdae import PDAE_NETWORK, PDAEPipeline
from ldmscale.pipelines.sample import LatentDiffusionPipeline, resolve_export
from ldmscale.training.task import TASKS, Component, Task
from ldmscale.training.tasks.latent_diffusion import autoencoder_config, load_export_for_sampling

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReconstructionGridConfig:
    """`images/reconstructions-<step>.png` from the EMA heads: inputs, then autoencoded with inferred x_T."""

    num_images: int = 4
    encode_steps: int = 50  # shifted DDIM inversion steps
    decode_steps: int = 20  # shifted DDIM decoding steps

    def validate(self) -> list[str]:
        return [f"{name}: must be >= 1, got {getattr(self, name)}"
                for name in ("num_images", "encode_steps", "decode_steps") if getattr(self, name) < 1]


@dataclasses.dataclass
class PDAETaskConfig:
    ldm: str  # the pre-trained LDM: an export (runs/<ldm run>/export/ldm.safetensors) or its run directory
    encoder_input: Literal["image", "latent"] = "image"  # what E reads: pixels (the paper) or the scaled latent
    encoder: SemanticEncoderConfig = dataclasses.field(default_factory=SemanticEncoderConfig)
    decoder: ShiftDecoderConfig = dataclasses.field(default_factory=ShiftDecoderConfig)
    gamma: float = 0.1  # lambda_t = SNR^gamma / (1 + SNR), PDAE eq. 10
    # Precision of the frozen LDM (UNet and autoencoder): fp32, or the engine's (`distributed.precision`).
    frozen_precision: Literal["fp32", "training"] = "fp32"
    sample: ReconstructionGridConfig = dataclasses.field(default_factory=ReconstructionGridConfig)

    def validate(self) -> list[str]:
        problems = []
        if not self.ldm:
            problems.append("ldm: required: the path of a latent diffusion export (.safetensors) or run directory")
        if not 0.0 <= self.gamma <= 1.0:
            problems.append(f"gamma: must be in [0, 1], got {self.gamma}")
        return problems


def ldm_run_config(path: str, key: str = "task.ldm") -> tuple[Path, Any, dict[str, Any]]:
    """(export path, the LDM's RunConfig, its export metadata), read from the header (no weights)."""
    try:
        export = resolve_export(path)
    except ValueError:
        raise ValueError(f"{key}: {path!r} is neither an LDM export (.safetensors) nor a run directory with "
                         "export/ldm.safetensors; train one with `ldmscale train configs/ldm/...`") from None
    meta = read_export_metadata(export)
    if meta.get("stage") != "latent_diffusion":
        raise ValueError(f"{key}: {export} is an export of stage {meta.get('stage')!r}, not of latent_diffusion")
    from ldmscale.config.schema import RunConfig  # `config.schema` imports the stages, this one included

    return export, config_from_dict(RunConfig, meta["config"]), meta


def build_heads(task: PDAETaskConfig, unet: UNetConfig, latent_shape: tuple[int, int, int], resolution: int
                ) -> PDAEHeads:
    channels, side = (3, resolution) if task.encoder_input == "image" else (latent_shape[0], latent_shape[1])
    return PDAEHeads(PDAEConfig(task.encoder, task.decoder), unet, encoder_channels=channels,
                     encoder_resolution=side)


def load_frozen_ldm(path: str, device: torch.device) -> tuple[LatentDiffusionPipeline, str]:
    """The LDM export's pipeline (weights strictly, frozen, eval) and its UNet's content hash."""
    export, _, _ = ldm_run_config(path)
    ldm = load_export_for_sampling(export, device)
    for module in (ldm.unet, ldm.conditioner, ldm.autoencoder):
        module.requires_grad_(False).eval()
    return ldm, content_hash(ldm.unet.state_dict())


def check_resolution(ldm_cfg: Any, resolution: int, path: str) -> None:
    if ldm_cfg.data.resolution != resolution:
        raise ConfigError([f"data.resolution: must equal the resolution the LDM {path} was trained at "
                           f"({ldm_cfg.data.resolution}), got {resolution}"])


def load_pdae_pipeline(checkpoint: str, device: torch.device | str = "cpu") -> PDAEPipeline:
    """A PDAE export (or run directory) -> its pipeline; refuses an LDM other than the one it was trained on."""
    from ldmscale.config.schema import RunConfig
    from ldmscale.nn.attention import set_attention_backend

    path = export_file(checkpoint, PDAE_NETWORK, "a PDAE")
    state, meta = load_export(path)
    if meta.get("stage") != "pdae":
        raise ValueError(f"CHECKPOINT: {path} is an export of stage {meta.get('stage')!r}, not of pdae")
    cfg = config_from_dict(RunConfig, meta["config"])
    set_attention_backend(cfg.attention)
    device = torch.device(device)
    ldm, ldm_hash = load_frozen_ldm(cfg.task.ldm, device)
    if ldm_hash != meta["ldm_unet_content_hash"]:
        raise ValueError(f"task.ldm: {cfg.task.ldm} is not the LDM {path} was trained on "
                         f"(UNet content hash {ldm_hash[:12]} != {meta['ldm_unet_content_hash'][:12]})")
    with torch.device("meta"):
        heads = build_heads(cfg.task, ldm.unet.cfg, ldm.latent_shape, cfg.data.resolution)
    heads.load_state_dict(state, strict=True, assign=True)
    return PDAEPipeline(unet=ldm.unet, heads=heads.to(device).eval(), autoencoder=ldm.autoencoder,
                        schedule=ldm.schedule, prediction=ldm.prediction,
                        uncond=ldm.conditioner.unconditional(1, device), encoder_input=cfg.task.encoder_input,
                        resolution=cfg.data.resolution)


class PDAETask(Task):
    @classmethod
    def build_components(cls, cfg) -> dict[str, Component]:
        task: PDAETaskConfig = cfg.task
        _, ldm_cfg, meta = ldm_run_config(task.ldm)
        return {"pdae": Component(build_heads(task, ldm_cfg.task.unet, tuple(meta["latent_shape"]),
                                              cfg.data.resolution), trainable=True),
                "unet": Component(UNet(ldm_cfg.task.unet), trainable=False),
                "autoencoder": Component(Autoencoder(autoencoder_config(ldm_cfg.task.autoencoder)[0]),
                                         trainable=False)}

    def __init__(self, cfg, *, penv, run_dir: Path):
        super().__init__(cfg, penv=penv, run_dir=run_dir)
        task: PDAETaskConfig = cfg.task
        self.task_cfg = task
        export, ldm_cfg, ldm_meta = ldm_run_config(task.ldm)
        check_resolution(ldm_cfg, cfg.data.resolution, task.ldm)
        # Loaded before the heads are built: `load_export_for_sampling` draws no random numbers, so the
        # heads' initialisation depends on the seed alone.
        ldm, ldm_hash = load_frozen_ldm(str(export), self.device)
        self.latent_shape = tuple(ldm_meta["latent_shape"])
        heads = build_heads(task, ldm.unet.cfg, self.latent_shape, cfg.data.resolution)
        self.engine = self.make_engine(PDAE_NETWORK, heads, cfg.optim)
        self.frozen_dtype = self.engine.dtype if task.frozen_precision == "training" else torch.float32
        self.unet = ldm.unet.to(self.device, self.frozen_dtype)
        self.autoencoder = ldm.autoencoder.to(self.device, self.frozen_dtype)
        self.uncond = {k: v.to(self.device) for k, v in ldm.conditioner.unconditional(1, self.device).items()}
        self.schedule, self.prediction = ldm.schedule, ldm.prediction
        self._export_metadata = {"ldm": str(export), "ldm_unet_content_hash": ldm_hash,
                                 "latent_shape": list(self.latent_shape), "encoder_input": task.encoder_input,
                                 "z_dim": task.encoder.z_dim}

    def cond(self, batch: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(batch, *v.shape[1:]).to(self.frozen_dtype) for k, v in self.uncond.items()}

    @torch.no_grad()
    def frozen_forward(self, z_t: torch.Tensor, t: torch.Tensor
                       ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The pre-trained UNet once: (h, skips, emb) of its encoder half and eps_theta (B, E, h, w) float32."""
        cond = self.cond(z_t.shape[0])
        h, skips, emb = self.unet.encode_features(z_t.to(self.frozen_dtype), t, **cond)
        output = self.unet.decode_features(h, skips, emb, cond.get("context")).float()
        return h, skips, emb, self.prediction.to_eps(output, z_t, t, self.schedule)

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        """One micro-batch of eq. 7 (module docstring).

        Random draws come from the global RNG, which the trainer checkpoints per rank, in this order:
        the autoencoder's posterior sample, t, the noise.
        """
        images = batch["image"].to(self.device)
        with torch.no_grad():
            z0 = self.autoencoder.encode_to_latent(images.to(self.frozen_dtype), sample=True).float()  # (B, E, h, w)
        t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],), device=z0.device)  # (B,)
        noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype)
        z_t = self.schedule.q_sample(z0, t, noise)
        h, skips, emb, eps_theta = self.frozen_forward(z_t, t)
        dtype = self.engine.dtype
        x_enc = images if self.task_cfg.encoder_input == "image" else z0
        z, g = self.engine(x_enc.to(dtype), h.to(dtype), [s.to(dtype) for s in skips], emb.to(dtype))
        loss = pdae_loss(noise, eps_theta, g, t, self.schedule, self.task_cfg.gamma)
        self.engine.backward_step(loss)
        return {"loss": float(loss.detach()), "z_std": float(z.detach().float().std())}

    def pipeline(self, state: dict[str, torch.Tensor]) -> PDAEPipeline:
        """A plain copy of the heads holding `state` (the EMA weights), beside the frozen LDM."""
        with torch.device("meta"):
            heads = build_heads(self.task_cfg, self.unet.cfg, self.latent_shape, self.cfg.data.resolution)
        heads.load_state_dict(state, strict=True, assign=True)
        return PDAEPipeline(unet=self.unet, heads=heads.to(self.device).eval(), autoencoder=self.autoencoder,
                            schedule=self.schedule, prediction=self.prediction, uncond=self.uncond,
                            encoder_input=self.task_cfg.encoder_input, resolution=self.cfg.data.resolution)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], step: int, images_dir: Path) -> None:
        ema = self.emas.get(PDAE_NETWORK)
        state = ema.state_dict() if ema is not None else full_state_dict(self.engine.module)  # collective, ZeRO-3
        if not self.penv.is_main:
            return
        grid = self.task_cfg.sample
        images = batch["image"][:grid.num_images].to(self.device).float()
        recon = self.pipeline(state).reconstruct(images, encode_steps=grid.encode_steps,
                                                 decode_steps=grid.decode_steps)
        save_rows([images, recon], images_dir / f"reconstructions-{step:08d}.png")

    def export_metadata(self) -> dict[str, Any]:
        return dict(self._export_metadata)


TASKS.register("pdae", PDAETaskConfig, PDAETask)
