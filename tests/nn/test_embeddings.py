"""Sinusoidal timestep embedding, as CompVis openaimodel.timestep_embedding."""

import math

import pytest
import torch

from ldmscale.nn.embeddings import timestep_embedding


def test_closed_form_cos_first():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    for row, tv in zip(emb, t.tolist()):
        expected = [math.cos(tv * f) for f in freqs] + [math.sin(tv * f) for f in freqs]
        assert row.tolist() == pytest.approx(expected, abs=1e-4)
    assert emb[0, :4].tolist() == [1.0] * 4 and emb[0, 4:].tolist() == [0.0] * 4


def test_flip_and_odd_dim():
    t = torch.tensor([3.5, 7.0])
    a, b = timestep_embedding(t, 6), timestep_embedding(t, 6, flip_sin_to_cos=False)
    torch.testing.assert_close(a, torch.cat([b[:, 3:], b[:, :3]], dim=1))
    odd = timestep_embedding(t, 7)
    assert odd.shape == (2, 7) and odd[:, -1].abs().max() == 0
    torch.testing.assert_close(odd[:, :6], a)


def test_matches_diffusers_sd_convention():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 10, 500, 999])
    ours = timestep_embedding(t, 320)
    theirs = embeddings.get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
