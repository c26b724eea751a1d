"""A real single-machine Slurm cluster for the tests: start/stop scripts beside this file, plus the few
queries the tests make (job state from sacct, when slurmctld next checks time limits).

The daemons (munged, mariadbd, slurmdbd, slurmctld, one slurmd per virtual node) run as root on
127.0.0.1 with everything under one directory; they are stopped by the PIDs in their pid files.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
START_SCRIPT = HERE / "slurm_local_start.sh"
STOP_SCRIPT = HERE / "slurm_local_stop.sh"
PROGRAMS = ("sbatch", "srun", "sacct", "scancel", "slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# slurmctld checks time limits (and sends `--signal` warnings) every PERIODIC_TIMEOUT seconds,
# counted from its start (slurmctld/slurmctld.h in Slurm 22.05; the period is not configurable).
LIMIT_CHECK_PERIOD_S = 30


class SlurmUnavailable(RuntimeError):
    pass


@dataclasses.dataclass
class LocalSlurm:
    directory: Path
    conf: str
    nodes: int

    def _log_times(self, message: str) -> list[float]:
        log = (self.directory / "log" / "slurmctld.log").read_text()
        # slurmctld logs local time
        stamps = re.findall(rf"\[([0-9T:.-]+)\] .*{message}", log)
        return [datetime.datetime.fromisoformat(t).timestamp() for t in stamps]

    def limit_check_base(self) -> float:
        """A whole second at which slurmctld's time-limit checks are due, every 30 s from it: its timer
        holds whole seconds (time(NULL)), so a check fires within the second after it is due. Read from
        its debug2 line "Testing job time limits", or before the first one, from its start."""
        checks = self._log_times("Testing job time limits") or self._log_times("Running as primary controller")
        return float(int(checks[-1]))

    def begin_for_warning(self, earliest_s: float, latest_s: float, signal_delay_s: int,
                          not_before: float) -> tuple[int, float]:
        """The first `--begin` time (whole seconds, after `not_before`) at which a 1-minute job gets Slurm's
        `--signal` warning between `earliest_s` and `latest_s` seconds after it starts (or, when no start
        in the next minute does, as close as it gets); and how many seconds in the warning will come.

        slurmctld warns at its first check at or after `start + 60 - delay - 30` (the 30 s is the check
        period), so a job starting `o` seconds after a check is warned `30 - o` s in when `o <= delay`,
        else `60 - o` s in: 23 to 53 s in, depending on `o`. A job starts up to ~1.5 s after its begin
        time, and a check fires up to 1 s after it is due, so offsets that close to the switch are avoided."""
        threshold = 60 - signal_delay_s - LIMIT_CHECK_PERIOD_S

        def warned_after(offset: float) -> float:
            return LIMIT_CHECK_PERIOD_S * (1 + int(offset + threshold > LIMIT_CHECK_PERIOD_S)) - offset

        base = self.limit_check_base()
        candidates = []
        for begin in range(int(not_before) + 1, int(not_before) + 1 + 2 * LIMIT_CHECK_PERIOD_S):
            offset = (begin - base) % LIMIT_CHECK_PERIOD_S
            early, late = offset - 1, offset + 1.5
            if early < 0 or late >= LIMIT_CHECK_PERIOD_S or abs(warned_after(early) - warned_after(late)) > 2.5:
                continue
            when = warned_after(offset + 0.25)
            candidates.append((max(0.0, earliest_s - when, when - latest_s), begin, when))
        best = min(miss for miss, _, _ in candidates)
        tolerance = best + 3 if best > 0 else 0.0  # out of reach: the first start within 3 s of the closest
        return next((begin, when) for miss, begin, when in candidates if miss <= tolerance)


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def _ports_free(base: int, nodes: int) -> bool:
    ports = [base, base + 2, base + 490] + ([base + 1] if nodes == 1 else [base + 10 + i for i in range(nodes)])
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return False
    return True


def start(directory: Path, nodes: int = 2, cpus_per_node: int = 2, timeout: float = 180) -> LocalSlurm:
    """Starts a fresh cluster of `nodes` virtual nodes; raises SlurmUnavailable with the script's log."""
    missing = missing_programs()
    if missing:
        raise SlurmUnavailable(f"Slurm is not installed (missing: {', '.join(missing)}); install it with "
                               "`.ci/install-slurm.sh` (as root: Debian's slurmctld slurmd slurm-client munge "
                               "slurmdbd mariadb-server-core)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local Slurm cluster runs its daemons as root (SlurmUser=root); run the "
                               "Slurm tests as root")
    base = next((b for b in range(6817, 6817 + 20000, 1000) if _ports_free(b, nodes)), None)
    if base is None:
        raise SlurmUnavailable("no free block of ports for slurmctld/slurmd/slurmdbd/mariadbd on 127.0.0.1")
    # debug2: slurmctld logs each time-limit check, which `begin_for_warning` times jobs by.
    env = dict(os.environ, SLURM_LOCAL_DIR=str(directory), SLURM_LOCAL_NODES=str(nodes),
               SLURM_LOCAL_CPUS=str(cpus_per_node), SLURM_LOCAL_PORT_BASE=str(base), SLURM_LOCAL_INSTALL="0",
               SLURM_LOCAL_CTLD_DEBUG="debug2")
    result = subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout)
    match = re.search(r"^export SLURM_CONF=(\S+)$", result.stdout, re.M)
    if result.returncode != 0 or not match:
        stop(directory, purge=False)  # whatever did start
        raise SlurmUnavailable(f"the local Slurm cluster did not start (exit {result.returncode}):\n"
                               f"{result.stderr[-6000:]}")
    return LocalSlurm(directory=directory, conf=match.group(1), nodes=nodes)


def stop(directory: Path, purge: bool) -> str:
    env = dict(os.environ, SLURM_LOCAL_DIR=str(directory))
    result = subprocess.run(["bash", str(STOP_SCRIPT), *(["--purge"] if purge else [])], env=env,
                            capture_output=True, text=True, timeout=300)
    return result.stderr


def job_state(job_id: str) -> str | None:
    """The job's state in sacct (None until slurmctld has reported it to slurmdbd)."""
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True,
                         timeout=30).stdout.split()
    return out[0].split()[0] if out else None  # "CANCELLED by 0" -> CANCELLED


def wait_until_ended(job_id: str, timeout: float) -> str:
    """Polls until the job ended (requeues included) and none of its processes is left; its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in ENDED and not running_steps(job_id):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job_state(job_id)} after {timeout} s")


def running_steps(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "RUNNING,COMPLETING,PENDING,REQUEUED", "-o", "%T"],
                         capture_output=True, text=True, timeout=30).stdout
    return bool(out.strip())


def sacct_field(job_id: str, field: str) -> str:
    return subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", field], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def local_time(ts: float) -> str:
    """`--begin` format (Slurm reads it in local time)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts))
