"""Small synthetic shard sets shared by the data tests (written once per session)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from ldmscale.data.synthetic import write_synthetic_shards


def shard_keys(folder: Path) -> dict[str, list[str]]:
    """shard file name -> sample keys in file order, read with plain `tarfile`."""
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys = [m.name.split(".", 1)[0] for m in tar.getmembers()]
        out[shard.name] = list(dict.fromkeys(keys))
    return out


@pytest.fixture(scope="session")
def even_shards(tmp_path_factory) -> Path:
    """8 shards x 16 samples, 32 px (128 samples)."""
    out = tmp_path_factory.mktemp("even")
    write_synthetic_shards(out, num_samples=128, resolution=32, samples_per_shard=16, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def uneven_shards(tmp_path_factory) -> Path:
    """7 shards (6 x 16 + 4 samples), 32 px: workers get different numbers of batches."""
    out = tmp_path_factory.mktemp("uneven")
    write_synthetic_shards(out, num_samples=100, resolution=32, samples_per_shard=16, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def keys_by_shard():
    """`shard_keys` as a fixture, for the test modules."""
    return shard_keys
