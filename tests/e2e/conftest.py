from __future__ import annotations

import pytest

from ldmscale.data.synthetic import write_synthetic_shards


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory):
    """8 shards x 8 samples of 32 px synthetic images (enough for 2 ranks x 2 workers), plus a held-out set."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_shards(root / "train", num_samples=64, resolution=32, seed=0, samples_per_shard=8, progress=False)
    write_synthetic_shards(root / "val", num_samples=16, resolution=32, seed=1, samples_per_shard=8, progress=False)
    return root
