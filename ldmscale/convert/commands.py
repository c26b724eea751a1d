"""`ldmscale convert ...`: the five conversions from file to file, and their command-line arguments.

Shared by the `convert` verb of `launch/cli.py` and `tools/convert_checkpoint.py`. Imports stay
light at module level (argument parsing must not load torch); each action imports what it needs.

- zero-to-safetensors RUN_OR_STEP_DIR OUT.safetensors: one engine's consolidated weights (`runs.py`);
- to-original CKPT OUT.(safetensors|ckpt): an ldmscale model -> original single file (`compvis.py`);
- from-original SRC.(ckpt|safetensors) OUT_DIR: the reverse, into an ldmscale run-like folder;
- to-diffusers CKPT OUT_DIR / from-diffusers DIR OUT_DIR (`diffusers.py`).
CKPT is an ldmscale export (.safetensors), a committed checkpoint folder or a run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ACTIONS = ("zero-to-safetensors", "to-original", "from-original", "to-diffusers", "from-diffusers")
CONFIG_KEY = "ldmscale_config"  # to-original's safetensors metadata: the run configs, for a config-free way back
AUTOENCODER_CONFIG_KEY = "ldmscale_autoencoder_config"


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("src", help="run directory, checkpoint folder, export, original file or diffusers folder")
    parser.add_argument("dst", help="output file (zero-to-safetensors, to-original) or folder (the others)")
    parser.add_argument("--engine", default=None, help="zero-to-safetensors: engine to consolidate (default: the "
                        "stage's network; e.g. discriminator)")
    parser.add_argument("--ema", action="store_true", help="zero-to-safetensors: the trainer's EMA weights")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="floating-point type of the written tensors (default fp32)")
    parser.add_argument("--weights", choices=("ema", "raw", "main"), default=None,
                        help="to-*: ema (default; falls back to the live weights without EMA) or raw (live weights, "
                             "checkpoint folders only); from-*: main (default: model.diffusion_model.* / unet/) or "
                             "ema (model_ema.* / unet_ema/)")
    parser.add_argument("--with-ema", action="store_true",
                        help="to-*: also write the EMA beside the --weights raw ones (model_ema.* / unet_ema/)")
    parser.add_argument("--autoencoder", default=None,
                        help="to-*: the autoencoder export, instead of the path in the model's config")
    parser.add_argument("--text-layout", choices=("auto", "openclip", "hf"), default="auto",
                        help="to-original: cond_stage_model.model.* (SD2, OpenCLIP) or .transformer.* (SD1, "
                             "Hugging Face CLIP); auto: hf for ViT-L-14 archs")
    parser.add_argument("--config", default=None, help="from-*: the run config (YAML) of the model; optional "
                        "where the source carries ldmscale's configs")
    parser.add_argument("--autoencoder-config", default=None,
                        help="from-*: an autoencoder run config (default: Stable Diffusion's KL-f8)")
    parser.add_argument("--scale-factor", type=float, default=None,
                        help="from-original: latent scale when the file stores none (SD 1.x/2.x: 0.18215)")


def _write_weights(state: dict, dst: Path, dtype: str, metadata: dict[str, str] | None = None,
                   global_step: int | None = None) -> Path:
    from ldmscale.convert.files import write_state_file
    from ldmscale.convert.runs import cast

    return write_state_file(cast(state, dtype), dst, metadata=metadata, global_step=global_step)


def _configs(config: str | None, autoencoder_config: str | None, embedded: dict[str, Any] | None = None):
    """(run, autoencoder run) from the given YAML files, else from configs a source carries, else None."""
    from ldmscale.config.load import config_from_dict
    from ldmscale.config.schema import RunConfig, load_run_config

    embedded = embedded or {}
    run = load_run_config(config) if config else None
    if run is None and CONFIG_KEY in embedded:
        run = config_from_dict(RunConfig, embedded[CONFIG_KEY])
    ae_run = load_run_config(autoencoder_config) if autoencoder_config else None
    if ae_run is None and AUTOENCODER_CONFIG_KEY in embedded:
        ae_run = config_from_dict(RunConfig, embedded[AUTOENCODER_CONFIG_KEY])
    if ae_run is not None and ae_run.stage != "autoencoder":
        raise ValueError(f"--autoencoder-config: {autoencoder_config} is a {ae_run.stage} config, not an autoencoder's")
    return run, ae_run


def to_original(src: str, dst: str, *, weights: str = "ema", with_ema: bool = False, autoencoder: str | None = None,
                text_layout: str = "auto", dtype: str = "fp32") -> Path:
    from ldmscale.config.load import config_to_dict
    from ldmscale.convert import compvis
    from ldmscale.convert.bundle import read_ldmscale

    bundle = read_ldmscale(src, weights, autoencoder, keep_ema=with_ema)
    state = compvis.to_original(bundle, text_layout)
    metadata = {"format": "pt", AUTOENCODER_CONFIG_KEY: json.dumps(config_to_dict(bundle.autoencoder_run))}
    if bundle.is_ldm:
        metadata[CONFIG_KEY] = json.dumps(config_to_dict(bundle.run))
    path = _write_weights(state, Path(dst), dtype, metadata, global_step=bundle.step)
    # The CompVis inference config beside it, which original-format loaders ask for.
    from omegaconf import OmegaConf

    from ldmscale.checkpoint.io import atomic_write_text

    atomic_write_text(path.with_suffix(".yaml"), OmegaConf.to_yaml(OmegaConf.create(
        compvis.original_config(bundle, text_layout))))
    return path


def _embedded_configs(path: Path) -> dict[str, Any]:
    """The run configs a safetensors file written by to-original carries in its metadata."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable: `read_state_file` reports it properly
        return {}
    return {k: json.loads(meta[k]) for k in (CONFIG_KEY, AUTOENCODER_CONFIG_KEY) if k in meta}


def from_original(src: str, dst: str, *, config: str | None = None, autoencoder_config: str | None = None,
                  weights: str = "main", scale_factor: float | None = None) -> Path:
    from ldmscale.config.schema import RunConfig
    from ldmscale.convert import compvis
    from ldmscale.convert.bundle import write_ldmscale
    from ldmscale.convert.files import read_state_file

    state = read_state_file(src)
    run, ae_run = _configs(config, autoencoder_config, _embedded_configs(Path(src)))
    run = run or ae_run  # an autoencoder alone
    if run is None:
        raise ValueError(f"--config: {src} carries no ldmscale config; give the run config (YAML) of its model, "
                         "e.g. configs/ldm/sd2-base.yaml, or an autoencoder config for a VAE file")
    if run.stage == "autoencoder":
        ae_run = run
    ae_run = ae_run or RunConfig(stage="autoencoder")  # its default model is Stable Diffusion's KL-f8
    bundle = compvis.from_original(state, run, ae_run, weights=weights, scale_factor=scale_factor)
    return write_ldmscale(bundle, dst, source=str(src))


def to_diffusers(src: str, dst: str, *, weights: str = "ema", with_ema: bool = False, autoencoder: str | None = None,
                 dtype: str = "fp32") -> Path:
    from ldmscale.convert import diffusers
    from ldmscale.convert.bundle import read_ldmscale
    from ldmscale.convert.runs import cast

    bundle = read_ldmscale(src, weights, autoencoder, keep_ema=with_ema)
    if dtype != "fp32":
        bundle.autoencoder = cast(bundle.autoencoder, dtype)
        bundle.denoiser = cast(bundle.denoiser, dtype) if bundle.denoiser is not None else None
        bundle.denoiser_ema = cast(bundle.denoiser_ema, dtype) if bundle.denoiser_ema is not None else None
        bundle.text = cast(bundle.text, dtype)
    return diffusers.to_diffusers(bundle, dst)


def from_diffusers(src: str, dst: str, *, config: str | None = None, autoencoder_config: str | None = None,
                   weights: str = "main") -> Path:
    from ldmscale.convert import diffusers
    from ldmscale.convert.bundle import write_ldmscale

    run, ae_run = _configs(config, autoencoder_config)
    bundle = diffusers.from_diffusers(src, run, ae_run, weights=weights)
    return write_ldmscale(bundle, dst, source=str(src))


def run_action(args: argparse.Namespace) -> Path:
    """Runs one parsed `convert` command line; `ValueError` for user errors."""
    action, src, dst = args.action, args.src, args.dst
    to_weights = args.weights or "ema"
    from_weights = args.weights or "main"
    if action.startswith("to-") and to_weights not in ("ema", "raw"):
        raise ValueError(f"--weights: {action} takes ema or raw, got {to_weights}")
    if action.startswith("from-") and from_weights not in ("main", "ema"):
        raise ValueError(f"--weights: {action} takes main or ema, got {from_weights}")
    if action == "zero-to-safetensors":
        from ldmscale.convert.runs import zero_to_safetensors

        return zero_to_safetensors(src, dst, engine=args.engine, ema=args.ema, dtype=args.dtype)
    if action == "to-original":
        return to_original(src, dst, weights=to_weights, with_ema=args.with_ema, autoencoder=args.autoencoder,
                           text_layout=args.text_layout, dtype=args.dtype)
    if action == "from-original":
        return from_original(src, dst, config=args.config, autoencoder_config=args.autoencoder_config,
                             weights=from_weights, scale_factor=args.scale_factor)
    if action == "to-diffusers":
        return to_diffusers(src, dst, weights=to_weights, with_ema=args.with_ema, autoencoder=args.autoencoder,
                            dtype=args.dtype)
    assert action == "from-diffusers", action
    return from_diffusers(src, dst, config=args.config, autoencoder_config=args.autoencoder_config,
                          weights=from_weights)

