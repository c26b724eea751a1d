"""ResBlock / Downsample / Upsample / GroupNorm32 behaviour."""

import torch

from ldmscale.nn.blocks import Downsample, GroupNorm32, ResBlock, Upsample


def test_resblock_starts_as_identity_or_projection():
    torch.manual_seed(0)
    x, emb = torch.randn(2, 64, 6, 6), torch.randn(2, 16)
    same = ResBlock(64, 16)
    torch.testing.assert_close(same(x, emb), x)  # zero-initialised last conv: identity at init
    wider = ResBlock(64, 16, 128)
    torch.testing.assert_close(wider(x, emb), wider.skip_connection(x))
    assert isinstance(wider.skip_connection, torch.nn.Conv2d) and wider.skip_connection.kernel_size == (1, 1)
    torch.nn.init.normal_(same.out_layers[3].weight)
    a, b = same(x, emb), same(x, emb + 1)
    # the embedding reaches the output (64 channels: 2 per GroupNorm group, so a per-channel offset survives)
    assert (a - b).abs().max() > 1e-3


def test_down_and_up_sampling_shapes():
    x = torch.randn(1, 32, 8, 6)
    assert Downsample(32)(x).shape == (1, 32, 4, 3)
    assert Upsample(32)(x).shape == (1, 32, 16, 12)


def test_groupnorm32_computes_in_fp32():
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4) * 100 + 50
    out = norm.bfloat16()(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.nn.functional.group_norm(x, 32), rtol=0.02, atol=0.02)
