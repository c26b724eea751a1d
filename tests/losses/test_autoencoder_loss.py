"""The autoencoder objective: adaptive GAN weight, disc_start, reductions, regulariser weights, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from ldmscale.config.load import ConfigError, config_from_dict, load_yaml_with_overrides
from ldmscale.losses.autoencoder import AutoencoderLoss, AutoencoderLossConfig, adaptive_weight
from ldmscale.losses.discriminator import DiscriminatorConfig, NLayerDiscriminator, hinge_d_loss
from ldmscale.losses.lpips import LPIPSConfig
from ldmscale.models.regularizers import RegularizerOutput

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_adaptive_weight_matches_hand_computation():
    w = nn.Parameter(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    a, b = torch.tensor([3.0, 0.0, 4.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    nll = (w * a).sum()  # gradient a, norm 5
    g_loss = -(w * b).sum() * 2.0  # gradient -2b, norm 2
    assert float(adaptive_weight(nll, g_loss, w)) == pytest.approx(5.0 / (2.0 + 1e-4))
    # A generator loss that ignores the layer's value would divide by 1e-4 alone: clamped to 1e4.
    assert float(adaptive_weight(nll, (w * 0.0).sum(), w)) == pytest.approx(1e4)


class TinySetup:
    """A one-conv "decoder" (its weight is the last layer) and a small group-norm PatchGAN."""

    def __init__(self, reduction="mean", perceptual_weight=0.0, disc_start=10, disc_loss="hinge"):
        torch.manual_seed(0)
        self.decoder = nn.Conv2d(3, 3, 3, padding=1)
        self.disc = NLayerDiscriminator(DiscriminatorConfig(ndf=32, n_layers=2, norm="group"))
        self.cfg = AutoencoderLossConfig(reduction=reduction, perceptual_weight=perceptual_weight, kl_weight=0.1,
                                         codebook_weight=0.7, disc_start=disc_start, disc_weight=0.5,
                                         disc_loss=disc_loss, lpips=LPIPSConfig(pretrained=False),
                                         discriminator=DiscriminatorConfig(ndf=32, n_layers=2, norm="group"))
        self.loss = AutoencoderLoss(self.cfg)
        self.x = torch.rand(2, 3, 32, 32) * 2 - 1
        self.features = torch.randn(2, 3, 32, 32)
        self.kl = torch.tensor(3.0, requires_grad=True)

    def forward(self):
        rec = self.decoder(self.features)
        reg = RegularizerOutput(z=self.features, losses={"kl": self.kl * 1.0}, stats={})
        return rec, reg


def test_generator_loss_after_disc_start_uses_the_adaptive_weight():
    s = TinySetup()
    rec, reg = s.forward()
    loss, logs = s.loss.generator_loss(s.x, rec, reg, step=10, last_layer=s.decoder.weight, discriminator=s.disc)
    # Recompute every term independently.
    nll = (rec - s.x).abs().mean()
    g_loss = -s.disc(rec).mean()
    w = s.decoder.weight
    grad_nll = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    grad_g = torch.autograd.grad(g_loss, w, retain_graph=True)[0].norm()
    d_weight = 0.5 * torch.clamp(grad_nll / (grad_g + 1e-4), 0, 1e4)
    expected = nll + 0.1 * 3.0 + d_weight * 1.0 * g_loss
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["d_weight"], d_weight)
    torch.testing.assert_close(logs["nll"], nll.detach())
    torch.testing.assert_close(logs["g_loss"], g_loss.detach())
    assert float(logs["kl"]) == 3.0 and float(logs["disc_factor"]) == 1.0
    assert {"rec", "loss"} <= logs.keys() and "lpips" not in logs  # perceptual_weight 0: no VGG built
    assert s.loss.lpips is None
    loss.backward()  # the retained graph is still usable
    assert s.decoder.weight.grad is not None and s.kl.grad == pytest.approx(0.1)


def test_disc_start_zero_weights_both_adversarial_terms():
    s = TinySetup(disc_start=10)
    rec, reg = s.forward()
    loss, logs = s.loss.generator_loss(s.x, rec, reg, step=9, last_layer=s.decoder.weight, discriminator=s.disc)
    torch.testing.assert_close(loss, (rec - s.x).abs().mean() + 0.1 * 3.0)
    assert float(logs["disc_factor"]) == 0.0 and float(logs["d_weight"]) == 0.0
    torch.testing.assert_close(logs["g_loss"], -s.disc(rec).mean().detach())  # still measured
    loss.backward()
    assert all(p.grad is None for p in s.disc.parameters())  # no adversarial gradient at all

    d_loss, d_logs = s.loss.discriminator_loss(s.x, rec, step=9, discriminator=s.disc)
    assert float(d_loss) == 0.0 and float(d_logs["d_loss"]) > 0.0
    d_loss.backward()  # differentiable, with zero gradients, so a DeepSpeed engine can step as usual
    assert all(float(p.grad.abs().sum()) == 0.0 for p in s.disc.parameters())

    d_loss, d_logs = s.loss.discriminator_loss(s.x, rec, step=10, discriminator=s.disc)
    expected = hinge_d_loss(s.disc(s.x), s.disc(rec.detach()))
    torch.testing.assert_close(d_loss, expected)
    torch.testing.assert_close(d_logs["logits_real"], s.disc(s.x).mean().detach())
    torch.testing.assert_close(d_logs["logits_fake"], s.disc(rec).mean().detach())


def test_validation_without_graph_has_zero_adaptive_weight():
    s = TinySetup()
    with torch.no_grad():
        rec, reg = s.forward()
        loss, logs = s.loss.generator_loss(s.x, rec, reg, step=10, last_layer=s.decoder.weight,
                                           discriminator=s.disc)
    assert float(logs["d_weight"]) == 0.0
    torch.testing.assert_close(loss, (rec - s.x).abs().mean() + 0.1 * 3.0)


def test_sample_sum_reduction_and_perceptual_term():
    s = TinySetup(reduction="sample_sum", perceptual_weight=0.5, disc_start=100)
    rec, reg = s.forward()
    loss, logs = s.loss.generator_loss(s.x, rec, reg, step=0, last_layer=s.decoder.weight, discriminator=s.disc)
    p = s.loss.lpips(s.x, rec)  # (B,)
    # LDM: per-pixel |x - x̂| + 0.5 * LPIPS(image), summed over (C, H, W), averaged over the batch.
    per_sample = (rec - s.x).abs().flatten(1).sum(1) + 0.5 * p * 3 * 32 * 32
    torch.testing.assert_close(logs["nll"], per_sample.mean().detach())
    torch.testing.assert_close(logs["lpips"], p.mean().detach())
    torch.testing.assert_close(loss, per_sample.mean() + 0.1 * 3.0)


def test_codebook_term_and_l2_reconstruction():
    s = TinySetup()
    s.loss = AutoencoderLoss(AutoencoderLossConfig(reconstruction="l2", reduction="mean", perceptual_weight=0.0,
                                                   codebook_weight=0.7, disc_start=100))
    rec = s.decoder(s.features)
    reg = RegularizerOutput(z=s.features, losses={"codebook": torch.tensor(2.0)},
                            stats={"perplexity": torch.tensor(5.0), "usage": torch.tensor(0.5)})
    loss, logs = s.loss.generator_loss(s.x, rec, reg, step=0, last_layer=s.decoder.weight, discriminator=s.disc)
    torch.testing.assert_close(loss, (rec - s.x).pow(2).mean() + 0.7 * 2.0)
    assert float(logs["codebook"]) == 2.0 and float(logs["perplexity"]) == 5.0 and float(logs["usage"]) == 0.5


def test_vanilla_generator_loss_is_non_saturating():
    s = TinySetup(disc_loss="vanilla", disc_start=0)
    rec, reg = s.forward()
    _, logs = s.loss.generator_loss(s.x, rec, reg, step=0, last_layer=s.decoder.weight, discriminator=s.disc)
    torch.testing.assert_close(logs["g_loss"], torch.nn.functional.softplus(-s.disc(rec)).mean().detach())


@pytest.mark.parametrize("path", ["autoencoder/kl-f8.yaml", "autoencoder/kl-f4.yaml", "autoencoder/kl-f16.yaml",
                                  "autoencoder/vq-f4.yaml", "debug/autoencoder.yaml"])
def test_shipped_loss_configs_load(path):
    data = load_yaml_with_overrides(CONFIGS / path)
    assert data["stage"] == "autoencoder" and {"model", "loss"} <= set(data["task"])
    cfg = config_from_dict(AutoencoderLossConfig, data["task"]["loss"])
    if path.startswith("autoencoder/kl"):
        assert (cfg.kl_weight, cfg.disc_start, cfg.disc_weight, cfg.reduction) == (1e-6, 50001, 0.5, "sample_sum")
    if path == "autoencoder/vq-f4.yaml":
        assert (cfg.codebook_weight, cfg.disc_start, cfg.disc_weight, cfg.reduction) == (1.0, 0, 0.75, "mean")


def test_invalid_loss_config_names_the_keys():
    with pytest.raises(ConfigError) as info:
        config_from_dict(AutoencoderLossConfig, {"disc_loss": "wgan", "discriminator": {"norm": "layer"}})
    problems = "\n".join(info.value.problems)
    assert "disc_loss: invalid value 'wgan'; valid values: hinge, vanilla" in problems
    assert "discriminator.norm: invalid value 'layer'; valid values: batch, group, none" in problems
