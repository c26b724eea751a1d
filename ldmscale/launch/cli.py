"""The `ldmscale` command line: argument parsing only; every verb calls into the library."""

from __future__ import annotations

import argparse
import dataclasses
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
def cmd_cache_latents(args: argparse.Namespace) -> int:
    from ldmscale.pipelines.cache_latents import cache_latents, load_cache_config

    summary = cache_latents(load_cache_config(args.config, args.overrides))
    print(f"wrote {summary['written']} shard(s) ({summary['samples']} samples), {summary['skipped_shards']} already "
          f"complete; {'set complete' if summary['complete'] else 'set not complete yet'}")
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
    failed = [name for name, check in report["checks"].items() if not check["passed"]]
    print(f"quickstart done in {report['total_seconds']:.0f} s: report in {args.out}/report.md; "
          + (f"below threshold: {', '.join(failed)}" if failed else "every check passed"))
    return 1 if failed else 0


@command
def cmd_sample(args: argparse.Namespace) -> int:
    from ldmscale.pipelines.sample import sample_to_png

    path = sample_to_png(args.checkpoint, args.out, prompt=args.prompt, class_label=args.class_label, num=args.num,
                         steps=args.steps, eta=args.eta, guidance=args.guidance, seed=args.seed, device=args.device)
    print(f"wrote {args.num} samples to {path}")
    return 0


@command
def cmd_submit(args: argparse.Namespace) -> int:
    from ldmscale.launch import slurm

    fields = [f.name for f in dataclasses.fields(slurm.SlurmConfig)]  # the options carry the fields' names
    cfg = slurm.SlurmConfig(**{name: getattr(args, name) for name in fields})
    sub = slurm.prepare(cfg, args.config, args.overrides, verb=args.verb)
    if args.dry_run:
        print(f"# {slurm.describe(sub)}")
        print(f"# run dir {sub.run_dir}; submitit folder and per-task logs {sub.folder}")
        print("# ---- sbatch script ----")
        print(slurm.sbatch_script(sub))
        print("# ---- environment of every task (the exports above, as submitted from this shell) ----")
        for key, value in slurm.job_environment(sub).items():
            print(f"{key}={value}")
        return 0
    jobs = slurm.submit(sub)
    job_id = jobs[0].job_id.split("_")[0]
    print(f"submitted job {job_id} ({slurm.describe(sub)})")
    logs = str(sub.folder).replace("%j", job_id if len(jobs) == 1 else f"{job_id}_*")
    print(f"  run dir: {sub.run_dir}\n  logs:    {logs}/*_log.{{out,err}} (one pair per task)\n"
          f"  cancel:  scancel {job_id}", flush=True)
    if not args.wait:
        return 0
    results = slurm.wait(jobs)
    for result in results:
        print(f"job ended: {result}")
    return 0 if all(r["status"] == "completed" for r in results) else 1


@command
def cmd_convert(args: argparse.Namespace) -> int:
    from ldmscale.convert.commands import run_action

    print(f"wrote {run_action(args)}")
    return 0

@command
def cmd_pdae(args: argparse.Namespace) -> int:
    from ldmscale.pipelines import pdae

    if args.action != "probe" and not args.out:
        raise ValueError(f"--out: required for pdae {args.action} (the output PNG)")
    steps = dict(encode_steps=args.encode_steps, decode_steps=args.decode_steps, device=args.device)
    if args.action == "reconstruct":
        path, mse = pdae.reconstruct_to_png(args.checkpoint, args.input, args.out, num=args.num, **steps)
        print(f"wrote {path} (inputs over reconstructions; pixel MSE {mse:.5f})")
    elif args.action == "interpolate":
        path = pdae.interpolate_to_png(args.checkpoint, args.input, args.out, pairs=args.pairs, num=args.num, **steps)
        print(f"wrote {path}")
    elif args.action == "edit":
        path = pdae.edit_to_png(args.checkpoint, args.input, args.out, attribute=args.attribute, scales=args.scales,
                                num=args.num, **steps)
        print(f"wrote {path} (one row per image, one column per scale)")
    else:
        report = pdae.probe(args.checkpoint, args.input, held_out=args.held_out, device=args.device)
        for name, r in report.items():
            print(f"{name:16s} accuracy {r['accuracy']:.3f}  majority baseline {r['baseline']:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldmscale", description="Latent diffusion training at cluster scale.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("config", help="YAML run config")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        return p

    with_config(sub.add_parser("train", help="train any stage (multi-rank under torchrun / deepspeed / srun)"))
    with_config(sub.add_parser("cache-latents", help="encode image shards once into latent shards (one rank or "
                               "Slurm array task per shard range; rerun to finish)"))
    info = with_config(sub.add_parser("info", help="parameter counts and per-GPU memory under ZeRO 0-3"))
    info.add_argument("--gpus", type=int, default=8, help="number of GPUs to plan for (default 8)")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    quick = sub.add_parser("quickstart", help="the whole pipeline on one CPU on synthetic data")
    quick.add_argument("--out", default="outputs/quickstart")
    quick.add_argument("--size", choices=["full", "tiny"], default="full", help="tiny: the test-sized run")

    sample = sub.add_parser("sample", help="a PNG grid from a latent diffusion export (DDIM + CFG)")
    sample.add_argument("checkpoint", help="an LDM export, or a run directory (then its export/ldm.safetensors)")
    what = sample.add_mutually_exclusive_group()
    what.add_argument("--prompt", help="text prompt (text-conditional models)")
    what.add_argument("--class", dest="class_label", type=int, metavar="K", help="class id (class-conditional models)")
    sample.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    sample.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 0)")
    sample.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale; 1 disables")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    sample.add_argument("--out", required=True, help="output PNG")

    pdae_parser = sub.add_parser("pdae", help="PDAE: reconstruct, interpolate, edit (PNG grids) or probe z")
    pdae_parser.add_argument("action", choices=["reconstruct", "interpolate", "edit", "probe"])
    pdae_parser.add_argument("checkpoint", help="a PDAE export, or a run directory (then its export/pdae.safetensors)")
    pdae_parser.add_argument("--input", required=True, help="shards (a folder of tars or a brace pattern), an image, "
                             "or a folder of images; edit and probe need shards with attributes")
    pdae_parser.add_argument("--out", help="output PNG (all actions but probe)")
    pdae_parser.add_argument("--num", type=int, default=8, help="images (reconstruct, edit) or images per row "
                             "(interpolate)")
    pdae_parser.add_argument("--pairs", type=int, default=2, help="interpolate: number of input pairs")
    pdae_parser.add_argument("--attribute", default="is_circle", help="edit: attribute name or column")
    pdae_parser.add_argument("--scales", type=float, nargs="+", default=[-0.3, -0.1, 0.0, 0.1, 0.3],
                             help="edit: steps along the attribute direction (standardised z units / sqrt(d))")
    pdae_parser.add_argument("--held-out", type=float, default=0.25, help="probe: held-out fraction (the last inputs)")
    pdae_parser.add_argument("--encode-steps", type=int, default=100, help="shifted DDIM inversion steps")
    pdae_parser.add_argument("--decode-steps", type=int, default=100, help="shifted DDIM decoding steps")
    pdae_parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")

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
    from ldmscale.launch.slurm import VERBS, SlurmConfig  # light: stdlib + submitit

    slurm_defaults = SlurmConfig()
    submit = with_config(sub.add_parser(
        "submit", help="run as a Slurm job through submitit (one task per GPU; requeued on time limit / preemption)",
        description="Give the overrides right after CONFIG, before the options."))
    submit.add_argument("--nodes", type=int, default=slurm_defaults.nodes)
    submit.add_argument("--gpus-per-node", type=int, default=slurm_defaults.gpus_per_node,
                        help="one task per GPU (default %(default)s); 0: a CPU job on gloo")
    submit.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node when --gpus-per-node 0")
    submit.add_argument("--cpus-per-task", type=int, default=None, help="data workers + 1 is a good start")
    submit.add_argument("--mem", default=None, help="sbatch --mem per node, e.g. 480G; 0 = all of it")
    submit.add_argument("--time", type=int, default=slurm_defaults.time, help="minutes (default %(default)s)")
    submit.add_argument("--partition", default=None)
    submit.add_argument("--account", default=None)
    submit.add_argument("--qos", default=None)
    submit.add_argument("--constraint", default=None)
    submit.add_argument("--job-name", default=None, help="default ldmscale-VERB-<run dir name>")
    submit.add_argument("--gres", action="store_true", help="ask for GPUs as --gres=gpu:G (older clusters)")
    submit.add_argument("--signal-delay", type=int, default=slurm_defaults.signal_delay,
                        help="seconds before the time limit at which USR2 makes the job checkpoint and requeue "
                             "(default %(default)s)")
    submit.add_argument("--max-requeues", type=int, default=slurm_defaults.max_requeues,
                        help="restarts after time limits and preemptions, in all (default %(default)s)")
    submit.add_argument("--verb", default="train", help=f"one of {', '.join(VERBS)} (default %(default)s)")
    submit.add_argument("--array", type=int, default=None, help="cache-latents: number of array tasks")
    submit.add_argument("--array-parallelism", type=int, default=None, help="array tasks running at once")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="export in every task (wins over the NCCL/OMP defaults); repeatable")
    submit.add_argument("--sbatch", action="append", default=[], metavar="KEY[=VALUE]",
                        help="any other sbatch option, e.g. reservation=big or exclusive; repeatable")
    submit.add_argument("--logs", default=None, help="submitit folder and per-task logs (default RUN_DIR/slurm)")
    submit.add_argument("--dry-run", action="store_true", help="print the sbatch script and environment only")
    submit.add_argument("--wait", action="store_true", help="block until the job ends, requeues included")
    from ldmscale.convert.commands import add_convert_arguments  # light: argparse only

    add_convert_arguments(sub.add_parser(
        "convert", help="checkpoints: DeepSpeed shards -> safetensors; ldmscale <-> original SD file <-> diffusers"))
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
