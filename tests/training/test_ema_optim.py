"""EMA warm-up and averaging, LR schedule shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from ldmscale.training.ema import EMA, EMAConfig, ema_decay
from ldmscale.training.optim import OptimConfig, lr_multiplier


def test_ema_decay_warmup_closed_form():
    cfg = EMAConfig(max_decay=0.999, inv_gamma=1.0, power=0.75, start_step=2)
    assert ema_decay(1, cfg) == 0.0
    assert ema_decay(2, cfg) == 0.0  # 1 - (1 + 0) ** -0.75
    assert ema_decay(12, cfg) == pytest.approx(1 - 11 ** -0.75)
    assert ema_decay(10**9, cfg) == 0.999


def test_ema_update_matches_manual_average_and_copies_buffers():
    torch.manual_seed(0)
    net = nn.BatchNorm1d(3)
    net.weight.data.uniform_()
    cfg = EMAConfig(max_decay=0.9, power=1.0, inv_gamma=1.0)
    ema = EMA(net, cfg)
    expected = net.weight.detach().clone()
    for step in range(1, 6):
        net.weight.data.add_(1.0)
        net.running_mean.add_(2.0)
        decay = ema.update(net, step)
        assert decay == pytest.approx(min(0.9, 1 - (1 + step) ** -1.0))
        expected = decay * expected + (1 - decay) * net.weight.detach()
    assert torch.allclose(ema.state_dict()["weight"], expected, atol=1e-6)
    assert torch.equal(ema.state_dict()["running_mean"], net.running_mean)  # copied, not averaged


def test_ema_load_rejects_mismatch():
    ema = EMA(nn.Linear(2, 2), EMAConfig())
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({"weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule(schedule):
    cfg = OptimConfig(warmup_steps=10, schedule=schedule, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    mid = {"constant": 1.0, "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), "linear": 0.1 + 0.9 * 0.5}
    assert lr_multiplier(60, cfg, 110) == pytest.approx(mid[schedule])
    assert lr_multiplier(110, cfg, 110) == pytest.approx(1.0 if schedule == "constant" else 0.1)
