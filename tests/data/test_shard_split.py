"""Every sample exactly once per epoch across ranks and workers; the few-shards fallback; config."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ldmscale.config.load import ConfigError, config_from_dict
from ldmscale.data.shards import DATA_SOURCES, ImageDataConfig, build_image_loader
from ldmscale.data.synthetic import write_synthetic_shards

REPO = Path(__file__).resolve().parents[2]


def rank_batches(shards, *, world_size, num_workers, epochs, batch_size=5):
    """Each rank's batches. The ranks run as two loaders in this process: the data package gets
    rank and world size as arguments and never talks to torch.distributed, so this is the same
    split a 2-process launch makes."""
    cfg = ImageDataConfig(shards=str(shards), resolution=32, num_workers=num_workers, crop="random")
    loaders = [build_image_loader(cfg, batch_size=batch_size, rank=r, world_size=world_size, seed=7, epochs=epochs)
               for r in range(world_size)]
    return [list(loader) for loader in loaders], loaders


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(even_shards, keys_by_shard):
    all_keys = {k for keys in keys_by_shard(even_shards).values() for k in keys}
    assert len(all_keys) == 128
    batches, loaders = rank_batches(even_shards, world_size=2, num_workers=2, epochs=2)
    # 8 shards over 4 slots: 2 shards = 32 samples per worker per epoch -> 6 batches of 5 + 1 of 2,
    # so 14 batches per rank and epoch; epochs never interleave, so the first 14 are epoch 0.
    assert [len(rank) for rank in batches] == [28, 28]
    for epoch in range(2):
        keys = [k for rank in batches for b in rank[epoch * 14:(epoch + 1) * 14] for k in b["key"]]
        assert len(keys) == 128 and set(keys) == all_keys
        sizes = sorted(len(b["key"]) for b in batches[0][epoch * 14:(epoch + 1) * 14])
        assert sizes == [2, 2] + [5] * 12
    assert all(loader.epoch == 2 for loader in loaders)
    b = batches[0][0]
    assert b["image"].shape == (5, 3, 32, 32) and b["label"].shape == (5,) and b["attributes"].shape == (5, 14)
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0


def test_fewer_shards_than_slots_splits_samples(tmp_path, caplog):
    write_synthetic_shards(tmp_path, num_samples=40, resolution=32, samples_per_shard=16, progress=False)  # 3 shards
    with caplog.at_level(logging.WARNING, logger="ldmscale.data.shards"):
        batches, _ = rank_batches(tmp_path, world_size=2, num_workers=2, epochs=1, batch_size=4)
    assert "3 shard(s) for 2 rank(s) x 2 worker(s)" in caplog.text
    keys = [k for rank in batches for b in rank for k in b["key"]]
    assert sorted(keys) == [f"s0_{i:06d}" for i in range(40)]  # all 40, none twice
    # Sample i of the epoch goes to slot i % 4: 10 samples each, i.e. 20 per rank.
    assert [sum(len(b["key"]) for b in rank) for rank in batches] == [20, 20]


def test_config_loads_strictly_and_builds_through_the_registry(even_shards):
    cfg = config_from_dict(ImageDataConfig, {"kind": "images", "shards": str(even_shards), "crop": "random",
                                             "num_workers": 0})
    loader = DATA_SOURCES.build(cfg, batch_size=64, rank=0, world_size=1, seed=0, epochs=1)
    assert sum(len(b["key"]) for b in loader) == 128
    with pytest.raises(ConfigError) as e:
        config_from_dict(ImageDataConfig, {"crop": "middle", "colour": 1})
    assert "crop: invalid value 'middle'; valid values: center, random" in str(e.value)
    assert "colour: unknown key" in str(e.value)
    with pytest.raises(ConfigError, match="num_workers: must be >= 0"):
        config_from_dict(ImageDataConfig, {"num_workers": -1})


def test_bad_shard_specs_are_value_errors(tmp_path):
    for spec, message in [("", "data.shards: empty"), (str(tmp_path), "contains no .tar shards"),
                          (str(tmp_path / "nope"), "neither a folder")]:
        with pytest.raises(ValueError, match=message):
            build_image_loader(ImageDataConfig(shards=spec), batch_size=2, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="data.validation_shards: empty"):
        build_image_loader(ImageDataConfig(shards=str(tmp_path)), batch_size=2, rank=0, world_size=1, seed=0,
                           split="validation")


def test_real_two_process_launch_reads_each_sample_once(even_shards, keys_by_shard, tmp_path):
    with socket.socket() as s:  # a free port for the (unused) rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                    str(Path(__file__).with_name("two_rank_keys.py")), str(even_shards), str(tmp_path)],
                   env=env, check=True, timeout=120, capture_output=True)
    per_rank = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [len(keys) for keys in per_rank] == [64, 64]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(k for keys in keys_by_shard(even_shards).values() for k in keys)
