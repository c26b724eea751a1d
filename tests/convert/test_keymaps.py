"""The declarative key maps: exact agreement with diffusers' converters at Stable Diffusion scale, both ways."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

from ldmscale.config.load import config_from_dict, load_yaml_with_overrides
from ldmscale.convert.keymaps import KeyMapError, lit_ema_key, openclip_to_hf_clip, unet_to_diffusers, vae_to_diffusers
from ldmscale.models.autoencoder import Autoencoder, AutoencoderConfig
from ldmscale.models.unet import UNet, UNetConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _sd_unet(name: str) -> UNetConfig:
    return config_from_dict(UNetConfig, load_yaml_with_overrides(CONFIGS / "ldm" / name)["task"]["unet"])


@pytest.mark.parametrize("name", ["sd15.yaml", "sd2-base.yaml"])
def test_unet_map_equals_diffusers_converter_on_stable_diffusion(name):
    """On the meta device: our table gives the same 686 keys and shapes as diffusers' own
    `convert_ldm_unet_checkpoint`, and reading it backwards restores our keys."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    cfg = _sd_unet(name)
    with torch.device("meta"):
        ours = UNet(cfg).state_dict()
    params = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("gradient_checkpointing", "dropout", "num_classes") and v != -1}
    original_config = {"model": {"params": {"unet_config": {"params": params},
                                            "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.items()}
    reference = single_file.convert_ldm_unet_checkpoint(
        checkpoint, single_file.create_unet_diffusers_config_from_ldm(original_config, checkpoint))
    theirs = unet_to_diffusers(cfg).to_theirs(ours)
    assert len(theirs) == len(reference) == 686
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in reference.items()}
    back = unet_to_diffusers(cfg).to_ours(theirs)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}


def test_vae_map_equals_diffusers_converter_on_kl_f8():
    """The KL-f8 autoencoder: 248 tensors, the decoder's levels reversed, 1x1-conv attention as Linear."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    cfg = AutoencoderConfig()
    with torch.device("meta"):
        ours = {k: v for k, v in Autoencoder(cfg).state_dict().items() if k != "scale_factor"}
    dd = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    original_config = {"model": {"params": {"first_stage_config": {"params": {"embed_dim": 4, "ddconfig": dd}}}}}
    checkpoint = {"first_stage_model." + k: v for k, v in ours.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = single_file.create_vae_diffusers_config_from_ldm(original_config, checkpoint, image_size=256)
    reference = single_file.convert_ldm_vae_checkpoint(checkpoint, config)
    theirs = vae_to_diffusers(cfg).to_theirs(ours)
    assert len(theirs) == len(reference) == 248
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in reference.items()}
    deepest = ours["decoder.up.3.upsample.conv.weight"]  # runs first in the decoder: diffusers' up_blocks.0
    assert theirs["decoder.up_blocks.0.upsamplers.0.conv.weight"].shape == deepest.shape
    back = vae_to_diffusers(cfg).to_ours(theirs)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}


def test_fused_attention_projection_splits_and_rejoins_exactly():
    """OpenCLIP's in_proj (3D, D) is HF CLIP's q, k, v rows in that order; the way back concatenates them."""
    d = 8
    weight, bias = torch.randn(3 * d, d), torch.randn(3 * d)
    ours = {"transformer.resblocks.0.attn.in_proj_weight": weight, "transformer.resblocks.0.attn.in_proj_bias": bias}
    keymap = openclip_to_hf_clip(1)
    theirs = keymap.to_theirs(ours)
    layer = "text_model.encoder.layers.0.self_attn."
    assert torch.equal(theirs[layer + "q_proj.weight"], weight[:d])
    assert torch.equal(theirs[layer + "k_proj.weight"], weight[d:2 * d])
    assert torch.equal(theirs[layer + "v_proj.bias"], bias[2 * d:])
    back = keymap.to_ours(theirs)
    assert torch.equal(back["transformer.resblocks.0.attn.in_proj_weight"], weight)
    del theirs[layer + "k_proj.weight"]
    with pytest.raises(KeyMapError, match="needs all of"):
        keymap.to_ours(theirs)


def test_unknown_keys_are_listed_not_dropped():
    cfg = AutoencoderConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8)
    with pytest.raises(KeyMapError, match=r"2 keys have no conversion rule: \['decoder.extra.weight', 'loss.logvar'\]"):
        vae_to_diffusers(cfg).to_theirs({"encoder.conv_in.weight": torch.zeros(1), "loss.logvar": torch.zeros(1),
                                         "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="attn_resolutions"):
        vae_to_diffusers(dataclasses.replace(cfg, attn_resolutions=[8]))


def test_lit_ema_names_strip_the_dots_as_compvis_does():
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert lit_ema_key(key) == "model_ema.diffusion_modelinput_blocks00weight"
