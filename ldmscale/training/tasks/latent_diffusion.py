"""Stage 2a: the latent diffusion UNet on a frozen autoencoder (Rombach et al. 2022, §3.3, eq. 2).

    L = E_{x, y, eps ~ N(0, I), t ~ U{0..T-1}} [ w(t) || target(z0, eps, t) - net(z_t, t, c(y)) ||^2 ],
    z0 = scale_factor * E(x) (a fresh posterior sample each step), z_t = q_sample(z0, t, eps) (DDPM eq. 4)

with target eps | v | x0 (`diffusion.objectives`), w uniform or min-SNR, and c(y) a class table or a
frozen OpenCLIP text tower whose output is replaced by the unconditional one with probability
`ucg_rate` (classifier-free guidance training, Ho & Salimans 2022 §3.2).

Frozen networks (autoencoder, text tower) live beside the engine: eval mode, no gradients, never
in the optimizer or under ZeRO partitioning. The engine trains `LatentDenoiser`: the UNet, plus the
conditioner when it has trainable parameters (a class table giving a cross-attention context),
so that ZeRO partitions and the optimizer updates both. The autoencoder is rebuilt from the run
config embedded in its export, with the export's `scale_factor`; the LDM export records the
autoencoder's content hash so that `ldmscale sample` refuses a different one.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ldmscale.checkpoint.export import content_hash, load_export, read_export_metadata
from ldmscale.config.load import ConfigError, config_from_dict
from ldmscale.config.registry import polymorphic
from ldmscale.data.latents import check_latent_metadata, read_metadata
from ldmscale.diffusion.objectives import (LOSS_WEIGHTINGS, PREDICTIONS, EpsPredictionConfig,
                                           UniformWeightingConfig, build_prediction, diffusion_loss)
from ldmscale.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldmscale.distributed.zero import full_state_dict
from ldmscale.models.autoencoder import Autoencoder, AutoencoderConfig
from ldmscale.models.conditioners import (CONDITIONERS, Conditioner, NoConditionerConfig,
                                          OpenCLIPConditionerConfig, build_conditioner, unet_compatibility)
from ldmscale.models.regularizers import DiagonalGaussian
from ldmscale.models.unet import UNet, UNetConfig
from ldmscale.observability.images import save_image_grid
from ldmscale.pipelines.sample import LDM_NETWORK, LatentDiffusionPipeline
from ldmscale.training.task import TASKS, Component, Task

log = logging.getLogger(__name__)

ENGINE = LDM_NETWORK  # the engine's and the export's name: run_dir/export/ldm.safetensors


@dataclasses.dataclass
class SampleGridConfig:
    """The PNG grid written every `train.image_every` steps from the EMA weights."""

    num_images: int = 8
    steps: int = 50  # DDIM steps
    eta: float = 0.0
    guidance_scale: float = 3.0  # 1: no guidance
    prompts: list[str] = dataclasses.field(default_factory=list)  # openclip: cycled; empty: the batch's captions
    classes: list[int] = dataclasses.field(default_factory=list)  # class: cycled; empty: the batch's labels
    seed: int = 0  # the same starting noise at every grid, so grids are comparable over training

    def validate(self) -> list[str]:
        problems = []
        for name in ("num_images", "steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eta < 0:
            problems.append(f"eta: must be >= 0, got {self.eta}")
        return problems


@dataclasses.dataclass
class LatentDiffusionTaskConfig:
    autoencoder: str  # an autoencoder export, e.g. runs/<autoencoder run>/export/autoencoder.safetensors
    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    conditioner: NoConditionerConfig = polymorphic(CONDITIONERS, "none")
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    prediction: EpsPredictionConfig = polymorphic(PREDICTIONS, "eps")
    loss_weighting: UniformWeightingConfig = polymorphic(LOSS_WEIGHTINGS, "uniform")
    # Precision of the frozen autoencoder and text tower: fp32, or the engine's (`distributed.precision`).
    frozen_precision: Literal["fp32", "training"] = "fp32"
    sample: SampleGridConfig = dataclasses.field(default_factory=SampleGridConfig)

    def validate(self) -> list[str]:
        problems = []
        if not self.autoencoder:
            problems.append("autoencoder: required: the path of an autoencoder export (.safetensors)")
        try:
            conditioner = conditioner_shape(self.conditioner)
        except ValueError as e:  # unknown open_clip arch, max_length against its context length, ...
            problems.append(f"conditioner.{e}")
        else:
            problems += unet_compatibility(conditioner, self.unet)
        if self.sample.steps > self.schedule.num_timesteps:
            problems.append(f"sample.steps: must be <= schedule.num_timesteps ({self.schedule.num_timesteps}), "
                            f"got {self.sample.steps}")
        if self.sample.prompts and self.conditioner.kind != "openclip":
            problems.append(f"sample.prompts: only for conditioner kind openclip, got {self.conditioner.kind}")
        if self.sample.classes:
            if self.conditioner.kind != "class":
                problems.append(f"sample.classes: only for conditioner kind class, got {self.conditioner.kind}")
            elif not all(0 <= c < self.conditioner.num_classes for c in self.sample.classes):
                problems.append(f"sample.classes: must lie in [0, {self.conditioner.num_classes}), "
                                f"got {self.sample.classes}")
        return problems


# ------------------------------------------------------------------------------------------------------
# Building the stage's networks (shared with `pipelines.sample` and `ldmscale info`)


def conditioner_shape(cfg: Any) -> Conditioner:
    """The conditioner built on the meta device with nothing loaded: its output widths, for checks and counts."""
    if isinstance(cfg, OpenCLIPConditionerConfig):
        custom = cfg.custom
        if custom is None:
            import open_clip

            # The arch's own text config, passed as `custom`, builds the same tower without the
            # "random weights" warning that `weights: null` rightly gives in a real run. An unknown
            # arch is left to the constructor to report.
            model_cfg = open_clip.get_model_config(cfg.arch)
            custom = dict(model_cfg["text_cfg"]) if model_cfg is not None else None
        cfg = dataclasses.replace(cfg, weights=None, custom=custom)
    with torch.device("meta"):
        return build_conditioner(cfg)


def build_seeded_conditioner(cfg: Any, seed: int) -> Conditioner:
    """The conditioner on the CPU, initialised from `seed` alone (the global RNG is left untouched).

    A frozen text tower with `weights: null` (tests, smoke runs) is random; drawing it from the
    run's seed lets every rank, a resumed run and `ldmscale sample` rebuild the same one.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_conditioner(cfg)


def is_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def autoencoder_config(path: str, key: str = "task.autoencoder") -> tuple[AutoencoderConfig, dict[str, Any]]:
    """The architecture and metadata of an autoencoder export, read from its header (no weights)."""
    if not Path(path).is_file():
        raise ValueError(f"{key}: {path!r} is not a file; give the export/autoencoder.safetensors of an "
                         "autoencoder run (`ldmscale train configs/autoencoder/...`)")
    meta = read_export_metadata(path)
    if meta.get("stage") != "autoencoder":
        raise ValueError(f"{key}: {path} is an export of stage {meta.get('stage')!r}, not of an autoencoder")
    # `config.schema` imports the stages (this module included), hence the import here.
    from ldmscale.config.schema import RunConfig

    return config_from_dict(RunConfig, meta["config"]).task.model, meta


def load_frozen_autoencoder(path: str) -> tuple[Autoencoder, dict[str, Any]]:
    """The exported autoencoder (weights loaded strictly) with the export's scale factor, frozen, on the CPU."""
    cfg, meta = autoencoder_config(path)
    with torch.device("meta"):  # no random init: every tensor comes from the export
        model = Autoencoder(cfg)
    state, _ = load_export(path)
    model.load_state_dict(state, strict=True, assign=True)
    stored = float(model.scale_factor)
    model.set_scale_factor(float(meta["scale_factor"]))
    if abs(stored - float(meta["scale_factor"])) > 1e-6 * abs(stored):
        log.warning("%s: scale_factor buffer %g differs from the metadata's %g; using the metadata's",
                    path, stored, float(meta["scale_factor"]))
    return model.requires_grad_(False).eval(), meta


def check_latent_fit(unet: UNetConfig, autoencoder: Autoencoder, resolution: int, path: str) -> None:
    """The UNet must read and write the autoencoder's latents, and the latent side must downsample evenly."""
    problems = []
    channels = autoencoder.latent_channels
    for name in ("in_channels", "out_channels"):
        if getattr(unet, name) != channels:
            problems.append(f"task.unet.{name}: must equal the latent channels ({channels}) of the autoencoder "
                            f"{path}, got {getattr(unet, name)}")
    multiple = autoencoder.downsample_factor * 2 ** (len(unet.channel_mult) - 1)
    if resolution % multiple:
        problems.append(f"data.resolution: must be a multiple of {multiple} (autoencoder factor "
                        f"{autoencoder.downsample_factor} x UNet downsampling), got {resolution}")
    if problems:
        raise ConfigError(problems)


class LatentDenoiser(nn.Module):
    """What the engine trains: the UNet, and the conditioner when it has trainable parameters."""

    def __init__(self, unet: UNet, conditioner: Conditioner | None = None):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor] | None = None,
                raw: Any = None) -> torch.Tensor:
        """(B, E, h, w), (B,) -> (B, E, h, w).

        `cond` holds the UNet's keyword inputs from a frozen conditioner (dropout already applied);
        `raw` is the input of the trainable conditioner, encoded and dropped out here, inside the
        engine's forward, where ZeRO-3 has gathered its parameters.
        """
        if raw is not None:
            cond = self.conditioner.drop(self.conditioner(raw))
        return self.unet(x_t, t, **(cond or {}))


def build_denoiser(task: LatentDiffusionTaskConfig, conditioner: Conditioner) -> LatentDenoiser:
    return LatentDenoiser(UNet(task.unet), conditioner if is_trainable(conditioner) else None)


def plain_denoiser(task: LatentDiffusionTaskConfig, state: dict[str, torch.Tensor]) -> LatentDenoiser:
    """A plain `LatentDenoiser` holding `state` (strictly), in eval mode.

    Built on the meta device and given the state's tensors: no random init (which would also advance
    the training RNG), no second allocation. On the state's device the module shares its tensors,
    which sampling only reads. The state holds `conditioner.*` exactly when the conditioner trained.
    """
    trained_conditioner = any(k.startswith("conditioner.") for k in state)
    with torch.device("meta"):
        model = LatentDenoiser(UNet(task.unet), conditioner_shape(task.conditioner) if trained_conditioner else None)
    model.load_state_dict(state, strict=True, assign=True)
    assert not any(t.is_meta for t in model.state_dict().values()), "every tensor comes from `state`"
    return model.eval()


def latent_shape(autoencoder: Autoencoder, resolution: int) -> tuple[int, int, int]:
    side = resolution // autoencoder.downsample_factor
    return autoencoder.latent_channels, side, side


def load_export_for_sampling(path: Path, device: torch.device) -> LatentDiffusionPipeline:
    """An LDM export -> its pipeline; refuses an autoencoder or text tower other than the trained ones."""
    from ldmscale.config.schema import RunConfig  # see `autoencoder_config`
    from ldmscale.nn.attention import set_attention_backend

    state, meta = load_export(path)
    if meta.get("stage") != "latent_diffusion":
        raise ValueError(f"CHECKPOINT: {path} is an export of stage {meta.get('stage')!r}, not of latent_diffusion")
    cfg = config_from_dict(RunConfig, meta["config"])
    set_attention_backend(cfg.attention)
    task: LatentDiffusionTaskConfig = cfg.task
    autoencoder, ae_meta = load_frozen_autoencoder(task.autoencoder)
    if ae_meta["content_hash"] != meta["autoencoder_content_hash"]:
        raise ValueError(f"task.autoencoder: {task.autoencoder} is not the autoencoder {path} was trained with "
                         f"(content hash {ae_meta['content_hash'][:12]} != {meta['autoencoder_content_hash'][:12]})")
    model = plain_denoiser(task, state).to(device)
    conditioner = model.conditioner  # trained with the UNet, or else frozen and rebuilt from the config:
    if conditioner is None:
        conditioner = build_seeded_conditioner(task.conditioner, cfg.seed)
        trained_hash = meta.get("conditioner_content_hash")
        if trained_hash is not None and content_hash(conditioner.state_dict()) != trained_hash:
            raise ValueError(f"task.conditioner: the text tower built from {task.conditioner} differs from the one "
                             f"{path} was trained with (did its weights file change?)")
    return LatentDiffusionPipeline(
        unet=model.unet, conditioner=conditioner.to(device).eval(), autoencoder=autoencoder.to(device),
        schedule=NoiseSchedule.from_config(task.schedule), prediction=build_prediction(task.prediction),
        latent_shape=tuple(meta["latent_shape"]))


# ------------------------------------------------------------------------------------------------------
# The task


class LatentDiffusionTask(Task):
    @classmethod
    def build_components(cls, cfg) -> dict[str, Component]:
        task: LatentDiffusionTaskConfig = cfg.task
        conditioner = conditioner_shape(task.conditioner)
        components = {"unet": Component(UNet(task.unet), trainable=True)}
        if any(True for _ in conditioner.parameters()):
            components["conditioner"] = Component(conditioner, trainable=is_trainable(conditioner))
        try:
            components["autoencoder"] = Component(Autoencoder(autoencoder_config(task.autoencoder)[0]),
                                                  trainable=False)
        except ValueError as e:  # planning before the autoencoder exists: count the rest
            log.warning("autoencoder not counted: %s", e)
        return components

    def __init__(self, cfg, *, penv, run_dir: Path):
        super().__init__(cfg, penv=penv, run_dir=run_dir)
        task: LatentDiffusionTaskConfig = cfg.task
        self.task_cfg = task
        autoencoder, ae_meta = load_frozen_autoencoder(task.autoencoder)
        check_latent_fit(task.unet, autoencoder, cfg.data.resolution, task.autoencoder)
        conditioner = build_seeded_conditioner(task.conditioner, cfg.seed)
        trainable_conditioner = is_trainable(conditioner)
        self.cached_text = False  # condition on the text-tower outputs stored in latent shards
        if cfg.data.kind == "latents":  # cached moments: refuse those of another autoencoder or scale factor
            cached = read_metadata(cfg.data.shards)
            self.cached_text = cfg.data.text and task.conditioner.kind == "openclip" and cached["text"] is not None
            check_latent_metadata(cached, folder=cfg.data.shards, autoencoder_hash=ae_meta["content_hash"],
                                  scale_factor=float(ae_meta["scale_factor"]),
                                  latent_shape=latent_shape(autoencoder, cfg.data.resolution),
                                  resolution=cfg.data.resolution,
                                  conditioner_hash=content_hash(conditioner.state_dict()) if self.cached_text else None)
        self.engine = self.make_engine(ENGINE, build_denoiser(task, conditioner), cfg.optim)
        self.frozen_dtype = self.engine.dtype if task.frozen_precision == "training" else torch.float32
        self.autoencoder = autoencoder.to(self.device, self.frozen_dtype)
        # A trainable conditioner lives in the engine; a frozen one (text tower, labels as `y`) beside it.
        self.conditioner = None if trainable_conditioner else conditioner.to(self.device, self.frozen_dtype).eval()
        self.schedule = NoiseSchedule.from_config(task.schedule)
        self.prediction = build_prediction(task.prediction)
        self.weighting = LOSS_WEIGHTINGS.build(task.loss_weighting)
        self.latent_shape = latent_shape(autoencoder, cfg.data.resolution)
        self._export_metadata = {"autoencoder_content_hash": ae_meta["content_hash"],
                                 "scale_factor": float(ae_meta["scale_factor"]), "latent_shape": self.latent_shape}
        if not trainable_conditioner and any(True for _ in conditioner.parameters()):
            # Hashed before the cast to `frozen_dtype`, as `ldmscale sample` rebuilds it (in fp32).
            self._export_metadata["conditioner_content_hash"] = content_hash(conditioner.state_dict())

    # --- one step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, E, H/f, W/f) in float32, one posterior sample."""
        x = images.to(self.device, self.frozen_dtype)
        return self.autoencoder.encode_to_latent(x, sample=True).float()

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """z0 = scale_factor * z, z ~ q(z|x), (B, E, h, w) float32: from the cached moments of
        `data.kind=latents` (a fresh sample each step, same draw as `encode`), else `encode(batch["image"])`."""
        if "latent_mean" not in batch:
            return self.encode(batch["image"])
        posterior = DiagonalGaussian(batch["latent_mean"].to(self.device, self.frozen_dtype),
                                     batch["latent_logvar"].to(self.device, self.frozen_dtype))  # (B, E, h, w)
        return (posterior.sample() * self.autoencoder.scale_factor).float()

    def raw_input(self, batch: dict[str, Any]) -> Any:
        """The batch's raw conditioning: captions (openclip), labels (class) or None."""
        kind = self.task_cfg.conditioner.kind
        if kind == "openclip":
            return list(batch["caption"])
        if kind == "class":
            labels = batch["label"]
            num_classes = self.task_cfg.conditioner.num_classes
            if bool(((labels < 0) | (labels >= num_classes)).any()):
                raise ValueError(f"data: class-conditional training needs a label (`cls`) in [0, {num_classes}) "
                                 f"for every sample; got {labels.tolist()} (-1: the sample has none)")
            return labels.to(self.device)
        return None

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of `LatentDenoiser.forward` for this batch, with conditioning dropout."""
        raw = self.raw_input(batch)
        if raw is None:
            return {}
        if self.conditioner is None:  # trainable: encoded inside the engine
            return {"raw": raw}
        with torch.no_grad():
            cond = {"context": batch["text_context"].to(self.device, self.frozen_dtype)} if self.cached_text \
                else self.conditioner(raw)  # (B, L, D) stored by cache-latents, or encoded now
            return {"cond": self.conditioner.drop(cond)}

    def training_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        """One micro-batch of eq. 2 (module docstring).

        Random draws come from the global RNG, which the trainer checkpoints per rank, in this order:
        the autoencoder's posterior sample, t, the noise, the conditioning dropout mask.
        """
        z0 = self.latents(batch)  # (B, E, h, w)
        t = torch.randint(0, self.schedule.num_timesteps, (z0.shape[0],), device=z0.device)  # (B,)
        noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype)  # (B, E, h, w)
        z_t = self.schedule.q_sample(z0, t, noise)
        output = self.engine(z_t, t, **self.conditioning(batch))  # (B, E, h, w)
        target = self.prediction.target(z0, noise, t, self.schedule)
        loss = diffusion_loss(output, target, self.weighting(t, self.schedule, self.prediction))
        self.engine.backward_step(loss)
        return {"loss": float(loss.detach()), "latent_std": float(z0.std())}

    # --- sample grids and export ---------------------------------------------------------------------

    def sampling_pipeline(self, state: dict[str, torch.Tensor]) -> LatentDiffusionPipeline:
        """A plain copy of the engine's network with `state` (the EMA weights), beside the frozen parts."""
        model = plain_denoiser(self.task_cfg, state).to(self.device)
        return LatentDiffusionPipeline(
            unet=model.unet, conditioner=self.conditioner if model.conditioner is None else model.conditioner,
            autoencoder=self.autoencoder, schedule=self.schedule, prediction=self.prediction,
            latent_shape=self.latent_shape)

    def grid_input(self, batch: dict[str, Any]) -> Any:
        """Raw conditioning of the grid's images: the configured prompts / classes, else the batch's, cycled."""
        grid, kind, n = self.task_cfg.sample, self.task_cfg.conditioner.kind, self.task_cfg.sample.num_images
        if kind == "openclip":
            prompts = grid.prompts or list(batch["caption"])
            return [prompts[i % len(prompts)] for i in range(n)]
        if kind == "class":
            classes = grid.classes or self.raw_input(batch).tolist()
            return torch.tensor([classes[i % len(classes)] for i in range(n)], device=self.device)
        return None

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], step: int, images_dir: Path) -> None:
        """`images/samples-<step>.png`: DDIM + CFG from the EMA weights (the live weights without EMA)."""
        ema = self.emas.get(ENGINE)
        state = ema.state_dict() if ema is not None else full_state_dict(self.engine.module)  # collective, ZeRO-3
        if not self.penv.is_main:
            return
        grid = self.task_cfg.sample
        generator = torch.Generator(self.device).manual_seed(grid.seed)
        images = self.sampling_pipeline(state).generate(
            self.grid_input(batch), grid.num_images, steps=grid.steps, eta=grid.eta,
            guidance=grid.guidance_scale, generator=generator)
        save_image_grid(images, images_dir / f"samples-{step:08d}.png")

    def export_metadata(self) -> dict[str, Any]:
        return dict(self._export_metadata)


TASKS.register("latent_diffusion", LatentDiffusionTaskConfig, LatentDiffusionTask)
