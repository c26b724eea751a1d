"""`ldmscale submit`: a run as a Slurm job through submitit, requeued on time limits and preemption.

One Slurm task per GPU (`--ntasks-per-node = --gpus-per-node`); each task takes its rank, local rank,
world size and rendezvous address from Slurm through submitit's `JobEnvironment`, so no torchrun runs
inside the job. On a CPU-only cluster `gpus_per_node=0` with `tasks_per_node=T` runs T gloo ranks.

The requeue protocol (submitit's `Checkpointable`, with the checkpoint written by all ranks):
1. sbatch asks Slurm for `--signal=USR2@signal_delay`: USR2 reaches every task that long before the
   time limit (Slurm checks limits every 30 s, so up to a minute earlier); preemption may send it too.
2. During `Trainer.fit` the trainer owns USR2 on every rank: the ranks agree at the next step boundary
   (an all-reduce), write one committed checkpoint together and `fit()` returns "stopped".
3. Only global rank 0 may requeue (submitit calls `checkpoint()` on rank 0 alone). It re-raises the
   signal to hand over to submitit's own handler, which calls `checkpoint()`, dumps the resubmission,
   runs `scontrol requeue` and exits. The other ranks just return; the requeue ends them.
4. The requeued job runs the same config snapshot against the same run directory and resumes from
   `checkpoints/latest`. `max_requeues` caps the restarts (`SLURM_RESTART_COUNT`); scancel (SIGTERM)
   makes the trainers checkpoint but never requeues.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

if TYPE_CHECKING:
    from ldmscale.distributed.env import ProcessEnv

log = logging.getLogger(__name__)

VERBS = ("train", "cache-latents")
# Environment of every task: sensible defaults that a value already exported in the submitting shell
# (sbatch passes the shell's environment on) or an explicit `--env KEY=VALUE` overrides.
DEFAULT_ENV_GPU = {
    "OMP_NUM_THREADS": "1",  # the GPUs do the maths; CPU threads would only fight the data workers
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a hung collective raises (and the job ends) instead of hanging
    "NCCL_DEBUG": "WARN",
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass
class SlurmConfig:
    """Resources and behaviour of one submission; `ldmscale submit --help` documents each field."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: gpus_per_node (one task per GPU), 1 on a CPU job
    cpus_per_task: int | None = None
    mem: str | None = None  # sbatch --mem, e.g. "480G" or "0" (all of the node's memory)
    time: int = 24 * 60  # minutes
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None
    gres: bool = False  # ask for GPUs as --gres=gpu:G (older clusters) instead of --gpus-per-node
    signal_delay: int = 180  # seconds to finish the step and write the checkpoint before the limit
    max_requeues: int = 20
    array: int | None = None  # cache-latents: number of array tasks (shard ranges)
    array_parallelism: int | None = None
    env: list[str] = dataclasses.field(default_factory=list)  # KEY=VALUE, exported in every task
    sbatch: list[str] = dataclasses.field(default_factory=list)  # extra sbatch options: key=value or key
    logs: str | None = None  # submitit folder and per-task logs; default <run.dir>/slurm

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else max(self.gpus_per_node, 1)

    def validate(self) -> list[str]:
        problems = []
        for name in ("nodes", "time"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "max_requeues"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            problems.append(f"tasks_per_node: must be >= 1, got {self.tasks_per_node}")
        elif self.gpus_per_node > 0 and self.tasks_per_node not in (None, self.gpus_per_node):
            problems.append(f"tasks_per_node: one task per GPU, so it must equal gpus_per_node "
                            f"({self.gpus_per_node}) or be left out; got {self.tasks_per_node}")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            problems.append(f"cpus_per_task: must be >= 1, got {self.cpus_per_task}")
        if not 0 <= self.signal_delay < self.time * 60:
            problems.append(f"signal_delay: must be in [0, time * 60 = {self.time * 60}) seconds, "
                            f"got {self.signal_delay}")
        if self.array is not None:
            if self.array < 1:
                problems.append(f"array: must be >= 1, got {self.array}")
            if self.nodes * self.ntasks_per_node != 1:
                problems.append("array: each array task is one Slurm task; use --nodes 1 and --gpus-per-node 1 "
                                "(or --gpus-per-node 0 --tasks-per-node 1)")
        if self.array_parallelism is not None and self.array_parallelism < 1:
            problems.append(f"array_parallelism: must be >= 1, got {self.array_parallelism}")
        for item in self.env:
            key = item.split("=", 1)[0]
            if "=" not in item or not _ENV_NAME.match(key):
                problems.append(f"env: expected KEY=VALUE with a shell variable name, got {item!r}")
        for item in self.sbatch:
            if not re.match(r"^[a-z][a-z0-9-]*(=.*)?$", item):
                problems.append(f"sbatch: expected an sbatch option as key=value or key (e.g. "
                                f"reservation=big or exclusive), got {item!r}")
        return problems


@dataclasses.dataclass(frozen=True)
class Submission:
    """Everything needed to print or submit one job; `prepare` builds it and checks the config."""

    verb: str
    slurm: SlurmConfig
    config: dict  # the verb's resolved config, snapshotted at submission
    run_dir: Path
    folder: Path  # submitit's folder; `%j` becomes the job id


def prepare(slurm: SlurmConfig, config_path: str, overrides: list[str], verb: str = "train") -> Submission:
    """Checks the Slurm options and the run config (all problems at once) and snapshots the config,
    so that editing the YAML after submitting changes neither a queued job nor its requeues."""
    from ldmscale.config.load import ConfigError, config_to_dict, load_yaml_with_overrides

    # The fields are the `ldmscale submit` options: name them as typed.
    problems = ["--" + p.split(":", 1)[0].replace("_", "-") + ":" + p.split(":", 1)[1] for p in slurm.validate()]
    if verb not in VERBS:
        problems.append(f"--verb: invalid value {verb!r}; valid values: {', '.join(VERBS)}")
    elif verb == "train" and slurm.array is not None:
        problems.append("--array: only cache-latents runs as an array job; train is one multi-task job")
    config: dict = {}
    run_dir = Path()
    try:
        merged = load_yaml_with_overrides(config_path, overrides)
        run_dir = Path(str(merged.get("run", {}).get("dir", "runs/default"))).expanduser().resolve()
        if verb in VERBS:
            # The job runs in the submitting directory anyway, but a fixed absolute run.dir is what
            # `--dry-run` shows, where the logs go and what every requeue writes to.
            config = config_to_dict(_load_verb_config(verb, config_path, [*overrides, f"run.dir={run_dir}"]))
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ValueError("invalid submission:\n  " + "\n  ".join(problems))
    folder = Path(slurm.logs).expanduser().resolve() if slurm.logs else run_dir / "slurm"
    return Submission(verb=verb, slurm=slurm, config=config, run_dir=run_dir, folder=folder / "%j")


def _load_verb_config(verb: str, config_path: str, overrides: list[str]) -> Any:
    if verb == "train":
        from ldmscale.config.schema import load_run_config

        return load_run_config(config_path, overrides)
    from ldmscale.pipelines.cache_latents import load_cache_config

    return load_cache_config(config_path, overrides)


def sbatch_parameters(sub: Submission) -> dict[str, Any]:
    """submitit's sbatch-level parameters (the keyword names of its sbatch writer)."""
    s = sub.slurm
    params: dict[str, Any] = {
        "job_name": s.job_name or f"ldmscale-{sub.verb}-{sub.run_dir.name}",
        "nodes": s.nodes,
        "ntasks_per_node": s.ntasks_per_node,
        "time": s.time,
        "signal_delay_s": s.signal_delay,
        "setup": _export_lines(sub),
        # `scontrol requeue` is refused for jobs that are not requeueable (JobRequeue=0 clusters).
        "additional_parameters": {"requeue": True, **_extra_sbatch(s.sbatch)},
    }
    if s.gpus_per_node > 0:
        if s.gres:
            params["gres"] = f"gpu:{s.gpus_per_node}"
        else:
            params["gpus_per_node"] = s.gpus_per_node
    optional = {"cpus_per_task": s.cpus_per_task, "mem": s.mem, "partition": s.partition, "account": s.account,
                "qos": s.qos, "constraint": s.constraint}
    params.update({k: v for k, v in optional.items() if v is not None})
    if s.array is not None and s.array_parallelism is not None:
        params["array_parallelism"] = s.array_parallelism
    return params


def _extra_sbatch(items: list[str]) -> dict[str, Any]:
    return {k.replace("-", "_"): (v if sep else True) for k, sep, v in (i.partition("=") for i in items)}


def task_environment(sub: Submission) -> dict[str, tuple[str, bool]]:
    """Variables the script exports in every task: name -> (value, whether a value already set in the
    submitting shell wins). Defaults yield to the shell; `--env KEY=VALUE` always wins."""
    s = sub.slurm
    if s.gpus_per_node > 0:
        env = {k: (v, True) for k, v in DEFAULT_ENV_GPU.items()}
    else:
        # A CPU job computes on its CPUs: one thread per allocated core; DeepSpeed's CPU accelerator (gloo).
        env = {"OMP_NUM_THREADS": (str(s.cpus_per_task or 1), True), "DS_ACCELERATOR": ("cpu", False)}
    for item in s.env:
        key, _, value = item.partition("=")
        env[key] = (value, False)
    return env


def _export_lines(sub: Submission) -> list[str]:
    return [f"export {k}=${{{k}:-{shlex.quote(v)}}}" if inherit else f"export {k}={shlex.quote(v)}"
            for k, (v, inherit) in task_environment(sub).items()]


def job_environment(sub: Submission, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The exported variables as a task sees them when the job is submitted from `environ`."""
    environ = os.environ if environ is None else environ
    return {k: (environ.get(k) or v) if inherit else v for k, (v, inherit) in task_environment(sub).items()}


def _preempt_signal_name() -> str:
    # submitit reads SUBMITIT_PREEMPT_SIGNAL (default USR2) both for `--signal=` and for its handler.
    return os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")


def preempt_signal() -> signal.Signals:
    from ldmscale.training.trainer import STOP_SIGNALS

    name = _preempt_signal_name()
    sig = getattr(signal, "SIG" + name, None)
    if sig not in STOP_SIGNALS:
        valid = ", ".join(signal.Signals(s).name.removeprefix("SIG") for s in STOP_SIGNALS)
        raise ValueError(f"SUBMITIT_PREEMPT_SIGNAL: {name!r} is not a signal the trainer checkpoints on; "
                         f"valid values: {valid}")
    return sig


def submitit_command(folder: Path) -> str:
    """What each task runs: submitit's `SlurmExecutor._submitit_command_str` (the job's Python is this one)."""
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(sub: Submission) -> str:
    """The exact script `submit` hands to sbatch (submitit writes it as `<folder>/<job id>_submission.sh`).

    submitit's own writer, called directly because its executor refuses to exist where `srun` does not
    (a laptop doing a dry run); tests/slurm/test_submit.py checks the two scripts are the same."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(sub)
    if sub.verb != "train" and (sub.slurm.array or 1) > 1:  # submitit submits a 1-element map as a plain job
        params["map_count"] = sub.slurm.array
    return _make_sbatch_string(command=submitit_command(sub.folder), folder=sub.folder, **params)


def describe(sub: Submission) -> str:
    s = sub.slurm
    gpus = f"{s.nodes * s.gpus_per_node} GPUs" if s.gpus_per_node else "CPU only (gloo)"
    shape = f"{s.array or 1} array tasks" if sub.verb != "train" else f"{s.nodes} node(s) x {s.ntasks_per_node} tasks"
    return (f"{sub.verb}: {shape}, {gpus}, time limit {s.time} min, signal {s.signal_delay} s before it, "
            f"up to {s.max_requeues} requeues")


def submit(sub: Submission) -> list[Any]:
    """Submits through submitit's AutoExecutor; returns the submitit jobs (one, or one per array task)."""
    preempt_signal()  # fail here, not in the job, on a SUBMITIT_PREEMPT_SIGNAL the trainer ignores
    executor = submitit.AutoExecutor(folder=sub.folder, cluster="slurm", slurm_max_num_timeout=sub.slurm.max_requeues)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in sbatch_parameters(sub).items()})
    if sub.verb == "train":
        return [executor.submit(TrainJob(sub.config, sub.slurm.max_requeues))]
    count = sub.slurm.array or 1
    return executor.map_array(VerbJob(sub.verb, sub.config, count, sub.slurm.max_requeues), list(range(count)))


def wait(jobs: list[Any]) -> list[dict]:
    """Blocks until every job has ended, requeues included; the rank-0 result of each, or for a job that
    failed or ended without a result (cancelled, timed out, out of requeues) {"status": "failed", ...}."""
    results = []
    for job in jobs:
        try:
            results.append(job.task(0).result())
        except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
            results.append({"status": "failed", "job": job.job_id, "error": str(e).strip()})
    return results


def restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def slurm_process_env() -> "ProcessEnv":
    """Rank, world size and rendezvous of this task from Slurm (through submitit), ignoring any RANK /
    MASTER_* inherited from the submitting shell. The port is derived from the job id so that all
    tasks agree without talking, and stays the same across requeues."""
    from ldmscale.distributed.env import ProcessEnv, slurm_master_port

    job = submitit.JobEnvironment()
    return ProcessEnv(rank=job.global_rank, world_size=job.num_tasks, local_rank=job.local_rank,
                      master_addr=job.hostnames[0], master_port=slurm_master_port(job.raw_job_id), source="slurm")


class _RequeueingJob(Checkpointable):
    """submitit's `checkpoint()`: resubmit unchanged (the state lives in the run directory), at most
    `max_requeues` times in all (time limits and preemptions together)."""

    max_requeues: int

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        if restart_count() >= self.max_requeues:
            log.warning("not requeueing: the job already restarted %d times (max_requeues=%d); the last checkpoint "
                        "is kept, submit the same command again to go on", restart_count(), self.max_requeues)
            return None
        log.warning("requeueing (restart %d of at most %d)", restart_count() + 1, self.max_requeues)
        return DelayedSubmission(self, *args, **kwargs)


def _ignore_late_warning(signum: int, frame: Any) -> None:
    log.warning("signal %d after the run completed: nothing to checkpoint, not requeueing", signum)


class TrainJob(_RequeueingJob):
    """`ldmscale train` in one Slurm task (every task of the job runs one)."""

    def __init__(self, config: dict, max_requeues: int):
        self.config = config
        self.max_requeues = max_requeues

    def __call__(self) -> dict:
        from ldmscale.config.load import config_from_dict
        from ldmscale.config.schema import RunConfig
        from ldmscale.launch.cli import _setup_logging
        from ldmscale.training.trainer import Trainer

        _setup_logging()
        sig = preempt_signal()
        penv = slurm_process_env()
        trainer = Trainer(config_from_dict(RunConfig, self.config), penv)
        status = trainer.fit()
        if status == "completed":
            # Slurm's warning can still come while submitit writes the result; its handler would requeue
            # a finished run (and exit rank 0 with an error).
            signal.signal(sig, _ignore_late_warning)
        log.info("rank %d: %s at step %d (restart %d)", penv.rank, status, trainer.state.step, restart_count())
        if status == "stopped" and trainer.stop_signal == sig and penv.is_main:
            # The checkpoint is committed; let submitit's handler (restored by fit) requeue and exit.
            signal.raise_signal(sig)
        return {"status": status, "step": trainer.state.step, "rank": penv.rank, "restarts": restart_count(),
                "run_dir": self.config["run"]["dir"]}


class VerbJob(_RequeueingJob):
    """Another verb (cache-latents) as one array task: `ldmscale VERB CONFIG cache.rank=i cache.world_size=n`.
    On the preemption signal submitit requeues the array task, which runs its shard range again (the
    shards it finished are kept: cache-latents skips complete ones)."""

    def __init__(self, verb: str, config: dict, world_size: int, max_requeues: int):
        self.verb, self.config, self.world_size, self.max_requeues = verb, config, world_size, max_requeues

    def __call__(self, index: int) -> dict:
        from omegaconf import OmegaConf

        from ldmscale.launch.cli import main

        path = Path(submitit.JobEnvironment().paths.folder) / "config.yaml"
        OmegaConf.save(OmegaConf.create(self.config), path)
        code = main([self.verb, str(path), f"cache.rank={index}", f"cache.world_size={self.world_size}"])
        if code != 0:
            raise RuntimeError(f"ldmscale {self.verb} exited with {code}; see this task's log")
        return {"status": "completed", "rank": index, "restarts": restart_count()}
