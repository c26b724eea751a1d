from pathlib import Path

import pytest
import torch

from ldmscale.data.synthetic import write_synthetic_shards
from tests.e2e.harness import train_autoencoder


@pytest.fixture(autouse=True)
def single_thread():
    """Tests use tiny tensors: one intra-op thread avoids OpenMP start-up and spin-wait costs that
    otherwise dominate on a 2-core CI machine (a 1000-step sampler loop runs ~40x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Shared by the end-to-end and Slurm tests (one copy per session).


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """8 shards x 8 samples of 32 px synthetic images (enough for 2 ranks x 2 workers), plus a held-out set."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_shards(root / "train", num_samples=64, resolution=32, seed=0, samples_per_shard=8, progress=False)
    write_synthetic_shards(root / "val", num_samples=16, resolution=32, seed=1, samples_per_shard=8, progress=False)
    return root


@pytest.fixture(scope="session")
def kl_autoencoder(tmp_path_factory, synth_shards) -> Path:
    """The debug KL autoencoder trained for 4 steps: the prerequisite export of the later stages' tests."""
    return train_autoencoder(tmp_path_factory.mktemp("kl-ae"), synth_shards)
