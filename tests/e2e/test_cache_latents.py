"""cache-latents and `data.kind=latents` as real processes: 2 ranks killed midway then rerun give a complete,
duplicate-free set with partial files replaced; training from cached latents reproduces on-the-fly encoding
step by step; latents of another autoencoder are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ldmscale.checkpoint.export import export_weights
from ldmscale.config.load import config_to_dict, load_config
from ldmscale.config.schema import load_run_config
from ldmscale.data.latents import MANIFEST_FILE, file_sha256
from ldmscale.data.stream import ErrorTracker, read_shard
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.pipelines.cache_latents import CacheLatentsConfig, LatentCacher
from tests.e2e.harness import DEBUG_AE, ROOT, kill_job, metrics, run, start, wait_for

pytest.importorskip("open_clip")

DEBUG_LDM = str(ROOT / "configs" / "debug" / "ldm.yaml")
DEBUG_CACHE = str(ROOT / "configs" / "debug" / "cache_latents.yaml")
STEPS = 6


def export_autoencoder(path: Path, seed: int, scale: float) -> Path:
    """The debug KL autoencoder with random weights from `seed`, exported as stage 1 does."""
    cfg = load_run_config(DEBUG_AE)
    torch.manual_seed(seed)
    model = Autoencoder(dataclasses.replace(cfg.task.model, scale_factor=scale))
    return export_weights(model.state_dict(), path, config=config_to_dict(cfg),
                          metadata={"stage": "autoencoder", "network": "autoencoder", "scale_factor": scale})


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory) -> Path:
    return export_autoencoder(tmp_path_factory.mktemp("cache-ae") / "autoencoder.safetensors", seed=0, scale=0.5)


def cache_args(autoencoder: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return [f"cache.autoencoder={autoencoder}", f"cache.shards={shards}", f"cache.out={out}", "cache.progress=false",
            f"run.dir={out.parent}", *extra]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, synth_shards, autoencoder) -> Path:
    """The debug cache (moments, flipped moments, text-tower outputs) of the e2e synth shards, in-process."""
    out = tmp_path_factory.mktemp("cached") / "latents"
    cfg = load_config(CacheLatentsConfig, DEBUG_CACHE, cache_args(autoencoder, synth_shards / "train", out,
                                                                  "cache.device=cpu"))
    assert LatentCacher(cfg).run()["complete"]
    return out


def sample_keys(folder: Path) -> list[str]:
    return [s["__key__"] for shard in sorted(folder.glob("*.tar"))
            for s in read_shard(str(shard), ErrorTracker("fail", {}), count_errors=True)]


def test_two_rank_cache_killed_midway_then_rerun_is_complete(tmp_path, synth_shards, autoencoder):
    """kill -9 once the first shard is committed; a truncated shard stands for a torn file. The rerun keeps
    the committed shards, replaces partial and torn ones, and every input sample appears exactly once."""
    out = tmp_path / "latents"
    args = ["cache-latents", DEBUG_CACHE, *cache_args(autoencoder, synth_shards / "train", out, "cache.batch_size=1")]
    job = start(args, nproc=2, log_path=tmp_path / "killed.log")
    try:
        wait_for(lambda: any(p.name.startswith("shard-") for p in out.glob("*.json")), timeout=120, proc=job,
                 poll=0.002)
    finally:
        kill_job(job)
    committed = sorted(p.with_suffix(".tar") for p in out.glob("shard-*.json"))
    assert 1 <= len(committed) < 8 and not (out / MANIFEST_FILE).exists(), "the kill must land midway"
    # What the kill left half-written: partial files, or a renamed tar whose record was not yet written.
    leftovers = [out / p.name[1:].removesuffix(".partial") for p in out.glob(".*.partial")] + \
        [p for p in out.glob("shard-*.tar") if p not in committed]
    torn = committed[0]
    torn.write_bytes(torn.read_bytes()[:2048])  # stands for a shard torn under its final name
    kept = {p: p.stat().st_mtime_ns for p in committed[1:]}

    result = run(args, nproc=2)
    assert "set complete" in result.stdout
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["total_samples"] == 64 and len(manifest["shards"]) == 8 and manifest["skipped"] == []
    for record in manifest["shards"]:
        assert record["sha256"] == file_sha256(out / record["shard"]) and record["num_samples"] == 8
    keys = sample_keys(out)
    assert len(keys) == len(set(keys)) == 64 and sorted(keys) == sorted(sample_keys(synth_shards / "train"))
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*.tmp"))
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # committed shards were skipped
    assert torn.stat().st_size > 2048
    for shard in leftovers:  # replaced by complete shards (each listed in the manifest with its checksum)
        assert shard.name in {r["shard"] for r in manifest["shards"]} and shard.with_suffix(".json").is_file()


def test_training_from_cached_latents_matches_on_the_fly_encoding(tmp_path, synth_shards, autoencoder, cached):
    """Same data order, flips, posterior draws, timesteps, noise and dropout: the per-step loss of the
    cached run equals the on-the-fly run's within rel 1e-5 (fp32 moments and text outputs, computed in
    other batch compositions; observed here: at most 7e-8)."""
    common = ["train", DEBUG_LDM, f"task.autoencoder={autoencoder}", "train.progress=false", f"train.max_steps={STEPS}",
              "train.image_every=0", "checkpoint.every_steps=100", "data.num_workers=0", "data.flip=true"]
    images_dir, latents_dir = tmp_path / "images", tmp_path / "latents"
    jobs = [start([*common, f"run.dir={images_dir}", f"data.shards={synth_shards / 'train'}"],
                  log_path=tmp_path / "images.log"),
            start([*common, f"run.dir={latents_dir}", "data.kind=latents", f"data.shards={cached}",
                   "data.resolution=32"], log_path=tmp_path / "latents.log")]
    for job, log in zip(jobs, ("images.log", "latents.log")):
        assert job.wait(timeout=300) == 0, (tmp_path / log).read_text()[-4000:]
    online, offline = metrics(images_dir), metrics(latents_dir)
    assert sorted(online) == sorted(offline) == list(range(1, STEPS + 1))
    for step in online:
        assert offline[step]["data_crc"] == online[step]["data_crc"]  # the same samples
        assert offline[step]["loss"] == pytest.approx(online[step]["loss"], rel=1e-5)
        assert offline[step]["latent_std"] == pytest.approx(online[step]["latent_std"], rel=1e-5)


def test_training_refuses_latents_of_another_autoencoder(tmp_path, synth_shards, cached):
    other = export_autoencoder(tmp_path / "other.safetensors", seed=1, scale=0.25)
    result = run(["train", DEBUG_LDM, f"task.autoencoder={other}", f"run.dir={tmp_path / 'run'}", "data.kind=latents",
                  f"data.shards={cached}", "data.resolution=32", "train.progress=false"], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "were encoded by another autoencoder" in result.stderr
    assert "were cached for scale factor 0.5, task.autoencoder has 0.25" in result.stderr
