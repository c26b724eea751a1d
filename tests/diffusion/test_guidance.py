"""Classifier-free guidance wrapper (Ho & Salimans 2022, eq. 6)."""

import pytest
import torch

from ldmscale.diffusion.guidance import CFGDenoiser
from ldmscale.diffusion.objectives import build_prediction
from ldmscale.diffusion.samplers import ddim_sample
from ldmscale.diffusion.schedule import NoiseSchedule, ScheduleConfig


def conditional_model():
    """out = 0.5 x + mean(context) + 0.1 t, and a record of each call's batch size."""
    batches = []

    def denoise(x, t, cond):
        batches.append(x.shape[0])
        bias = cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return 0.5 * x + bias + 0.1 * t.view(-1, 1, 1, 1)

    return denoise, batches


def inputs():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 4, generator=g), torch.tensor([5, 50, 500])
    cond = {"context": torch.randn(3, 7, 8, generator=g)}
    uncond = {"context": torch.zeros(1, 7, 8)}  # batch 1, broadcast to the batch
    return x, t, cond, uncond


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0, 7.5])
def test_cfg_combines_the_two_branches(scale):
    model, batches = conditional_model()
    x, t, cond, uncond = inputs()
    out_cond = model(x, t, cond)
    out_uncond = model(x, t, {"context": uncond["context"].expand(3, -1, -1)})
    batches.clear()
    guided = CFGDenoiser(model, uncond, scale)(x, t, cond)
    assert batches == [6]  # one forward pass over cond and uncond together
    torch.testing.assert_close(guided, out_uncond + scale * (out_cond - out_uncond))
    if scale == 1.0:
        torch.testing.assert_close(guided, out_cond)
    if scale == 0.0:
        torch.testing.assert_close(guided, out_uncond)


def test_cfg_denoiser_plugs_into_a_sampler():
    model, _ = conditional_model()
    x, _, cond, uncond = inputs()
    schedule = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=100))
    pred = build_prediction("eps")
    a = ddim_sample(CFGDenoiser(model, uncond, 1.0), x, schedule, prediction=pred, cond=cond, steps=5)
    b = ddim_sample(model, x, schedule, prediction=pred, cond=cond, steps=5)
    torch.testing.assert_close(a, b)


def test_mismatched_keys_are_rejected():
    model, _ = conditional_model()
    x, t, cond, _ = inputs()
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(model, {"y": torch.zeros(1, dtype=torch.long)}, 2.0)(x, t, cond)
