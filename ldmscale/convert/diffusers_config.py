"""ldmscale configs <-> the `config.json` files of diffusers / transformers model folders.

Written by hand (no diffusers import): `UNet2DConditionModel`, `AutoencoderKL`, `DDIMScheduler` and
transformers' `CLIPTextModel` configs, in the form their `from_pretrained` reads. Read back, each
file gives our config, and a setting our models do not implement is an error naming it rather
than a model that silently computes something else.

Two naming traps of the peers: diffusers' `attention_head_dim` of `UNet2DConditionModel` is the
number of heads per level (SD2's [5, 10, 20, 20] are 64-wide heads), and its scheduler calls our
eps / v / x0 targets epsilon / v_prediction / sample; a wrong `prediction_type` is the classic
cause of "deep-fried" samples after a conversion.
"""

from __future__ import annotations

from typing import Any

from ldmscale.diffusion.schedule import ScheduleConfig
from ldmscale.models.autoencoder import AutoencoderConfig
from ldmscale.models.unet import UNetConfig
from ldmscale.nn.blocks import GROUPS

DIFFUSERS_VERSION = "0.30.0"  # the config format written (read by every later diffusers)
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}

# diffusers settings our UNet implements only at these values (a missing key means diffusers' default).
UNET_FIXED = {"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
              "norm_num_groups": GROUPS, "norm_eps": 1e-5, "downsample_padding": 1, "mid_block_scale_factor": 1,
              "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
              "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
              "encoder_hid_dim": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
              "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
              "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
              "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
              "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
              "reverse_transformer_layers_per_block": None}
VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
             "shift_factor": None, "latents_mean": None, "latents_std": None}
SCHEDULER_FIXED = {"trained_betas": None, "rescale_betas_zero_snr": False}


def _problems_fixed(config: dict[str, Any], fixed: dict[str, Any], where: str) -> list[str]:
    return [f"{where}: {key} = {config[key]!r} is not supported (ldmscale implements {value!r})"
            for key, value in fixed.items() if key in config and config[key] != value]


def _levels(widths: list[int], where: str) -> tuple[int, list[int], list[str]]:
    """(base width, multipliers) of per-level widths; our first conv emits the first level's width."""
    base = widths[0]
    if any(w % base for w in widths):
        return base, [], [f"{where}: block_out_channels {widths} are not multiples of the first level's width"]
    return base, [w // base for w in widths], []


# --- UNet ---------------------------------------------------------------------------------------------

def unet_config_json(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    factors = [2 ** i for i in range(len(widths))]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": widths, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if f in cfg.attention_resolutions else "DownBlock2D"
                             for f in factors],
        "up_block_types": ["CrossAttnUpBlock2D" if f in cfg.attention_resolutions else "UpBlock2D"
                           for f in reversed(factors)],
        # Head counts per level (diffusers' misnamed `attention_head_dim`); the mid-block uses the last.
        "attention_head_dim": [cfg.heads(w)[0] for w in widths],
        "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": cfg.transformer_depth, "num_class_embeds": cfg.num_classes,
        "dropout": cfg.dropout, "upcast_attention": False, **UNET_FIXED,
    }


def _unet_heads(heads: list[int], widths: list[int], attention_levels: list[int], where: str
                ) -> tuple[dict[str, int], list[str]]:
    """num_heads / num_head_channels giving these per-level head counts (attention levels and the mid-block)."""
    used = sorted(set(attention_levels) | {len(widths) - 1})
    counts = {heads[i] for i in used}
    if len(counts) == 1:
        return {"num_heads": counts.pop(), "num_head_channels": -1}, []
    dims = {widths[i] // heads[i] for i in used if widths[i] % heads[i] == 0}
    if len(dims) == 1 and all(widths[i] % heads[i] == 0 for i in used):
        return {"num_heads": -1, "num_head_channels": dims.pop()}, []
    return {}, [f"{where}: attention_head_dim {heads} is neither one head count nor one head width over the levels"]


def unet_config_from_json(config: dict[str, Any], where: str = "unet/config.json") -> tuple[dict[str, Any], list[str]]:
    """Our `UNetConfig` fields for a diffusers UNet config, and the problems that make it unrepresentable."""
    problems = _problems_fixed(config, UNET_FIXED, where)
    widths = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    base, mult, level_problems = _levels(widths, where)
    problems += level_problems
    down = list(config.get("down_block_types", ()))
    attention_levels = [i for i, t in enumerate(down) if t.startswith("CrossAttn")]
    expected_up = ["CrossAttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(range(len(down)))]
    if list(config.get("up_block_types", ())) != expected_up:
        problems.append(f"{where}: up_block_types must mirror down_block_types ({expected_up})")
    for name in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim"):
        if isinstance(config.get(name), (list, tuple)):
            problems.append(f"{where}: {name} per level ({config[name]}) is not supported; one value for all levels")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    head_fields, head_problems = _unet_heads(heads, widths, attention_levels, where)
    problems += head_problems
    fields = {"in_channels": config.get("in_channels", 4), "out_channels": config.get("out_channels", 4),
              "model_channels": base, "channel_mult": mult, "num_res_blocks": config.get("layers_per_block", 2),
              "attention_resolutions": [2 ** i for i in attention_levels],
              "transformer_depth": config.get("transformer_layers_per_block", 1),
              "context_dim": config.get("cross_attention_dim", 1280),
              "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
              "num_classes": config.get("num_class_embeds"), "dropout": float(config.get("dropout", 0.0)),
              **head_fields}
    return fields, problems


# --- VAE ----------------------------------------------------------------------------------------------

def vae_config_json(cfg: AutoencoderConfig, scale_factor: float) -> dict[str, Any]:
    levels = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult], "layers_per_block": cfg.num_res_blocks,
        "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups, "sample_size": cfg.resolution,
        "scaling_factor": scale_factor, "force_upcast": True, **VAE_FIXED,
    }


def vae_config_from_json(config: dict[str, Any], where: str = "vae/config.json") -> tuple[dict[str, Any], list[str]]:
    problems = _problems_fixed(config, VAE_FIXED, where)
    widths = list(config.get("block_out_channels", (64,)))
    base, mult, level_problems = _levels(widths, where)
    problems += level_problems
    for name, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != block for t in config.get(name, ())):
            problems.append(f"{where}: {name} must all be {block}, got {config[name]}")
    size = config.get("sample_size", 32)
    latent = config.get("latent_channels", 4)
    fields = {"in_channels": config.get("in_channels", 3), "out_channels": config.get("out_channels", 3),
              "base_channels": base, "channel_mult": mult, "num_res_blocks": config.get("layers_per_block", 1),
              "attn_resolutions": [], "resolution": size[0] if isinstance(size, (list, tuple)) else size,
              "z_channels": latent, "embed_dim": latent, "norm_groups": config.get("norm_num_groups", 32),
              "regularizer": {"kind": "kl"}, "scale_factor": float(config.get("scaling_factor", 0.18215))}
    return fields, problems


# --- scheduler ----------------------------------------------------------------------------------------

def scheduler_config_json(schedule: ScheduleConfig, prediction: str) -> dict[str, Any]:
    """A DDIM scheduler on the training schedule, with the network's parameterisation."""
    return {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": schedule.num_timesteps, "beta_schedule": BETA_SCHEDULES[schedule.beta_schedule],
            "beta_start": schedule.beta_start, "beta_end": schedule.beta_end,
            "prediction_type": PREDICTION_TYPES[prediction], "clip_sample": False, "set_alpha_to_one": False,
            "steps_offset": 1, "timestep_spacing": "leading", **SCHEDULER_FIXED}


def scheduler_from_json(config: dict[str, Any], where: str = "scheduler/scheduler_config.json"
                        ) -> tuple[dict[str, Any], str | None, list[str]]:
    """(ScheduleConfig fields, prediction kind, problems)."""
    problems = _problems_fixed(config, SCHEDULER_FIXED, where)
    schedules = {v: k for k, v in BETA_SCHEDULES.items()}
    predictions = {v: k for k, v in PREDICTION_TYPES.items()}
    beta_schedule = config.get("beta_schedule", "linear")
    prediction = predictions.get(config.get("prediction_type", "epsilon"))
    if beta_schedule not in schedules:
        problems.append(f"{where}: beta_schedule {beta_schedule!r} is not supported; valid: {', '.join(schedules)}")
    if prediction is None:
        problems.append(f"{where}: prediction_type {config.get('prediction_type')!r} is not supported; "
                        f"valid: {', '.join(predictions)}")
    fields = {"beta_schedule": schedules.get(beta_schedule, "linear"),
              "num_timesteps": config.get("num_train_timesteps", 1000),
              "beta_start": float(config.get("beta_start", 0.0001)), "beta_end": float(config.get("beta_end", 0.02))}
    return fields, prediction, problems


# --- text encoder (transformers CLIPTextModel) --------------------------------------------------------

def clip_text_config_json(width: int, heads: int, layers: int, context_length: int, vocab_size: int,
                          mlp_ratio: float, quick_gelu: bool) -> dict[str, Any]:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": width,
            "intermediate_size": int(width * mlp_ratio), "num_attention_heads": heads, "num_hidden_layers": layers,
            "max_position_embeddings": context_length, "vocab_size": vocab_size,
            "hidden_act": "quick_gelu" if quick_gelu else "gelu", "layer_norm_eps": 1e-5, "projection_dim": width,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "torch_dtype": "float32"}


def openclip_custom_from_json(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """OpenCLIP `custom` text config fields of a CLIPTextModel config, and whether it uses QuickGELU."""
    width = config["hidden_size"]
    custom = {"width": width, "heads": config["num_attention_heads"], "layers": config["num_hidden_layers"],
              "context_length": config["max_position_embeddings"], "vocab_size": config["vocab_size"],
              "mlp_ratio": config["intermediate_size"] / width}
    return custom, config.get("hidden_act") == "quick_gelu"
