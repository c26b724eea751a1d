"""Tiny random-weight ldmscale models in the three conditioning styles the converters must handle.

- sd1: 1x1-conv transformer projections, a head count, an OpenCLIP ViT-L-14-named text tower read at
  its last layer (written as SD1's Hugging Face CLIP layout);
- sd2: Linear projections, a head width, penultimate-layer OpenCLIP tower, v-prediction;
- class: a trained class table giving a one-token cross-attention context.
"""

from __future__ import annotations

import torch

from ldmscale.config.load import config_from_dict
from ldmscale.config.schema import RunConfig
from ldmscale.convert.bundle import Bundle
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.models.unet import UNet
from ldmscale.training.tasks.latent_diffusion import LatentDenoiser, build_seeded_conditioner, is_trainable

STYLES = ("sd1", "sd2", "class")
RESOLUTION = 32  # pixels; latents are 8x8 (f = 4)
TEXT = {"width": 32, "heads": 2, "layers": 2, "context_length": 16}


def autoencoder_run() -> RunConfig:
    model = {"base_channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "resolution": RESOLUTION,
             "norm_groups": 8, "z_channels": 4, "embed_dim": 4, "scale_factor": 0.5}
    return config_from_dict(RunConfig, {"stage": "autoencoder", "task": {"model": model}})


def ldm_run(style: str) -> RunConfig:
    unet = {"in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": 1,
            "attention_resolutions": [2], "channel_mult": [1, 2], "transformer_depth": 1, "context_dim": 32}
    if style == "sd1":
        unet.update(num_heads=2, num_head_channels=-1, use_linear_in_transformer=False)
        conditioner = {"kind": "openclip", "arch": "ViT-L-14", "layer": "last", "max_length": 16, "custom": TEXT}
    elif style == "sd2":
        unet.update(num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, transformer_depth=2)
        conditioner = {"kind": "openclip", "arch": "ViT-H-14", "layer": "penultimate", "max_length": 16,
                       "custom": TEXT}
    else:
        unet.update(num_heads=2, num_head_channels=-1, context_dim=16)
        conditioner = {"kind": "class", "num_classes": 5, "embed_dim": 16}
    return config_from_dict(RunConfig, {
        "stage": "latent_diffusion", "data": {"resolution": RESOLUTION},
        "task": {"autoencoder": "unused.safetensors", "unet": unet, "conditioner": conditioner,
                 "prediction": {"kind": "v" if style == "sd2" else "eps"}}})


def randomized(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every floating tensor redrawn (zero-initialised output layers included), so outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 if v.is_floating_point() and v.ndim else v.clone()
            for k, v in state.items()}


def bundle(style: str | None, seed: int = 0, with_ema: bool = False) -> Bundle:
    """A random-weight bundle (an autoencoder alone when `style` is None)."""
    ae_run = autoencoder_run()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = randomized(Autoencoder(ae_run.task.model).state_dict(), seed)
    autoencoder["scale_factor"] = torch.tensor(0.5)
    if style is None:
        return Bundle(ae_run, ae_run, autoencoder, step=3)
    run = ldm_run(style)
    conditioner = build_seeded_conditioner(run.task.conditioner, seed)
    trained = is_trainable(conditioner)
    with torch.random.fork_rng(devices=[]):
        denoiser = LatentDenoiser(UNet(run.task.unet), conditioner if trained else None).state_dict()
    text = {} if trained else randomized(conditioner.state_dict(), seed + 1)
    ema = randomized(denoiser, seed + 3) if with_ema else None
    return Bundle(run, ae_run, autoencoder, randomized(denoiser, seed + 2), ema, text, step=3)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for key, value in a.items():
        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), f"{what}: {key} differs"


def modules(b: Bundle) -> dict[str, torch.nn.Module]:
    """The bundle's networks as plain eval-mode modules holding its weights."""
    out = {"autoencoder": Autoencoder(b.ae_cfg)}
    out["autoencoder"].load_state_dict(b.autoencoder)
    if b.is_ldm:
        out["unet"] = UNet(b.task.unet)
        out["unet"].load_state_dict(b.part("unet."))
        conditioner = build_seeded_conditioner(b.task.conditioner, 0)
        conditioner.load_state_dict(b.part("conditioner.") or b.text)
        out["conditioner"] = conditioner
    return {k: v.eval() for k, v in out.items()}
