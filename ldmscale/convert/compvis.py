"""The original single-file layout of CompVis LDM / Stable Diffusion checkpoints.

One flat state dict (a Lightning `.ckpt` wraps it in `state_dict`) of the whole `LatentDiffusion`
module (CompVis `ldm/models/diffusion/ddpm.py`):
- `model.diffusion_model.*`: the UNet, whose keys ours equal (`models/unet.py`);
- `first_stage_model.*`: the autoencoder, keys equal ours (`models/autoencoder.py`); ldmscale's
  VQ-EMA statistics (`quantize.ema_cluster_size`, `ema_embed_sum`, `code_usage`) have no place there;
- `cond_stage_model.*`: a class table (`ClassEmbedder.embedding`), SD2's OpenCLIP text tower under
  `cond_stage_model.model.*` (our tower's keys), or SD1's Hugging Face CLIP under
  `cond_stage_model.transformer.text_model.*` (`keymaps.openclip_to_hf_clip`);
- `model_ema.*`: `LitEma` shadows of the UNet's parameters named with their dots removed, plus
  `model_ema.decay` and `model_ema.num_updates`;
- top level: the schedule tables (`NoiseSchedule.original_buffers`) and `scale_factor`.
An autoencoder alone is written as a standalone VAE file (bare `encoder.*`, `decoder.*`, ... keys,
as Stability's `vae-ft-mse` releases) with `scale_factor` at the top level.

Reading is strict: every key must be mapped, declared derived (schedule tables, checked against
the config) or declared unused (`UNUSED_KEYS`), and every tensor of the configured models present
with its shape; otherwise one `ValueError` lists all problems.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import torch

from ldmscale.config.schema import RunConfig
from ldmscale.convert.bundle import Bundle, check_bundle, expected_denoiser, expected_states
from ldmscale.convert.keymaps import KeyMap, Rule, lit_ema_key, openclip_to_hf_clip
from ldmscale.diffusion.schedule import NoiseSchedule
from ldmscale.training.tasks.latent_diffusion import conditioner_shape, is_trainable

log = logging.getLogger(__name__)

TextLayout = Literal["auto", "openclip", "hf"]
UNET, FIRST_STAGE, COND, EMA = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema."
HF_TEXT = COND + "transformer."  # SD1's FrozenCLIPEmbedder holds a transformers CLIPTextModel
OPENCLIP_TEXT = COND + "model."  # SD2's FrozenOpenCLIPEmbedder holds an open_clip CLIP without its vision tower
AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.embedding.")
# ldmscale-only buffers of the EMA vector quantiser; rebuilt from the codebook on import.
VQ_EMA_BUFFERS = ("quantize.ema_cluster_size", "quantize.ema_embed_sum", "quantize.code_usage")
# Keys an original checkpoint may hold that no ldmscale model stores: bookkeeping and unused heads.
UNUSED_KEYS = ("model_ema.decay", "model_ema.num_updates", "lvlb_weights", "logvar",
               OPENCLIP_TEXT + "text_projection", OPENCLIP_TEXT + "logit_scale",
               HF_TEXT + "text_model.embeddings.position_ids")
UNUSED_PREFIXES = ("loss.", FIRST_STAGE + "loss.")  # autoencoder training losses (LPIPS, discriminator)


def default_text_layout(arch: str) -> Literal["openclip", "hf"]:
    """SD1 conditions on OpenAI's CLIP ViT-L/14 through transformers; SD2 on an OpenCLIP tower."""
    return "hf" if arch.startswith("ViT-L-14") else "openclip"


def _autoencoder_map(prefix: str) -> KeyMap:
    rules = [Rule("autoencoder." + part, prefix + part) for part in AUTOENCODER_PARTS]
    return KeyMap(rules + [Rule("autoencoder.scale_factor", "scale_factor")])


def _text_map(layout: Literal["openclip", "hf"], layers: int) -> KeyMap:
    if layout == "hf":
        return openclip_to_hf_clip(layers).prefixed("text.model.", HF_TEXT)
    return KeyMap([Rule("text.model.", OPENCLIP_TEXT)])


def _ema_map(expected_unet: list[str]) -> KeyMap:
    return KeyMap([Rule(f"ema.unet.{k}", lit_ema_key(UNET + k)) for k in expected_unet])


def original_keymap(bundle: Bundle, text_layout: Literal["openclip", "hf"], vae_prefix: str) -> KeyMap:
    """Namespaced ours (`denoiser.*`, `ema.*`, `autoencoder.*`, `text.*`) <-> the original keys."""
    keymap = _autoencoder_map(vae_prefix)
    if bundle.is_ldm:
        keymap += KeyMap([Rule("denoiser.unet.", UNET), Rule("denoiser.conditioner.", COND)])
        unet_keys = [k.removeprefix("unet.") for k in expected_denoiser(bundle.task) if k.startswith("unet.")]
        keymap += _ema_map(unet_keys)
        conditioner = conditioner_shape(bundle.task.conditioner)
        if not is_trainable(conditioner) and any(True for _ in conditioner.parameters()):
            layers = len(conditioner.model.transformer.resblocks)
            keymap += _text_map(text_layout, layers)
    return keymap


def _schedule_tables(run: RunConfig) -> dict[str, torch.Tensor]:
    return NoiseSchedule.from_config(run.task.schedule).original_buffers()


def to_original(bundle: Bundle, text_layout: TextLayout = "auto") -> dict[str, torch.Tensor]:
    """The bundle as one original-layout state dict (`model_ema.*` too when it holds an EMA beside)."""
    check_bundle(bundle)
    ours = {f"autoencoder.{k}": v for k, v in bundle.autoencoder.items() if k not in VQ_EMA_BUFFERS}
    if not bundle.is_ldm:
        return _autoencoder_map("").to_theirs(ours)
    if text_layout == "auto":
        text_layout = default_text_layout(getattr(bundle.task.conditioner, "arch", ""))
    ours.update({f"denoiser.{k}": v for k, v in bundle.denoiser.items()})
    ours.update({f"text.{k}": v for k, v in bundle.text.items()})
    if bundle.denoiser_ema is not None:
        ours.update({f"ema.{k}": v for k, v in bundle.denoiser_ema.items() if k.startswith("unet.")})
    state = original_keymap(bundle, text_layout, FIRST_STAGE).to_theirs(ours)
    state.update(_schedule_tables(bundle.run))
    if bundle.denoiser_ema is not None:  # LitEma's bookkeeping, for loaders that expect it
        state["model_ema.decay"] = torch.tensor(bundle.run.ema.max_decay, dtype=torch.float32)
        state["model_ema.num_updates"] = torch.tensor(bundle.step, dtype=torch.int32)
    return state


# Our beta schedules by their CompVis `make_beta_schedule` names ("linear" there is SD's scaled linear).
COMPVIS_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear", "cosine": "cosine"}


def _first_stage_config(cfg) -> dict:
    dd = {"double_z": cfg.regularizer.kind == "kl", "z_channels": cfg.z_channels, "resolution": cfg.resolution,
          "in_channels": cfg.in_channels, "out_ch": cfg.out_channels, "ch": cfg.base_channels,
          "ch_mult": list(cfg.channel_mult), "num_res_blocks": cfg.num_res_blocks,
          "attn_resolutions": list(cfg.attn_resolutions), "dropout": cfg.dropout}
    if cfg.regularizer.kind == "kl":
        return {"target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {"embed_dim": cfg.embed_dim, "ddconfig": dd, "lossconfig": {"target": "torch.nn.Identity"}}}
    return {"target": "ldm.models.autoencoder.VQModelInterface",
            "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.regularizer.n_embed, "ddconfig": dd,
                       "lossconfig": {"target": "torch.nn.Identity"}}}


def _cond_stage_config(bundle: Bundle, text_layout: Literal["openclip", "hf"]) -> tuple[dict | str, str | None, bool]:
    """(cond_stage_config, conditioning_key, cond_stage_trainable) of CompVis' LatentDiffusion."""
    cond = bundle.task.conditioner
    if cond.kind == "openclip":
        if text_layout == "hf":
            return {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}, "crossattn", False
        return ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                 "params": {"arch": cond.arch, "freeze": True, "layer": cond.layer}}, "crossattn", False)
    if cond.kind == "class" and cond.output == "context":
        return ({"target": "ldm.modules.encoders.modules.ClassEmbedder",
                 "params": {"embed_dim": cond.embed_dim, "n_classes": cond.num_classes + 1, "key": "class_label"}},
                "crossattn", True)
    # Labels straight into the UNet's label_emb (CompVis' "adm" conditioning) or no conditioning at all.
    return "__is_unconditional__", "adm" if cond.kind == "class" else None, False


def original_config(bundle: Bundle, text_layout: TextLayout = "auto") -> dict:
    """The CompVis inference config (`model.target/params`, as `v2-inference.yaml`) describing the written file.

    diffusers' `from_single_file(original_config=...)` and the CompVis scripts read it.
    """
    scale = float(bundle.autoencoder["scale_factor"])
    if not bundle.is_ldm:
        return {"model": _first_stage_config(bundle.ae_cfg)}
    task = bundle.task
    if text_layout == "auto":
        text_layout = default_text_layout(getattr(task.conditioner, "arch", ""))
    # -1 (unset head setting) and None are CompVis' defaults: left out, as its own configs do.
    unet = {k: v for k, v in dataclasses.asdict(task.unet).items()
            if k != "gradient_checkpointing" and v != -1 and v is not None}
    latent_size = bundle.run.data.resolution // bundle.ae_cfg.downsample_factor
    unet.update(use_spatial_transformer=True, legacy=False, image_size=latent_size)
    cond_stage, conditioning_key, trainable = _cond_stage_config(bundle, text_layout)
    params = {"parameterization": task.prediction.kind, "linear_start": task.schedule.beta_start,
              "linear_end": task.schedule.beta_end, "timesteps": task.schedule.num_timesteps,
              "beta_schedule": COMPVIS_SCHEDULES[task.schedule.beta_schedule],
              "first_stage_key": "jpg",
              "cond_stage_key": "txt" if task.conditioner.kind == "openclip" else "class_label",
              "image_size": unet["image_size"], "channels": task.unet.in_channels,
              "cond_stage_trainable": trainable, "conditioning_key": conditioning_key, "scale_factor": scale,
              "use_ema": bundle.denoiser_ema is not None,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": _first_stage_config(bundle.ae_cfg), "cond_stage_config": cond_stage}
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def _check_schedule(state: dict[str, torch.Tensor], run: RunConfig) -> list[str]:
    problems = []
    for name, expected in _schedule_tables(run).items():
        if name not in state:
            continue
        found = state[name].double()
        if found.shape != expected.shape or (found - expected.double()).abs().max() > 1e-5 * expected.abs().max():
            problems.append(f"task.schedule: the checkpoint's {name} differs from the configured schedule "
                            f"({run.task.schedule}); configure the schedule it was trained with")
            break
    return problems


def _fill_vq_ema(run: RunConfig, autoencoder: dict[str, torch.Tensor]) -> None:
    """The EMA quantiser's statistics as a fresh quantiser starts them, around the imported codebook."""
    reg = run.task.model.regularizer
    if reg.kind != "vq" or not getattr(reg, "ema", False):
        return
    codes = autoencoder["quantize.embedding.weight"]  # (K, D)
    autoencoder["quantize.ema_cluster_size"] = torch.ones(codes.shape[0], dtype=codes.dtype)
    autoencoder["quantize.ema_embed_sum"] = codes.clone()
    if getattr(reg, "restart_threshold", 0) > 0:
        autoencoder["quantize.code_usage"] = torch.full((codes.shape[0],), float(reg.restart_threshold))


def _expected_shapes(run: RunConfig, autoencoder_run: RunConfig, keymap: KeyMap, weights: str) -> dict[str, tuple]:
    """Original key -> shape of every tensor the configured models need (`scale_factor` aside: the
    caller may supply it)."""
    states = expected_states(run, autoencoder_run)
    ours = {f"autoencoder.{k}": v for k, v in states["autoencoder"].items()
            if k not in VQ_EMA_BUFFERS and k != "scale_factor"}
    for key, value in states.get("denoiser", {}).items():
        ours[("ema." if weights == "ema" and key.startswith("unet.") else "denoiser.") + key] = value
    ours.update({f"text.{k}": v for k, v in states.get("text", {}).items()})
    return {k: tuple(v.shape) for k, v in keymap.to_theirs(ours).items()}


def from_original(state: dict[str, torch.Tensor], run: RunConfig, autoencoder_run: RunConfig, *,
                  weights: Literal["main", "ema"] = "main", scale_factor: float | None = None,
                  step: int = 0) -> Bundle:
    """An original-layout state dict -> a bundle for `run` (strict; every problem listed at once).

    `weights: ema` takes the UNet from `model_ema.*` instead of `model.diffusion_model.*`.
    `scale_factor` is used when the checkpoint stores none (Stable Diffusion's configs set 0.18215
    without storing it). With an autoencoder `run`, the first stage of a whole LDM checkpoint is
    taken and the other networks are left out.
    """
    is_ldm = run.stage == "latent_diffusion"
    has_ema = any(k.startswith(EMA) for k in state)
    vae_prefix = FIRST_STAGE if is_ldm or any(k.startswith(FIRST_STAGE) for k in state) else ""
    layout: Literal["openclip", "hf"] = "hf" if any(k.startswith(HF_TEXT) for k in state) else "openclip"
    bundle = Bundle(run, autoencoder_run, {}, step=step, ema=weights == "ema")
    keymap = original_keymap(bundle, layout, vae_prefix)
    expected = _expected_shapes(run, autoencoder_run, keymap, weights)
    problems = _check_schedule(state, run) if is_ldm else []
    if weights == "ema" and not has_ema:
        problems.append("--weights ema: the checkpoint holds no model_ema.* weights")
    skip = set(_schedule_tables(run)) if is_ldm else set()
    skip |= {"scale_factor", *UNUSED_KEYS}
    other_copy = UNET if weights == "ema" else EMA  # the UNet copy not asked for
    known, unexpected, other_networks = {}, [], 0
    for key, value in state.items():
        if key in skip or key.startswith(UNUSED_PREFIXES) or key.startswith(other_copy):
            continue
        if not is_ldm and vae_prefix and not key.startswith(vae_prefix):
            other_networks += 1
        elif key in expected:
            known[key] = value
        else:
            unexpected.append(key)
    missing = sorted(set(expected) - set(known))
    shapes = [f"{k} {tuple(v.shape)} (model: {expected[k]})" for k, v in known.items() if tuple(v.shape) != expected[k]]
    for keys, what in ((sorted(unexpected), "unexpected keys (not part of the configured model)"),
                       (missing, "missing keys (the configured model needs them)"),
                       (shapes, "tensors of the wrong shape")):
        if keys:
            problems.append(f"{len(keys)} {what}: {keys}")
    if "scale_factor" in state:
        known["scale_factor"] = state["scale_factor"]
    elif scale_factor is not None or not is_ldm:
        known["scale_factor"] = torch.tensor(float(scale_factor if scale_factor is not None
                                                   else autoencoder_run.task.model.scale_factor))
    else:
        problems.append("--scale-factor: the checkpoint stores no scale_factor; give the latent scale its model "
                        "was trained with (0.18215 for Stable Diffusion 1.x and 2.x)")
    if problems:
        raise ValueError("the checkpoint does not fit the configured model:\n  " + "\n  ".join(problems))
    ours = keymap.to_ours(known)

    def part(namespace: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(namespace): v for k, v in ours.items() if k.startswith(namespace)}

    bundle.autoencoder = part("autoencoder.")
    _fill_vq_ema(autoencoder_run, bundle.autoencoder)
    if is_ldm:
        bundle.denoiser = {**part("denoiser."), **part("ema.")}
        bundle.text = part("text.")
    check_bundle(bundle)
    if other_networks:
        log.info("took the autoencoder (first_stage_model.*) and left the other %d tensors", other_networks)
    if has_ema and weights == "main":
        log.info("the checkpoint also holds EMA weights (model_ema.*); pass --weights ema to import those")
    return bundle
