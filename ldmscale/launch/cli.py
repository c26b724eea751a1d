"""The `ldmscale` command line: argument parsing only; every verb calls into the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_").replace("_", "-")] = fn
    return fn


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(args: argparse.Namespace):
    from ldmscale.config.schema import load_run_config

    return load_run_config(args.config, args.overrides)


@command
def cmd_train(args: argparse.Namespace) -> int:
    from ldmscale.training.trainer import Trainer

    cfg = _load(args)
    Trainer(cfg).fit()
    return 0


@command
def cmd_info(args: argparse.Namespace) -> int:
    from ldmscale.launch.info import info_command

    print(info_command(_load(args), args.gpus, args.json))
    return 0


@command
def cmd_synth(args: argparse.Namespace) -> int:
    from ldmscale.data.synthetic import write_synthetic_shards

    manifest = write_synthetic_shards(args.out, num_samples=args.num, resolution=args.resolution, seed=args.seed,
                                      samples_per_shard=args.samples_per_shard)
    print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shards to {args.out}")
    return 0


@command
def cmd_make_shards(args: argparse.Namespace) -> int:
    from ldmscale.data.make_shards import make_shards

    manifest = make_shards(args.src, args.out, resolution=args.resolution, samples_per_shard=args.samples_per_shard)
    print(f"wrote {manifest['total']} samples in {len(manifest['shards'])} shards to {args.out}"
          f" ({len(manifest.get('skipped', []))} unreadable files skipped)")
    return 0


@command
def cmd_quickstart(args: argparse.Namespace) -> int:
    from ldmscale.pipelines.quickstart import run_quickstart

    report = run_quickstart(args.out, size=args.size)
    print(f"quickstart done: report in {args.out}/report.md "
          f"(autoencoder PSNR {report['autoencoder']['psnr']:.2f} dB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmscale", description="Latent diffusion training at cluster scale.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", help="YAML run config")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        return p

    with_config(sub.add_parser("train", help="train any stage (multi-rank under torchrun / deepspeed / srun)"))
    info = with_config(sub.add_parser("info", help="parameter counts and per-GPU memory under ZeRO 0-3"))
    info.add_argument("--gpus", type=int, default=8, help="number of GPUs to plan for (default 8)")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    quick = sub.add_parser("quickstart", help="the whole pipeline on one CPU on synthetic data")
    quick.add_argument("--out", default="outputs/quickstart")
    quick.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: the test-sized run")

    synth = sub.add_parser("synth", help="write the synthetic shapes dataset as webdataset shards")
    synth.add_argument("out")
    synth.add_argument("--num", type=int, default=2000)
    synth.add_argument("--resolution", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--samples-per-shard", type=int, default=250)

    shards = sub.add_parser("make-shards", help="turn an image folder (class subfolders, .txt captions) into shards")
    shards.add_argument("src")
    shards.add_argument("out")
    shards.add_argument("--resolution", type=int, default=None)
    shards.add_argument("--samples-per-shard", type=int, default=1000)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except ValueError as e:  # user errors: bad config, bad arguments, bad input files
        print(f"ldmscale {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
