"""eps / v / x0 parameterisations, targets, conversions and loss weighting."""

import pytest
import torch

from ldmscale.config.load import config_from_dict
from ldmscale.diffusion.objectives import (LOSS_WEIGHTINGS, PREDICTIONS, MinSNRWeightingConfig, build_prediction,
                                           diffusion_loss)
from ldmscale.diffusion.schedule import NoiseSchedule, ScheduleConfig

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    return x0, noise, t, SCHEDULE.q_sample(x0, t, noise)


@pytest.mark.parametrize("kind", ["eps", "v", "x0"])
def test_target_converts_back_to_x0_and_eps(kind):
    x0, noise, t, x_t = batch()
    pred = build_prediction(kind)
    target = pred.target(x0, noise, t, SCHEDULE)
    x0_hat, eps_hat = pred.to_x0_eps(target, x_t, t, SCHEDULE)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-9, atol=1e-9)
    v = build_prediction("v").target(x0, noise, t, SCHEDULE)
    torch.testing.assert_close(pred.to_v(target, x_t, t, SCHEDULE), v, rtol=1e-9, atol=1e-9)


def test_conversions_between_kinds_round_trip():
    """Any output converted eps -> v -> x0 -> eps comes back unchanged (the maps invert each other)."""
    _, _, t, x_t = batch()
    out = torch.randn_like(x_t)
    eps_p, v_p, x0_p = (build_prediction(k) for k in ("eps", "v", "x0"))
    v = eps_p.to_v(out, x_t, t, SCHEDULE)
    x0 = v_p.to_x0(v, x_t, t, SCHEDULE)
    torch.testing.assert_close(x0_p.to_eps(x0, x_t, t, SCHEDULE), out, rtol=1e-9, atol=1e-9)


def test_v_target_closed_form():
    x0, noise, t, _ = batch()
    ab = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(build_prediction("v").target(x0, noise, t, SCHEDULE),
                               ab.sqrt() * noise - (1 - ab).sqrt() * x0)


def test_weighted_loss_closed_form():
    out, target = torch.zeros(3, 2, 2), torch.ones(3, 2, 2) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    assert diffusion_loss(out, target).item() == pytest.approx((1 + 4 + 9) / 3)
    weights = torch.tensor([1.0, 0.5, 0.0])
    assert diffusion_loss(out, target, weights).item() == pytest.approx((1 + 2 + 0) / 3)


def test_min_snr_weights():
    t = torch.tensor([0, 300, 999])
    snr = SCHEDULE.snr(t)
    weighting = LOSS_WEIGHTINGS.build(MinSNRWeightingConfig(gamma=5.0))
    clipped = snr.clamp(max=5.0)
    torch.testing.assert_close(weighting(t, SCHEDULE, build_prediction("eps")), (clipped / snr).float())
    torch.testing.assert_close(weighting(t, SCHEDULE, build_prediction("v")), (clipped / (snr + 1)).float())
    torch.testing.assert_close(weighting(t, SCHEDULE, build_prediction("x0")), clipped.float())
    assert snr[0] > 5 > snr[2]  # both branches of the min are exercised


def test_prediction_kinds_from_config():
    assert PREDICTIONS.kinds == ["eps", "v", "x0"]
    cfg = config_from_dict(PREDICTIONS.config_class("v"), {"kind": "v"})
    assert PREDICTIONS.build(cfg).kind == "v"
    with pytest.raises(ValueError, match="valid kinds: eps, v, x0"):
        PREDICTIONS.config_class("score")
