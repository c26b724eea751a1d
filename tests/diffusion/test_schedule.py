"""Noise schedules against their closed forms (DDPM eqs. 4 and 7; Nichol & Dhariwal eq. 17)."""

import math

import pytest
import torch

from ldmscale.config.load import ConfigError, config_from_dict
from ldmscale.diffusion.samplers import posterior_coefs
from ldmscale.diffusion.schedule import NoiseSchedule, ScheduleConfig

KINDS = ["linear", "scaled_linear", "cosine"]


def schedule(kind: str, **kw) -> NoiseSchedule:
    return NoiseSchedule.from_config(ScheduleConfig(beta_schedule=kind, **kw))


@pytest.mark.parametrize("kind", KINDS)
def test_cumprod_snr_and_q_sample_closed_forms(kind):
    s = schedule(kind)
    assert s.alphas_cumprod.dtype == torch.float64 and s.num_timesteps == 1000
    ab = torch.cumprod(1 - s.betas, 0)
    torch.testing.assert_close(s.alphas_cumprod, ab, rtol=0, atol=0)
    t = torch.tensor([0, 1, 500, 999])
    torch.testing.assert_close(s.snr(t), ab[t] / (1 - ab[t]))
    x0, noise = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    expected = ab[t].sqrt().float().view(4, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().float().view(4, 1, 1, 1) * noise
    torch.testing.assert_close(s.q_sample(x0, t, noise), expected)
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())  # SNR strictly decreasing


def test_linear_is_ddpm_linspace():
    s = schedule("linear", beta_start=1e-4, beta_end=2e-2)
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15) and s.betas[-1].item() == pytest.approx(2e-2, abs=1e-15)
    diffs = s.betas[1:] - s.betas[:-1]
    torch.testing.assert_close(diffs, torch.full_like(diffs, (2e-2 - 1e-4) / 999))


def test_scaled_linear_endpoints_and_sqrt_linearity():
    s = schedule("scaled_linear")
    assert s.betas[0].item() == pytest.approx(0.00085, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(0.012, abs=1e-15)
    root = s.betas.sqrt()
    diffs = root[1:] - root[:-1]
    torch.testing.assert_close(diffs, torch.full_like(diffs, (0.012 ** 0.5 - 0.00085 ** 0.5) / 999))
    # SD's final alpha-bar, a well-known value (diffusers/LDM tables): ~0.0047
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.004660, abs=2e-6)


def test_cosine_formula_and_clipping():
    s = schedule("cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    unclipped = int((s.betas < 0.999).sum())
    assert 990 < unclipped < 1000 and s.betas.max().item() == pytest.approx(0.999)
    for t in [0, 1, 100, 500, 900, unclipped - 1]:
        assert s.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_is_the_gaussian_conditional(kind):
    """DDPM eq. 7 equals Bayes' rule for q(x_{t-1} | x_t, x_0), and the respaced formula with s = t-1."""
    s = schedule(kind)
    t = torch.arange(1, 1000)
    ab_prev, beta = s.alphas_cumprod[t - 1], s.betas[t]
    # x_{t-1} ~ N(sqrt(ab_prev) x0, 1-ab_prev), x_t | x_{t-1} ~ N(sqrt(1-beta) x_{t-1}, beta): Gaussian conditioning.
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    torch.testing.assert_close(s.posterior_variance[t], 1 / prec)
    torch.testing.assert_close(s.posterior_mean_coef1[t], ab_prev.sqrt() / (1 - ab_prev) / prec)
    torch.testing.assert_close(s.posterior_mean_coef2[t], (1 - beta).sqrt() / beta / prec)
    assert s.posterior_variance[0].item() == 0.0 and s.posterior_mean_coef1[0].item() == pytest.approx(1.0)
    for i in [0, 1, 37, 999]:
        c1, c2, var = posterior_coefs(float(s.alphas_cumprod[i]), float(s.alphas_cumprod_prev[i]))
        assert (c1, c2, var) == pytest.approx((s.posterior_mean_coef1[i].item(), s.posterior_mean_coef2[i].item(),
                                               s.posterior_variance[i].item()), rel=1e-9, abs=1e-15)


def test_original_buffer_names():
    buffers = schedule("scaled_linear").original_buffers()
    assert {"betas", "alphas_cumprod", "posterior_mean_coef2", "sqrt_recipm1_alphas_cumprod"} <= set(buffers)
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in buffers.values())
    assert buffers["posterior_log_variance_clipped"][0].item() == pytest.approx(math.log(1e-20))  # LDM's floor
    torch.testing.assert_close(buffers["posterior_log_variance_clipped"][1:], buffers["posterior_variance"][1:].log())


def test_config_errors_name_key_and_choices():
    with pytest.raises(ConfigError) as e:
        config_from_dict(ScheduleConfig, {"beta_schedule": "sigmoid", "num_timesteps": 1})
    assert "beta_schedule" in str(e.value) and "scaled_linear" in str(e.value)
    with pytest.raises(ConfigError, match="beta_start"):
        config_from_dict(ScheduleConfig, {"beta_schedule": "linear", "beta_start": 0.1, "beta_end": 0.01})
