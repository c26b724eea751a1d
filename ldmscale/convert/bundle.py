"""A whole ldmscale model in its own key layouts: what every converter reads and writes.

`Bundle` holds the state dicts of the autoencoder, the latent denoiser (UNet, plus the conditioner
when it trained) and the frozen text tower, with the run configs they are built from. `read_ldmscale`
makes one from an export, a checkpoint folder or a run directory; `write_ldmscale` writes one as
a run-directory-like folder (`config.yaml`, `export/autoencoder.safetensors`, `export/ldm.safetensors`
and the text tower's weights) that `ldmscale sample` and later stages read like a trained run's.
Every write first loads each state into its model built on the meta device, strictly: a missing,
unexpected or mis-shaped tensor is an error listing them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from ldmscale.checkpoint.export import content_hash, export_weights, load_export, read_export_metadata
from ldmscale.checkpoint.io import save_safetensors
from ldmscale.config.load import config_from_dict, config_to_dict, load_config, save_config
from ldmscale.config.schema import RunConfig
from ldmscale.convert.runs import PRIMARY_NETWORK, read_engine, resolve_step_dir
from ldmscale.models.autoencoder import Autoencoder, AutoencoderConfig
from ldmscale.models.unet import UNet
from ldmscale.training.tasks.latent_diffusion import (LatentDenoiser, LatentDiffusionTaskConfig,
                                                      build_seeded_conditioner, conditioner_shape, is_trainable,
                                                      latent_shape)

log = logging.getLogger(__name__)

Weights = Literal["ema", "raw"]
TEXT_WEIGHTS = "text_encoder.safetensors"  # the frozen text tower's weights beside the exports


@dataclasses.dataclass
class Bundle:
    run: RunConfig  # stage latent_diffusion or autoencoder
    autoencoder_run: RunConfig  # the autoencoder's run config (`run` itself for an autoencoder bundle)
    autoencoder: dict[str, torch.Tensor]  # `Autoencoder.state_dict()`, `scale_factor` included
    denoiser: dict[str, torch.Tensor] | None = None  # `LatentDenoiser.state_dict()`: unet.*, conditioner.* if trained
    denoiser_ema: dict[str, torch.Tensor] | None = None  # its EMA, where a format stores both (`model_ema.*`)
    text: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # frozen conditioner's state_dict()
    step: int = 0
    ema: bool = False  # the main weights (denoiser, or the autoencoder of an autoencoder bundle) are an EMA

    @property
    def is_ldm(self) -> bool:
        return self.run.stage == "latent_diffusion"

    @property
    def task(self) -> LatentDiffusionTaskConfig:
        assert self.is_ldm, "only latent diffusion bundles have a diffusion task"
        return self.run.task

    @property
    def ae_cfg(self) -> AutoencoderConfig:
        return self.autoencoder_run.task.model

    def part(self, prefix: str, ema: bool = False) -> dict[str, torch.Tensor]:
        """The denoiser's (or its EMA's) tensors under `prefix` ("unet." or "conditioner."), prefix removed."""
        state = self.denoiser_ema if ema else self.denoiser
        return {k[len(prefix):]: v for k, v in (state or {}).items() if k.startswith(prefix)}


def strict_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> list[str]:
    """Missing, unexpected and mis-shaped tensors of `state` against a model's `state_dict()`."""
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"{what}: {len(missing)} missing tensors: {missing}")
    if unexpected:
        problems.append(f"{what}: {len(unexpected)} unexpected tensors: {unexpected}")
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(v.shape)})" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append(f"{what}: {len(shapes)} tensors of the wrong shape: {shapes}")
    return problems


def _meta_state(build) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return build().state_dict()


def expected_denoiser(task: LatentDiffusionTaskConfig) -> dict[str, torch.Tensor]:
    """Shapes of the engine's `LatentDenoiser` state: the UNet, plus the conditioner when it trains."""
    conditioner = conditioner_shape(task.conditioner)
    return _meta_state(lambda: LatentDenoiser(UNet(task.unet), conditioner if is_trainable(conditioner) else None))


def expected_states(run: RunConfig, autoencoder_run: RunConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Meta-device state dicts of the configured models: `autoencoder`, and for latent diffusion
    `denoiser` and `text` (the frozen conditioner's; empty when the conditioner trains or has no weights)."""
    states = {"autoencoder": _meta_state(lambda: Autoencoder(autoencoder_run.task.model))}
    if run.stage == "latent_diffusion":
        states["denoiser"] = expected_denoiser(run.task)
        conditioner = conditioner_shape(run.task.conditioner)
        states["text"] = {} if is_trainable(conditioner) else conditioner.state_dict()
    return states


def bundle_problems(bundle: Bundle) -> list[str]:
    """Where the states do not fit their models exactly (missing, unexpected, mis-shaped tensors)."""
    expected = expected_states(bundle.run, bundle.autoencoder_run)
    problems = strict_problems(expected["autoencoder"], bundle.autoencoder, "autoencoder")
    if bundle.is_ldm:
        problems += strict_problems(expected["denoiser"], bundle.denoiser or {}, "denoiser (unet.*, conditioner.*)")
        if bundle.denoiser_ema is not None:
            problems += strict_problems(expected["denoiser"], bundle.denoiser_ema, "denoiser EMA")
        problems += strict_problems(expected["text"], bundle.text, "text tower")
    return problems


def check_bundle(bundle: Bundle) -> None:
    problems = bundle_problems(bundle)
    if problems:
        raise ValueError("the weights do not fit the configured models:\n  " + "\n  ".join(problems))


# --- reading ldmscale checkpoints ---------------------------------------------------------------------

def _read_autoencoder_export(path: str) -> tuple[RunConfig, dict[str, torch.Tensor], dict[str, Any]]:
    if not Path(path).is_file():
        raise ValueError(f"task.autoencoder: {path!r} is not a file; pass --autoencoder with the "
                         "autoencoder export the model was trained with")
    state, meta = load_export(path)
    if meta.get("stage") != "autoencoder":
        raise ValueError(f"task.autoencoder: {path} is an export of stage {meta.get('stage')!r}, not of an autoencoder")
    if "scale_factor" in meta:  # the export's metadata is authoritative, as in `load_frozen_autoencoder`
        state["scale_factor"] = torch.tensor(float(meta["scale_factor"]), dtype=state["scale_factor"].dtype)
    return config_from_dict(RunConfig, meta["config"]), state, meta


def _frozen_text(task: LatentDiffusionTaskConfig, seed: int) -> dict[str, torch.Tensor]:
    """The frozen conditioner's weights, rebuilt from the config (its weights file, or the run's seed)."""
    if is_trainable(conditioner_shape(task.conditioner)):
        return {}
    return build_seeded_conditioner(task.conditioner, seed).state_dict()


def _ldm_bundle(run: RunConfig, main: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None, is_ema: bool,
                step: int, autoencoder: str | None, meta: dict[str, Any]) -> Bundle:
    ae_path = autoencoder or run.task.autoencoder
    ae_run, ae_state, ae_meta = _read_autoencoder_export(ae_path)
    expected = meta.get("autoencoder_content_hash")
    if expected is not None and ae_meta["content_hash"] != expected:
        raise ValueError(f"--autoencoder: {ae_path} is not the autoencoder this model was trained with "
                         f"(content hash {ae_meta['content_hash'][:12]} != {expected[:12]})")
    text = _frozen_text(run.task, run.seed)
    if text and meta.get("conditioner_content_hash") not in (None, content_hash(text)):
        raise ValueError(f"task.conditioner: the text tower built from {run.task.conditioner} differs from the one "
                         "the model was trained with (its weights file changed?)")
    run = dataclasses.replace(run, task=dataclasses.replace(run.task, autoencoder=str(ae_path)))
    return Bundle(run, ae_run, ae_state, main, ema, text, step, is_ema)


def read_ldmscale(path: str | os.PathLike, weights: Weights = "ema", autoencoder: str | None = None,
                  keep_ema: bool = False) -> Bundle:
    """An ldmscale export (.safetensors), checkpoint folder or run directory (its newest checkpoint).

    `weights`: "ema" takes the trainer's EMA where the source has one (else the live weights, with
    a warning), "raw" the live weights (consolidated from DeepSpeed; checkpoint folders only).
    `keep_ema` also keeps the EMA beside raw weights as `denoiser_ema`. `autoencoder` replaces the
    autoencoder export path recorded in a latent diffusion config.
    """
    path = Path(path)
    if path.is_file():
        meta = read_export_metadata(path)
        state, _ = load_export(path)
        run = config_from_dict(RunConfig, meta["config"])
        is_ema = bool(meta.get("ema", False))
        if weights == "raw" and is_ema:
            raise ValueError(f"--weights raw: {path} is an export of EMA weights only; give the run's checkpoint "
                             "folder to convert its live weights")
        if keep_ema:
            raise ValueError("--with-ema: an export holds one set of weights; give the run's checkpoint folder")
        if run.stage == "autoencoder":
            if "scale_factor" in meta:
                state["scale_factor"] = torch.tensor(float(meta["scale_factor"]), dtype=state["scale_factor"].dtype)
            return Bundle(run, run, state, step=int(meta.get("step", 0)), ema=is_ema)
        return _ldm_bundle(run, state, None, is_ema, int(meta.get("step", 0)), autoencoder, meta)
    step_dir = resolve_step_dir(path)
    run = load_config(RunConfig, step_dir / "config.yaml")
    if run.stage not in PRIMARY_NETWORK:
        raise ValueError(f"{step_dir}: conversion supports the stages {', '.join(PRIMARY_NETWORK)}, not {run.stage!r}")
    network = PRIMARY_NETWORK[run.stage]
    has_ema = (step_dir / f"ema-{network}.safetensors").is_file()
    engine = read_engine(step_dir, network, config_to_dict(run), with_raw=weights == "raw" or keep_ema or not has_ema)
    if weights == "ema" and engine.ema is None:
        log.warning("%s has no EMA weights (EMA disabled in its run); converting the live weights", step_dir)
    use_ema = weights == "ema" and engine.ema is not None
    main = engine.ema if use_ema else engine.raw
    if keep_ema and engine.ema is None:
        raise ValueError(f"--with-ema: {step_dir} has no EMA weights (EMA disabled in its run)")
    ema = engine.ema if keep_ema else None
    if run.stage == "autoencoder":
        return Bundle(run, run, main, step=engine.step, ema=use_ema)
    return _ldm_bundle(run, main, ema, use_ema, engine.step, autoencoder, {})


# --- writing ldmscale exports -------------------------------------------------------------------------

def _export_meta(stage: str, network: str, bundle: Bundle, ema: bool, source: str) -> dict[str, Any]:
    """The metadata the trainer's exports carry (`Trainer._export`), plus where the weights came from."""
    return {"stage": stage, "network": network, "step": bundle.step, "ema": ema, "source": source}


def write_ldmscale(bundle: Bundle, out: str | os.PathLike, source: str = "") -> Path:
    """`out/config.yaml` and `out/export/*.safetensors`, as a trained run leaves them; returns the main export."""
    check_bundle(bundle)
    out = Path(out)
    export = out / "export"
    export.mkdir(parents=True, exist_ok=True)
    ae_path = export / "autoencoder.safetensors"
    scale = float(bundle.autoencoder["scale_factor"])
    ae_run = dataclasses.replace(bundle.autoencoder_run, run=dataclasses.replace(bundle.autoencoder_run.run,
                                                                                   dir=str(out.resolve())))
    ae_meta = _export_meta("autoencoder", "autoencoder", bundle, bundle.ema and not bundle.is_ldm, source)
    export_weights(bundle.autoencoder, ae_path, config=config_to_dict(ae_run),
                   metadata={**ae_meta, "scale_factor": scale})
    if not bundle.is_ldm:
        save_config(ae_run, out / "config.yaml")
        return ae_path
    task = dataclasses.replace(bundle.task, autoencoder=str(ae_path.resolve()))
    metadata = _export_meta("latent_diffusion", PRIMARY_NETWORK["latent_diffusion"], bundle, bundle.ema, source)
    if bundle.text:
        text_path = export / TEXT_WEIGHTS
        # The OpenCLIP tower's own keys (the conditioner's without `model.`), which its `weights:` loader reads.
        save_safetensors({k.removeprefix("model."): v for k, v in bundle.text.items()}, text_path)
        task = dataclasses.replace(task, conditioner=dataclasses.replace(task.conditioner,
                                                                         weights=str(text_path.resolve())))
    run = dataclasses.replace(bundle.run, task=task, run=dataclasses.replace(bundle.run.run, dir=str(out.resolve())))
    if bundle.text:
        conditioner = build_seeded_conditioner(task.conditioner, run.seed)  # loads the written weights strictly
        metadata["conditioner_content_hash"] = content_hash(conditioner.state_dict())
    with torch.device("meta"):
        shape = latent_shape(Autoencoder(bundle.ae_cfg), run.data.resolution)
    metadata.update(autoencoder_content_hash=read_export_metadata(ae_path)["content_hash"], scale_factor=scale,
                    latent_shape=list(shape))
    path = export / f"{PRIMARY_NETWORK['latent_diffusion']}.safetensors"
    export_weights(bundle.denoiser, path, config=config_to_dict(run), metadata=metadata)
    save_config(run, out / "config.yaml")
    return path

