"""`ldmscale submit` against a real Slurm cluster (slurmctld + 2 slurmd on this host): a 2-node job equals
torchrun, scancel leaves only committed checkpoints, cache-latents runs as an array job, and a job
that hits its 1-minute time limit checkpoints, requeues itself and ends with the losses of an
uninterrupted run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import submitit

from ldmscale.checkpoint.manager import is_committed
from ldmscale.launch.cli import main
from tests.e2e.harness import DEBUG_AE, ROOT, metrics, run, start, wait_for
from tests.slurm import cluster

CPU = ("--gpus-per-node", "0")
DEBUG_CACHE = str(ROOT / "configs" / "debug" / "cache_latents.yaml")


def _overrides(run_dir, shards, *extra) -> list[str]:
    return [f"run.dir={run_dir}", f"data.shards={shards / 'train'}", "train.progress=false", "train.image_every=0",
            "train.validate_every=0", *extra]


def _submit(capsys, overrides, *options) -> tuple[str, str]:
    """`ldmscale submit` in this process (its environment is the job's); the job id and the output."""
    code = main(["submit", DEBUG_AE, *overrides, *options])
    out = capsys.readouterr().out
    assert code == 0, out
    return re.search(r"^submitted job (\d+)", out, re.M).group(1), out


def _assert_same_losses(run_dir, reference_dir, steps: int) -> None:
    ran, reference = metrics(run_dir), metrics(reference_dir)
    assert sorted(ran) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for key in ("loss", "nll", "data_crc"):
            assert ran[step][key] == reference[step][key], (step, key)


def test_two_node_job_equals_torchrun_and_runs_the_dry_run_script(slurm_cluster, synth_shards, job_env, tmp_path,
                                                                   capsys):
    """2 nodes x 1 CPU task (gloo across the virtual nodes): the per-step losses and data equal a
    2-rank torchrun run of the same config; each task logs into the run directory; the script
    submitit handed to sbatch is exactly what --dry-run printed."""
    steps = ("train.max_steps=6",)
    run(["train", DEBUG_AE, *_overrides(tmp_path / "torchrun", synth_shards, *steps)], nproc=2)
    overrides = _overrides(tmp_path / "slurm", synth_shards, *steps)
    options = ("--nodes", "2", *CPU, "--tasks-per-node", "1", "--time", "10")

    job_id, out = _submit(capsys, overrides, *options, "--wait")
    assert "job ended: {'status': 'completed', 'step': 6, 'rank': 0, 'restarts': 0" in out
    _assert_same_losses(tmp_path / "slurm", tmp_path / "torchrun", 6)
    assert cluster.wait_until_ended(job_id, timeout=60) == "COMPLETED"  # sacct lags the result file
    assert cluster.sacct_field(job_id, "NNodes,NodeList") == "2|localhost,vm"

    job_dir = tmp_path / "slurm" / "slurm" / job_id
    for task in (0, 1):
        assert f"[rank {task}]" in (job_dir / f"{job_id}_{task}_log.err").read_text()
    assert main(["submit", DEBUG_AE, *overrides, *options, "--dry-run"]) == 0
    printed = capsys.readouterr().out.split("# ---- sbatch script ----\n")[1].split("\n# ---- environment")[0]
    assert printed == (job_dir / f"{job_id}_submission.sh").read_text()


def test_scancel_leaves_only_committed_checkpoints_and_a_rerun_resumes(slurm_cluster, synth_shards, job_env,
                                                                      tmp_path, capsys):
    run_dir = tmp_path / "run"
    options = ("--nodes", "1", *CPU, "--tasks-per-node", "2", "--time", "10")
    job_id, _ = _submit(capsys, _overrides(run_dir, synth_shards, "train.max_steps=1000",
                                           "checkpoint.every_steps=2", "checkpoint.keep_last=2"), *options)
    root = run_dir / "checkpoints"

    def latest_step() -> int:
        pointer = root / "latest"
        return int(pointer.read_text().strip()[5:]) if pointer.exists() else 0

    wait_for(lambda: latest_step() >= 4, timeout=300, poll=0.2)
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    assert cluster.wait_until_ended(job_id, timeout=120) == "CANCELLED"

    steps = [p for p in root.iterdir() if re.fullmatch(r"step-\d{8}", p.name)]
    assert steps and all(is_committed(p) for p in steps), sorted(p.name for p in steps)
    latest = root / (root / "latest").read_text().strip()
    assert is_committed(latest) and latest in steps
    last = int(latest.name[5:])
    assert last < 1000, "the job finished before it was cancelled; the test proves nothing"

    # The same command with a closer end: it resumes from `latest` (no step trained twice or skipped).
    _, out = _submit(capsys, _overrides(run_dir, synth_shards, f"train.max_steps={last + 2}",
                                        "checkpoint.every_steps=2", "checkpoint.keep_last=2"), *options, "--wait")
    assert f"'status': 'completed', 'step': {last + 2}" in out
    assert sorted(metrics(run_dir)) == list(range(1, last + 3))
    assert not list(root.glob("*.tmp"))
    logs = "".join(p.read_text() for p in (run_dir / "slurm").glob("*/*_0_log.err"))
    assert f"resuming from {latest}" in logs


def test_cache_latents_array_tasks_split_the_shards(slurm_cluster, synth_shards, kl_autoencoder, job_env, tmp_path,
                                                    capsys):
    """`--verb cache-latents --array 2`: array task i of 2 runs `cache-latents ... cache.rank=i
    cache.world_size=2`; each encodes half of the 8 shards, and together they write the whole set."""
    out_dir, shards = tmp_path / "latents", synth_shards / "train"
    code = main(["submit", DEBUG_CACHE, f"run.dir={tmp_path / 'cache'}", f"cache.shards={shards}",
                 f"cache.out={out_dir}", f"cache.autoencoder={kl_autoencoder}",
                 "cache.progress=false", "--verb", "cache-latents", "--array", "2", *CPU, "--time", "10", "--wait"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("'status': 'completed'") == 2, out
    job_id = re.search(r"^submitted job (\d+)", out, re.M).group(1)

    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert sorted(s["source"] for s in manifest["shards"]) == sorted(str(p) for p in shards.glob("*.tar"))
    assert sorted(p.name for p in out_dir.glob("shard-*.tar")) == sorted(p.name for p in shards.glob("*.tar"))
    for task in (0, 1):
        log = (tmp_path / "cache" / "slurm" / f"{job_id}_{task}" / f"{job_id}_{task}_0_log.err").read_text()
        assert f"rank {task}: wrote 4 shard(s)" in log


def _logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0  # complete records only


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm_cluster, synth_shards, job_env, tmp_path,
                                                                    capsys):
    """A 1-minute job that needs longer: Slurm's USR2 (`--signal-delay 7` s before the limit) makes every
    rank checkpoint at the same step; rank 0 requeues; the job resumes from `latest`, and its losses and
    data equal those of an uninterrupted run.

    Timing. slurmctld sends the warning at its first time-limit check (every 30 s) once `end - delay -
    30 s` has passed: 23 to 53 s in, depending on the start, never earlier. The uninterrupted reference
    runs first, watched, for long enough that a warning 26 s in (a little after the earliest, for
    timing slack) is at most halfway through the job: 25 s of training, more on a machine that starts
    fast (`steps` is chosen from its speed; with a constant learning rate the first `steps` steps do not
    depend on `train.max_steps`, so it runs with a larger one and is stopped once it has logged them).
    The job is held (`--begin`) until the moment after a check that puts the warning in the middle of
    its training (by the reference's timing); the requeued job starts a requeue delay after a check, so
    it has 60 s minus that delay before the next warning."""
    common = ("optim.schedule=constant", "checkpoint.every_steps=1000")
    reference_dir = tmp_path / "reference"
    started = time.monotonic()
    reference = start(["train", DEBUG_AE, *_overrides(reference_dir, synth_shards, "train.max_steps=100000", *common)],
                      nproc=2, log_path=tmp_path / "reference.log")
    wait_for(lambda: _logged_steps(reference_dir) >= 1, timeout=300, proc=reference, poll=0.05)
    startup, first = time.monotonic() - started, time.monotonic()
    wait_for(lambda: _logged_steps(reference_dir) >= 11, timeout=300, proc=reference, poll=0.05)
    seconds = max(25.0, 2 * (26 - startup))
    steps = max(40, round(seconds / ((time.monotonic() - first) / 10)))
    wait_for(lambda: _logged_steps(reference_dir) >= steps, timeout=300, proc=reference, poll=0.05)
    training = time.monotonic() - first
    # Its first `steps` records are written (line-buffered); stop it. torchrun passes SIGTERM on to its
    # workers (which run in sessions of their own, out of reach of a process-group kill) and waits.
    reference.send_signal(signal.SIGTERM)
    reference.wait(timeout=120)

    # Warned halfway through its training at the latest (interrupted even if this machine speeds up by
    # half), and if possible late enough that the rest fits in the requeued job (~46 s minus its startup).
    latest = startup + 0.5 * training
    earliest = min(latest, max(startup + 0.15 * training, 2 * startup + training - 46))
    begin, warned_at = slurm_cluster.begin_for_warning(earliest, latest, 7, time.time() + 2)
    job_id, _ = _submit(capsys, _overrides(tmp_path / "slurm", synth_shards, f"train.max_steps={steps}", *common),
                        "--nodes", "1", *CPU, "--tasks-per-node", "2", "--time", "1", "--signal-delay", "7",
                        f"--sbatch=begin={cluster.local_time(begin)}")
    timing = (f"reference: startup {startup:.0f} s, {steps} steps in {training:.0f} s; "
              f"warning planned {warned_at:.0f} s in")

    assert cluster.wait_until_ended(job_id, timeout=480) == "COMPLETED", timing
    job = submitit.SlurmJob(folder=tmp_path / "slurm" / "slurm" / "%j", job_id=job_id, tasks=[0, 1])
    result = job.task(0).result()
    assert result["status"] == "completed" and result["step"] == steps, (result, timing)
    job_dir = tmp_path / "slurm" / "slurm" / job_id
    stops = [int(s) for s in re.findall(r"stopped at step (\d+) after a signal", (job_dir / f"{job_id}_0_log.err")
                                        .read_text())]
    assert stops and all(0 < s < steps for s in stops), f"no checkpoint on Slurm's signal ({timing})"
    # submitit logs each requeue to the task's stdout (also one during startup, before the trainer runs)
    requeues = (job_dir / f"{job_id}_0_log.out").read_text().count("Requeued job")
    assert result["restarts"] == requeues >= 1, timing
    _assert_same_losses(tmp_path / "slurm", reference_dir, steps)
