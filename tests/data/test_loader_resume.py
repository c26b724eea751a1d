"""Exact resume: a fresh loader given `state_dict()` yields exactly the batches that would have come next."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from ldmscale.data.shards import ImageDataConfig, build_image_loader

EPOCHS = 3


@pytest.fixture(scope="module")
def shards_with_a_corrupt_sample(uneven_shards, tmp_path_factory):
    """The uneven set (7 shards, 100 samples) with one undecodable png and, through the pattern, a
    missing 8th shard, so that error counts are restored too (including problems met while the
    resumed loader replays its stream)."""
    folder = tmp_path_factory.mktemp("resume")
    for shard in sorted(uneven_shards.glob("*.tar")):
        with tarfile.open(shard) as src, tarfile.open(folder / shard.name, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name == "s1_000020.png":
                    data = b"not a png"
                    member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
    return str(folder / "shard-{000000..000007}.tar")


def make_loader(folder, num_workers):
    cfg = ImageDataConfig(shards=folder, resolution=32, crop="random", flip=True, num_workers=num_workers,
                          shuffle_buffer=10)
    return build_image_loader(cfg, batch_size=6, rank=0, world_size=1, seed=11, epochs=EPOCHS)


def assert_same_batches(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a["key"] == e["key"]
        assert torch.equal(a["image"], e["image"])
        assert torch.equal(a["label"], e["label"]) and torch.equal(a["attributes"], e["attributes"])
        assert a["caption"] == e["caption"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_uninterrupted_batches(shards_with_a_corrupt_sample, num_workers):
    reference = make_loader(shards_with_a_corrupt_sample, num_workers)
    batches, states, epochs = [], [], []
    for batch in reference:
        batches.append(batch)
        states.append(json.loads(json.dumps(reference.state_dict())))  # as a checkpoint stores it
        epochs.append(reference.epoch)
    assert sum(len(b["key"]) for b in batches) == 99 * EPOCHS  # 100 samples, one corrupt
    assert reference.error_counts == {"corrupt_sample": EPOCHS, "bad_shard": 0, "missing_shard": EPOCHS}

    first_of_epoch_1 = epochs.index(1)  # the epoch advances lazily, when the next batch is asked for
    # A worker that has finished its epoch while another has not (the re-sequencing buffer is in use).
    one_finished = [k for k, s in enumerate(states) if any(w["finished"] for w in s["workers"])
                    and not all(w["finished"] for w in s["workers"])]
    assert bool(one_finished) == (num_workers == 2)
    resume_points = sorted({2, 3,  # mid-epoch 0 (either worker next), then across two epoch boundaries
                            *one_finished[:1],  # one worker done with epoch 0, the other not
                            first_of_epoch_1 - 1,  # right after the last batch of epoch 0
                            first_of_epoch_1 + 2})  # inside epoch 1
    for k in resume_points:
        resumed = make_loader(shards_with_a_corrupt_sample, num_workers)
        resumed.load_state_dict(states[k])
        assert resumed.epoch == epochs[k]
        rest = list(resumed)
        assert_same_batches(rest, batches[k + 1:])
        assert resumed.error_counts == reference.error_counts


def test_resuming_with_another_setup_is_refused(uneven_shards):
    loader = make_loader(str(uneven_shards), 0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    del it
    other = make_loader(str(uneven_shards), 2)
    with pytest.raises(ValueError, match="num_workers: saved 0, now 2"):
        other.load_state_dict(state)
