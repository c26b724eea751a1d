"""PDAE's noise process: c_t, the DDIM coefficient and lambda_t against hand values (the brief's table)
for DDPM's linear and LDM's scaled-linear schedules; the loss against its closed form; shifted
DDIM step, inversion round trip and the shifted DDPM posterior mean mu_theta + Sigma_t G."""

from __future__ import annotations

import math

import pytest
import torch

from ldmscale.diffusion.objectives import EpsPrediction, VPrediction, v_from_x0_eps
from ldmscale.diffusion.pdae import (ShiftedDenoiser, ddim_shift_coefficient, pdae_weight, shift_coefficient,
                                     shifted_ddim_invert, shifted_ddim_sample, shifted_ddpm_sample)
from ldmscale.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldmscale.losses.pdae import pdae_loss

LINEAR = NoiseSchedule.from_config(ScheduleConfig("linear", 1000, 1e-4, 0.02))
SCALED = NoiseSchedule.from_config(ScheduleConfig("scaled_linear", 1000, 0.0015, 0.0195))
TS = torch.tensor([0, 10, 100, 300, 500, 700, 999])
# The brief's table (reference/pdae.md §2): ab, lambda, c_t, DDIM coefficient, at the timesteps TS.
TABLE = {
    "linear": (LINEAR, [0.9999, 0.9978, 0.895, 0.394, 0.0778, 0.0069, 4.0e-5],
               [0.0003, 0.0040, 0.130, 0.581, 0.720, 0.604, 0.364],
               [0.0, -0.041, -0.318, -0.773, -0.955, -0.989, -0.990],
               [-0.010, -0.047, -0.324, -0.779, -0.960, -0.997, -1.000]),
    "scaled_linear": (SCALED, [0.9985, 0.9832, 0.823, 0.407, 0.115, 0.0157, 1.4e-4],
                      [0.0029, 0.025, 0.206, 0.571, 0.722, 0.651, 0.412],
                      [0.0, -0.118, -0.415, -0.766, -0.936, -0.986, -0.990], None),
}


def hand_betas(kind: str) -> list[float]:
    if kind == "linear":
        return [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    lo, hi = math.sqrt(0.0015), math.sqrt(0.0195)
    return [(lo + (hi - lo) * i / 999) ** 2 for i in range(1000)]


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_coefficients_and_weighting_match_hand_values(kind):
    schedule, ab_table, lam_table, c_table, ddim_table = TABLE[kind]
    # The brief's rounded anchors.
    assert schedule.alphas_cumprod[TS].tolist() == pytest.approx(ab_table, rel=2e-2, abs=2e-4)
    assert pdae_weight(schedule, TS).tolist() == pytest.approx(lam_table, abs=1.5e-3)
    assert shift_coefficient(schedule, TS).tolist() == pytest.approx(c_table, abs=1.5e-3)
    if ddim_table is not None:
        assert ddim_shift_coefficient(schedule, TS).tolist() == pytest.approx(ddim_table, abs=1.5e-3)
    # Full precision against a plain-Python computation of eq. 7's coefficient and eq. 10's weight.
    betas = hand_betas(kind)
    for t in TS.tolist():
        ab = math.prod(1 - b for b in betas[:t + 1])
        ab_prev = ab / (1 - betas[t])
        sigma_t = betas[t] * (1 - ab_prev) / (1 - ab)  # fixed-small posterior variance
        c_eq7 = -math.sqrt(1 - betas[t]) * math.sqrt(1 - ab) / betas[t] * sigma_t
        snr = ab / (1 - ab)
        lam_eq10 = (1 / (1 + snr)) ** 0.9 * (snr / (1 + snr)) ** 0.1
        tt = torch.tensor([t])
        assert float(shift_coefficient(schedule, tt)) == pytest.approx(c_eq7, rel=1e-9, abs=1e-12)
        assert float(pdae_weight(schedule, tt)) == pytest.approx(lam_eq10, rel=1e-9)
        assert float(ddim_shift_coefficient(schedule, tt)) == pytest.approx(-math.sqrt(1 - ab), rel=1e-9)
    weights = pdae_weight(schedule, torch.arange(1000))
    assert int(weights.argmax()) == {"linear": 475, "scaled_linear": 517}[kind]
    assert float(weights.max()) == pytest.approx(0.7225, abs=1e-4)  # SNR^0.1/(1+SNR) at SNR = 1/9


def test_loss_is_weighted_shifted_mse_and_t0_gives_g_no_gradient():
    g_noise = torch.Generator().manual_seed(0)
    noise, eps_theta = torch.randn(3, 4, 2, 2, generator=g_noise), torch.randn(3, 4, 2, 2, generator=g_noise)
    g = torch.randn(3, 4, 2, 2, generator=g_noise, requires_grad=True)
    t = torch.tensor([0, 500, 999])
    loss = pdae_loss(noise, eps_theta, g, t, SCALED)
    expected = 0.0
    for b, tb in enumerate(t.tolist()):
        c = float(shift_coefficient(SCALED, torch.tensor([tb])))
        lam = float(pdae_weight(SCALED, torch.tensor([tb])))
        expected += lam * float((noise[b] - eps_theta[b] - c * g[b].detach()).pow(2).sum())
    assert float(loss) == pytest.approx(expected / noise.numel(), rel=1e-5)
    loss.backward()
    assert bool((g.grad[0] == 0).all()) and g.grad[1:].abs().sum() > 0  # c_0 = 0


class Analytic(torch.nn.Module):
    """A smooth stand-in for (UNet output, G): eps_theta = 0.3 x, G = tanh(x) * z (z broadcast per channel)."""

    def forward(self, x, t, z):
        return 0.3 * x, torch.tanh(x) * z[:, :, None, None]


def test_shifted_ddim_step_matches_hand_formula():
    model, x, z = Analytic(), torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    out = shifted_ddim_sample(model, x, z, SCALED, prediction=EpsPrediction(), steps=1)  # t = 0 -> clean
    ab = float(SCALED.alphas_cumprod[0])
    eps_hat = 0.3 * x - math.sqrt(1 - ab) * torch.tanh(x) * z[:, :, None, None]  # eq. 6
    assert torch.allclose(out, (x - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab), atol=1e-6)  # no clamp
    two = shifted_ddim_sample(model, x, z, SCALED, prediction=EpsPrediction(), steps=2)  # t = 500, then 0
    ab5 = float(SCALED.alphas_cumprod[500])
    eps5 = 0.3 * x - math.sqrt(1 - ab5) * torch.tanh(x) * z[:, :, None, None]
    x0 = (x - math.sqrt(1 - ab5) * eps5) / math.sqrt(ab5)
    x_mid = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps5
    eps0 = 0.3 * x_mid - math.sqrt(1 - ab) * torch.tanh(x_mid) * z[:, :, None, None]
    assert torch.allclose(two, (x_mid - math.sqrt(1 - ab) * eps0) / math.sqrt(ab), atol=1e-5)


def test_shifted_inversion_round_trips_and_the_shift_matters():
    model, x0, z = Analytic(), torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    x_T = shifted_ddim_invert(model, x0, z, SCALED, prediction=EpsPrediction(), steps=10, fixed_point_iters=30)
    back = shifted_ddim_sample(model, x_T, z, SCALED, prediction=EpsPrediction(), steps=10)
    assert torch.allclose(back, x0, atol=1e-4)
    wrong_z = shifted_ddim_sample(model, x_T, -z, SCALED, prediction=EpsPrediction(), steps=10)
    assert (wrong_z - x0).abs().mean() > 0.05


def test_v_prediction_is_converted_to_eps_before_the_shift():
    """A v-predicting network whose v encodes eps_theta = 0.3 x gives the same shifted eps as the eps model."""
    eps_model = Analytic()

    class VModel(torch.nn.Module):
        def forward(self, x, t, z):
            eps, g = eps_model(x, t, z)
            ab = SCALED.gather("alphas_cumprod", t, x)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            return v_from_x0_eps(x0, eps, t, SCALED), g

    x, z, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4), torch.tensor([100, 800])
    for coefficient in ("ddim", "ddpm"):
        a = ShiftedDenoiser(eps_model, SCALED, EpsPrediction(), coefficient=coefficient)(x, t, {"z": z})
        b = ShiftedDenoiser(VModel(), SCALED, VPrediction(), coefficient=coefficient)(x, t, {"z": z})
        assert torch.allclose(a, b, atol=1e-5)


def test_shifted_ddpm_mean_is_mu_theta_plus_sigma_g():
    """One full-chain step from t: mean = mu_theta(x_t) + Sigma_t G (PDAE §3.2), fixed-small variance."""
    schedule = NoiseSchedule(torch.tensor([0.1, 0.2], dtype=torch.float64))  # T = 2: one noisy step, one clean
    model, x, z = Analytic(), torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    seen = []
    shifted_ddpm_sample(model, x, z, schedule, prediction=EpsPrediction(), generator=torch.Generator().manual_seed(0),
                        callback=lambda step: seen.append(step.x.clone()))
    beta, ab, ab_prev = 0.2, 0.9 * 0.8, 0.9
    mu_theta = (x - beta / math.sqrt(1 - ab) * 0.3 * x) / math.sqrt(1 - beta)  # DDPM eq. 11
    sigma = beta * (1 - ab_prev) / (1 - ab)
    mean = mu_theta + sigma * torch.tanh(x) * z[:, :, None, None]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(seen[0], mean + math.sqrt(sigma) * noise, atol=1e-5)


def test_stop_below_turns_the_shift_off_and_bad_coefficient_is_refused():
    model, x, z = Analytic(), torch.randn(2, 4, 3, 3), torch.randn(2, 4)
    denoiser = ShiftedDenoiser(model, SCALED, EpsPrediction(), stop_below=300)
    out = denoiser(x, torch.tensor([299, 300]), {"z": z})
    assert torch.allclose(out[0], 0.3 * x[0]) and not torch.allclose(out[1], 0.3 * x[1])
    with pytest.raises(ValueError, match="coefficient"):
        ShiftedDenoiser(model, SCALED, EpsPrediction(), coefficient="euler")
