"""Where this process sits in the job: rank, world size, local rank and master address.

Read from torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
or, when those are absent, from Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of
SLURM_JOB_NODELIST), so `srun ldmscale train ...` with one task per GPU works without a wrapper.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import subprocess

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class ProcessEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as `gpu-[003-005,009],cpu1` -> `gpu-003`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    match = re.match(r"^(.*?)\[([^\]]+)\](.*)$", head)
    if not match:
        return head
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def slurm_master_port(job_id: str) -> int:
    """A port derived from the job id, so all tasks of a job agree without talking (as submitit does)."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def read_process_env(environ: dict[str, str] | None = None) -> ProcessEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                          local_rank=int(env.get("LOCAL_RANK", 0)),
                          master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=int(env.get("MASTER_PORT", 29500)), source="torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return ProcessEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                          local_rank=int(env.get("SLURM_LOCALID", 0)),
                          master_addr=env.get("MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"]),
                          master_port=int(env.get("MASTER_PORT") or slurm_master_port(env.get("SLURM_JOB_ID", "0"))),
                          source="slurm")
    # A lone process still initialises a (one-member) process group; pick a free port for it so
    # several single-process runs on one machine do not collide.
    return ProcessEnv(master_port=int(env.get("MASTER_PORT") or free_port()))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(penv: ProcessEnv, backend: str = "auto", timeout_minutes: int = 30) -> None:
    """Initialises torch.distributed (also for one process, so every run goes through one code path)."""
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if penv.device.type == "cuda" else "gloo"
    # DeepSpeed and torch read these; set them from whichever launcher we came from.
    os.environ.update(RANK=str(penv.rank), WORLD_SIZE=str(penv.world_size), LOCAL_RANK=str(penv.local_rank),
                      MASTER_ADDR=penv.master_addr, MASTER_PORT=str(penv.master_port))
    if penv.device.type == "cuda":
        torch.cuda.set_device(penv.local_rank)
    dist.init_process_group(backend=backend, rank=penv.rank, world_size=penv.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(value: float) -> float:
    """Max of a scalar over ranks (flags: non-finite loss, stop signal)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_sum(value: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Averages every logged scalar over ranks (one all-reduce); the keys are the same on all ranks."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return metrics
    names = sorted(metrics)
    values = torch.tensor([metrics[k] for k in names], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        values = values.cuda()
    dist.all_reduce(values)
    return {k: float(v) / world for k, v in zip(names, values.tolist())}


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
