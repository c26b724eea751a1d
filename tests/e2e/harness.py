"""Launching real `ldmscale` processes: one process, or several ranks under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ldmscale.distributed.env import free_port

ROOT = Path(__file__).resolve().parents[2]
DEBUG_AE = str(ROOT / "configs" / "debug" / "autoencoder.yaml")


def process_env(threads: int = 1) -> dict[str, str]:
    """One thread per process by default: two ranks on CI's two cores must not oversubscribe them."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads), WANDB_MODE="offline", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def command(args: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "ldmscale", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "ldmscale", *args]


def run(args: list[str], nproc: int = 1, timeout: float = 600, check: bool = True,
        threads: int = 1) -> subprocess.CompletedProcess:
    result = subprocess.run(command(args, nproc), env=process_env(threads), capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"ldmscale {' '.join(args)} exited {result.returncode}\n{result.stderr[-6000:]}")
    return result


def train_autoencoder(run_dir: Path, shards: Path, *extra: str) -> Path:
    """The debug autoencoder for 4 steps through the CLI, on `shards/train`; its export."""
    run(["train", DEBUG_AE, f"run.dir={run_dir}", f"data.shards={shards / 'train'}", "train.progress=false",
         "train.max_steps=4", "train.image_every=0", "train.validate_every=0", "checkpoint.every_steps=4", *extra])
    return run_dir / "export" / "autoencoder.safetensors"


def start(args: list[str], nproc: int = 1, log_path: Path | None = None) -> subprocess.Popen:
    """Starts in a new process group, so the whole job (launcher and ranks) can be killed at once."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(command(args, nproc), env=process_env(), stdout=out, stderr=subprocess.STDOUT,
                            cwd=ROOT, start_new_session=True)


def kill_job(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signals the launcher and every process below it: torchrun starts its ranks in sessions of their
    own, so a process-group kill alone would leave them running (and writing) as orphans."""
    import psutil

    family = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    for pid in family[1:]:
        try:
            psutil.Process(pid).wait(timeout=60)
        except psutil.NoSuchProcess:
            pass


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before the awaited condition")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(poll)


def metrics(run_dir: Path) -> dict[int, dict]:
    """Training records of metrics.jsonl by step (validation records are merged in)."""
    records: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records.setdefault(record["step"], {}).update(record)
    return records


def committed(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{step:08d}" / "COMMITTED").is_file()


def kill_after_checkpoint_then_rerun(args: list[str], run_dir: Path, checkpoint_step: int, last_step: int,
                                     log_path: Path, nproc: int = 2, timeout: float = 300) -> None:
    """Starts `args`, kill -9s the job once `checkpoint_step` is committed (failing if it already reached
    `last_step`, which would prove nothing), then reruns the same command to the end."""
    job = start(args, nproc=nproc, log_path=log_path)
    wait_for(lambda: committed(run_dir, checkpoint_step), timeout=timeout, proc=job)
    kill_job(job, signal.SIGKILL)
    assert not committed(run_dir, last_step), "the job finished before it could be killed; the test proves nothing"
    run(args, nproc=nproc)
