"""PDAE heads: G is exactly zero at initialisation, so the shifted model is the pre-trained UNet;
gradients reach only E and G's new parts; G mirrors the UNet's decoder and reads its frozen features."""

from __future__ import annotations

import pytest
import torch

from ldmscale.models.pdae import (PDAEConfig, PDAEHeads, SemanticEncoder, SemanticEncoderConfig, ShiftDecoderConfig,
                                  ShiftedUNet)
from ldmscale.models.unet import UNet, UNetConfig

UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=[2],
                  channel_mult=[1, 2], num_heads=-1, num_head_channels=16, context_dim=None)
HEADS = PDAEConfig(encoder=SemanticEncoderConfig(channels=[32, 32, 64], attention_level=1, num_heads=2, z_dim=16),
                   decoder=ShiftDecoderConfig(attention_head_channels=16))


def build(seed: int = 0) -> ShiftedUNet:
    torch.manual_seed(seed)
    unet = UNet(UNET)
    with torch.no_grad():  # a "pre-trained" UNet: its zero-initialised convs made non-zero
        for p in unet.parameters():
            if not p.abs().sum():
                p.normal_(std=0.05)
    heads = PDAEHeads(HEADS, UNET, encoder_channels=3, encoder_resolution=32)
    return ShiftedUNet(unet.requires_grad_(False).eval(), heads)


def test_g_is_exactly_zero_and_shifted_model_equals_pretrained_unet_at_init():
    model = build()
    x_t, t = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    z = model.heads.encoder(torch.rand(3, 3, 32, 32) * 2 - 1)  # (3, 16)
    with torch.no_grad():
        output, g = model(x_t, t, z)
        reference = model.unet(x_t, t)
    assert g.shape == x_t.shape and bool((g == 0).all())
    assert output.abs().mean() > 0.01 and torch.equal(output, reference)  # bit for bit, one shared encoder pass


def test_g_depends_on_z_and_only_heads_get_gradients():
    model = build()
    with torch.no_grad():  # leave the zero init: every zero-initialised conv of G made non-zero
        for p in model.heads.decoder.parameters():
            if not p.abs().sum():
                p.normal_(std=0.05)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 300])
    z = model.heads.encoder(x0)
    _, g = model(x_t, t, z)
    _, g_other = model(x_t, t, z + 1.0)
    assert g.abs().mean() > 1e-3 and (g - g_other).abs().mean() > 1e-4  # z enters through AdaGN
    g.pow(2).sum().backward()
    assert all(p.grad is None for p in model.unet.parameters())
    assert model.heads.encoder.proj.weight.grad.abs().sum() > 0
    assert model.heads.decoder.label_emb.weight.grad.abs().sum() > 0


def test_decoder_mirrors_unet_and_heads_forward_matches_parts():
    model = build()
    decoder = model.heads.decoder
    assert len(decoder.shift_output_blocks) == len(model.unet.output_blocks)
    for ours, theirs in zip(decoder.shift_output_blocks, model.unet.output_blocks):
        assert ours[0].in_layers[2].in_channels == theirs[0].in_layers[2].in_channels  # same skip concatenation
        assert ours[0].in_layers[2].out_channels == theirs[0].in_layers[2].out_channels
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        for p in decoder.shift_out.parameters():
            p.normal_(std=0.05)
        h, skips, emb = model.unet.encode_features(x_t, t)
        z, g = model.heads(x0, h, skips, emb)
        _, g_composed = model(x_t, t, model.heads.encoder(x0))
    assert z.shape == (2, 16) and torch.allclose(g, g_composed)


@pytest.mark.parametrize("in_channels,resolution", [(3, 32), (4, 8)])
def test_encoder_reads_images_or_latents(in_channels, resolution):
    cfg = SemanticEncoderConfig(channels=[32, 64], attention_level=0, num_heads=4, z_dim=8)
    encoder = SemanticEncoder(cfg, in_channels, resolution)
    z = encoder(torch.randn(5, in_channels, resolution, resolution))
    assert z.shape == (5, 8)
    assert encoder.proj.in_features == 64 * (resolution // 4) ** 2


def test_invalid_encoder_config_names_the_key():
    with pytest.raises(ValueError, match="attention_level"):
        SemanticEncoder(SemanticEncoderConfig(channels=[32], attention_level=3), 3, 32)
    with pytest.raises(ValueError, match="channels"):
        SemanticEncoder(SemanticEncoderConfig(channels=[30]), 3, 32)
