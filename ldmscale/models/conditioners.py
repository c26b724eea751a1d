"""Conditioners: raw conditioning (class labels, prompts) -> the UNet's keyword inputs.

A conditioner returns a dict with `context` (B, M, D) for cross-attention (Rombach et al. 2022 §3.3)
and/or `y` (B,) for the UNet's class-embedding table, and knows its unconditional input (null
class, empty prompt) for classifier-free guidance (Ho & Salimans 2022). `drop` replaces each
sample's conditioning by the unconditional one with probability `ucg_rate` (conditioning dropout,
SD2's `ucg_rate`); it acts on encoded conditionings so that it also applies to cached text
embeddings, which is equivalent to dropping the raw input because every sample is encoded alone.

Kinds (`CONDITIONERS`): `none`; `class` (a table with one extra null row giving a (B, 1, D) context,
or the labels as `y` for the UNet's `label_emb`); `openclip` (a frozen OpenCLIP text tower, as
SD2's `FrozenOpenCLIPEmbedder`).
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from ldmscale.config.registry import Registry
from ldmscale.models.unet import UNetConfig

CONDITIONERS = Registry("conditioner")
log = logging.getLogger(__name__)

# Keys a `custom` OpenCLIP text config may set (a plain causal text transformer).
OPENCLIP_CUSTOM_KEYS = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "ls_init_value")


class Conditioner(nn.Module, ABC):
    ucg_rate: float = 0.0
    context_dim: int | None = None  # width of `context`, or None when the conditioner gives no context
    num_labels: int | None = None  # size of the UNet's label_emb the `y` output needs, or None

    @abstractmethod
    def forward(self, raw: Any) -> dict[str, torch.Tensor]:
        """Encodes one batch of raw conditioning."""

    @abstractmethod
    def unconditional(self, batch_size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The unconditional conditioning for `batch_size` samples."""

    def drop(self, cond: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Replaces each sample's conditioning by the unconditional one with probability ucg_rate."""
        if not cond or self.ucg_rate <= 0:
            return dict(cond)
        batch = next(iter(cond.values())).shape[0]
        rng_device = generator.device if generator is not None else torch.device("cpu")
        drop = torch.rand(batch, generator=generator, device=rng_device) < self.ucg_rate  # (B,)
        uncond = self.unconditional(batch, next(iter(cond.values())).device)
        out = {}
        for key, value in cond.items():
            mask = drop.to(value.device).view(batch, *([1] * (value.ndim - 1)))
            out[key] = torch.where(mask, uncond[key].to(value.dtype), value)
        return out


def unet_compatibility(conditioner: Conditioner, unet: UNetConfig) -> list[str]:
    """Problems (naming UNet config keys) that stop `conditioner`'s outputs from feeding `unet`."""
    problems = []
    if conditioner.context_dim != unet.context_dim:
        problems.append(f"unet.context_dim: must be {conditioner.context_dim} for this conditioner, "
                        f"got {unet.context_dim}")
    if conditioner.num_labels != unet.num_classes:
        problems.append(f"unet.num_classes: must be {conditioner.num_labels} for this conditioner "
                        f"(classes plus the null class), got {unet.num_classes}")
    return problems


# --- none ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class NoConditionerConfig:
    kind: str = "none"


class NoConditioner(Conditioner):
    """Unconditional model: no inputs, nothing to drop."""

    def forward(self, raw: Any = None) -> dict[str, torch.Tensor]:
        return {}

    def unconditional(self, batch_size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {}


# --- class --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ClassConditionerConfig:
    kind: str = "class"
    num_classes: int = 1000  # real classes; index num_classes is the null class
    output: Literal["context", "y"] = "context"  # a (B, 1, embed_dim) context, or labels for the UNet's label_emb
    embed_dim: int = 512  # width of the context token (output: context only)
    ucg_rate: float = 0.1

    def validate(self) -> list[str]:
        problems = []
        if self.num_classes < 1:
            problems.append(f"num_classes: must be >= 1, got {self.num_classes}")
        if self.embed_dim < 1:
            problems.append(f"embed_dim: must be >= 1, got {self.embed_dim}")
        if not 0.0 <= self.ucg_rate <= 1.0:
            problems.append(f"ucg_rate: must be in [0, 1], got {self.ucg_rate}")
        return problems


class ClassConditioner(Conditioner):
    """Class labels (B,) long -> {"context": (B, 1, D)} via `embedding`, or {"y": (B,)} for the UNet.

    The table has num_classes + 1 rows; the last is the learned null class used for CFG (as LDM's
    `ClassEmbedder` for cin256-v2, whose 1001 rows include the null class). In `y` mode the labels
    pass through and the UNet must have num_classes + 1 entries in its `label_emb`.
    """

    def __init__(self, cfg: ClassConditionerConfig):
        super().__init__()
        self.cfg = cfg
        self.ucg_rate = cfg.ucg_rate
        self.null_class = cfg.num_classes
        if cfg.output == "context":
            self.embedding = nn.Embedding(cfg.num_classes + 1, cfg.embed_dim)
            self.context_dim = cfg.embed_dim
        else:
            self.num_labels = cfg.num_classes + 1

    def forward(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.output == "y":
            return {"y": labels.long()}
        return {"context": self.embedding(labels.long())[:, None]}  # (B, 1, D)

    def unconditional(self, batch_size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        return self(torch.full((batch_size,), self.null_class, dtype=torch.long, device=device))


# --- openclip -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class OpenCLIPConditionerConfig:
    kind: str = "openclip"
    arch: str = "ViT-H-14"  # open_clip architecture name (its text config and tokenizer)
    weights: str | None = None  # local open_clip weights (.safetensors, or a torch file); None: random init
    layer: Literal["last", "penultimate"] = "penultimate"  # SD2 uses the penultimate block's tokens
    max_length: int = 77
    custom: dict[str, Any] | None = None  # a small text config replacing the arch's (tests); arch names the tokenizer
    ucg_rate: float = 0.1

    def validate(self) -> list[str]:
        problems = []
        if self.max_length < 1:
            problems.append(f"max_length: must be >= 1, got {self.max_length}")
        if not 0.0 <= self.ucg_rate <= 1.0:
            problems.append(f"ucg_rate: must be in [0, 1], got {self.ucg_rate}")
        if self.custom is not None:
            for key in self.custom:
                if key not in OPENCLIP_CUSTOM_KEYS:
                    problems.append(f"custom.{key}: unknown key; valid keys: {', '.join(OPENCLIP_CUSTOM_KEYS)}")
        if self.layer == "penultimate" and self.custom is not None and self.custom.get("layers", 2) < 2:
            problems.append("layer: 'penultimate' needs custom.layers >= 2")
        return problems


class OpenCLIPTextTower(nn.Module):
    """The text parts of an OpenCLIP model, with the key names of SD2's `cond_stage_model.model.*`.

    `text_projection` and `logit_scale` (present in SD2 checkpoints, unused for conditioning) are
    not kept.
    """

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)

    def forward(self, tokens: torch.Tensor, skip_last: int = 0) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D) final-LayerNorm'ed tokens after all but `skip_last` blocks."""
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, D)
        batch_first = self.transformer.batch_first
        if not batch_first:
            x = x.transpose(0, 1)  # (L, B, D)
        blocks = self.transformer.resblocks
        for block in blocks[: len(blocks) - skip_last]:
            x = block(x, attn_mask=self.attn_mask)
        if not batch_first:
            x = x.transpose(0, 1)  # (B, L, D)
        return self.ln_final(x)


def _load_text_weights(path: str) -> dict[str, torch.Tensor]:
    """Text-tower tensors of an open_clip checkpoint (or of an SD2 checkpoint's cond_stage_model.model.*)."""
    if not Path(path).is_file():
        raise ValueError(f"weights: file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.")
    out = {}
    for key, value in state.items():
        for prefix in ("", "cond_stage_model.model."):
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name is not None and name.startswith(keep):
                out[name] = value
    return out


class OpenCLIPConditioner(Conditioner):
    """Prompts (list of B strings) -> {"context": (B, max_length, width)} from a frozen OpenCLIP text tower.

    As SD2's `FrozenOpenCLIPEmbedder`: token + positional embedding, the causal transformer up to the
    last (`layer: last`) or the penultimate (`layer: penultimate`) block, then `ln_final`. The
    tower stays in eval mode with requires_grad False, whatever `train()` is called with.
    """

    def __init__(self, cfg: OpenCLIPConditionerConfig):
        super().__init__()
        import open_clip  # heavy import (seconds), only when an OpenCLIP conditioner is built

        model_cfg = open_clip.get_model_config(cfg.arch)
        if model_cfg is None:
            raise ValueError(f"arch: unknown open_clip architecture {cfg.arch!r}; "
                             "valid names: see open_clip.list_models()")
        text_cfg = dict(cfg.custom) if cfg.custom is not None else dict(model_cfg["text_cfg"])
        if text_cfg.get("hf_model_name"):
            raise ValueError(f"arch: {cfg.arch!r} has a Hugging Face text tower; "
                             "only OpenCLIP text transformers are supported")
        # open_clip builds CLIP's text half with this function; calling it skips the vision tower.
        tower = open_clip.model._build_text_tower(model_cfg["embed_dim"], text_cfg, model_cfg.get("quick_gelu", False))
        if tower.context_length != cfg.max_length:
            raise ValueError(f"max_length: must equal the text tower's context_length {tower.context_length}, "
                             f"got {cfg.max_length}")
        self.model = OpenCLIPTextTower(tower)
        if cfg.weights is not None:
            try:
                self.model.load_state_dict(_load_text_weights(cfg.weights), strict=True)
            except RuntimeError as e:  # missing / unexpected / mis-shaped tensors
                raise ValueError(f"weights: {cfg.weights!r} does not fit the {cfg.arch} text tower: {e}") from e
        elif cfg.custom is None:
            log.warning("OpenCLIP conditioner %s has random weights (weights: null)", cfg.arch)
        self.model.requires_grad_(False)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.arch, context_length=cfg.max_length)
        self.cfg = cfg
        self.ucg_rate = cfg.ucg_rate
        self.context_dim = self.model.token_embedding.embedding_dim
        self.skip_last = 1 if cfg.layer == "penultimate" else 0

    def train(self, mode: bool = True) -> OpenCLIPConditioner:
        super().train(mode)
        self.model.eval()  # frozen: no dropout or other train-mode behaviour, ever
        return self

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.tokenizer(list(prompts)).to(self.model.token_embedding.weight.device)  # (B, L)
        return {"context": self.model(tokens, self.skip_last)}  # (B, L, D)

    def unconditional(self, batch_size: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        empty = self([""])["context"].to(device)  # (1, L, D): SD2's unconditional input is the empty prompt
        return {"context": empty.expand(batch_size, -1, -1)}


CONDITIONERS.register("none", NoConditionerConfig, lambda cfg: NoConditioner())
CONDITIONERS.register("class", ClassConditionerConfig, ClassConditioner)
CONDITIONERS.register("openclip", OpenCLIPConditionerConfig, OpenCLIPConditioner)


def build_conditioner(cfg: Any) -> Conditioner:
    return CONDITIONERS.build(cfg)
