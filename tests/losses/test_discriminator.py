"""PatchGAN discriminator layout and initialisation; GAN losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ldmscale.losses.discriminator import (DiscriminatorConfig, NLayerDiscriminator, hinge_d_loss, hinge_g_loss,
                                           vanilla_d_loss, vanilla_g_loss)

REAL = torch.tensor([0.5, 2.0])
FAKE = torch.tensor([-0.5, 0.3])


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_taming_layout_parameter_count_and_patch_shape():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(DiscriminatorConfig())  # ndf 64, 3 layers, BatchNorm as LDM
    # 4x4 convs 3->64 (bias), 64->128, 128->256, 256->512 (no bias, BatchNorm), 512->1 (bias).
    expected = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 256) + (128 * 256 * 16 + 512) + (256 * 512 * 16 + 1024) \
        + (512 * 16 + 1)
    assert sum(p.numel() for p in disc.parameters()) == expected == 2_765_633
    keys = disc.state_dict().keys()
    assert {"main.0.weight", "main.0.bias", "main.2.weight", "main.3.running_mean", "main.11.weight"} <= set(keys)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 64 / 2^3 - 2 patches per side
    # taming init: conv weights N(0, 0.02), BatchNorm scales N(1, 0.02).
    assert float(disc.main[8].weight.std()) == pytest.approx(0.02, rel=0.05)
    assert float(disc.main[3].weight.mean()) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("norm, norm_type", [("group", torch.nn.GroupNorm), ("none", torch.nn.Identity)])
def test_norm_options(norm, norm_type):
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=32, n_layers=2, norm=norm))
    assert isinstance(disc.main[3], norm_type)
    assert (disc.main[2].bias is None) == (norm != "none")  # a conv before a norm has no bias
    out = disc(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 1, 6, 6)
    # Without batch statistics each sample's logits do not depend on the rest of the batch.
    if norm == "group":
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(disc(x)[:1], disc(x[:1]))


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="ndf: must be a multiple of 32"):
        NLayerDiscriminator(DiscriminatorConfig(ndf=48, norm="group"))


def test_hinge_losses_match_hand_values():
    # relu(1 - real) = (0.5, 0) -> 0.25; relu(1 + fake) = (0.5, 1.3) -> 0.9; half their sum.
    assert float(hinge_d_loss(REAL, FAKE)) == pytest.approx(0.5 * (0.25 + 0.9))
    assert float(hinge_g_loss(FAKE)) == pytest.approx(0.1)  # -mean(fake)


def test_vanilla_losses_match_hand_values():
    real = (softplus(-0.5) + softplus(-2.0)) / 2
    fake = (softplus(-0.5) + softplus(0.3)) / 2
    assert float(vanilla_d_loss(REAL, FAKE)) == pytest.approx(0.5 * (real + fake))
    assert float(vanilla_g_loss(FAKE)) == pytest.approx((softplus(0.5) + softplus(-0.3)) / 2)
