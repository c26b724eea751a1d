"""A corrupt image, a truncated tar and a missing shard: skipped, counted and logged, or fatal."""

from __future__ import annotations

import collections
import io
import logging
import tarfile

import pytest

from ldmscale.data.shards import ImageDataConfig, build_image_loader
from ldmscale.data.synthetic import write_synthetic_shards

CORRUPT_KEY = "s2_000003"  # in shard-000000


def members(path):
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """4 shards x 8 samples; shard 0 has an undecodable png, shard 1 is cut inside its 3rd sample.

    Returns (folder, keys expected to survive one epoch)."""
    folder = tmp_path_factory.mktemp("broken")
    write_synthetic_shards(folder, num_samples=32, resolution=32, samples_per_shard=8, seed=2, progress=False)
    first = folder / "shard-000000.tar"
    entries = members(first)
    with tarfile.open(first, "w") as tar:
        for member, data in entries:
            if member.name == f"{CORRUPT_KEY}.png":
                data = b"\x89PNG\r\n\x1a\n garbage instead of pixels"
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))

    second = folder / "shard-000001.tar"
    entries = members(second)
    cut = entries[9][0].offset_data + 100  # inside the 10th file: the json of the 3rd sample
    second.write_bytes(second.read_bytes()[:cut])
    # A sample reaches the loader once the first file of the next sample has been read whole;
    # the sample being read when the tar breaks off is dropped.
    firsts = [m for m, _ in entries if m.name.endswith(".cls")]
    survivors = [m.name.split(".")[0] for m, nxt in zip(firsts, firsts[1:]) if nxt.offset_data + nxt.size <= cut]
    assert survivors == ["s2_000008", "s2_000009"]

    expected = {f"s2_{i:06d}" for i in range(32)} - {CORRUPT_KEY} - {f"s2_{i:06d}" for i in range(8, 16)}
    return folder, expected | set(survivors)


def test_problems_are_skipped_counted_and_logged_once(broken, caplog):
    folder, expected = broken
    pattern = str(folder / "shard-{000000..000004}.tar")  # shard-000004.tar does not exist
    for num_workers in (0, 2):
        cfg = ImageDataConfig(shards=pattern, resolution=32, num_workers=num_workers, shuffle_buffer=4)
        loader = build_image_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0, epochs=2)
        with caplog.at_level(logging.WARNING, logger="ldmscale.data.stream"):
            keys = collections.Counter(k for batch in loader for k in batch["key"])
        assert set(keys) == expected and set(keys.values()) == {2}  # the rest, once in each epoch
        assert loader.error_counts == {"corrupt_sample": 2, "bad_shard": 2, "missing_shard": 2}
    # Logged by the in-process run (workers log in their own processes), once per problem.
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3
    assert any("corrupt_sample" in m and "shard-000000.tar at key s2_000003" in m for m in logged)
    assert any("bad_shard" in m and "shard-000001.tar at key s2_000010" in m for m in logged)
    assert any("missing_shard" in m and "shard-000004.tar" in m for m in logged)


@pytest.mark.parametrize("shards, num_workers, message", [
    ("shard-000000.tar", 2, r"corrupt_sample in shard \S*shard-000000.tar at key s2_000003"),
    ("shard-00000{1,2}.tar", 0, r"bad_shard in shard \S*shard-000001.tar at key s2_000010"),
    ("shard-00000{2,4}.tar", 0, r"missing_shard in shard \S*shard-000004.tar"),
])
def test_on_error_fail_raises_naming_the_shard(broken, shards, num_workers, message):
    folder, _ = broken
    cfg = ImageDataConfig(shards=str(folder / shards), resolution=32, num_workers=num_workers, on_error="fail")
    loader = build_image_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)
    with pytest.raises(RuntimeError, match=message):
        for _ in loader:
            pass
