"""Process environment from torchrun / Slurm variables, and the ZeRO memory arithmetic."""

from __future__ import annotations

import pytest

from ldmscale.distributed.env import first_slurm_host, read_process_env, slurm_master_port
from ldmscale.distributed.memory import model_state_bytes


def test_torchrun_variables_win():
    penv = read_process_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                             "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (penv.rank, penv.world_size, penv.local_rank, penv.master_addr, penv.master_port, penv.source) == \
        (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_variables():
    penv = read_process_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                             "SLURM_JOB_NODELIST": "gpu-[003-005,009]", "SLURM_JOB_ID": "4242"})
    assert (penv.rank, penv.world_size, penv.local_rank, penv.source) == (5, 16, 1, "slurm")
    assert penv.master_addr == "gpu-003"
    assert penv.master_port == slurm_master_port("4242") == 20000 + 4242


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[1-3],b2", "a1"), ("x-[07,09]y", "x-07y")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_single_process_gets_a_port():
    penv = read_process_env({})
    assert penv.world_size == 1 and penv.rank == 0 and 0 < penv.master_port < 65536


def test_zero_memory_arithmetic():
    # 1e9 trainable params in bf16 on 8 GPUs (Rajbhandari et al. 2020: 2 + 2 + 12 bytes per parameter).
    p = 10**9
    z0 = model_state_bytes(p, 0, 0, zero_stage=0, precision="bf16", num_gpus=8)
    assert z0.total == 16 * p
    z1 = model_state_bytes(p, 0, 0, zero_stage=1, precision="bf16", num_gpus=8)
    assert z1.total == 4 * p + 12 * p / 8
    z2 = model_state_bytes(p, 0, 0, zero_stage=2, precision="bf16", num_gpus=8)
    assert z2.total == 2 * p + 14 * p / 8
    z3 = model_state_bytes(p, 100, p, zero_stage=3, precision="fp32", num_gpus=8)
    assert (z3.params, z3.grads, z3.optimizer, z3.frozen, z3.ema) == (4 * p / 8, 4 * p / 8, 8 * p / 8, 400, 4 * p)
    # A frozen network (the LDM's autoencoder and text encoder) is whole on every rank, fp32 unless cast.
    assert model_state_bytes(p, p, 0, zero_stage=3, precision="bf16", num_gpus=8).frozen == 2 * p
    assert model_state_bytes(p, p, 0, zero_stage=3, precision="bf16", num_gpus=8, frozen_fp32=True).frozen == 4 * p
