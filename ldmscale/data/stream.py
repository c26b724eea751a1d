"""What runs inside one data worker: its share of an epoch's samples, read, decoded and batched.

Splitting (node and worker): an epoch's shard order is the sorted shard list, permuted from
(seed, epoch) when shuffling. There are `world_size * workers` slots, slot = rank * workers + worker.
With at least as many shards as slots, slot s reads shards `order[s::slots]`; with fewer, every slot
reads all shards and keeps sample i of the epoch stream iff `i % slots == s` (each sample is still
yielded exactly once, at the cost of every slot reading every shard).

Within a slot, a shuffle buffer seeded from (seed, epoch, slot) reorders the raw (still encoded)
samples; batches of `batch_size` decoded samples are formed in the worker; the final batch of an
epoch may be smaller, and every epoch ends with an end-of-epoch message (`batch: None`).

Every message carries `consumed`, the number of raw samples of this worker's epoch stream used so
far, and the worker's error counts for the epoch. To resume, a worker replays its epoch stream and
drops the first `consumed` raw samples without decoding them; the stream (shard order, shuffle
buffer, tar read-ahead) is a pure function of (seed, epoch, slot), so it is then in exactly the
state it was in when the checkpointed batch was made. Errors met while replaying are not counted
again: they are already in the checkpointed counts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random
from typing import Callable, Iterator, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from ldmscale.data.transforms import IMAGE_EXTENSIONS, derive_seed, image_transform

log = logging.getLogger(__name__)

ERROR_KINDS = ("corrupt_sample", "bad_shard", "missing_shard")
# (kind, shard, key) already logged by this process: a bad sample recurs every epoch, and one
# warning per process is enough to find it.
_LOGGED: set[tuple[str, str, str | None]] = set()


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs; plain data so it pickles into worker processes."""

    shards: tuple[str, ...]
    batch_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    epochs: int | None
    resolution: int
    crop: Literal["center", "random"]
    flip: bool
    shuffle: bool
    shuffle_buffer: int
    on_error: Literal["skip", "fail"]
    # Raw sample -> item (None if corrupt) and items -> batch; module-level functions, so they pickle.
    # None: the image pipeline's `decode_sample` and `collate` (data.kind=latents has its own).
    decode: Callable[[dict, "StreamSpec", int, "ErrorTracker"], dict | None] | None = None
    collate: Callable[[list[dict]], dict] | None = None

    @property
    def workers(self) -> int:
        """Worker streams per rank (`num_workers=0` reads in-process: one stream)."""
        return max(1, self.num_workers)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    @property
    def splits_samples(self) -> bool:
        """True when there are fewer shards than slots and samples, not shards, are dealt."""
        return len(self.shards) < self.slots


@dataclasses.dataclass(frozen=True)
class WorkerStart:
    """Where worker w starts: `consumed` raw samples of `epoch` were already delivered."""

    epoch: int
    consumed: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)


class ErrorTracker:
    """Counts, logs, or (with on_error="fail") raises on a bad sample or shard."""

    def __init__(self, on_error: str, counts: dict[str, int]):
        self.on_error = on_error
        self.counts = dict(counts)
        self.silent = False  # while replaying to a resume point

    def problem(self, kind: str, shard: str, key: str | None, error: BaseException, count: bool = True) -> None:
        assert kind in ERROR_KINDS, kind
        where = f"shard {shard}" + (f" at key {key}" if key is not None else "")
        message = f"{kind} in {where}: {type(error).__name__}: {error}"
        if self.on_error == "fail":
            raise RuntimeError(f"{message} (data.on_error=fail)") from error
        if self.silent or not count:
            return
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if (kind, shard, key) not in _LOGGED:
            _LOGGED.add((kind, shard, key))
            log.warning("skipping %s", message)


def epoch_shard_order(shards: tuple[str, ...], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """The sorted shard list, permuted from (seed, epoch) when `shuffle`."""
    order = sorted(shards)
    if shuffle:
        random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return order


class _TailReader:
    """A read-only file wrapper that remembers the last `END_OF_ARCHIVE` bytes it returned."""

    END_OF_ARCHIVE = 1024  # two zero blocks of 512 bytes end every well-formed tar (POSIX ustar)

    def __init__(self, fileobj, url: str):
        self.fileobj = fileobj
        self.url = url
        self.tail = b""

    def __str__(self) -> str:  # webdataset appends the stream to its error messages
        return self.url

    def read(self, size: int = -1) -> bytes:
        data = self.fileobj.read(size)
        if data:
            self.tail = (self.tail + data)[-self.END_OF_ARCHIVE:]
        return data

    def ends_with_marker(self) -> bool:
        while self.read(1 << 16):  # the record padding after the marker, if tarfile left it unread
            pass
        return self.tail == bytes(self.END_OF_ARCHIVE)


def read_shard(url: str, tracker: ErrorTracker, count_errors: bool) -> Iterator[dict]:
    """Raw samples {"__key__", "__url__", ext: bytes} of one tar, in file order.

    Files are read with webdataset's `tar_file_iterator` and grouped by key here, so that a read
    error ends this shard only, not the stream. The sample being assembled when the tar breaks off
    is dropped: it may lack files. A tar cut exactly at a member boundary reads as a normal end of
    archive to `tarfile`, so an uncompressed `.tar` must also end with its zero-block marker.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # FileNotFoundError locally; other errors for remote URLs
        tracker.problem("missing_shard", url, None, e, count_errors)
        return
    current: dict | None = None
    last_key: str | None = None
    try:
        with stream:
            reader = _TailReader(stream, url)
            for entry in tar_file_iterator(reader):
                prefix, suffix = base_plus_ext(entry["fname"])
                if prefix is None:
                    continue
                if current is not None and prefix != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current, last_key = {"__key__": prefix, "__url__": url}, prefix
                current[suffix.lower()] = entry["data"]
            if url.endswith(".tar") and not reader.ends_with_marker():
                raise EOFError("the tar ends without its end-of-archive marker (truncated)")
        if current is not None:
            yield current
    except Exception as e:  # truncated or otherwise unreadable tar: skip from the failure point
        tracker.problem("bad_shard", url, last_key, e, count_errors)


def slot_samples(spec: StreamSpec, epoch: int, slot: int, tracker: ErrorTracker) -> Iterator[dict]:
    """The raw samples of `slot` in `epoch`, before the shuffle buffer."""
    order = epoch_shard_order(spec.shards, spec.seed, epoch, spec.shuffle)
    if not spec.splits_samples:
        for url in order[slot::spec.slots]:
            yield from read_shard(url, tracker, count_errors=True)
        return
    index = 0
    for position, url in enumerate(order):
        # Every slot reads this shard; only one counts its shard-level errors, so totals summed
        # over ranks and workers count each problem once.
        for sample in read_shard(url, tracker, count_errors=position % spec.slots == slot):
            if index % spec.slots == slot:
                yield sample
            index += 1


def shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Approximate shuffle with a buffer of `size` samples, as in webdataset's `shuffle` stage."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        buffer[i], sample = sample, buffer[i]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def decode_sample(sample: dict, spec: StreamSpec, epoch: int, tracker: ErrorTracker) -> dict | None:
    """Raw sample -> {"image" [3,R,R], "caption", "label", "attributes", "key"}; None if corrupt."""
    key, url = sample["__key__"], sample["__url__"]
    try:
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise ValueError(f"no image ({'|'.join(IMAGE_EXTENSIONS)}); sample has "
                             f"{', '.join(k for k in sample if not k.startswith('__'))}")
        image = image_transform(sample[ext], resolution=spec.resolution, crop=spec.crop, flip=spec.flip,
                                seed=spec.seed, epoch=epoch, key=key)  # [3, R, R]
        fields = decode_fields(sample)
    except Exception as e:  # PIL and the parsers raise many types; all mean "this sample is unusable"
        tracker.problem("corrupt_sample", url, key, e)
        return None
    return {"image": image, **fields, "key": key}


def decode_fields(sample: dict) -> dict:
    """The optional caption (txt), label (cls) and attributes (json) of a raw sample; raises if malformed."""
    return {"caption": sample["txt"].decode("utf-8") if "txt" in sample else "",
            "label": int(sample["cls"].decode("ascii")) if "cls" in sample else -1,
            "attributes": [float(a) for a in json.loads(sample["json"]).get("attributes", [])]
            if "json" in sample else []}


def collate(items: list[dict]) -> dict:
    """Decoded samples -> the batch dict yielded by `ResumableLoader`."""
    return {"image": torch.stack([item["image"] for item in items]), **collate_fields(items)}  # [B, 3, R, R]


def collate_fields(items: list[dict]) -> dict:
    """The caption, label, attributes and key entries of a batch (shared by image and latent batches)."""
    lengths = {len(item["attributes"]) for item in items}
    if len(lengths) > 1:
        raise ValueError(f"samples {', '.join(i['key'] for i in items)} have attribute vectors of different "
                         f"lengths {sorted(lengths)}; every sample's json 'attributes' must have the same length")
    return {
        "caption": [item["caption"] for item in items],
        "label": torch.tensor([item["label"] for item in items], dtype=torch.long),  # [B]
        "attributes": torch.tensor([item["attributes"] for item in items],
                                   dtype=torch.float32).reshape(len(items), lengths.pop()),  # [B, A]
        "key": [item["key"] for item in items],
    }


class ShardStream(IterableDataset):
    """The per-worker stream of messages {"worker", "epoch", "consumed", "errors", "batch"}."""

    def __init__(self, spec: StreamSpec, starts: list[WorkerStart]):
        assert len(starts) == spec.workers, (len(starts), spec.workers)
        self.spec = spec
        self.starts = starts

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        assert (info.num_workers if info is not None else 1) == self.spec.workers
        start = self.starts[worker]
        epoch = start.epoch
        while self.spec.epochs is None or epoch < self.spec.epochs:
            yield from self._epoch(worker, epoch, start if epoch == start.epoch else WorkerStart(epoch))
            epoch += 1

    def _epoch(self, worker: int, epoch: int, start: WorkerStart) -> Iterator[dict]:
        spec = self.spec
        slot = spec.rank * spec.workers + worker
        tracker = ErrorTracker(spec.on_error, start.errors)
        samples = slot_samples(spec, epoch, slot, tracker)
        if spec.shuffle:
            samples = shuffle_buffer(samples, spec.shuffle_buffer, random.Random(derive_seed("samples", spec.seed,
                                                                                             epoch, slot)))
        tracker.silent = True
        consumed = sum(1 for _ in itertools.islice(samples, start.consumed))  # replay, no decoding
        tracker.silent = False
        if consumed != start.consumed:
            raise RuntimeError(f"cannot resume: worker {worker} of rank {spec.rank} delivered {start.consumed} samples "
                               f"of epoch {epoch} before the checkpoint but its shards now hold {consumed}; "
                               "the shards changed since the checkpoint")

        def message(batch: dict | None) -> dict:
            return {"worker": worker, "epoch": epoch, "consumed": consumed, "errors": dict(tracker.counts),
                    "batch": batch}

        decode, make_batch = spec.decode or decode_sample, spec.collate or collate
        items: list[dict] = []
        for sample in samples:
            consumed += 1
            item = decode(sample, spec, epoch, tracker)
            if item is None:
                continue
            items.append(item)
            if len(items) == spec.batch_size:
                yield message(make_batch(items))
                items = []
        if items:
            yield message(make_batch(items))  # the partial last batch is kept, not dropped
        yield message(None)
