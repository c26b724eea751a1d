"""Latent diffusion training from cached latents vs on-the-fly encoding, and cache-latents throughput.

MosaicML reports 1.4x slower SD training without cached latents, fast-DiT 1.5x: at 512 px the
autoencoder's encoder costs more than the UNet's forward. This script measures the ratio for
ldmscale's own paths with the same UNet, autoencoder, text tower, data and seed:

1. writes `--samples` synthetic images at `--resolution` as shards and exports an autoencoder with
   random weights (an SD-style KL autoencoder scaled down by `--ae-channels` / `--ae-mult`);
2. `cache-latents` (in this process, `LatentCacher`): moments, flipped moments and text-tower outputs;
   its samples/s is the cache throughput;
3. `ldmscale train` twice as separate processes, `data.kind=images` (encoding every step) and
   `data.kind=latents`, `--steps` steps each; the throughput is the median `samples_per_sec` of
   metrics.jsonl (data loading + step, logged every step) after `--warmup` steps.
Prints the samples/s of each and the ratio cached / on-the-fly.

    PYTHONPATH=. .venv/bin/python bench/cached_vs_online.py                   # the CPU numbers of docs/benchmarks.md
    PYTHONPATH=. .venv/bin/python bench/cached_vs_online.py --resolution 256 --ae-channels 128 --threads 0   # a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ldmscale.checkpoint.export import export_weights
from ldmscale.config.load import config_to_dict, load_config
from ldmscale.config.schema import load_run_config
from ldmscale.data.synthetic import write_synthetic_shards
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.pipelines.cache_latents import CacheLatentsConfig, LatentCacher

ROOT = Path(__file__).resolve().parents[1]
DEBUG_AE = ROOT / "configs" / "debug" / "autoencoder.yaml"
DEBUG_LDM = ROOT / "configs" / "debug" / "ldm.yaml"
DEBUG_CACHE = ROOT / "configs" / "debug" / "cache_latents.yaml"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=16)
    p.add_argument("--ae-channels", type=int, default=64, help="autoencoder base channels (SD: 128)")
    p.add_argument("--ae-mult", type=int, nargs="+", default=[1, 2, 4, 4], help="SD: 1 2 4 4 (f = 8)")
    p.add_argument("--ae-res-blocks", type=int, default=2)
    p.add_argument("--unet-channels", type=int, default=64, help="UNet model_channels (SD: 320)")
    p.add_argument("--unet-mult", type=int, nargs="+", default=[1, 2, 4, 4])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="logged steps left out of the median")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (0: torch's choice)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="stored moments")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="also cache the flipped image's moments (a second encoder pass per sample)")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def export_autoencoder(args: argparse.Namespace, path: Path) -> Path:
    overrides = [f"task.model.base_channels={args.ae_channels}", f"task.model.channel_mult={args.ae_mult}",
                 f"task.model.num_res_blocks={args.ae_res_blocks}", f"task.model.resolution={args.resolution}",
                 f"data.resolution={args.resolution}", "task.model.norm_groups=32"]
    cfg = load_run_config(str(DEBUG_AE), overrides)
    torch.manual_seed(0)
    model = Autoencoder(dataclasses.replace(cfg.task.model, scale_factor=0.18215))
    return export_weights(model.state_dict(), path, config=config_to_dict(cfg),
                          metadata={"stage": "autoencoder", "network": "autoencoder", "scale_factor": 0.18215})


def train_throughput(args: argparse.Namespace, run_dir: Path, data: list[str], autoencoder: Path) -> float:
    """Median samples/s of `ldmscale train` (debug LDM with the requested UNet width) after the warm-up steps."""
    overrides = [f"run.dir={run_dir}", f"task.autoencoder={autoencoder}", f"train.max_steps={args.steps}",
                 f"train.micro_batch_size={args.batch}", "train.log_every=1", "train.image_every=0",
                 "train.progress=false", f"checkpoint.every_steps={args.steps + 1}",
                 f"data.resolution={args.resolution}", "data.num_workers=1", "data.flip=true", f"task.unet.model_channels={args.unet_channels}",
                 f"task.unet.channel_mult={args.unet_mult}", "task.unet.attention_resolutions=[4,2,1]", *data]
    accelerator = os.environ.get("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR=accelerator)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run([sys.executable, "-m", "ldmscale", "train", str(DEBUG_LDM), *overrides], env=env, check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_sec"] for r in records if "samples_per_sec" in r and r["step"] > args.warmup]
    return statistics.median(rates)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_shards(tmp / "images", num_samples=args.samples, resolution=args.resolution, seed=0,
                               samples_per_shard=args.samples_per_shard, progress=False)
        autoencoder = export_autoencoder(args, tmp / "autoencoder.safetensors")
        cache_cfg = load_config(CacheLatentsConfig, DEBUG_CACHE, [
            f"cache.autoencoder={autoencoder}", f"cache.shards={tmp / 'images'}", f"cache.out={tmp / 'latents'}",
            f"cache.resolution={args.resolution}", f"cache.dtype={args.dtype}", "cache.progress=false",
            f"cache.batch_size={args.batch}", f"cache.flip={str(args.flip).lower()}"])
        start = time.perf_counter()
        summary = LatentCacher(cache_cfg).run()
        cache_rate = summary["samples"] / (time.perf_counter() - start)
        online = train_throughput(args, tmp / "online", [f"data.shards={tmp / 'images'}"], autoencoder)
        cached = train_throughput(args, tmp / "cached", ["data.kind=latents", f"data.shards={tmp / 'latents'}"],
                                  autoencoder)
    result = {"resolution": args.resolution, "batch": args.batch, "steps": args.steps, "threads": args.threads,
              "ae_channels": args.ae_channels, "unet_channels": args.unet_channels, "cache_flip": args.flip,
              "device": "cuda" if torch.cuda.is_available() else platform.processor() or platform.machine(),
              "torch": torch.__version__, "cache_samples_per_sec": round(cache_rate, 3),
              "online_samples_per_sec": round(online, 3), "cached_samples_per_sec": round(cached, 3),
              "speedup_cached_over_online": round(cached / online, 3)}
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
