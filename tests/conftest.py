import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Tests use tiny tensors: one intra-op thread avoids OpenMP start-up and spin-wait costs that
    otherwise dominate on a 2-core CI machine (a 1000-step sampler loop runs ~40x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
