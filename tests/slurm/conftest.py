"""A real Slurm cluster (2 virtual nodes on this host) for the session. A machine without Slurm fails
these tests instead of skipping them: CI installs it with `.ci/install-slurm.sh`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.harness import process_env
from tests.slurm import cluster


@pytest.fixture(scope="session")
def slurm_cluster(request):
    # Not under pytest's tmp dir: munged needs o+x on every parent of its socket (pytest's is 0700).
    directory = Path(f"/tmp/ldmscale-slurm-{os.getpid()}")
    try:
        local = cluster.start(directory, nodes=2, cpus_per_node=2)  # 2 virtual nodes: multi-node jobs
    except cluster.SlurmUnavailable as e:
        pytest.fail(str(e), pytrace=False)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = local.conf  # sbatch, sacct, scancel and submitit read it
    try:
        yield local
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        failed = request.session.testsfailed > 0
        log = cluster.stop(directory, purge=not failed)
        if failed:
            print(f"\nSlurm logs kept in {directory}/log\n{log}")


@pytest.fixture
def job_env(monkeypatch):
    """The environment `ldmscale submit` runs in: sbatch hands it to the job (CPU DeepSpeed, offline
    wandb, one OpenMP thread per rank, this checkout importable)."""
    for key, value in process_env().items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
