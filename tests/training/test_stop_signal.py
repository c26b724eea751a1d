"""A stop signal (SIGTERM / SIGUSR1 / SIGUSR2) checkpoints at the next step boundary and stops; one
that lands on the last step lets the run finish and export, so that a launcher does not requeue a
run whose only remaining work is the export."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ldmscale.config.schema import load_run_config
from ldmscale.data.synthetic import write_synthetic_shards
from ldmscale.distributed import env as dist_env
from ldmscale.training import trainer as trainer_module
from ldmscale.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("signal_step, status", [(1, "stopped"), (3, "completed")])
def test_signal_stops_mid_run_but_not_on_the_last_step(tmp_path, monkeypatch, signal_step, status):
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_samples=16, resolution=32, seed=0, samples_per_shard=8, progress=False)
    cfg = load_run_config(str(ROOT / "configs" / "debug" / "autoencoder.yaml"), [
        f"run.dir={tmp_path / 'run'}", f"data.shards={shards}", "train.max_steps=3", "train.progress=false",
        "train.image_every=0", "train.validate_every=0", "checkpoint.every_steps=1000", "logging.wandb=false"])
    trainer = Trainer(cfg)

    real_reduce = dist_env.all_reduce_max

    def reduce_with_signal(value):  # the signal arrives while step `signal_step` ends
        if trainer.state.step == signal_step:
            signal.raise_signal(signal.SIGUSR1)
        return real_reduce(value)

    monkeypatch.setattr(trainer_module.dist_env, "all_reduce_max", reduce_with_signal)
    assert trainer.fit() == status
    assert trainer.stop_signal == signal.SIGUSR1
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved == [f"step-{signal_step:08d}"]
    assert (tmp_path / "run" / "export" / "autoencoder.safetensors").is_file() == (status == "completed")
    assert signal.getsignal(signal.SIGUSR1) is not trainer._on_signal  # handlers restored
