"""PSNR and SSIM against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ldmscale.losses.metrics import psnr, ssim


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01)
    y[1] += 0.5  # MSE 0.25 -> 10 log10(16)
    torch.testing.assert_close(psnr(x, y), torch.tensor([10 * math.log10(400.0), 10 * math.log10(16.0)]))
    assert float(psnr(x, y[:1], data_range=1.0)[0]) == pytest.approx(20.0)
    assert math.isinf(float(psnr(x, x)[0]))


def test_ssim_of_identical_images_is_one():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2))


def test_ssim_of_constant_images_is_the_luminance_term():
    # Flat images have zero variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 2)^2.
    a, b, c1 = 0.2, -0.4, (0.01 * 2.0) ** 2
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    assert float(ssim(x, y)[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-4)


def test_ssim_is_symmetric_and_falls_with_noise():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    noisy = [x + s * torch.randn_like(x) for s in (0.05, 0.2, 0.8)]
    values = [float(ssim(x, n)[0]) for n in noisy]
    assert values[0] > values[1] > values[2]
    assert float(ssim(noisy[1], x)[0]) == pytest.approx(values[1], rel=1e-5)
    with pytest.raises(ValueError, match="window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
