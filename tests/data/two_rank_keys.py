"""Run by `test_shard_split.py` under `torch.distributed.run --nproc_per_node 2`: each rank reads one
epoch of the shards with 2 workers and writes the keys it saw to OUT/rank-<RANK>.json.

Ranks come from torchrun's environment, as the trainer passes them; no process group is needed
because the data pipeline never communicates between ranks."""

import json
import os
import sys
from pathlib import Path

from ldmscale.data.shards import ImageDataConfig, build_image_loader

if __name__ == "__main__":
    shards, out = sys.argv[1], Path(sys.argv[2])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = ImageDataConfig(shards=shards, resolution=32, num_workers=2)
    loader = build_image_loader(cfg, batch_size=5, rank=rank, world_size=world_size, seed=7, epochs=1)
    keys = [k for batch in loader for k in batch["key"]]
    (out / f"rank-{rank}.json").write_text(json.dumps(keys))
