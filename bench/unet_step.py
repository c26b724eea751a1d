"""One UNet training step (forward + backward): ldmscale's UNet against diffusers' `UNet2DConditionModel`.

Both networks have the same architecture and the same weights: ours is exported under the original
checkpoint names and converted with diffusers' own `convert_ldm_unet_checkpoint` (as
tests/models/test_unet.py does), and the two outputs are checked to agree before anything is timed.
Both use torch's scaled_dot_product_attention (ours: `attention: sdpa`; diffusers: `AttnProcessor2_0`).

Time: the median over `--repeats` steps per model, the two models alternating so that a change in
machine load hits both. Peak memory over one step: on a GPU `torch.cuda.max_memory_allocated`; on a
CPU the torch profiler's memory timeline (`export_memory_timeline`), whose peak `total` counts every
tensor torch allocates (parameters, gradients, activations, temporaries) and whose `activations`
peak leaves out parameters and gradients, which are the same for both networks by construction.
`--no-memory` skips it. Prints the ratios ours / theirs.

    python bench/unet_step.py                          # the reduced SD2-like UNet of docs/benchmarks.md
    python bench/unet_step.py --model-channels 320 --context-dim 1024 --latent 64 --device cuda   # SD2-base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

import torch

from ldmscale.models.unet import UNet, UNetConfig
from ldmscale.nn.attention import set_attention_backend


# Columns of the torch profiler's memory timeline (torch.profiler._memory_profiler: a leading unused
# column, then its categories in `_CATEGORY_TO_INDEX` order, then tensors it could not categorise).
TIMELINE_COLUMNS = ("unused", "parameter", "optimizer_state", "input", "temporary", "activation", "gradient",
                    "autograd_detail", "unknown")
WEIGHT_COLUMNS = ("parameter", "optimizer_state", "gradient")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-channels", type=int, default=64)
    p.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 4, 4])
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--attention-resolutions", type=int, nargs="+", default=[4, 2, 1])
    p.add_argument("--head-channels", type=int, default=32)
    p.add_argument("--context-dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px images with an f8 autoencoder)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args()


def unet_config(args: argparse.Namespace) -> UNetConfig:
    """An SD2-style UNet (Linear transformer projections, fixed head width) of the requested size."""
    return UNetConfig(in_channels=4, out_channels=4, model_channels=args.model_channels,
                      num_res_blocks=args.num_res_blocks, attention_resolutions=args.attention_resolutions,
                      channel_mult=args.channel_mult, num_heads=-1, num_head_channels=args.head_channels,
                      context_dim=args.context_dim, use_linear_in_transformer=True)


def diffusers_twin(ours: UNet, cfg: UNetConfig) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with our weights, via its original-checkpoint converter."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils
    from diffusers.models.attention_processor import AttnProcessor2_0

    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    params = {k: v for k, v in vars(cfg).items() if k not in ("gradient_checkpointing", "dropout") and v != -1}
    params.pop("num_classes")
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    config = single_file_utils.create_unet_diffusers_config_from_ldm(original, checkpoint)
    converted = single_file_utils.convert_ldm_unet_checkpoint(checkpoint, config)
    assert len(converted) == len(checkpoint), "every tensor maps to exactly one diffusers tensor"
    theirs = UNet2DConditionModel(**config)
    theirs.load_state_dict(converted, strict=True)
    theirs.set_attn_processor(AttnProcessor2_0())  # torch SDPA, as ours
    return theirs


def make_step(model: torch.nn.Module, call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        call().float().square().mean().backward()

    return step


def time_steps(steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
               ) -> dict[str, list[float]]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # alternate: load changes affect both
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def peak_step_memory(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Bytes at the peak of one step: `total` and, on a CPU, `activations` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return {"total": float(torch.cuda.max_memory_allocated(device))}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)  # per event: bytes by category, in TIMELINE_COLUMNS order
    total = max(sum(s) for s in sizes)
    activations = max(sum(v for name, v in zip(TIMELINE_COLUMNS, s) if name not in WEIGHT_COLUMNS) for s in sizes)
    return {"total": float(total), "activations": float(activations)}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    set_attention_backend("sdpa")
    cfg = unet_config(args)
    torch.manual_seed(0)
    ours = UNet(cfg)
    with torch.no_grad():  # the output convs start at zero; perturb so both compute something non-trivial
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs = diffusers_twin(ours, cfg)
    ours, theirs = ours.to(device, dtype).train(), theirs.to(device, dtype).train()

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    ctx = torch.randn(args.batch, args.tokens, args.context_dim, generator=g).to(device, dtype)
    with torch.no_grad():
        difference = (ours(x, t, ctx) - theirs(x, t, encoder_hidden_states=ctx).sample).abs().max().item()
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    assert difference < tolerance, f"the two UNets disagree (max |diff| {difference}); the comparison is void"

    steps = {"ldmscale": make_step(ours, lambda: ours(x, t, ctx)),
             "diffusers": make_step(theirs, lambda: theirs(x, t, encoder_hidden_states=ctx).sample)}
    times = time_steps(steps, args.repeats, args.warmup, device)
    median = {name: statistics.median(v) for name, v in times.items()}
    memory = {} if args.no_memory else {name: peak_step_memory(step, device) for name, step in steps.items()}
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "dtype": args.dtype,
        "parameters": sum(p.numel() for p in ours.parameters()),
        "config": {"model_channels": cfg.model_channels, "channel_mult": cfg.channel_mult,
                   "num_res_blocks": cfg.num_res_blocks, "attention_resolutions": cfg.attention_resolutions,
                   "head_channels": cfg.num_head_channels, "context": [args.tokens, args.context_dim],
                   "latent": [4, args.latent, args.latent], "batch": args.batch},
        "max_abs_output_difference": difference,
        "step_seconds": times, "median_seconds": median, "time_ratio": median["ldmscale"] / median["diffusers"],
    }
    if memory:
        for kind in memory["ldmscale"]:
            result[f"peak_{kind}_mib"] = {name: m[kind] / 2**20 for name, m in memory.items()}
            result[f"{kind}_memory_ratio"] = memory["ldmscale"][kind] / memory["diffusers"][kind]
    if args.json:
        print(json.dumps(result))
        return
    print(f"UNet {result['parameters']:,} parameters, latent {cfg.in_channels}x{args.latent}x{args.latent}, "
          f"batch {args.batch}, context {args.tokens}x{args.context_dim}, {args.dtype} on {result['device']} "
          f"({result['cpu_threads']} threads); outputs agree to {difference:.1e}")
    kinds = list(memory["ldmscale"]) if memory else []
    print(f"{'':<12}{'median step s':>15}" + "".join(f"{'peak ' + k + ' MiB':>22}" for k in kinds))
    for name in steps:
        print(f"{name:<12}{median[name]:>15.4f}" + "".join(f"{memory[name][k] / 2**20:>22.1f}" for k in kinds))
    print(f"ratio ldmscale/diffusers: time {result['time_ratio']:.3f}"
          + "".join(f", peak {k} memory {result[f'{k}_memory_ratio']:.3f}" for k in kinds))


if __name__ == "__main__":
    main()
