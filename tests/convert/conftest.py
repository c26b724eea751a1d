from __future__ import annotations

import pytest

from ldmscale.data.synthetic import write_synthetic_shards


@pytest.fixture(scope="session")
def convert_shards(tmp_path_factory):
    """4 shards x 8 samples of 32 px synthetic images (2 ranks x 2 steps x 4 images), with captions."""
    root = tmp_path_factory.mktemp("convert-synth")
    write_synthetic_shards(root, num_samples=32, resolution=32, seed=0, samples_per_shard=8, progress=False)
    return root
