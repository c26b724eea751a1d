"""Declarative key maps between ldmscale's state dicts and the peers' layouts.

A `KeyMap` is a table of `Rule`s, each pairing a key prefix (or a whole key) of ours with the
peer's. The table is built once per model config, by walking the architecture the way the model's
constructor does, and read in either direction: `to_theirs` looks every key up by its longest
matching prefix on our side, `to_ours` on the peer's side. A key that no rule covers is an error
listing all such keys, never silently dropped. Two tensor transforms are declared in the rules
rather than done in code: `conv1x1` (our 1x1-conv weight (O, I, 1, 1) is the peer's Linear weight
(O, I)) and a tuple of peer prefixes (one fused tensor of ours is the peer's equal chunks along
dim 0, as OpenCLIP's `in_proj_weight` is Hugging Face CLIP's q/k/v projections).

Tables (references: diffusers `loaders/single_file_utils.py` and
`scripts/convert_diffusers_to_original_stable_diffusion.py`, kohya `library/model_util.py`):
- `unet_to_diffusers(cfg)`: CompVis `openaimodel.UNetModel` keys (ours) <-> `UNet2DConditionModel`.
  `input_blocks.i` -> `down_blocks[(i-1) // (R+1)]`, `output_blocks.i` -> `up_blocks[i // (R+1)]`
  with R = num_res_blocks; SD1's 1x1-conv and SD2's Linear `proj_in/proj_out` have the same shapes
  on both sides (diffusers picks conv or Linear with `use_linear_projection`).
- `vae_to_diffusers(cfg)`: CompVis `Encoder`/`Decoder` <-> `AutoencoderKL`. The decoder's levels
  are stored in reverse: our `decoder.up.{L-1-i}` is diffusers' `decoder.up_blocks.{i}`; the
  mid-block attention's 1x1 convs are Linear layers there.
- `openclip_to_hf_clip(layers)`: OpenCLIP's text tower (SD2's `cond_stage_model.model.*`) <->
  Hugging Face `CLIPTextModel` (`text_model.*`, SD1's `cond_stage_model.transformer.*` and diffusers'
  `text_encoder/`).
The original single-file layout is a prefix table over these (`convert/compvis.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ldmscale.models.autoencoder import AutoencoderConfig
from ldmscale.models.unet import UNetConfig


@dataclasses.dataclass(frozen=True)
class Rule:
    """`ours` <-> `theirs`: both whole keys, or both prefixes ending in "." (the rest of the key is kept)."""

    ours: str
    theirs: str | tuple[str, ...]  # a tuple: our tensor is the concatenation of these along dim 0
    transform: Literal["none", "conv1x1"] = "none"


class KeyMapError(ValueError):
    pass


class KeyMap:
    def __init__(self, rules: list[Rule]):
        self.rules = list(rules)
        self._ours: dict[str, Rule] = {}
        self._theirs: dict[str, tuple[Rule, int]] = {}
        for rule in self.rules:
            assert rule.ours not in self._ours, f"two rules for our key {rule.ours!r}"
            self._ours[rule.ours] = rule
            names = rule.theirs if isinstance(rule.theirs, tuple) else (rule.theirs,)
            for index, name in enumerate(names):
                assert name not in self._theirs, f"two rules for their key {name!r}"
                self._theirs[name] = (rule, index)

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rules + other.rules)

    def prefixed(self, ours: str, theirs: str) -> KeyMap:
        """The same table under a namespace on each side (e.g. "unet." <-> "model.diffusion_model.")."""
        def name(prefix: str, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
            return tuple(prefix + v for v in value) if isinstance(value, tuple) else prefix + value

        return KeyMap([Rule(ours + r.ours, name(theirs, r.theirs), r.transform) for r in self.rules])

    @staticmethod
    def _lookup(table: dict, key: str):
        """The entry of the longest rule matching `key`: the whole key, else its longest "."-ended prefix."""
        if key in table:
            return table[key], ""
        cut = key.rfind(".", 0, len(key) - 1)
        while cut >= 0:
            entry = table.get(key[:cut + 1])
            if entry is not None:
                return entry, key[cut + 1:]
            cut = key.rfind(".", 0, cut)
        return None, None

    def to_theirs(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        unmapped = []
        for key, value in state.items():
            rule, rest = self._lookup(self._ours, key)
            if rule is None:
                unmapped.append(key)
                continue
            if rule.transform == "conv1x1" and value.ndim == 4:
                value = value[:, :, 0, 0]  # (O, I, 1, 1) -> (O, I)
            if isinstance(rule.theirs, tuple):
                for name, chunk in zip(rule.theirs, value.chunk(len(rule.theirs), dim=0)):
                    out[name + rest] = chunk
            else:
                out[rule.theirs + rest] = value
        if unmapped:
            raise KeyMapError(f"{len(unmapped)} keys have no conversion rule: {sorted(unmapped)}")
        return out

    def to_ours(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        pieces: dict[str, dict[int, torch.Tensor]] = {}
        unmapped = []
        for key, value in state.items():
            found, rest = self._lookup(self._theirs, key)
            if found is None:
                unmapped.append(key)
                continue
            rule, index = found
            if rule.transform == "conv1x1" and value.ndim == 2:
                value = value[:, :, None, None]  # (O, I) -> (O, I, 1, 1)
            if isinstance(rule.theirs, tuple):
                pieces.setdefault(rule.ours + rest, {})[index] = value
            else:
                out[rule.ours + rest] = value
        if unmapped:
            raise KeyMapError(f"{len(unmapped)} keys have no conversion rule: {sorted(unmapped)}")
        for key, parts in pieces.items():
            rule, _ = self._lookup(self._ours, key)
            if len(parts) != len(rule.theirs):
                raise KeyMapError(f"{key}: needs all of {list(rule.theirs)}, got {len(parts)} of them")
            out[key] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
        return out


# --- UNet <-> diffusers UNet2DConditionModel ---------------------------------------------------------

RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
          ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def _resnet(ours: str, theirs: str) -> list[Rule]:
    return [Rule(ours + a, theirs + b) for a, b in RESNET]


def unet_to_diffusers(cfg: UNetConfig) -> KeyMap:
    """Our `UNet` (= original `model.diffusion_model.*`) <-> diffusers `UNet2DConditionModel`."""
    rules = [Rule("time_embed.0.", "time_embedding.linear_1."), Rule("time_embed.2.", "time_embedding.linear_2."),
             Rule("input_blocks.0.0.", "conv_in."), Rule("out.0.", "conv_norm_out."), Rule("out.2.", "conv_out."),
             Rule("label_emb.", "class_embedding.")]
    # Transformer internals (norm, proj_in, transformer_blocks.*, proj_out) are named alike on both sides.
    levels, blocks, attn = len(cfg.channel_mult), cfg.num_res_blocks, cfg.attention_resolutions
    index, ds = 1, 1
    for level in range(levels):
        for j in range(blocks):
            rules += _resnet(f"input_blocks.{index}.0.", f"down_blocks.{level}.resnets.{j}.")
            if ds in attn:
                rules.append(Rule(f"input_blocks.{index}.1.", f"down_blocks.{level}.attentions.{j}."))
            index += 1
        if level != levels - 1:
            rules.append(Rule(f"input_blocks.{index}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
            index, ds = index + 1, ds * 2
    rules += _resnet("middle_block.0.", "mid_block.resnets.0.")
    rules.append(Rule("middle_block.1.", "mid_block.attentions.0."))
    rules += _resnet("middle_block.2.", "mid_block.resnets.1.")
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            rules += _resnet(f"output_blocks.{index}.0.", f"up_blocks.{up}.resnets.{j}.")
            position = 1
            if ds in attn:
                rules.append(Rule(f"output_blocks.{index}.1.", f"up_blocks.{up}.attentions.{j}."))
                position = 2
            if level and j == blocks:
                rules.append(Rule(f"output_blocks.{index}.{position}.conv.", f"up_blocks.{up}.upsamplers.0.conv."))
                ds //= 2
            index += 1
    return KeyMap(rules)


# --- Autoencoder <-> diffusers AutoencoderKL ---------------------------------------------------------

VAE_RESNET = (("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."),
              ("nin_shortcut.", "conv_shortcut."))
VAE_ATTENTION = (("norm.", "group_norm.", "none"), ("q.", "to_q.", "conv1x1"), ("k.", "to_k.", "conv1x1"),
                 ("v.", "to_v.", "conv1x1"), ("proj_out.", "to_out.0.", "conv1x1"))


def _vae_resnet(ours: str, theirs: str) -> list[Rule]:
    return [Rule(ours + a, theirs + b) for a, b in VAE_RESNET]


def _vae_mid(ours: str, theirs: str) -> list[Rule]:
    rules = _vae_resnet(ours + "block_1.", theirs + "resnets.0.")
    rules += _vae_resnet(ours + "block_2.", theirs + "resnets.1.")
    return rules + [Rule(ours + "attn_1." + a, theirs + "attentions.0." + b, t) for a, b, t in VAE_ATTENTION]


def vae_diffusers_problems(cfg: AutoencoderConfig) -> list[str]:
    """Why this autoencoder has no `AutoencoderKL` equivalent (empty when it has one)."""
    problems = []
    if cfg.regularizer.kind != "kl":
        problems.append(f"regularizer.kind: diffusers' AutoencoderKL needs kl, got {cfg.regularizer.kind}")
    if cfg.attn_resolutions:
        problems.append(f"attn_resolutions: AutoencoderKL has attention only in its mid-blocks, got "
                        f"{cfg.attn_resolutions}")
    if cfg.embed_dim != cfg.z_channels:
        problems.append(f"embed_dim: AutoencoderKL needs embed_dim == z_channels ({cfg.z_channels}), "
                        f"got {cfg.embed_dim}")
    return problems


def vae_to_diffusers(cfg: AutoencoderConfig) -> KeyMap:
    """Our KL `Autoencoder` (= original `first_stage_model.*`, without `scale_factor`) <-> `AutoencoderKL`."""
    problems = vae_diffusers_problems(cfg)
    if problems:
        raise ValueError("this autoencoder cannot be written in diffusers' layout:\n  " + "\n  ".join(problems))
    levels = len(cfg.channel_mult)
    rules = [Rule(k, k) for k in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                                  "quant_conv.", "post_quant_conv.")]
    rules += [Rule("encoder.norm_out.", "encoder.conv_norm_out."), Rule("decoder.norm_out.", "decoder.conv_norm_out.")]
    rules += _vae_mid("encoder.mid.", "encoder.mid_block.") + _vae_mid("decoder.mid.", "decoder.mid_block.")
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            rules += _vae_resnet(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.")
        if i != levels - 1:
            rules.append(Rule(f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
        level = levels - 1 - i  # the decoder runs its levels from the deepest; diffusers numbers them in run order
        for j in range(cfg.num_res_blocks + 1):
            rules += _vae_resnet(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
        if level != 0:
            rules.append(Rule(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    return KeyMap(rules)


# --- OpenCLIP text tower <-> Hugging Face CLIPTextModel ----------------------------------------------

CLIP_LAYER = (("ln_1.", "layer_norm1."), ("attn.out_proj.", "self_attn.out_proj."), ("ln_2.", "layer_norm2."),
              ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def openclip_to_hf_clip(layers: int) -> KeyMap:
    """OpenCLIP text keys (`OpenCLIPTextTower`, SD2's `cond_stage_model.model.*`) <-> `CLIPTextModel` keys.

    `layers` blocks are mapped; OpenCLIP's fused `in_proj_weight` (3D, D) is HF's q, k, v (D, D) each.
    """
    rules = [Rule("token_embedding.", "text_model.embeddings.token_embedding."),
             Rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
             Rule("ln_final.", "text_model.final_layer_norm.")]
    for i in range(layers):
        ours, theirs = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        rules += [Rule(ours + a, theirs + b) for a, b in CLIP_LAYER]
        for suffix in ("weight", "bias"):
            rules.append(Rule(f"{ours}attn.in_proj_{suffix}",
                              tuple(f"{theirs}self_attn.{p}_proj.{suffix}" for p in "qkv")))
    return KeyMap(rules)


def lit_ema_key(original_key: str) -> str:
    """CompVis `LitEma` buffer name of an original parameter key: dots removed after the `model.` prefix.

    `model.diffusion_model.input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`
    (as diffusers' `convert_ldm_unet_checkpoint(extract_ema=True)` reads it).
    """
    assert original_key.startswith("model."), original_key
    return "model_ema." + original_key[len("model."):].replace(".", "")
