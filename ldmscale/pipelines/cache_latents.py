"""`ldmscale cache-latents CONFIG`: encode an image shard set once into latent shards (`data.latents`).

Encoding costs more than the UNet's forward at 512 px (MosaicML: 1.4x slower training without cached
latents; fast-DiT: 1.5x), so stage 2a can read the autoencoder's posterior moments instead of images.

Parallel and restartable. Rank r of n (torchrun's RANK / WORLD_SIZE, or `cache.rank` /
`cache.world_size` from a Slurm array task) owns input shards `sorted_inputs[r::n]` and writes one
output shard per input shard under the same name, so no two ranks ever write the same file. A shard
is built under a partial name and renamed when complete, then its manifest record (sample count,
sha256, skipped samples) is written; a rerun skips shards whose record matches the tar and this
set's metadata, and rewrites the rest. `latents.json` is written by whichever rank finds it missing,
and `manifest.json` by a rank that finds every shard complete: through a temp name and an atomic
rename, and from the config alone, so ranks racing on them write the same bytes.

Images are center-cropped to `cache.resolution` (a random crop frozen at cache time would be the same
crop every epoch); the horizontal flip stays random at training time through the flipped moments.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from ldmscale.checkpoint.export import content_hash
from ldmscale.config.load import load_config
from ldmscale.data.latents import (FORMAT, MANIFEST_FILE, METADATA_FILE, STORED_DTYPES, LatentShardWriter,
                                   complete_record, metadata_digest, read_metadata, write_json_atomic)
from ldmscale.data.shards import resolve_shards
from ldmscale.data.stream import ErrorTracker, StreamSpec, decode_sample, read_shard
from ldmscale.distributed.env import read_process_env
from ldmscale.models.conditioners import OpenCLIPConditionerConfig
from ldmscale.models.regularizers import GaussianRegularizer
from ldmscale.training.tasks.latent_diffusion import build_seeded_conditioner, latent_shape, load_frozen_autoencoder

log = logging.getLogger(__name__)

PASSTHROUGH = ("txt", "cls", "json")


@dataclasses.dataclass
class CacheConfig:
    autoencoder: str = ""  # an autoencoder export (export/autoencoder.safetensors of an autoencoder run)
    shards: str = ""  # input image shards: a folder of .tar files or a brace pattern
    out: str = ""  # output folder of the latent shards (data.shards of a `data.kind: latents` run)
    resolution: int = 256  # images are resized (shorter side) and center-cropped to this
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # of the stored moments (encoding runs in fp32)
    flip: bool = False  # also store the moments of the horizontally flipped image
    text_encoder: OpenCLIPConditionerConfig | None = None  # also store its output for the caption (txt)
    batch_size: int = 32
    rank: int = -1  # -1: from torchrun / srun (RANK, WORLD_SIZE), else 0; a Slurm array task sets it
    world_size: int = -1
    device: str = "auto"  # auto: this rank's GPU when there is one, else the CPU
    on_error: Literal["skip", "fail"] = "skip"  # a corrupt input sample: skip it (listed in the manifest) or fail
    progress: bool = True

    def validate(self) -> list[str]:
        problems = [f"{name}: required" for name in ("autoencoder", "shards", "out") if not getattr(self, name)]
        for name in ("resolution", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if (self.rank < 0) != (self.world_size < 0):
            problems.append("rank: give cache.rank and cache.world_size together (or neither, to use torchrun's)")
        elif self.world_size >= 0 and not 0 <= self.rank < self.world_size:
            problems.append(f"rank: must be in [0, world_size={self.world_size}), got {self.rank}")
        return problems


@dataclasses.dataclass
class RunDirConfig:
    dir: str = "runs/cache-latents"  # where `ldmscale submit --verb cache-latents` keeps the Slurm logs


@dataclasses.dataclass
class CacheLatentsConfig:
    seed: int = 0  # draws a text tower with `weights: null`, as the LDM run's `seed` does
    run: RunDirConfig = dataclasses.field(default_factory=RunDirConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)


def load_cache_config(path: str | None, overrides: list[str] = ()) -> CacheLatentsConfig:
    return load_config(CacheLatentsConfig, path, overrides)


class _RecordingTracker(ErrorTracker):
    """The pipeline's error tracker, also keeping each skipped sample's key and reason for the manifest."""

    def __init__(self, on_error: str):
        super().__init__(on_error, {})
        self.skipped: list[dict] = []

    def problem(self, kind, shard, key, error, count=True):
        super().problem(kind, shard, key, error, count)
        self.skipped.append({"kind": kind, "key": key, "error": f"{type(error).__name__}: {error}"})


class LatentCacher:
    """Encodes input shards into latent shards with a frozen autoencoder (and text tower)."""

    def __init__(self, cfg: CacheLatentsConfig):
        c = self.cfg = cfg.cache
        penv = read_process_env()
        self.rank, self.world_size = (c.rank, c.world_size) if c.world_size >= 0 else (penv.rank, penv.world_size)
        self.device = penv.device if c.device == "auto" else torch.device(c.device)
        self.inputs = resolve_shards(c.shards, "cache.shards")
        names = [Path(url).name for url in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"cache.shards: input shards must have distinct file names (one output shard each, "
                             f"same name); {c.shards} has repeated names")
        autoencoder, ae_meta = load_frozen_autoencoder(c.autoencoder)
        if not isinstance(autoencoder.quantize, GaussianRegularizer):
            raise ValueError(f"cache.autoencoder: {c.autoencoder} has a {autoencoder.cfg.regularizer.kind} "
                             "bottleneck; latent shards store KL posteriors (mean, log-variance): use a kl autoencoder")
        self.autoencoder = autoencoder.to(self.device)
        self.text = None
        text_meta = None
        if c.text_encoder is not None:
            tower = build_seeded_conditioner(c.text_encoder, cfg.seed)
            text_meta = {"conditioner_content_hash": content_hash(tower.state_dict()),
                         "config": dataclasses.asdict(c.text_encoder)}
            self.text = tower.to(self.device).eval()
        self.metadata = {
            "format": FORMAT, "autoencoder": str(c.autoencoder), "autoencoder_content_hash": ae_meta["content_hash"],
            "scale_factor": float(ae_meta["scale_factor"]),
            "latent_shape": list(latent_shape(autoencoder, c.resolution)), "resolution": c.resolution,
            "dtype": c.dtype, "flip": c.flip, "text": text_meta, "source_shards": list(self.inputs), "shards": names,
        }
        self.digest = metadata_digest(self.metadata)
        self.out = Path(c.out)
        self.spec = StreamSpec(shards=tuple(self.inputs), batch_size=c.batch_size, rank=0, world_size=1,
                               num_workers=0, seed=0, epochs=1, resolution=c.resolution, crop="center", flip=False,
                               shuffle=False, shuffle_buffer=1, on_error=c.on_error)

    def _prepare_output(self) -> None:
        """Creates the folder and its metadata, or refuses a folder holding another cache."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / METADATA_FILE
        if path.is_file():
            existing = read_metadata(self.out, "cache.out")
            if metadata_digest(existing) != self.digest:
                changed = sorted(k for k in {*existing, *self.metadata} if existing.get(k) != self.metadata.get(k))
                raise ValueError(f"cache.out: {self.out} holds latents of another setup (differs in "
                                 f"{', '.join(changed)}); choose an empty folder or delete it")
        else:  # every rank may find it missing (array tasks start in any order); they would write the same bytes
            write_json_atomic(path, self.metadata)

    @torch.no_grad()
    def _encode(self, items: list[dict]) -> list[dict[str, torch.Tensor]]:
        """Decoded samples -> per sample {"mean", "logvar" (E, h, w), ["flip_mean", "flip_logvar"], ["context"]}."""
        images = torch.stack([item["image"] for item in items]).to(self.device)  # (B, 3, R, R)
        if self.cfg.flip:
            images = torch.cat([images, images.flip(-1)])  # (2B, 3, R, R): one encoder pass for both
        mean, logvar = self.autoencoder.encode_moments(images).float().chunk(2, dim=1)  # (B or 2B, E, h, w) each
        dtype = STORED_DTYPES[self.cfg.dtype]
        context = self.text([item["caption"] for item in items])["context"] if self.text is not None else None

        def stored(t: torch.Tensor) -> torch.Tensor:  # its own storage: safetensors refuses shared views
            return t.to(dtype).cpu().clone().contiguous()

        out = []
        n = len(items)
        for i in range(n):
            tensors = {"mean": stored(mean[i]), "logvar": stored(logvar[i])}
            if self.cfg.flip:
                tensors.update(flip_mean=stored(mean[n + i]), flip_logvar=stored(logvar[n + i]))
            if context is not None:
                tensors["context"] = stored(context[i])  # (L, D)
            out.append(tensors)
        return out

    def cache_shard(self, url: str, progress: tqdm) -> dict:
        """Encodes one input shard into `out/<its name>`; returns its manifest record."""
        tracker = _RecordingTracker(self.cfg.on_error)
        writer = LatentShardWriter(self.out / Path(url).name, source=url, digest=self.digest)
        try:
            batch: list[tuple[dict, dict]] = []

            def flush() -> None:
                for (item, raw), tensors in zip(batch, self._encode([item for item, _ in batch])):
                    writer.write(item["key"], tensors, {ext: raw[ext] for ext in PASSTHROUGH if ext in raw})
                progress.update(len(batch))
                batch.clear()

            for raw in read_shard(url, tracker, count_errors=True):
                item = decode_sample(raw, self.spec, 0, tracker)
                if item is not None:
                    batch.append((item, raw))
                if len(batch) == self.cfg.batch_size:
                    flush()
            if batch:
                flush()
        except BaseException:
            writer.abort()
            raise
        return writer.commit(tracker.skipped, tracker.counts)

    def run(self) -> dict:
        """Caches this rank's shards; returns {"written", "skipped_shards", "samples", "seconds", "complete"}."""
        self._prepare_output()
        mine = self.inputs[self.rank::self.world_size]
        written, reused, samples = 0, 0, 0
        start = time.perf_counter()
        progress = tqdm(desc=f"cache-latents rank {self.rank}/{self.world_size}", unit="img",
                        disable=not self.cfg.progress, dynamic_ncols=True)
        with progress:
            for url in mine:
                progress.set_postfix(shards=f"{written + reused}/{len(mine)}")
                if complete_record(self.out / Path(url).name, self.digest) is not None:
                    reused += 1
                    continue
                record = self.cache_shard(url, progress)
                written += 1
                samples += record["num_samples"]
                if record["skipped"]:
                    log.warning("%s: skipped %d corrupt sample(s), listed in %s", url, len(record["skipped"]),
                                Path(record["shard"]).with_suffix(".json"))
            progress.set_postfix(shards=f"{written + reused}/{len(mine)}")
        seconds = time.perf_counter() - start
        complete = self.write_manifest_if_complete()
        log.info("rank %d: wrote %d shard(s) (%d samples, %.1f samples/s), %d already complete; set %s",
                 self.rank, written, samples, samples / max(seconds, 1e-9), reused,
                 "complete" if complete else "not complete yet (other ranks still running?)")
        return {"written": written, "skipped_shards": reused, "samples": samples, "seconds": seconds,
                "complete": complete}

    def write_manifest_if_complete(self) -> bool:
        """Writes manifest.json once every output shard has a matching record (checksums were verified by
        their writers; the file sizes are checked here)."""
        records = [complete_record(self.out / name, self.digest, verify_checksum=False)
                   for name in self.metadata["shards"]]
        if any(r is None for r in records):
            return False
        write_json_atomic(self.out / MANIFEST_FILE, {
            "metadata_digest": self.digest, "shards": records,
            "total_samples": sum(r["num_samples"] for r in records),
            "skipped": [{"shard": r["shard"], **s} for r in records for s in r["skipped"]]})
        return True


def cache_latents(cfg: CacheLatentsConfig) -> dict:
    return LatentCacher(cfg).run()
