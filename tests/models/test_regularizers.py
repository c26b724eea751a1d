"""KL posterior against closed forms; VQ quantisation, statistics, gradients, EMA and restarts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from ldmscale.config.load import ConfigError, config_from_dict
from ldmscale.models.autoencoder import Autoencoder, AutoencoderConfig
from ldmscale.models.regularizers import DiagonalGaussian, GaussianRegularizer, VectorQuantizer, VQConfig

# ---- KL ---------------------------------------------------------------------------------------


def test_diagonal_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)  # (B, 2C, h, w)
    post = DiagonalGaussian.from_moments(moments)
    mean, logvar = moments[:, :4], moments[:, 4:]
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), expected)
    # The standard normal itself has zero divergence.
    assert float(DiagonalGaussian(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)).kl()) == 0.0


def test_diagonal_gaussian_clamps_logvar_and_samples_its_moments():
    post = DiagonalGaussian(torch.zeros(1, 1, 1, 2), torch.tensor([-100.0, 100.0]).view(1, 1, 1, 2))
    torch.testing.assert_close(post.logvar.flatten(), torch.tensor([-30.0, 20.0]))
    assert float(post.std.flatten()[1]) == pytest.approx(math.exp(10.0), rel=1e-5)

    mean = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1).expand(20000, 2, 1, 1)
    logvar = torch.log(torch.tensor([0.25, 4.0])).view(1, 2, 1, 1).expand(20000, 2, 1, 1)
    post = DiagonalGaussian(mean, logvar)
    samples = post.sample(torch.Generator().manual_seed(0))  # (20000, 2, 1, 1)
    torch.testing.assert_close(samples.mean(0).flatten(), torch.tensor([1.0, -2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(samples.std(0).flatten(), torch.tensor([0.5, 2.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(post.sample(torch.Generator().manual_seed(0)), samples)  # reproducible
    assert torch.equal(post.mode(), mean)


def test_gaussian_regularizer_reports_the_batch_mean_kl():
    moments = torch.randn(4, 6, 2, 2)
    out = GaussianRegularizer()(moments, sample=False)
    torch.testing.assert_close(out.z, moments[:, :3])
    torch.testing.assert_close(out.losses["kl"], DiagonalGaussian.from_moments(moments).kl().mean())


# ---- VQ ---------------------------------------------------------------------------------------

CODES = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (K=4, D=2)
# Four vectors as a (1, 2, 2, 2) map: two near code 0, one near code 1, one near code 3; code 2 unused.
VECTORS = torch.tensor([[0.1, 0.0], [0.0, -0.2], [0.9, 0.1], [1.2, 0.8]])  # (N=4, D=2)


def as_map(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.view(1, 2, 2, 2).permute(0, 3, 1, 2).contiguous()  # (N, D) -> (1, D, 2, 2)


def make_vq(**kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(n_embed=4, embed_dim=2, **kwargs)
    with torch.no_grad():
        vq.embedding.weight.copy_(CODES)
        if vq.ema:  # the EMA sums start at the codes, as they do at construction
            vq.ema_embed_sum.copy_(CODES)
    return vq


def test_vq_hand_case_indices_loss_usage_and_perplexity():
    vq = make_vq(beta=0.25)
    z = as_map(VECTORS)
    out = vq(z)
    assert out.indices.flatten().tolist() == [0, 0, 1, 3]
    torch.testing.assert_close(out.z, as_map(CODES[[0, 0, 1, 3]]))  # forward value is the code
    mse = float(((VECTORS - CODES[[0, 0, 1, 3]]) ** 2).mean())  # (0.01 + 0.04 + 0.02 + 0.08) / 8
    assert mse == pytest.approx(0.15 / 8)
    assert float(out.losses["codebook"]) == pytest.approx(1.25 * mse)  # beta * commit + codebook term
    assert float(out.stats["usage"]) == pytest.approx(0.75)  # 3 of 4 codes used
    # p = (1/2, 1/4, 0, 1/4): perplexity exp(H) = 2^1.5.
    assert float(out.stats["perplexity"]) == pytest.approx(2**1.5, rel=1e-5)


def test_vq_straight_through_gradient_reaches_the_encoder():
    cfg = config_from_dict(AutoencoderConfig, {
        "base_channels": 32, "channel_mult": [1, 1, 2], "num_res_blocks": 1, "resolution": 32, "norm_groups": 8,
        "z_channels": 3, "embed_dim": 3, "regularizer": {"kind": "vq", "n_embed": 16}})
    torch.manual_seed(0)
    model = Autoencoder(cfg)
    assert "quantize.embedding.weight" in model.state_dict()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, reg = model(x)
    F.l1_loss(rec, x).backward(retain_graph=True)  # reconstruction only: crosses the quantiser by the straight-through path
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None  # the codebook learns only from its own loss
    reg.losses["codebook"].backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0

    # LDM's VQ interface: diffusion latents are pre-quantisation; decoding quantises them first.
    model.eval().set_scale_factor(0.5)
    with torch.no_grad():
        z = model.encode_to_latent(x, sample=False)
        torch.testing.assert_close(z, 0.5 * model.encode_moments(x))
        torch.testing.assert_close(model.decode_from_latent(z), model.decode(model.encode(x).z))


def test_vq_ema_update_matches_closed_form():
    decay, eps = 0.9, 1e-5
    vq = make_vq(ema=True, decay=decay, eps=eps).train()
    assert not any(p is vq.embedding.weight for p in vq.parameters())  # a buffer under EMA
    out = vq(as_map(VECTORS))
    # Only the commitment term remains.
    assert float(out.losses["codebook"]) == pytest.approx(0.25 * 0.15 / 8)
    counts = torch.tensor([2.0, 1.0, 0.0, 1.0])
    sums = torch.stack([VECTORS[0] + VECTORS[1], VECTORS[2], torch.zeros(2), VECTORS[3]])
    size = decay * torch.ones(4) + (1 - decay) * counts  # cluster sizes start at 1
    embed_sum = decay * CODES + (1 - decay) * sums  # sums start at the codes
    n = size.sum()
    expected = embed_sum / ((size + eps) / (n + 4 * eps) * n)[:, None]
    torch.testing.assert_close(vq.embedding.weight, expected)
    # Evaluation never updates.
    before = vq.embedding.weight.clone()
    vq.eval()(as_map(VECTORS))
    assert torch.equal(vq.embedding.weight, before)


@pytest.mark.parametrize("ema", [False, True])
def test_vq_restarts_dead_codes_to_encoder_outputs(ema):
    vq = make_vq(dead_code="restart", restart_threshold=1.0, decay=0.99, ema=ema).train()
    torch.manual_seed(0)
    before = vq.embedding.weight.detach().clone()
    z = as_map(VECTORS).requires_grad_(True)
    out = vq(z)
    # Code 2 was unused: its usage average fell to 0.99 < 1, so it now sits on one of the batch's vectors.
    new = vq.embedding.weight.detach()[2]
    assert any(torch.allclose(new, v) for v in VECTORS), new
    assert float(vq.code_usage[2]) == 1.0
    if not ema:  # used codes are untouched by a restart
        torch.testing.assert_close(vq.embedding.weight.detach()[[0, 1, 3]], before[[0, 1, 3]])
    # The graph of the forward pass stays valid after the in-place restart.
    (out.losses["codebook"] + out.z.sum()).backward()
    assert z.grad.abs().sum() > 0


def test_vq_from_latent_quantises_without_updates():
    vq = make_vq(ema=True).train()
    before = vq.embedding.weight.clone()
    torch.testing.assert_close(vq.from_latent(as_map(VECTORS)), as_map(CODES[[0, 0, 1, 3]]))
    assert torch.equal(vq.embedding.weight, before)


def test_vq_config_validation_names_fields():
    with pytest.raises(ConfigError) as info:
        config_from_dict(VQConfig, {"n_embed": 1, "decay": 1.5})
    assert [p.split(":")[0] for p in info.value.problems] == ["n_embed", "decay"]
    with pytest.raises(ConfigError, match="dead_code: invalid value 'revive'; valid values: none, restart"):
        config_from_dict(VQConfig, {"dead_code": "revive"})
