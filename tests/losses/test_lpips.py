"""LPIPS: a frozen distance, weight loading from local files, and the error when weights are missing."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
from safetensors.torch import save_file

from ldmscale.losses.lpips import LPIPS, LPIPSConfig


@pytest.fixture(scope="module")
def untrained() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(LPIPSConfig(pretrained=False))


def test_identical_images_are_at_distance_zero(untrained):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(untrained(x, x), torch.zeros(2))


def test_distance_grows_with_distortion_and_is_differentiable(untrained):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    small = untrained(x, x + 0.05 * torch.randn_like(x))
    large = untrained(x, x + 0.5 * torch.randn_like(x))
    assert small.shape == (2,) and bool((small > 0).all()) and bool((large > small).all())
    y = x.clone().requires_grad_(True)
    untrained(x, y + 0.1).sum().backward()
    assert y.grad.abs().sum() > 0


def test_network_is_frozen_and_stays_in_eval_mode(untrained):
    assert not any(p.requires_grad for p in untrained.parameters())
    parent = torch.nn.Sequential(untrained).train()
    assert parent.training and not untrained.training and not untrained.lin0.model[0].training


def _write_weights(source: LPIPS, tmp_path, fmt: str) -> LPIPSConfig:
    """Writes `source`'s VGG in torchvision's key layout and its heads in the LPIPS vgg.pth layout."""
    flat = [m for s in source.slices for m in s]
    vgg = {f"features.{i}.{k}": v.clone() for i, m in enumerate(flat) for k, v in m.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(1)  # torchvision files also hold the classifier; ignored
    heads = {f"lin{i}.model.1.weight": h.model[1].weight.detach().clone() for i, h in enumerate(source.heads())}
    if fmt == "safetensors":
        save_file(vgg, str(tmp_path / "vgg16.safetensors"))
        save_file(heads, str(tmp_path / "heads.safetensors"))
        return LPIPSConfig(str(tmp_path / "vgg16.safetensors"), str(tmp_path / "heads.safetensors"))
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    return LPIPSConfig(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_pretrained_weights_load_from_local_files(untrained, tmp_path, fmt):
    source = copy.deepcopy(untrained)
    with torch.no_grad():  # heads distinguishable from the untrained constant heads
        for head in source.heads():
            head.model[1].weight.uniform_(0.0, 0.1)
    loaded = LPIPS(_write_weights(source, tmp_path, fmt))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x, y), source(x, y))


def test_missing_heads_give_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="heads_weights"):
        LPIPS(LPIPSConfig(pretrained=True))
    with pytest.raises(ValueError, match="does not exist"):
        LPIPS(LPIPSConfig(pretrained=True, heads_weights=str(tmp_path / "nope.pth")))


def test_unreachable_vgg_download_gives_a_clear_error(untrained, tmp_path, monkeypatch):
    """No vgg_weights, an empty torch hub cache and no route to download.pytorch.org (as on CI)."""
    heads_cfg = _write_weights(untrained, tmp_path, "pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # a firewall that drops packets must not hang the test
    try:
        with pytest.raises(ValueError, match="LPIPS weights unavailable.*vgg_weights"):
            LPIPS(LPIPSConfig(pretrained=True, vgg_weights=None, heads_weights=heads_cfg.heads_weights))
    finally:
        socket.setdefaulttimeout(previous)
