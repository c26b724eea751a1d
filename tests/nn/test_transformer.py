"""SpatialTransformer (Rombach et al. 2022 §3.3): projections, identity at init, cross-attention."""

import torch

from ldmscale.nn.transformer import SpatialTransformer


def test_conv_and_linear_projections_are_the_same_map():
    torch.manual_seed(0)
    conv = SpatialTransformer(32, 2, 16, context_dim=12, use_linear=False)
    linear = SpatialTransformer(32, 2, 16, context_dim=12, use_linear=True)
    torch.nn.init.normal_(conv.proj_out.weight, std=0.1)
    state = {k: (v.flatten(1) if k.startswith(("proj_in.weight", "proj_out.weight")) else v)
             for k, v in conv.state_dict().items()}
    linear.load_state_dict(state)
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 12)
    torch.testing.assert_close(linear(x, ctx), conv(x, ctx), rtol=1e-5, atol=1e-5)


def test_spatial_transformer_is_identity_at_init_and_uses_the_context():
    torch.manual_seed(0)
    block = SpatialTransformer(32, 2, 16, depth=2, context_dim=12, use_linear=True)
    x, ctx = torch.randn(2, 32, 4, 4), torch.randn(2, 5, 12)
    torch.testing.assert_close(block(x, ctx), x)
    torch.nn.init.normal_(block.proj_out.weight, std=0.1)
    assert (block(x, ctx) - block(x, ctx + 1)).abs().max() > 1e-3
    names = {k for k in block.state_dict()}
    assert {"transformer_blocks.1.attn2.to_k.weight", "transformer_blocks.0.ff.net.0.proj.weight",
            "transformer_blocks.0.ff.net.2.weight", "transformer_blocks.0.attn1.to_out.0.bias",
            "transformer_blocks.0.norm3.weight", "norm.weight"} <= names


def test_no_context_means_no_cross_attention():
    block = SpatialTransformer(32, 2, 16, context_dim=None)
    assert not any("attn2" in k or "norm2" in k for k in block.state_dict())
    x = torch.randn(1, 32, 3, 3)
    assert block(x).shape == x.shape
