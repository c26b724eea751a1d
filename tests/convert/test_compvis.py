"""The original single-file layout: exact round trips, equivalence under diffusers' own single-file
converters (UNet, VAE, SD1 CLIP text encoder), and strict reading."""

from __future__ import annotations

import warnings

import pytest
import torch

from ldmscale.convert.compvis import from_original, original_config, to_original
from ldmscale.convert.keymaps import unet_to_diffusers
from ldmscale.diffusion.schedule import NoiseSchedule
from tests.convert import tiny


@pytest.mark.parametrize("style", tiny.STYLES)
def test_round_trip_is_exact(style):
    """ldmscale -> original -> ldmscale: identical tensors, main weights and the model_ema.* copy."""
    b = tiny.bundle(style, with_ema=True)
    state = to_original(b)
    main = from_original(state, b.run, b.autoencoder_run, step=b.step)
    tiny.assert_same(main.autoencoder, b.autoencoder, "autoencoder")
    tiny.assert_same(main.denoiser, b.denoiser, "denoiser")
    tiny.assert_same(main.text, b.text, "text tower")
    ema = from_original(state, b.run, b.autoencoder_run, weights="ema")
    tiny.assert_same(ema.part("unet."), b.part("unet.", ema=True), "UNet EMA")
    # The schedule tables are the configured schedule's, as CompVis registers them.
    expected = NoiseSchedule.from_config(b.task.schedule).original_buffers()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_layouts_of_the_text_towers_and_class_table():
    """SD1: Hugging Face CLIP under cond_stage_model.transformer; SD2: OpenCLIP under .model; a class table."""
    sd1, sd2, cls = (to_original(tiny.bundle(s)) for s in tiny.STYLES)
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in sd1
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in sd2
    assert [k for k in cls if k.startswith("cond_stage_model.")] == ["cond_stage_model.embedding.weight"]
    assert sd1["scale_factor"].item() == 0.5 and "first_stage_model.encoder.conv_in.weight" in sd1


def _peer_unet(state, config):
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from diffusers import UNet2DConditionModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet_config = single_file.create_unet_diffusers_config_from_ldm(config, state)
    return unet_config, UNet2DConditionModel(**unet_config).eval(), single_file


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_diffusers_single_file_converters_reproduce_our_outputs(style):
    """diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`, configured from the
    CompVis config we write beside the file, give networks computing ours (1e-5, fp32), and use
    every UNet and first-stage tensor we wrote; `extract_ema` reads our model_ema.* naming."""
    b = tiny.bundle(style, with_ema=True)
    state, config = to_original(b), original_config(b)
    ours = tiny.modules(b)
    unet_config, unet, single_file = _peer_unet(state, config)
    converted = single_file.convert_ldm_unet_checkpoint(state, unet_config)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    assert len(converted) == len(unet_keys)  # no exported key left unused
    unet.load_state_dict(converted, strict=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([17, 802])
    ctx = torch.randn(2, 5, b.task.unet.context_dim, generator=g)
    with torch.no_grad():
        expected = ours["unet"](x, t, ctx)
        assert expected.abs().mean() > 0.1
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample, expected, rtol=1e-5, atol=1e-5)
        ema = single_file.convert_ldm_unet_checkpoint(state, unet_config, extract_ema=True)
        tiny.assert_same(unet_to_diffusers(b.task.unet).to_ours(ema), b.part("unet.", ema=True), "EMA via diffusers")

    from diffusers import AutoencoderKL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae_config = single_file.create_vae_diffusers_config_from_ldm(config, state, image_size=tiny.RESOLUTION)
    assert vae_config["scaling_factor"] == 0.5  # read from our config's scale_factor
    vae_state = single_file.convert_ldm_vae_checkpoint(state, vae_config)
    assert len(vae_state) == len([k for k in state if k.startswith("first_stage_model.")])
    vae = AutoencoderKL(**vae_config, norm_num_groups=b.ae_cfg.norm_groups).eval()
    vae.load_state_dict(vae_state, strict=True)
    image, z = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(image).latent_dist.mean, ours["autoencoder"].encode(image).mean,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(z).sample, ours["autoencoder"].decode(z), rtol=1e-5, atol=1e-5)


def test_sd1_text_encoder_layout_loads_into_transformers_clip():
    """SD1's cond_stage_model.transformer.* is transformers' CLIPTextModel: diffusers' converter strips the
    prefix, the model loads it strictly and computes our tower's tokens."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    from transformers import CLIPTextConfig, CLIPTextModel

    b = tiny.bundle("sd1")
    state = to_original(b)
    text_state = single_file.convert_ldm_clip_checkpoint(state)
    spec = tiny.TEXT
    model = CLIPTextModel(CLIPTextConfig(hidden_size=spec["width"], intermediate_size=4 * spec["width"],
                                         num_attention_heads=spec["heads"], num_hidden_layers=spec["layers"],
                                         max_position_embeddings=spec["context_length"], hidden_act="gelu")).eval()
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers >= 5 dropped the `text_model` wrapper from its module tree (its loader still reads
        # the prefixed keys that SD1 files and Hub folders hold).
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    missing, unexpected = model.load_state_dict(text_state, strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("position_ids")]
    conditioner = tiny.modules(b)["conditioner"]
    prompts = ["a red circle in the center"]
    with torch.no_grad():
        torch.testing.assert_close(model(conditioner.tokenizer(prompts)).last_hidden_state,
                                   conditioner(prompts)["context"], rtol=1e-5, atol=1e-5)


def test_reading_is_strict_and_lists_every_problem():
    b = tiny.bundle("sd2")
    state = to_original(b)
    del state["model.diffusion_model.input_blocks.0.0.weight"]
    state["model.diffusion_model.extra.weight"] = torch.zeros(1)
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(3)
    state["betas"] = state["betas"] * 2
    with pytest.raises(ValueError) as info:
        from_original(state, b.run, b.autoencoder_run)
    message = str(info.value)
    assert "1 unexpected keys (not part of the configured model): ['model.diffusion_model.extra.weight']" in message
    assert ("1 missing keys (the configured model needs them): ['model.diffusion_model.input_blocks.0.0.weight']"
            in message)
    assert "first_stage_model.encoder.conv_in.weight (3,) (model: (16, 3, 3, 3))" in message
    assert "task.schedule: the checkpoint's betas differs" in message


def test_missing_scale_factor_must_be_given_and_unused_heads_are_skipped():
    """Stable Diffusion files store no scale_factor; SD2 files carry OpenCLIP heads we do not use."""
    b = tiny.bundle("sd2")
    state = to_original(b)
    del state["scale_factor"]
    state["cond_stage_model.model.text_projection"] = torch.zeros(32, 32)
    state["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    with pytest.raises(ValueError, match="--scale-factor: the checkpoint stores no scale_factor"):
        from_original(state, b.run, b.autoencoder_run)
    imported = from_original(state, b.run, b.autoencoder_run, scale_factor=0.18215)
    assert imported.autoencoder["scale_factor"].item() == pytest.approx(0.18215)
    with pytest.raises(ValueError, match="--weights ema: the checkpoint holds no model_ema"):
        from_original(state, b.run, b.autoencoder_run, weights="ema", scale_factor=0.18215)


def test_autoencoder_alone_as_a_standalone_vae_file_and_out_of_a_whole_checkpoint():
    """A VAE file has bare keys (as Stability's vae-ft-mse releases); an autoencoder config also takes the
    first stage out of a whole LDM checkpoint, leaving the other networks."""
    alone = tiny.bundle(None)
    state = to_original(alone)
    assert "encoder.conv_in.weight" in state and not any(k.startswith("first_stage_model.") for k in state)
    tiny.assert_same(from_original(state, alone.run, alone.run).autoencoder, alone.autoencoder, "VAE file")
    whole = tiny.bundle("class")
    taken = from_original(to_original(whole), alone.run, alone.run)
    tiny.assert_same(taken.autoencoder, whole.autoencoder, "first stage of an LDM file")
