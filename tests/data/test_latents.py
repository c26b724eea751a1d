"""Latent shards in one process: the cache equals direct encoding (per stored dtype), corrupt inputs are
listed in the manifest, reruns skip complete shards and redo partial ones, ranks split the shards, the
loader serves every sample once with the image pipeline's flips, and mismatched metadata is refused."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors

from ldmscale.checkpoint.export import export_weights
from ldmscale.config.load import config_to_dict, load_config
from ldmscale.config.schema import load_run_config
from ldmscale.data.latents import (MANIFEST_FILE, METADATA_FILE, LatentDataConfig, build_latent_loader,
                                   check_latent_metadata, file_sha256, read_metadata)
from ldmscale.data.stream import ErrorTracker, read_shard
from ldmscale.data.synthetic import write_synthetic_shards
from ldmscale.data.transforms import augment_rng, image_transform
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.pipelines.cache_latents import CacheLatentsConfig, LatentCacher
from ldmscale.training.tasks.latent_diffusion import load_frozen_autoencoder

ROOT = Path(__file__).resolve().parents[2]
SCALE = 0.5


@pytest.fixture(scope="module")
def autoencoder_export(tmp_path_factory) -> Path:
    """The debug KL autoencoder (f = 4, 4 latent channels), random weights, exported as stage 1 does."""
    cfg = load_run_config(str(ROOT / "configs" / "debug" / "autoencoder.yaml"))
    torch.manual_seed(0)
    model = Autoencoder(dataclasses.replace(cfg.task.model, scale_factor=SCALE))
    path = tmp_path_factory.mktemp("ae") / "autoencoder.safetensors"
    return export_weights(model.state_dict(), path, config=config_to_dict(cfg),
                          metadata={"stage": "autoencoder", "network": "autoencoder", "scale_factor": SCALE})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """4 shards x 6 samples of 32 px synthetic images with captions, labels and attributes."""
    out = tmp_path_factory.mktemp("images")
    write_synthetic_shards(out, num_samples=24, resolution=32, samples_per_shard=6, seed=0, progress=False)
    return out


def cacher(export: Path, shards: Path, out: Path, *overrides: str) -> LatentCacher:
    cfg = load_config(CacheLatentsConfig, None, [f"cache.autoencoder={export}", f"cache.shards={shards}",
                                                 f"cache.out={out}", "cache.resolution=32", "cache.batch_size=4",
                                                 "cache.progress=false", "cache.device=cpu", *overrides])
    return LatentCacher(cfg)


def read_samples(folder: Path, pattern: str = "*.tar") -> dict[str, dict]:
    """key -> raw sample of every latent shard in `folder` (asserting each key occurs once)."""
    out: dict[str, dict] = {}
    for shard in sorted(folder.glob(pattern)):
        for sample in read_shard(str(shard), ErrorTracker("fail", {}), count_errors=True):
            assert sample["__key__"] not in out, f"duplicate {sample['__key__']}"
            out[sample["__key__"]] = sample
    return out


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_cache_equals_direct_encoding(tmp_path, autoencoder_export, images, dtype, atol):
    """mean / log-variance (and those of the flipped image) equal `encode_moments` of the center-cropped
    image within the stored dtype's precision (bf16: 8 mantissa bits, |x| < 4 -> 2e-2); captions,
    labels and attributes pass through byte for byte; the manifest counts and checksums every shard."""
    out = tmp_path / "latents"
    summary = cacher(autoencoder_export, images, out, f"cache.dtype={dtype}", "cache.flip=true").run()
    assert summary == {**summary, "written": 4, "skipped_shards": 0, "samples": 24, "complete": True}
    autoencoder, _ = load_frozen_autoencoder(str(autoencoder_export))
    cached, inputs = read_samples(out), read_samples(images)
    assert sorted(cached) == sorted(inputs) and len(cached) == 24
    for key, sample in cached.items():
        tensors = load_tensors(sample["safetensors"])
        x = image_transform(inputs[key]["png"], resolution=32, crop="center", flip=False, seed=0, epoch=0, key=key)
        with torch.no_grad():
            moments = autoencoder.encode_moments(torch.stack([x, x.flip(-1)]))  # (2, 8, 8, 8)
        mean, logvar = moments.chunk(2, dim=1)  # (2, 4, 8, 8) each
        assert tensors["mean"].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        assert tensors["mean"].shape == (4, 8, 8)
        for name, expected in [("mean", mean[0]), ("logvar", logvar[0]), ("flip_mean", mean[1]),
                               ("flip_logvar", logvar[1])]:
            torch.testing.assert_close(tensors[name].float(), expected, atol=atol, rtol=0)
        assert not torch.allclose(tensors["mean"].float(), tensors["flip_mean"].float(), atol=1e-3)
        for ext in ("txt", "cls", "json"):
            assert sample[ext] == inputs[key][ext]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["total_samples"] == 24 and manifest["skipped"] == []
    for record in manifest["shards"]:
        assert record["num_samples"] == 6 and record["sha256"] == file_sha256(out / record["shard"])
    metadata = read_metadata(out)
    assert metadata["scale_factor"] == SCALE and metadata["latent_shape"] == [4, 8, 8]
    assert metadata["dtype"] == dtype and len(metadata["source_shards"]) == 4 and metadata["flip"] is True


def test_corrupt_input_samples_are_listed_in_the_manifest(tmp_path, autoencoder_export, images):
    src = tmp_path / "src"
    src.mkdir()
    good = sorted(images.glob("*.tar"))[0]
    with tarfile.open(good) as tar_in, tarfile.open(src / "shard-000000.tar", "w") as tar_out:
        for member in tar_in.getmembers():
            data = tar_in.extractfile(member).read()
            if member.name.endswith(".png") and member.name.startswith(sorted(read_samples(images))[2]):
                data = b"not a png"  # the third sample's image is corrupt
            member.size = len(data)
            tar_out.addfile(member, io.BytesIO(data))
    out = tmp_path / "latents"
    cacher(autoencoder_export, src, out).run()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    bad_key = sorted(read_samples(images))[2]
    assert [s["key"] for s in manifest["skipped"]] == [bad_key] and manifest["skipped"][0]["kind"] == "corrupt_sample"
    assert manifest["total_samples"] == 5 and bad_key not in read_samples(out)


def test_rerun_skips_complete_shards_and_redoes_partial_ones(tmp_path, autoencoder_export, images):
    out = tmp_path / "latents"
    cacher(autoencoder_export, images, out).run()
    shards = sorted(out.glob("*.tar"))
    before = {p.name: (file_sha256(p), p.stat().st_mtime_ns) for p in shards}
    shards[0].write_bytes(shards[0].read_bytes()[:3000])  # a truncated shard under its final name
    shards[1].with_suffix(".json").unlink()  # killed between the rename and the record
    (out / f".{shards[2].name}.partial").write_bytes(b"half a tar")  # killed while writing (owner: rewritten)
    shards[2].unlink()
    (out / MANIFEST_FILE).unlink()
    summary = cacher(autoencoder_export, images, out).run()
    assert summary["written"] == 3 and summary["skipped_shards"] == 1 and summary["complete"]
    after = {p.name: (file_sha256(p), p.stat().st_mtime_ns) for p in sorted(out.glob("*.tar"))}
    assert {n: h for n, (h, _) in after.items()} == {n: h for n, (h, _) in before.items()}  # same bytes again
    assert after[shards[3].name][1] == before[shards[3].name][1]  # the complete one was not rewritten
    assert not list(out.glob(".*partial")) and len(read_samples(out)) == 24


def test_ranks_write_disjoint_shards_and_the_last_writes_the_manifest(tmp_path, autoencoder_export, images):
    out = tmp_path / "latents"
    first = cacher(autoencoder_export, images, out, "cache.rank=1", "cache.world_size=2").run()
    assert first["written"] == 2 and not first["complete"] and not (out / MANIFEST_FILE).exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar", "shard-000003.tar"]
    with pytest.raises(ValueError, match="incomplete"):
        build_latent_loader(LatentDataConfig(shards=str(out), resolution=32), batch_size=4, rank=0, world_size=1,
                            seed=0)
    second = cacher(autoencoder_export, images, out, "cache.rank=0", "cache.world_size=2").run()
    assert second["written"] == 2 and second["complete"] and (out / METADATA_FILE).is_file()
    assert len(read_samples(out)) == 24


def test_another_setup_in_the_output_folder_is_refused(tmp_path, autoencoder_export, images):
    out = tmp_path / "latents"
    cacher(autoencoder_export, images, out, "cache.rank=1", "cache.world_size=2").run()
    with pytest.raises(ValueError, match=r"cache.out: .* another setup \(differs in dtype"):
        cacher(autoencoder_export, images, out, "cache.dtype=bf16").run()


def test_loader_serves_each_sample_once_with_the_image_pipelines_flips(tmp_path, autoencoder_export, images):
    out = tmp_path / "latents"
    cacher(autoencoder_export, images, out, "cache.flip=true").run()
    cfg = LatentDataConfig(shards=str(out), resolution=32, flip=True, num_workers=0, shuffle_buffer=8)
    loader = build_latent_loader(cfg, batch_size=5, rank=0, world_size=1, seed=3, epochs=1)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(read_samples(images)) and batches[0]["latent_mean"].shape == (5, 4, 8, 8)
    stored = {k: load_tensors(s["safetensors"]) for k, s in read_samples(out).items()}
    flips = 0
    for batch in batches:
        for i, key in enumerate(batch["key"]):
            flipped = augment_rng(3, 0, key).random() < 0.5  # the draw `image_transform` makes (center crop)
            flips += flipped
            expected = stored[key]["flip_mean" if flipped else "mean"]
            torch.testing.assert_close(batch["latent_mean"][i], expected, rtol=0, atol=0)
    assert 0 < flips < 24


def test_latent_loader_resumes_exactly(tmp_path, autoencoder_export, images):
    """The image pipeline's resume machinery, reused: stop after 4 batches, restore into a new loader, and the
    rest of the two epochs (keys, flips, moments) equals the uninterrupted loader's."""
    out = tmp_path / "latents"
    cacher(autoencoder_export, images, out, "cache.flip=true").run()
    cfg = LatentDataConfig(shards=str(out), resolution=32, flip=True, num_workers=0, shuffle_buffer=8)

    def loader():
        return build_latent_loader(cfg, batch_size=5, rank=0, world_size=1, seed=1, epochs=2)

    reference = [(b["key"], b["latent_mean"]) for b in loader()]
    first = loader()
    head = []
    for batch in first:
        head.append((batch["key"], batch["latent_mean"]))
        if len(head) == 4:
            state = first.state_dict()
            break
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [(b["key"], b["latent_mean"]) for b in resumed]
    assert len(reference) == 10 and [k for k, _ in head + rest] == [k for k, _ in reference]
    for (_, mean), (_, expected) in zip(head + rest, reference):
        assert torch.equal(mean, expected)


def test_mismatched_autoencoder_hash_or_scale_is_refused():
    meta = {"autoencoder_content_hash": "a" * 64, "scale_factor": 0.18215, "latent_shape": [4, 8, 8],
            "resolution": 32, "text": {"conditioner_content_hash": "c" * 64}}
    ok = dict(folder="cache", autoencoder_hash="a" * 64, scale_factor=0.18215, latent_shape=(4, 8, 8), resolution=32,
              conditioner_hash="c" * 64)
    check_latent_metadata(meta, **ok)
    with pytest.raises(ValueError) as e:
        check_latent_metadata(meta, **{**ok, "autoencoder_hash": "b" * 64, "scale_factor": 0.5,
                                       "conditioner_hash": "d" * 64})
    message = str(e.value)
    assert "another autoencoder (content hash aaaaaaaaaaaa, task.autoencoder has bbbbbbbbbbbb)" in message
    assert "scale factor 0.18215, task.autoencoder has 0.5" in message and "data.text" in message
    check_latent_metadata(meta, **{**ok, "conditioner_hash": None})  # stored text not used: not checked
