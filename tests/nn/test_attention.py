"""The attention dispatch: SDPA and the plain-math path agree, for self- and cross-attention."""

import math

import pytest
import torch

from ldmscale.nn.attention import attention, resolve_backend, set_attention_backend


def reference(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, H, N, M)
    return weights @ v


@pytest.mark.parametrize("n,m", [(16, 16), (16, 5), (3, 40)])
def test_sdpa_and_math_agree(n, m):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 8, generator=g, dtype=torch.float64) for length in (n, m, m))
    expected = reference(q, k, v).float()
    q, k, v = q.float(), k.float(), v.float()
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, backend=backend)
        assert out.shape == (2, 3, n, 8)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_math_path_keeps_the_input_dtype_but_computes_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(3))
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="math")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v), rtol=0.05, atol=0.05)


def test_auto_is_sdpa_on_cpu_and_xformers_is_refused_there():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="no CPU kernels"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="auto, xformers, sdpa, math"):
        set_attention_backend("flash")
