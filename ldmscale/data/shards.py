"""The resumable image-shard pipeline: `data.kind: images`.

`build_image_loader` returns a `ResumableLoader`: an iterable of batches
  {"image": [B, 3, R, R] in [-1, 1], "caption": list[str] ("" if absent),
   "label": [B] long (-1 if absent), "attributes": [B, A] float ([B, 0] if absent), "key": list[str]}
that runs epoch after epoch (or `epochs` epochs), split by rank and worker (see `stream.py`).

Exact resume. Workers batch their own samples and send them through a torch `DataLoader`
(`batch_size=None`), which hands out worker results round-robin. Rather than rely on that order
(a new DataLoader always starts at worker 0), the loader re-sequences batches into a canonical order:
within an epoch, round-robin over the workers, skipping those that have finished the epoch; the next
epoch starts only when all have. Batches that arrive early wait in a per-worker queue (at most the
imbalance in batches between workers within one epoch). The position is then fully described by
(epoch, next worker, per worker: raw samples consumed, finished flag, error counts), which is what
`state_dict` returns; a new loader given that state replays each worker's stream to its position
without decoding and continues with exactly the batches the uninterrupted loader would have yielded.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
from webdataset.shardlists import expand_urls

from ldmscale.config.registry import Registry
from ldmscale.data.stream import ERROR_KINDS, ShardStream, StreamSpec, WorkerStart

log = logging.getLogger(__name__)

DATA_SOURCES = Registry("data")
STATE_VERSION = 1


def stream_problems(cfg) -> list[str]:
    """The checks every shard-reading data config shares (images and cached latents)."""
    problems = []
    if cfg.resolution < 1:
        problems.append(f"resolution: must be >= 1, got {cfg.resolution}")
    if cfg.shuffle_buffer < 1:
        problems.append(f"shuffle_buffer: must be >= 1, got {cfg.shuffle_buffer}")
    if cfg.num_workers < 0:
        problems.append(f"num_workers: must be >= 0, got {cfg.num_workers}")
    return problems


@dataclasses.dataclass
class ImageDataConfig:
    """Image shards (webdataset tars with png|jpg|jpeg|webp and optional txt, cls, json)."""

    kind: str = "images"
    shards: str = ""  # a folder of .tar files, or a webdataset brace pattern "dir/shard-{000000..000007}.tar"
    resolution: int = 64
    crop: Literal["center", "random"] = "center"
    flip: bool = True  # random horizontal flip
    shuffle: bool = True
    shuffle_buffer: int = 1000  # samples held by each worker's shuffle buffer (when shuffle)
    num_workers: int = 2
    on_error: Literal["skip", "fail"] = "skip"
    validation_shards: str = ""  # held-out shards, same format (may be empty)

    def validate(self) -> list[str]:
        return stream_problems(self)


def resolve_shards(spec: str, key: str = "data.shards") -> list[str]:
    """A folder of `.tar` files, a single `.tar`, or a brace pattern -> the sorted shard list.

    Brace-pattern entries are kept even if a file is missing: the pipeline then counts and logs it as
    a missing shard when it reaches it, rather than silently training on less data.
    """
    if not spec:
        raise ValueError(f"{key}: empty; give a folder of .tar shards or a brace pattern like "
                         "dir/shard-{000000..000007}.tar")
    if "{" in spec or "::" in spec:
        return sorted(expand_urls(spec))
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise ValueError(f"{key}: folder {spec} contains no .tar shards")
        return shards
    if path.is_file() and path.suffix == ".tar":
        return [spec]
    raise ValueError(f"{key}: {spec!r} is neither a folder of .tar shards, a .tar file, nor a brace pattern like "
                     "dir/shard-{000000..000007}.tar")


@dataclasses.dataclass
class _WorkerPosition:
    consumed: int = 0  # raw samples of the current epoch delivered (corrupt ones included)
    finished: bool = False  # its end-of-epoch message was consumed
    errors: dict[str, int] = dataclasses.field(default_factory=dict)  # counts within the current epoch


def _add_counts(total: dict[str, int], counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        total[kind] = total.get(kind, 0) + n


def _passthrough(message: dict) -> dict:
    return message


class ResumableLoader:
    """Iterable of batches with an exactly restorable position (see the module docstring)."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self._epoch = 0
        self._next_worker = 0
        self._epoch_batches = 0
        self._workers = [_WorkerPosition() for _ in range(spec.workers)]
        self._errors_before_epoch: dict[str, int] = {}
        self._iterating = False

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def error_counts(self) -> dict[str, int]:
        """Problems skipped so far by this rank's workers, by kind (corrupt_sample, bad_shard, missing_shard)."""
        total = {kind: 0 for kind in ERROR_KINDS}
        _add_counts(total, self._errors_before_epoch)
        for worker in self._workers:
            _add_counts(total, worker.errors)
        return total

    def _fingerprint(self) -> dict:
        s = self.spec
        return {"num_shards": len(s.shards), "batch_size": s.batch_size, "rank": s.rank, "world_size": s.world_size,
                "num_workers": s.num_workers, "seed": s.seed, "shuffle": s.shuffle, "shuffle_buffer": s.shuffle_buffer}

    def state_dict(self) -> dict:
        """The position after the last batch handed out (JSON-serialisable)."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "next_worker": self._next_worker,
            "epoch_batches": self._epoch_batches,
            "workers": [dataclasses.asdict(w) for w in self._workers],
            "errors_before_epoch": dict(self._errors_before_epoch),
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a position from `state_dict()`; the next iteration continues from there."""
        if self._iterating:
            raise RuntimeError("load_state_dict while the loader is being iterated; load before iterating")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        saved, current = state["fingerprint"], self._fingerprint()
        changed = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in current.items() if saved.get(k) != v]
        if changed:
            raise ValueError("cannot restore the data position exactly, the data setup changed: " + "; ".join(changed))
        self._epoch = int(state["epoch"])
        self._next_worker = int(state["next_worker"])
        self._epoch_batches = int(state["epoch_batches"])
        self._workers = [_WorkerPosition(int(w["consumed"]), bool(w["finished"]), dict(w["errors"]))
                         for w in state["workers"]]
        self._errors_before_epoch = dict(state["errors_before_epoch"])

    def _finished(self) -> bool:
        return self.spec.epochs is not None and self._epoch >= self.spec.epochs

    def _starts(self) -> list[WorkerStart]:
        return [WorkerStart(self._epoch + 1) if w.finished else WorkerStart(self._epoch, w.consumed, dict(w.errors))
                for w in self._workers]

    def _advance_epoch(self) -> None:
        if self._epoch_batches == 0 and self.spec.epochs is None:
            raise RuntimeError(f"rank {self.spec.rank}: epoch {self._epoch} produced no samples from "
                               f"{len(self.spec.shards)} shard(s) (skipped so far: {self.error_counts}); "
                               "check data.shards")
        for worker in self._workers:
            _add_counts(self._errors_before_epoch, worker.errors)
        self._workers = [_WorkerPosition() for _ in range(self.spec.workers)]
        self._epoch += 1
        self._next_worker = 0
        self._epoch_batches = 0

    def __iter__(self) -> Iterator[dict]:
        if self._iterating:
            raise RuntimeError("the loader is already being iterated; one iterator at a time")
        if self._finished():
            return
        workers = self.spec.workers
        # The DataLoader draws its workers' base seed from `generator`, by default the global torch
        # RNG; a private one keeps the trainer's RNG stream (noise, dropout) the same whether or not
        # the loader was rebuilt on resume. Nothing in the pipeline uses those worker seeds.
        loader = DataLoader(ShardStream(self.spec, self._starts()), batch_size=None,
                            num_workers=self.spec.num_workers, collate_fn=_passthrough,
                            generator=torch.Generator().manual_seed(self.spec.seed))
        source = iter(loader)
        pending: list[collections.deque] = [collections.deque() for _ in range(workers)]
        self._iterating = True
        try:
            while True:
                if all(w.finished for w in self._workers):
                    self._advance_epoch()
                    if self._finished():
                        return
                    continue
                w = next(i % workers for i in range(self._next_worker, self._next_worker + workers)
                         if not self._workers[i % workers].finished)
                while not pending[w]:
                    message = next(source, None)
                    assert message is not None, f"worker stream ended before the end of epoch {self._epoch}"
                    pending[message["worker"]].append(message)
                message = pending[w].popleft()
                assert message["epoch"] == self._epoch, (message["epoch"], self._epoch, w)
                # Update the position before handing the batch out, so that `state_dict()` taken
                # after receiving it points just past it.
                position = self._workers[w]
                position.consumed, position.errors = message["consumed"], message["errors"]
                self._next_worker = (w + 1) % workers
                if message["batch"] is None:
                    position.finished = True
                    continue
                self._epoch_batches += 1
                yield message["batch"]
        finally:
            self._iterating = False
            # Stop the worker processes now. Dropping `source` is not enough after an exception: its
            # traceback keeps the DataLoader iterator alive until the garbage collector, whose late
            # shutdown waits out the workers' join timeouts (seconds). (A private method of
            # torch's multi-process iterator; the in-process iterator has nothing to stop.)
            if isinstance(source, _MultiProcessingDataLoaderIter):
                source._shutdown_workers()


def build_image_loader(cfg: ImageDataConfig, *, batch_size: int, rank: int, world_size: int, seed: int,
                       epochs: int | None = None, split: Literal["train", "validation"] = "train") -> ResumableLoader:
    """The loader of this rank over `cfg.shards` (split="train") or `cfg.validation_shards`.

    The validation split reads in a fixed order with center crops and no flips, and runs one epoch
    unless `epochs` says otherwise. Ranks and world size come from the caller (the data package knows
    nothing of torch.distributed); each rank builds its own loader.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: must be in [0, {world_size}), got {rank}")
    if split not in ("train", "validation"):
        raise ValueError(f"split: invalid value {split!r}; valid values: train, validation")
    train = split == "train"
    shards = resolve_shards(cfg.shards, "data.shards") if train else \
        resolve_shards(cfg.validation_shards, "data.validation_shards")
    spec = StreamSpec(
        shards=tuple(shards), batch_size=batch_size, rank=rank, world_size=world_size, num_workers=cfg.num_workers,
        seed=seed, epochs=epochs if train or epochs is not None else 1, resolution=cfg.resolution,
        crop=cfg.crop if train else "center", flip=cfg.flip and train, shuffle=cfg.shuffle and train,
        shuffle_buffer=cfg.shuffle_buffer, on_error=cfg.on_error)
    return make_loader(spec)


def make_loader(spec: StreamSpec) -> ResumableLoader:
    """The loader of `spec`, warning when there are fewer shards than reading slots (shared by the data kinds)."""
    if spec.splits_samples:
        log.warning("data: %d shard(s) for %d rank(s) x %d worker(s) = %d slots; every worker reads every shard and "
                    "keeps one sample in %d. Write more, smaller shards to avoid the extra reading.",
                    len(spec.shards), spec.world_size, spec.workers, spec.slots, spec.slots)
    return ResumableLoader(spec)


DATA_SOURCES.register("images", ImageDataConfig, build_image_loader)

# data.kind=latents registers itself; imported here, after DATA_SOURCES exists, so every user of the
# registry sees both kinds (latents imports this module).
import ldmscale.data.latents  # noqa: E402,F401
