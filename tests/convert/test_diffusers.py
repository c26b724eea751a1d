"""diffusers folders: exact round trips, and diffusers' / transformers' own `from_pretrained` computing ours."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ldmscale.convert.diffusers import from_diffusers, to_diffusers
from tests.convert import tiny


@pytest.mark.parametrize("style", tiny.STYLES)
def test_round_trip_is_exact(style, tmp_path):
    """ldmscale -> diffusers -> ldmscale: identical tensors (the EMA through unet_ema/). The configs come
    back from the folder's ldmscale/ files, and equal ours."""
    b = tiny.bundle(style, with_ema=True)
    to_diffusers(b, tmp_path)
    back = from_diffusers(tmp_path)
    tiny.assert_same(back.autoencoder, b.autoencoder, "autoencoder")
    tiny.assert_same(back.denoiser, b.denoiser, "denoiser")
    tiny.assert_same(from_diffusers(tmp_path, weights="ema").part("unet."), b.part("unet.", ema=True), "unet_ema")
    assert back.task.unet == b.task.unet and back.ae_cfg == b.ae_cfg
    if style == "sd1":  # a last-layer tower is written whole
        tiny.assert_same(back.text, b.text, "text tower")


def test_round_trip_of_an_autoencoder_alone(tmp_path):
    b = tiny.bundle(None)
    to_diffusers(b, tmp_path)
    assert not (tmp_path / "unet").exists()
    tiny.assert_same(from_diffusers(tmp_path).autoencoder, b.autoencoder, "autoencoder")


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_from_pretrained_models_compute_ours(style, tmp_path):
    """UNet2DConditionModel, AutoencoderKL and CLIPTextModel loaded by their own `from_pretrained` equal
    ours (1e-5, fp32); the scheduler carries the prediction type (v for the SD2-v style)."""
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextModel

    b = tiny.bundle(style)
    to_diffusers(b, tmp_path)
    ours = tiny.modules(b)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path, subfolder="vae").eval()
    text = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert scheduler.config.prediction_type == {"sd1": "epsilon", "sd2": "v_prediction"}[style]
    assert vae.config.scaling_factor == 0.5
    torch.testing.assert_close(scheduler.alphas_cumprod.double(),
                               torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000,
                                                                dtype=torch.float64) ** 2, 0), rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([17, 802])
    image, z = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.randn(2, 4, 8, 8, generator=g)
    prompts = ["a red circle in the center", ""]
    with torch.no_grad():
        context = ours["conditioner"](prompts)["context"]  # (2, 16, 32)
        tokens = ours["conditioner"].tokenizer(prompts)
        # SD2's penultimate-layer conditioning is the output of a text encoder one block shorter.
        torch.testing.assert_close(text(tokens).last_hidden_state, context, rtol=1e-5, atol=1e-5)
        expected = ours["unet"](x, t, context)
        assert expected.abs().mean() > 0.1
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=context).sample, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.encode(image).latent_dist.logvar, ours["autoencoder"].encode(image).logvar,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae.decode(z).sample, ours["autoencoder"].decode(z), rtol=1e-5, atol=1e-5)
    assert text.config.num_hidden_layers == {"sd1": 2, "sd2": 1}[style]


def test_config_free_import_reads_the_architecture_off_the_folder(tmp_path):
    """Without ldmscale/ configs (a folder written by anyone), the UNet, VAE, schedule, prediction and
    text tower come from the config.json files; the weights load strictly and compute the same."""
    b = tiny.bundle("sd2")
    to_diffusers(b, tmp_path)
    for name in ("run.yaml", "autoencoder.yaml"):
        (tmp_path / "ldmscale" / name).unlink()
    back = from_diffusers(tmp_path)
    task = back.task
    # One attention level (64 wide, 16-wide heads): read back as its 4 heads, the same layers.
    assert (task.unet.heads(64), task.unet.use_linear_in_transformer, task.prediction.kind) == ((4, 16), True, "v")
    assert (task.conditioner.layer, task.conditioner.custom["layers"]) == ("last", 1)
    tiny.assert_same(back.denoiser, b.denoiser, "denoiser")
    tiny.assert_same(back.autoencoder, b.autoencoder, "autoencoder")
    prompts = ["a blue square"]
    with torch.no_grad():
        torch.testing.assert_close(tiny.modules(back)["conditioner"](prompts)["context"],
                                   tiny.modules(b)["conditioner"](prompts)["context"], rtol=0, atol=0)


def test_a_folder_that_differs_from_the_config_is_refused(tmp_path):
    b = tiny.bundle("sd1")
    to_diffusers(b, tmp_path)
    other = dataclasses.replace(b.run, task=dataclasses.replace(
        b.task, unet=dataclasses.replace(b.task.unet, num_res_blocks=2)))
    with pytest.raises(ValueError, match="task.unet: unet/config.json has layers_per_block = 1, the config gives 2"):
        from_diffusers(tmp_path, other, b.autoencoder_run)
    scheduler = tmp_path / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="task.prediction.kind: scheduler_config.json predicts 'v'"):
        from_diffusers(tmp_path)
