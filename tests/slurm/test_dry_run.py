"""`ldmscale submit --dry-run`: the sbatch script and task environment for the resources asked for,
and every bad option reported at once. Needs no cluster (nothing is submitted)."""

from __future__ import annotations

import pytest

from ldmscale.launch.cli import main
from tests.e2e.harness import DEBUG_AE, ROOT

DEBUG_CACHE = str(ROOT / "configs" / "debug" / "cache_latents.yaml")


def _dry_run(capsys, run_dir, *options, overrides=()) -> tuple[int, str, str]:
    code = main(["submit", DEBUG_AE, f"run.dir={run_dir}", *overrides, *options, "--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err


def _script_and_env(out: str) -> tuple[list[str], dict[str, str]]:
    script = out.split("# ---- sbatch script ----\n")[1].split("# ---- environment")[0]
    env_lines = out.split("# ---- environment")[1].splitlines()[1:]
    return script.splitlines(), dict(line.split("=", 1) for line in env_lines if line)


def test_gpu_job_script_has_the_resources_asked_for(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("NCCL_DEBUG", "TRACE")  # a default yields to the shell's value ...
    run_dir = tmp_path / "run"
    code, out, _ = _dry_run(capsys, run_dir, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                            "--time", "2880", "--account", "proj", "--qos", "high", "--constraint", "h100",
                            "--mem", "900G", "--cpus-per-task", "12", "--max-requeues", "5", "--signal-delay", "300",
                            "--env", "TORCH_NCCL_ASYNC_ERROR_HANDLING=0", "--sbatch", "reservation=big",
                            "--sbatch", "exclusive")
    assert code == 0
    script, env = _script_and_env(out)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=2880", "#SBATCH --account=proj", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --mem=900G", "#SBATCH --cpus-per-task=12",
                 "#SBATCH --signal=USR2@300", "#SBATCH --requeue", "#SBATCH --reservation=big", "#SBATCH --exclusive",
                 f"#SBATCH --output={run_dir}/slurm/%j/%j_0_log.out", "#SBATCH --job-name=ldmscale-train-run",
                 "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}", "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=0"):
        assert line in script, line
    srun = next(line for line in script if line.startswith("srun "))
    # one log pair per task, in the run directory
    assert f"--output {run_dir}/slurm/%j/%j_%t_log.out --error {run_dir}/slurm/%j/%j_%t_log.err" in srun
    assert srun.endswith(f"-u -m submitit.core._submit {run_dir}/slurm/%j")
    assert not any("DS_ACCELERATOR" in line for line in script)
    # ... and `--env` wins over both
    assert env == {"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "TRACE", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}
    assert "4 node(s) x 8 tasks, 32 GPUs, time limit 2880 min, signal 300 s before it, up to 5 requeues" in out
    assert not run_dir.exists(), "a dry run must not create anything"


def test_cpu_job_runs_the_tasks_asked_for_on_gloo(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    code, out, _ = _dry_run(capsys, tmp_path / "run", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "3",
                            "--cpus-per-task", "2", "--time", "30")
    assert code == 0
    script, env = _script_and_env(out)
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=3", "#SBATCH --cpus-per-task=2",
            "#SBATCH --time=30"} <= set(script)
    assert not any("gpus" in line or "gres" in line for line in script)
    assert env == {"OMP_NUM_THREADS": "2", "DS_ACCELERATOR": "cpu"}


def test_gres_and_array_variants(tmp_path, capsys):
    code, out, _ = _dry_run(capsys, tmp_path / "run", "--nodes", "2", "--gpus-per-node", "4", "--gres")
    script, _ = _script_and_env(out)
    assert code == 0 and "#SBATCH --gres=gpu:4" in script and not any("gpus-per-node" in s for s in script)

    # cache-latents: one single-GPU task per shard range, as an array (logs per array task)
    code = main(["submit", DEBUG_CACHE, f"run.dir={tmp_path / 'run'}", "--verb", "cache-latents", "--array", "16",
                 "--array-parallelism", "4", "--gpus-per-node", "1", "--dry-run"])
    script, _ = _script_and_env(capsys.readouterr().out)
    assert code == 0
    assert {"#SBATCH --array=0-15%4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=1",
            f"#SBATCH --output={tmp_path}/run/slurm/%A_%a/%A_%a_0_log.out"} <= set(script)


def test_every_bad_option_is_reported_at_once(tmp_path, capsys):
    code, out, err = _dry_run(capsys, tmp_path / "run", "--nodes", "0", "--gpus-per-node", "4", "--tasks-per-node",
                              "2", "--time", "1", "--signal-delay", "90", "--env", "1BAD=x", "--sbatch=--exclusive",
                              "--verb", "sample")
    assert code == 2 and out == ""
    for expected in ("--nodes: must be >= 1", "--tasks-per-node: one task per GPU", "--signal-delay: must be in [0, "
                     "time * 60", "--env: expected KEY=VALUE", "--sbatch: expected an sbatch option",
                     "--verb: invalid value 'sample'; valid values: train, cache-latents"):
        assert expected in err, expected


def test_config_errors_are_reported_with_the_option_errors(tmp_path, capsys):
    code, _, err = _dry_run(capsys, tmp_path / "run", "--gpus-per-node", "0", "--max-requeues", "-1",
                            overrides=["train.max_stpes=3"])
    assert code == 2
    assert "train.max_stpes: unknown key" in err and "--max-requeues: must be >= 0" in err
    # each verb's config is checked against its own schema
    code = main(["submit", DEBUG_AE, "--verb", "cache-latents", "--gpus-per-node", "1", "--dry-run"])
    assert code == 2 and "stage: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("signal_name", ["INT", "KILL"])
def test_a_preemption_signal_the_trainer_ignores_is_refused(signal_name, monkeypatch):
    from ldmscale.launch.slurm import preempt_signal

    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", signal_name)
    with pytest.raises(ValueError, match="SUBMITIT_PREEMPT_SIGNAL.*valid values: TERM, USR1, USR2"):
        preempt_signal()
