import os

import pytest

from ldmscale.distributed import env as dist_env


@pytest.fixture(scope="session", autouse=True)
def process_group():
    """One single-process gloo group for the whole session: DeepSpeed engines need torch.distributed,
    and DeepSpeed keeps a reference to the first group it sees, so the group must outlive every module
    (destroying and re-creating it per module leaves DeepSpeed with a dead group)."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                            "DS_ACCELERATOR")}
    os.environ["DS_ACCELERATOR"] = "cpu"
    dist_env.init_process_group(dist_env.ProcessEnv(master_port=dist_env.free_port()), "gloo")
    yield
    dist_env.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
