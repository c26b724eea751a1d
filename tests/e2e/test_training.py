"""Real multi-process DeepSpeed training on the CPU (gloo): ZeRO stages agree, resumption is exact."""

from __future__ import annotations

import math
import signal

import pytest
import torch

from ldmscale.checkpoint.io import load_safetensors
from tests.e2e.harness import DEBUG_AE, kill_after_checkpoint_then_rerun, metrics, run, start, wait_for


def _args(run_dir, shards, *extra):
    return ["train", DEBUG_AE, f"run.dir={run_dir}", f"data.shards={shards / 'train'}", "train.progress=false",
            "train.image_every=0", "train.validate_every=0", *extra]


def _consolidated_weights(step_dir, stage):
    """The full fp32 weights of the autoencoder engine, however ZeRO partitioned them."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ldmscale.distributed.safe_load import load_deepspeed_file

    if stage == 0:  # no ZeRO optimizer: the model states file holds the full module
        return load_deepspeed_file(str(step_dir / "autoencoder" / "state" / "mp_rank_00_model_states.pt"))["module"]
    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir / "autoencoder"), tag="state")


def test_zero_stages_give_the_same_losses_and_ema(tmp_path, synth_shards):
    """2 ranks: ZeRO 0, 1, 2 and 3 train the generator + discriminator identically. The EMA (decay 0
    here, so it must equal the weights) is gathered in full under ZeRO-3: it equals the consolidated
    partitions, and the unpartitioned run's EMA up to the float noise between the stages."""
    losses, emas = {}, {}
    for stage in (0, 1, 2, 3):
        run_dir = tmp_path / f"zero{stage}"
        run(_args(run_dir, synth_shards, f"distributed.zero_stage={stage}", "train.max_steps=5",
                  "checkpoint.every_steps=5", "ema.max_decay=0.0"), nproc=2)
        records = metrics(run_dir)
        losses[stage] = [records[s]["loss"] for s in range(1, 6)]
        assert "d_loss" in records[5]  # the discriminator engine trains too (disc_start 2)
        step_dir = run_dir / "checkpoints" / "step-00000005"
        emas[stage] = load_safetensors(step_dir / "ema-autoencoder.safetensors")
        weights = _consolidated_weights(step_dir, stage)
        assert set(weights) <= set(emas[stage])
        for name, tensor in weights.items():
            torch.testing.assert_close(emas[stage][name], tensor.float(), msg=f"ZeRO-{stage} EMA {name}")
    for stage in (1, 2, 3):
        assert losses[stage] == pytest.approx(losses[0], rel=1e-5), f"ZeRO-{stage} diverged from ZeRO-0"
        for name, tensor in emas[0].items():
            torch.testing.assert_close(emas[stage][name], tensor, rtol=1e-3, atol=3e-4)


def test_exact_resume_after_sigkill(tmp_path, synth_shards):
    """2 ranks, ZeRO-2, generator + discriminator, 2 data workers, gradient accumulation over 2 micro-batches:
    kill -9 after the step-10 checkpoint, rerun the same command; steps 11-20 (losses and the data they
    saw) equal the uninterrupted run's exactly."""
    common = ("distributed.zero_stage=2", "train.max_steps=20", "checkpoint.every_steps=10", "data.num_workers=2",
              "train.grad_accum=2", "train.micro_batch_size=2")
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    run(_args(reference_dir, synth_shards, *common), nproc=2)
    reference = metrics(reference_dir)

    args = _args(resumed_dir, synth_shards, *common)
    kill_after_checkpoint_then_rerun(args, resumed_dir, 10, 20, tmp_path / "killed.log", timeout=600)
    resumed = metrics(resumed_dir)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        for key in ("loss", "d_loss", "nll", "data_crc"):
            assert resumed[step][key] == reference[step][key], (step, key)


def test_sigterm_checkpoints_and_stops_then_resumes(tmp_path, synth_shards):
    """SIGTERM (Slurm's warning) mid-run: checkpoint at the next step boundary, clean exit; a rerun
    finishes. wandb runs in offline mode into the run directory."""
    run_dir = tmp_path / "run"
    args = _args(run_dir, synth_shards, "train.max_steps=400", "checkpoint.every_steps=1000", "logging.wandb=true")
    job = start(args, nproc=1, log_path=tmp_path / "stopped.log")
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 3, timeout=600, proc=job)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=300) == 0
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert len(saved) == 1
    stopped_at = int(saved[0][5:])
    assert 3 <= stopped_at < 400 and max(metrics(run_dir)) == stopped_at
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    run(args[:-2] + ["train.max_steps=" + str(stopped_at + 2), "logging.wandb=true"])
    assert max(metrics(run_dir)) == stopped_at + 2


def test_divergence_is_skipped_then_aborts(tmp_path, synth_shards):
    """An absurd learning rate makes the loss non-finite: steps are skipped, counted, then the run aborts."""
    run_dir = tmp_path / "run"
    result = run(_args(run_dir, synth_shards, "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0",
                       "train.max_consecutive_nonfinite=3", "train.max_steps=50"), check=False)
    assert result.returncode != 0
    assert "non-finite losses in a row" in result.stderr
    assert "micro-step skipped" in result.stderr


def test_bf16_trains_and_fp16_on_cpu_is_refused_clearly(tmp_path, synth_shards):
    run(_args(tmp_path / "bf16", synth_shards, "distributed.precision=bf16", "train.max_steps=3"))
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "bf16").values())
    result = run(_args(tmp_path / "fp16", synth_shards, "distributed.precision=fp16", "train.max_steps=3"),
                 check=False)
    assert result.returncode == 2
    assert "distributed.precision: fp16 is not supported by DeepSpeed's cpu accelerator" in result.stderr
