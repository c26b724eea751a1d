"""Reconstruction metrics per image: PSNR and SSIM (Wang et al. 2004).

Images are (B, C, H, W); the default `data_range` of 2 is that of [-1, 1] images. Both return (B,),
computed in fp32; average them over a validation set as the caller sees fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """10 log10(data_range^2 / MSE) per image; (B, C, H, W) x 2 -> (B,). Identical images give inf."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k) depthwise


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004, eq. 13 with the 11x11, sigma 1.5 Gaussian window of §III-C).

    SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
    C1 = (k1 L)^2, C2 = (k2 L)^2, local statistics under the window over valid positions, each
    channel separately, then averaged over channels and positions; (B, C, H, W) x 2 -> (B,).
    """
    c = x.shape[1]
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim: images of size {tuple(x.shape[-2:])} are smaller than the window {window_size}")
    x, y = x.float(), y.float()
    window = _gaussian_window(window_size, sigma, c, x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=c)  # (B, C, H-k+1, W-k+1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)
