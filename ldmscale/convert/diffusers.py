"""ldmscale models <-> diffusers model folders.

Written: `unet/` and `vae/` (`config.json` + `diffusion_pytorch_model.safetensors`, loadable by
`UNet2DConditionModel.from_pretrained` / `AutoencoderKL.from_pretrained`), `scheduler/scheduler_config.json`
(a DDIM scheduler with the training schedule and prediction type), `text_encoder/` (transformers
`CLIPTextModel`) for a frozen OpenCLIP conditioner, `unet_ema/` when an EMA is kept beside live
weights (as diffusers' text-to-image trainer saves it), and an `ldmscale/` folder with the resolved
run configs and any trained conditioner that diffusers has no place for (a class table giving a
cross-attention context), so that a round trip is exact. No `tokenizer/` (the OpenCLIP BPE
vocabulary is not converted): load the components, not a whole pipeline.

The text encoder runs to the conditioning layer: SD2's penultimate-layer conditioning is a text
encoder without the last block (as Stability's diffusers release of SD2). Reading such a folder
back gives the equivalent `layer: last` tower without that unused block.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from ldmscale.checkpoint.io import atomic_write_json, atomic_write_text, save_safetensors
from ldmscale.config.load import config_from_dict, dump_config, load_config
from ldmscale.config.schema import RunConfig
from ldmscale.convert.bundle import Bundle, check_bundle
from ldmscale.convert.diffusers_config import (clip_text_config_json, openclip_custom_from_json, scheduler_config_json,
                                               scheduler_from_json, unet_config_from_json, unet_config_json,
                                               vae_config_from_json, vae_config_json)
from ldmscale.convert.files import read_state_file
from ldmscale.convert.keymaps import KeyMapError, openclip_to_hf_clip, unet_to_diffusers, vae_to_diffusers
from ldmscale.models.autoencoder import AutoencoderConfig
from ldmscale.models.unet import UNetConfig
from ldmscale.training.tasks.latent_diffusion import conditioner_shape, is_trainable

log = logging.getLogger(__name__)

MODEL_FILE = "diffusion_pytorch_model.safetensors"
TEXT_FILE = "model.safetensors"
SIDECAR = "ldmscale"  # run configs and weights diffusers has no place for


def _write_component(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor], filename: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "config.json", config)
    save_safetensors(state, folder / filename, metadata={"format": "pt"})


def _text_tower_spec(bundle: Bundle) -> dict[str, Any] | None:
    """Shape of the frozen OpenCLIP tower, or None when there is none or CLIPTextModel cannot hold it."""
    cfg = bundle.task.conditioner
    if cfg.kind != "openclip" or not bundle.text:
        return None
    if any(".ls_1." in k or ".ls_2." in k for k in bundle.text):
        log.warning("text_encoder/ not written: the text tower uses LayerScale, which CLIPTextModel lacks")
        return None
    import open_clip

    tower = conditioner_shape(cfg).model
    block = tower.transformer.resblocks[0]
    width = tower.token_embedding.embedding_dim
    model_cfg = open_clip.get_model_config(cfg.arch) or {}
    # The encoder ends at the conditioning layer: one block short for penultimate-layer conditioning.
    layers = len(tower.transformer.resblocks) - (1 if cfg.layer == "penultimate" else 0)
    return {"width": width, "heads": block.attn.num_heads, "layers": layers,
            "context_length": tower.positional_embedding.shape[0], "vocab_size": tower.token_embedding.num_embeddings,
            "mlp_ratio": block.mlp.c_fc.out_features / width, "quick_gelu": bool(model_cfg.get("quick_gelu", False))}


def to_diffusers(bundle: Bundle, out: str | os.PathLike) -> Path:
    """Writes the bundle as a diffusers folder (see the module docstring); returns the folder."""
    check_bundle(bundle)
    out = Path(out)
    scale = float(bundle.autoencoder["scale_factor"])
    vae_state = {k: v for k, v in bundle.autoencoder.items() if k != "scale_factor"}
    _write_component(out / "vae", vae_config_json(bundle.ae_cfg, scale),
                     vae_to_diffusers(bundle.ae_cfg).to_theirs(vae_state), MODEL_FILE)
    sidecar = out / SIDECAR
    sidecar.mkdir(parents=True, exist_ok=True)
    atomic_write_text(sidecar / "autoencoder.yaml", dump_config(bundle.autoencoder_run))
    if not bundle.is_ldm:
        return out
    task = bundle.task
    if task.unet.context_dim is None:  # its transformer blocks index the cross-attention width unconditionally
        raise ValueError("task.unet.context_dim: diffusers' UNet2DConditionModel needs cross-attention; a UNet "
                         "without context has no equivalent there (convert it with to-original instead)")
    keymap = unet_to_diffusers(task.unet)
    sample_size = bundle.run.data.resolution // bundle.ae_cfg.downsample_factor
    _write_component(out / "unet", unet_config_json(task.unet, sample_size), keymap.to_theirs(bundle.part("unet.")),
                     MODEL_FILE)
    if bundle.denoiser_ema is not None:
        _write_component(out / "unet_ema", unet_config_json(task.unet, sample_size),
                         keymap.to_theirs(bundle.part("unet.", ema=True)), MODEL_FILE)
    (out / "scheduler").mkdir(exist_ok=True)
    atomic_write_json(out / "scheduler" / "scheduler_config.json",
                      scheduler_config_json(task.schedule, task.prediction.kind))
    spec = _text_tower_spec(bundle)
    if spec is not None:
        dropped = f"transformer.resblocks.{spec['layers']}."  # the block after the conditioning layer, if any
        tower = {k.removeprefix("model."): v for k, v in bundle.text.items() if not k.startswith("model." + dropped)}
        config = clip_text_config_json(spec["width"], spec["heads"], spec["layers"], spec["context_length"],
                                       spec["vocab_size"], spec["mlp_ratio"], spec["quick_gelu"])
        _write_component(out / "text_encoder", config, openclip_to_hf_clip(spec["layers"]).to_theirs(tower), TEXT_FILE)
    atomic_write_text(sidecar / "run.yaml", dump_config(bundle.run))
    trained = bundle.part("conditioner.")
    if trained:
        save_safetensors(trained, sidecar / "conditioner.safetensors")
    return out


# --- reading ------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: missing; not a diffusers model folder")
    return json.loads(path.read_text())


def _weights_file(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise ValueError(f"{folder}: sharded weights (*.index.json) are not supported; save the model unsharded")
    raise ValueError(f"{folder}: none of {', '.join(names)} found")


# transformers' `position_ids` (an arange, persistent in older releases) is derived, not a weight.
DERIVED_TEXT_KEYS = ("text_model.embeddings.position_ids",)


def _component_state(folder: Path, names: tuple[str, ...], keymap, what: str) -> dict[str, torch.Tensor]:
    state = read_state_file(_weights_file(folder, names))
    try:
        return keymap.to_ours({k: v for k, v in state.items() if k not in DERIVED_TEXT_KEYS})
    except KeyMapError as e:
        raise ValueError(f"{folder}: tensors that are not part of the configured {what}: {e}") from e


def _differences(ours: dict[str, Any], theirs: dict[str, Any], where: str, key: str) -> list[str]:
    skip = {"_diffusers_version", "sample_size", "dropout", "scaling_factor"}
    return [f"{key}: {where} has {name} = {theirs[name]!r}, the config gives {value!r}"
            for name, value in ours.items() if name not in skip and theirs.get(name) != value]


def _comparable_unet(cfg: UNetConfig) -> dict[str, Any]:
    """The UNet's diffusers config with the head counts of levels without attention blanked (unused)."""
    config = unet_config_json(cfg, 0)
    last = len(config["block_out_channels"]) - 1
    config["attention_head_dim"] = [h if t.startswith("CrossAttn") or i == last else None
                                    for i, (h, t) in enumerate(zip(config["attention_head_dim"],
                                                                   config["down_block_types"]))]
    return config


def _derived_run(folder: Path, unet: dict[str, Any], schedule: dict[str, Any], prediction: str | None,
                 resolution: int) -> dict[str, Any]:
    """A latent diffusion run config read off the folder (no `--config`, no `ldmscale/run.yaml`)."""
    if (folder / "text_encoder" / "config.json").is_file():
        custom, quick_gelu = openclip_custom_from_json(_read_json(folder / "text_encoder" / "config.json"))
        # The tokenizer is the same CLIP BPE for both archs; the arch picks the activation.
        conditioner = {"kind": "openclip", "arch": "ViT-L-14-quickgelu" if quick_gelu else "ViT-H-14",
                       "layer": "last", "max_length": custom["context_length"], "custom": custom}
    elif unet.get("num_classes") is not None:
        conditioner = {"kind": "class", "output": "y", "num_classes": unet["num_classes"] - 1}
    elif unet.get("context_dim") is None:
        conditioner = {"kind": "none"}
    else:
        raise ValueError(f"--config: {folder}'s UNet cross-attends to a {unet['context_dim']}-wide context but the "
                         "folder has no text_encoder/; give --config with the conditioner")
    return {"stage": "latent_diffusion", "data": {"resolution": resolution},
            "task": {"autoencoder": "(from diffusers)", "unet": unet, "conditioner": conditioner,
                     "schedule": schedule, "prediction": {"kind": prediction or "eps"}}}


def _equivalent_last_layer(run: RunConfig, layers: int) -> RunConfig:
    """A penultimate-layer OpenCLIP conditioner as the same function on a tower one block shorter."""
    cond = run.task.conditioner
    if cond.custom is not None:
        custom = dict(cond.custom)
    else:
        import open_clip

        custom = dict(open_clip.get_model_config(cond.arch)["text_cfg"])
    custom["layers"] = layers
    new = dataclasses.replace(cond, layer="last", custom=custom, weights=None)
    log.info("text_encoder/ runs %d blocks to the conditioning layer: the conditioner becomes the equivalent "
             "layer: last tower of %d blocks", layers, layers)
    return dataclasses.replace(run, task=dataclasses.replace(run.task, conditioner=new))


def from_diffusers(folder: str | os.PathLike, run: RunConfig | None = None, autoencoder_run: RunConfig | None = None,
                   weights: Literal["main", "ema"] = "main") -> Bundle:
    """A diffusers folder -> a bundle. Configs: the arguments, else the folder's `ldmscale/*.yaml`, else
    read off its `config.json` files; in every case the folder's architecture must equal the config's."""
    folder = Path(folder)
    vae_json = _read_json(folder / "vae" / "config.json")
    vae_fields, problems = vae_config_from_json(vae_json)
    sidecar = folder / SIDECAR
    if autoencoder_run is None:
        if (sidecar / "autoencoder.yaml").is_file():
            autoencoder_run = load_config(RunConfig, sidecar / "autoencoder.yaml")
        else:
            autoencoder_run = config_from_dict(RunConfig, {"stage": "autoencoder", "task": {"model": vae_fields}})
    ae_cfg: AutoencoderConfig = autoencoder_run.task.model
    if not problems:
        derived = config_from_dict(AutoencoderConfig, vae_fields)
        problems += _differences(vae_config_json(ae_cfg, 0.0), vae_config_json(derived, 0.0), "vae/config.json",
                                 "task.model")
    has_unet = (folder / "unet" / "config.json").is_file()
    if run is None and has_unet:
        if (sidecar / "run.yaml").is_file():
            run = load_config(RunConfig, sidecar / "run.yaml")
        else:
            unet_fields, unet_problems = unet_config_from_json(_read_json(folder / "unet" / "config.json"))
            schedule, prediction, scheduler_problems = scheduler_from_json(
                _read_json(folder / "scheduler" / "scheduler_config.json"))
            if unet_problems or scheduler_problems or problems:
                raise ValueError(f"{folder} is not an ldmscale-compatible model:\n  "
                                 + "\n  ".join(problems + unet_problems + scheduler_problems))
            derived_run = _derived_run(folder, unet_fields, schedule, prediction, ae_cfg.resolution)
            run = config_from_dict(RunConfig, derived_run)
    if run is None:
        run = autoencoder_run
    if problems:
        raise ValueError(f"{folder} does not fit the configured model:\n  " + "\n  ".join(problems))
    autoencoder = _component_state(folder / "vae", (MODEL_FILE, "diffusion_pytorch_model.bin"),
                                   vae_to_diffusers(ae_cfg), "autoencoder")
    autoencoder["scale_factor"] = torch.tensor(float(vae_json.get("scaling_factor", ae_cfg.scale_factor)))
    if run.stage != "latent_diffusion":
        bundle = Bundle(run, autoencoder_run, autoencoder)
        check_bundle(bundle)
        return bundle
    return _ldm_from_diffusers(folder, run, autoencoder_run, autoencoder, weights)


def _ldm_from_diffusers(folder: Path, run: RunConfig, autoencoder_run: RunConfig,
                        autoencoder: dict[str, torch.Tensor], weights: Literal["main", "ema"]) -> Bundle:
    task = run.task
    unet_json = _read_json(folder / "unet" / "config.json")
    fields, problems = unet_config_from_json(unet_json)
    if not problems:
        derived = config_from_dict(UNetConfig, fields)
        problems += _differences(_comparable_unet(task.unet), _comparable_unet(derived), "unet/config.json",
                                 "task.unet")
    schedule, prediction, scheduler_problems = scheduler_from_json(
        _read_json(folder / "scheduler" / "scheduler_config.json"))
    problems += scheduler_problems
    if not scheduler_problems:
        for name, value in schedule.items():
            if getattr(task.schedule, name) != value:
                problems.append(f"task.schedule.{name}: scheduler_config.json has {value!r}, the config "
                                f"{getattr(task.schedule, name)!r}")
        if prediction != task.prediction.kind:
            problems.append(f"task.prediction.kind: scheduler_config.json predicts {prediction!r}, the config "
                            f"{task.prediction.kind!r}")
    if problems:
        raise ValueError(f"{folder} does not fit the configured model:\n  " + "\n  ".join(problems))
    unet_folder = folder / ("unet_ema" if weights == "ema" else "unet")
    if not unet_folder.is_dir():
        raise ValueError(f"--weights ema: {folder} has no unet_ema/ folder")
    unet = _component_state(unet_folder, (MODEL_FILE, "diffusion_pytorch_model.bin"), unet_to_diffusers(task.unet),
                            "UNet")
    denoiser = {f"unet.{k}": v for k, v in unet.items()}
    if is_trainable(conditioner_shape(task.conditioner)):
        path = folder / SIDECAR / "conditioner.safetensors"
        if not path.is_file():
            raise ValueError(f"{folder}: the configured conditioner ({task.conditioner.kind}) trains a table that "
                             f"diffusers has no place for, and {path} is missing")
        denoiser.update({f"conditioner.{k}": v for k, v in read_state_file(path).items()})
    text: dict[str, torch.Tensor] = {}
    text_folder = folder / "text_encoder"
    if task.conditioner.kind == "openclip":
        config = _read_json(text_folder / "config.json")
        layers = config["num_hidden_layers"]
        if task.conditioner.layer == "penultimate":
            run = _equivalent_last_layer(run, layers)
        tower = _component_state(text_folder, (TEXT_FILE, "pytorch_model.bin"), openclip_to_hf_clip(layers),
                                 "text encoder")
        text = {f"model.{k}": v for k, v in tower.items()}
    bundle = Bundle(run, autoencoder_run, autoencoder, denoiser, text=text, ema=weights == "ema")
    check_bundle(bundle)
    return bundle

