"""Latent shards: an image shard set encoded once by the autoencoder (`data.kind: latents`).

Caching one sampled latent with the scale factor baked in (as several peers do) freezes the
posterior noise and the random flip for all epochs. A latent shard instead keeps, per sample, the
KL posterior's mean and log-variance (Rombach et al. 2022 §3 / Kingma & Welling 2014 eq. 10: the
encoder's q(z|x) = N(mean, exp(logvar))), so training draws a fresh z ~ q(z|x) at every step and
multiplies by the scale factor of its own autoencoder; optionally the moments of the horizontally
flipped image, one of which is picked per (seed, epoch, key) exactly as the image pipeline picks its
flip; optionally the frozen text encoder's output for the caption.

A latent shard folder, written by `ldmscale cache-latents` (`pipelines/cache_latents.py`):
    latents.json       metadata of the set: autoencoder content hash, scale factor, latent shape,
                       stored dtype, image resolution, flip, text encoder, source shards
    shard-000003.tar   one per input shard, same name; per sample KEY.safetensors with `mean`,
                       `logvar` (E, h, w), optional `flip_mean`, `flip_logvar`, `context` (L, D),
                       and the input's txt / cls / json passed through unchanged
    shard-000003.json  its manifest record: source shard, sample count, sha256, skipped samples
    manifest.json      every record, written once all shards are complete
A shard is complete when its record exists, names this set's metadata and matches the tar's sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from webdataset import TarWriter

from ldmscale.data.shards import DATA_SOURCES, ResumableLoader, make_loader, stream_problems
from ldmscale.data.stream import ErrorTracker, StreamSpec, collate_fields, decode_fields
from ldmscale.data.transforms import augment_rng

FORMAT = "ldmscale-latents/1"
METADATA_FILE = "latents.json"
MANIFEST_FILE = "manifest.json"
SAMPLE_EXT = "safetensors"
STORED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class LatentDataConfig:
    """Latent shards written by `ldmscale cache-latents` for the run's autoencoder."""

    kind: str = "latents"
    shards: str = ""  # the cache's output folder (it holds latents.json and manifest.json)
    resolution: int = 64  # the image resolution the cache encoded; must equal its metadata's
    flip: bool = True  # pick the flipped copy at random when the shards hold one
    text: bool = True  # use stored text-encoder outputs when present (else encode captions on the fly)
    shuffle: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 2
    on_error: Literal["skip", "fail"] = "skip"

    def validate(self) -> list[str]:
        return stream_problems(self)


# ------------------------------------------------------------------------------------------------------
# Files of a latent shard set


def write_json_atomic(path: Path, obj: Any) -> None:
    """Writes `path` through a temp name in the same folder and renames it, so readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def metadata_digest(metadata: dict) -> str:
    """Identifies a metadata dict; every shard record carries the digest of the set it belongs to."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def partial_path(shard: Path) -> Path:
    """Where the writer of `shard` builds it; renamed to `shard` when complete."""
    return shard.with_name(f".{shard.name}.partial")


def complete_record(shard: Path, digest: str, verify_checksum: bool = True) -> dict | None:
    """The manifest record of `shard` if the shard is complete and belongs to the set `digest`, else None."""
    try:
        record = json.loads(record_path(shard).read_text())
    except (OSError, ValueError):
        return None
    if record.get("metadata_digest") != digest or not shard.is_file():
        return None
    if shard.stat().st_size != record.get("bytes"):
        return None
    if verify_checksum and file_sha256(shard) != record.get("sha256"):
        return None
    return record


def read_metadata(folder: str | os.PathLike, key: str = "data.shards") -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ValueError(f"{key}: {folder} is not a latent shard folder (no {METADATA_FILE}); write one with "
                         "`ldmscale cache-latents CONFIG`")
    metadata = json.loads(path.read_text())
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{key}: {path} has format {metadata.get('format')!r}, this version reads {FORMAT!r}")
    return metadata


def read_manifest(folder: str | os.PathLike, key: str = "data.shards") -> dict:
    """The manifest of a complete set; refuses an incomplete one (a cache job still running or killed)."""
    metadata = read_metadata(folder, key)
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        done = sum(1 for name in metadata["shards"] if record_path(Path(folder) / name).is_file())
        raise ValueError(f"{key}: the latent shards in {folder} are incomplete ({done} of {len(metadata['shards'])} "
                         "shards written, no manifest.json); rerun `ldmscale cache-latents` with the same config")
    manifest = json.loads(path.read_text())
    if manifest.get("metadata_digest") != metadata_digest(metadata):
        raise ValueError(f"{key}: {path} belongs to other metadata than {METADATA_FILE}; rerun cache-latents")
    return manifest


def check_latent_metadata(metadata: dict, *, folder: str, autoencoder_hash: str, scale_factor: float,
                          latent_shape: tuple[int, ...], resolution: int, conditioner_hash: str | None) -> None:
    """Refuses latents made by another autoencoder, scale factor, shape or resolution (all problems at once).

    `conditioner_hash` is the content hash of the run's frozen text tower, or None when stored text
    outputs are not used; stored outputs of another tower are refused.
    """
    problems = []
    if metadata["autoencoder_content_hash"] != autoencoder_hash:
        problems.append(f"data.shards: the latents in {folder} were encoded by another autoencoder (content hash "
                        f"{metadata['autoencoder_content_hash'][:12]}, task.autoencoder has {autoencoder_hash[:12]}); "
                        "re-cache with this autoencoder or train with the one that made them")
    if abs(float(metadata["scale_factor"]) - scale_factor) > 1e-6 * abs(scale_factor):
        problems.append(f"data.shards: the latents in {folder} were cached for scale factor "
                        f"{metadata['scale_factor']}, task.autoencoder has {scale_factor}")
    if tuple(metadata["latent_shape"]) != tuple(latent_shape):
        problems.append(f"data.shards: latent shape {tuple(metadata['latent_shape'])} in {folder} != "
                        f"{tuple(latent_shape)} of the autoencoder at data.resolution={resolution}")
    if int(metadata["resolution"]) != resolution:
        problems.append(f"data.resolution: must equal the cached image resolution {metadata['resolution']}, "
                        f"got {resolution}")
    text = metadata.get("text")
    if conditioner_hash is not None and text is not None and text["conditioner_content_hash"] != conditioner_hash:
        problems.append(f"data.text: the text-encoder outputs in {folder} come from another text tower than "
                        "task.conditioner; set data.text=false to encode captions on the fly, or re-cache")
    if problems:
        raise ValueError("latent shards do not match the run:\n  " + "\n  ".join(problems))


class LatentShardWriter:
    """Writes one latent shard under its partial name; `commit` renames it and then writes its record.

    The tar's member times are fixed (mtime 0), so the same inputs give the same bytes and checksum.
    A kill before `commit` leaves only the partial file (or, between the rename and the record, a tar
    without a record): either way the shard is not complete and a rerun writes it again.
    """

    def __init__(self, shard: Path, *, source: str, digest: str):
        self.shard, self.source, self.digest = shard, source, digest
        self.partial = partial_path(shard)
        self.partial.unlink(missing_ok=True)
        self._tar = TarWriter(str(self.partial), mtime=0.0)
        self.num_samples = 0

    def write(self, key: str, tensors: dict[str, torch.Tensor], passthrough: dict[str, bytes]) -> None:
        """One sample: `tensors` (each its own contiguous CPU tensor) and the input's txt / cls / json bytes."""
        self._tar.write({"__key__": key, SAMPLE_EXT: save_tensors(tensors), **passthrough})
        self.num_samples += 1

    def commit(self, skipped: list[dict], errors: dict[str, int]) -> dict:
        """Renames the finished shard into place and writes its manifest record; returns the record."""
        self._tar.close()  # writes the end-of-archive marker and closes the file
        with open(self.partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.partial, self.shard)
        record = {"shard": self.shard.name, "source": self.source, "num_samples": self.num_samples,
                  "bytes": self.shard.stat().st_size, "sha256": file_sha256(self.shard), "skipped": skipped,
                  "errors": errors, "metadata_digest": self.digest}
        write_json_atomic(record_path(self.shard), record)
        return record

    def abort(self) -> None:
        self._tar.close()
        self.partial.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------
# Reading (the stream machinery of `data.stream` with a latent decoder)


def decode_latent_sample(sample: dict, spec: StreamSpec, epoch: int, tracker: ErrorTracker) -> dict | None:
    """Raw latent sample -> {"mean", "logvar" (E, h, w) float32, ["context" (L, D)], caption, label, ...}.

    The flipped copy is taken iff `spec.flip` and `augment_rng(seed, epoch, key).random() < 0.5`: the
    image pipeline's draw with a center crop, so cached and on-the-fly runs see the same flips.
    """
    key, url = sample["__key__"], sample["__url__"]
    try:
        if SAMPLE_EXT not in sample:
            raise ValueError(f"no .{SAMPLE_EXT} member; sample has "
                             f"{', '.join(k for k in sample if not k.startswith('__'))}")
        tensors = load_tensors(sample[SAMPLE_EXT])
        flipped = spec.flip and "flip_mean" in tensors and augment_rng(spec.seed, epoch, key).random() < 0.5
        prefix = "flip_" if flipped else ""
        item = {"mean": tensors[prefix + "mean"].float(), "logvar": tensors[prefix + "logvar"].float(),
                **decode_fields(sample), "key": key}
        if "context" in tensors:
            item["context"] = tensors["context"].float()
    except Exception as e:  # safetensors and the parsers raise many types; all mean "this sample is unusable"
        tracker.problem("corrupt_sample", url, key, e)
        return None
    return item


def collate_latents(items: list[dict]) -> dict:
    """-> {"latent_mean", "latent_logvar" (B, E, h, w), ["text_context" (B, L, D)], caption, label, attributes, key}."""
    batch = {"latent_mean": torch.stack([item["mean"] for item in items]),  # (B, E, h, w)
             "latent_logvar": torch.stack([item["logvar"] for item in items]),  # (B, E, h, w)
             **collate_fields(items)}
    if all("context" in item for item in items):
        batch["text_context"] = torch.stack([item["context"] for item in items])  # (B, L, D)
    return batch


def build_latent_loader(cfg: LatentDataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                        epochs: int | None = None) -> ResumableLoader:
    """The resumable loader of this rank over a complete latent shard set (see `data.shards`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
    if not cfg.shards or not Path(cfg.shards).is_dir():
        raise ValueError(f"data.shards: {cfg.shards!r} is not a folder; data.kind=latents reads the output folder "
                         "of `ldmscale cache-latents`")
    manifest = read_manifest(cfg.shards)
    shards = tuple(str(Path(cfg.shards) / record["shard"]) for record in manifest["shards"])
    spec = StreamSpec(shards=shards, batch_size=batch_size, rank=rank, world_size=world_size,
                      num_workers=cfg.num_workers, seed=seed, epochs=epochs, resolution=cfg.resolution,
                      crop="center", flip=cfg.flip, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer,
                      on_error=cfg.on_error, decode=decode_latent_sample, collate=collate_latents)
    return make_loader(spec)


DATA_SOURCES.register("latents", LatentDataConfig, build_latent_loader)
