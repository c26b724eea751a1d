"""Deterministic shuffling: order from (seed, epoch); augmentation independent of the worker count."""

from __future__ import annotations

import random

import torch

from ldmscale.data.shards import ImageDataConfig, build_image_loader
from ldmscale.data.stream import epoch_shard_order


def epoch_orders(folder, *, seed, num_workers=2, shuffle=True, crop="center", epochs=2):
    """Per epoch, the keys in the order yielded, and key -> image."""
    cfg = ImageDataConfig(shards=str(folder), resolution=32, num_workers=num_workers, shuffle=shuffle, crop=crop,
                          shuffle_buffer=8)
    loader = build_image_loader(cfg, batch_size=8, rank=0, world_size=1, seed=seed, epochs=epochs)
    orders: list[list[str]] = [[] for _ in range(epochs)]
    images = {}
    for batch in loader:
        epoch = len([o for o in orders if len(o) == 128])  # 128 samples per epoch
        orders[epoch] += batch["key"]
        images.update({(epoch, k): x for k, x in zip(batch["key"], batch["image"])})
    return orders, images


def test_same_seed_and_epoch_same_order_other_epoch_or_seed_other_order(even_shards):
    first, _ = epoch_orders(even_shards, seed=3)
    again, _ = epoch_orders(even_shards, seed=3)
    other_seed, _ = epoch_orders(even_shards, seed=4)
    assert first == again
    assert sorted(first[0]) == sorted(first[1]) and first[0] != first[1]
    assert first[0] != other_seed[0]
    shards = tuple(f"s{i}.tar" for i in range(8))
    assert epoch_shard_order(shards, 3, 0, True) == epoch_shard_order(shards, 3, 0, True)
    assert epoch_shard_order(shards, 3, 0, True) != epoch_shard_order(shards, 3, 1, True)
    assert epoch_shard_order(shards[::-1], 3, 0, False) == list(shards)


def test_without_shuffle_one_worker_reads_in_file_order(even_shards):
    orders, _ = epoch_orders(even_shards, seed=0, num_workers=0, shuffle=False, epochs=1)
    assert orders[0] == [f"s0_{i:06d}" for i in range(128)]


def test_augmentation_does_not_depend_on_the_number_of_workers(even_shards):
    _, in_process = epoch_orders(even_shards, seed=5, num_workers=0, crop="random")
    _, two_workers = epoch_orders(even_shards, seed=5, num_workers=2, crop="random")
    assert in_process.keys() == two_workers.keys()
    assert all(torch.equal(in_process[k], two_workers[k]) for k in in_process)
    # ... while they do change from one epoch to the next: the images are square, so only the flip
    # varies, and about half of the 128 samples get the other flip in epoch 1.
    changed = sum(not torch.equal(in_process[(0, k)], in_process[(1, k)]) for e, k in in_process if e == 0)
    assert 32 < changed < 96


def test_loading_leaves_the_global_rngs_alone(even_shards):
    # Building and iterating the loader must not draw from the trainer's RNGs, or an exactly resumed
    # run (which rebuilds the loader after restoring them) would draw different noise.
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    for num_workers in (0, 2):
        cfg = ImageDataConfig(shards=str(even_shards), resolution=32, num_workers=num_workers, crop="random")
        next(iter(build_image_loader(cfg, batch_size=4, rank=0, world_size=1, seed=0)))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
