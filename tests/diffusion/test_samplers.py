"""DDPM / DDIM / DDIM inversion on an analytic denoiser whose exact prediction is known in closed form.

For data x0 ~ N(mu, s^2 I), x_t ~ N(sqrt(ab) mu, (ab s^2 + 1 - ab) I), so the exact noise prediction
is E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab).
"""

import math

import pytest
import torch

from ldmscale.diffusion.objectives import build_prediction
from ldmscale.diffusion.samplers import (SamplerStep, ddim_invert, ddim_sample, ddim_sigma, ddpm_sample,
                                         timestep_sequence)
from ldmscale.diffusion.schedule import NoiseSchedule, ScheduleConfig

MU, STD = 1.5, 0.5


def gaussian_denoiser(schedule: NoiseSchedule, kind: str = "eps"):
    """Exact network output of the given kind for N(MU, STD^2) data."""
    pred = build_prediction(kind)
    calls = []

    def denoise(x, t, cond):
        calls.append(t)
        ab = schedule.gather("alphas_cumprod", t, x)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * STD ** 2 + 1 - ab)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        return pred.target(x0, eps, t, schedule)

    denoise.calls = calls
    return denoise, pred


def test_timestep_sequences():
    assert timestep_sequence(1000, 50) == list(range(0, 1000, 20))
    assert timestep_sequence(1000, 1000) == list(range(1000))
    assert len(timestep_sequence(1000, 300)) == 300
    quad = timestep_sequence(1000, 100, "quadratic")
    assert len(quad) == 100 and quad[0] == 0 and quad[-1] == 800
    assert all(b > a for a, b in zip(quad, quad[1:]))
    gaps = [b - a for a, b in zip(quad, quad[1:])]
    assert gaps[-1] > gaps[len(gaps) // 2] > 1  # quadratic: steps widen towards t = T
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="steps"):
            timestep_sequence(1000, bad)
    with pytest.raises(ValueError, match="timestep_spacing"):
        timestep_sequence(1000, 10, "cubic")


def test_ddim_eta1_on_the_full_sequence_has_the_ddpm_posterior_variance():
    s = NoiseSchedule.from_config(ScheduleConfig(beta_schedule="scaled_linear"))
    ab, ab_prev = s.alphas_cumprod.tolist(), s.alphas_cumprod_prev.tolist()
    sigma2 = torch.tensor([ddim_sigma(ab[t], ab_prev[t], 1.0) ** 2 for t in range(1000)], dtype=torch.float64)
    torch.testing.assert_close(sigma2, s.posterior_variance, rtol=1e-9, atol=1e-18)
    assert ddim_sigma(0.5, 0.7, 0.0) == 0.0


def test_ddim_eta1_full_chain_equals_ddpm_sampling():
    """Same noise draws: DDIM(eta=1, every timestep) and DDPM ancestral sampling give the same samples."""
    s = NoiseSchedule.from_config(ScheduleConfig(beta_schedule="scaled_linear", num_timesteps=200))
    den, pred = gaussian_denoiser(s)
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = ddpm_sample(den, x_T, s, prediction=pred, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(den, x_T, s, prediction=pred, steps=None, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_ddim_inversion_then_sampling_returns_the_start(kind):
    s = NoiseSchedule.from_config(ScheduleConfig())
    den, pred = gaussian_denoiser(s, kind)
    x0 = MU + STD * torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_T = ddim_invert(den, x0, s, prediction=pred, steps=25, fixed_point_iters=30)
    back = ddim_sample(den, x_T, s, prediction=pred, steps=25, eta=0.0)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-7)
    # x_T is a standard-normal-like code: the ODE maps N(MU, STD^2) onto the prior (ab_T is near 0).
    assert abs(x_T.mean().item()) < 0.5 and 0.5 < x_T.std().item() < 1.5


def test_plain_ddim_inversion_error_shrinks_with_steps():
    """Without fixed-point refinement the inversion is first-order accurate: more steps, smaller error."""
    s = NoiseSchedule.from_config(ScheduleConfig())
    den, pred = gaussian_denoiser(s)
    x0 = MU + STD * torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (10, 40, 160):
        x_T = ddim_invert(den, x0, s, prediction=pred, steps=steps)
        errors.append((ddim_sample(den, x_T, s, prediction=pred, steps=steps) - x0).abs().max().item())
    assert errors[0] > 2.5 * errors[1] > 6 * errors[2] and errors[2] < 0.05


def test_ddpm_sampling_recovers_the_data_distribution():
    s = NoiseSchedule.from_config(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2))
    den, pred = gaussian_denoiser(s)
    g = torch.Generator().manual_seed(0)
    x = ddpm_sample(den, torch.randn(20000, dtype=torch.float64, generator=g)[:, None], s, prediction=pred,
                    generator=g)
    # standard errors: 0.5 / sqrt(20000) = 0.0035 for the mean, ~0.0025 for the std
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(STD, abs=0.015)
    assert len(den.calls) == 1000


def test_ddim_deterministic_sampling_recovers_the_data_distribution():
    s = NoiseSchedule.from_config(ScheduleConfig())
    den, pred = gaussian_denoiser(s, "x0")
    x_T = torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ab_T = s.alphas_cumprod[-1].item()
    x_T = math.sqrt(ab_T) * MU + math.sqrt(ab_T * STD ** 2 + 1 - ab_T) * x_T  # the exact marginal at t = T-1
    x = ddim_sample(den, x_T, s, prediction=pred, steps=100)
    assert x.mean().item() == pytest.approx(MU, abs=0.015)
    assert x.std().item() == pytest.approx(STD, abs=0.015)


def test_callback_and_clipping():
    s = NoiseSchedule.from_config(ScheduleConfig())
    den, pred = gaussian_denoiser(s)
    seen: list[SamplerStep] = []
    x_T = 3 * torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    out = ddim_sample(den, x_T, s, prediction=pred, steps=10, eta=0.5, generator=torch.Generator().manual_seed(0),
                      callback=seen.append, clip_x0=1.0)
    assert [st.t for st in seen] == list(range(900, -1, -100)) and seen[-1].t_next == -1
    assert all(st.x0.abs().max() <= 1.0 for st in seen)
    assert out.abs().max() <= 1.0  # the last step returns the clipped x0
    assert torch.equal(out, seen[-1].x)
    unclipped = ddim_sample(den, x_T, s, prediction=pred, steps=10)
    assert unclipped.max() > 1.0  # without clip_x0 nothing is clamped (MU = 1.5)


def test_generator_makes_stochastic_samplers_reproducible():
    s = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=50))
    den, pred = gaussian_denoiser(s)
    x_T = torch.randn(4, 2)
    a = ddpm_sample(den, x_T, s, prediction=pred, generator=torch.Generator().manual_seed(3))
    b = ddpm_sample(den, x_T, s, prediction=pred, generator=torch.Generator().manual_seed(3))
    c = ddpm_sample(den, x_T, s, prediction=pred, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)
