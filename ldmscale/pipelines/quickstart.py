"""`ldmscale quickstart`: the pipeline end to end on one CPU, on the synthetic shapes dataset.

Stages (each a real run of the library, under DeepSpeed with one rank): write shards -> train the
autoencoder. Later stages (cached latents, text-conditioned latent diffusion, PDAE) join as they
land. Everything goes into one folder with PNG grids, loss curves and `report.md`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ldmscale.config.schema import load_run_config
from ldmscale.data.shards import DATA_SOURCES
from ldmscale.data.synthetic import write_synthetic_shards
from ldmscale.losses.metrics import psnr
from ldmscale.observability.images import save_curve
from ldmscale.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "quickstart"


@dataclasses.dataclass
class QuickstartSize:
    train_samples: int = 1024
    holdout_samples: int = 128
    autoencoder_steps: int = 300


SIZES = {"full": QuickstartSize(), "tiny": QuickstartSize(train_samples=128, holdout_samples=32, autoencoder_steps=40)}


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def mean_image_psnr(cfg, *, batch_size: int = 32) -> float:
    """PSNR of the best constant guess, the mean training image, on the held-out images (the baseline)."""
    plain = dataclasses.replace(cfg.data, shuffle=False, flip=False, num_workers=0)
    total, count = None, 0
    for batch in DATA_SOURCES.build(plain, batch_size=batch_size, rank=0, world_size=1, seed=0, epochs=1):
        images = batch["image"].double()
        total = images.sum(0) if total is None else total + images.sum(0)
        count += images.shape[0]
    mean = (total / count).float()
    scores = [psnr(mean.expand_as(b["image"]), b["image"]) for b in
              DATA_SOURCES.build(plain, batch_size=batch_size, rank=0, world_size=1, seed=0, epochs=1,
                                 split="validation")]
    return float(torch.cat(scores).mean())


def train_autoencoder(out: Path, data: Path, size: QuickstartSize) -> dict[str, Any]:
    run_dir = out / "autoencoder"
    steps = size.autoencoder_steps
    cfg = load_run_config(str(CONFIGS / "autoencoder.yaml"), [
        f"run.dir={run_dir}", f"data.shards={data / 'train'}", f"data.validation_shards={data / 'holdout'}",
        f"train.max_steps={steps}", f"train.validate_every={steps}", f"train.image_every={steps}",
        f"checkpoint.every_steps={steps}", f"task.loss.disc_start={steps * 2 // 3}"])
    Trainer(cfg).fit()
    records = _records(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val/psnr" in r][-1]
    save_curve([r["step"] for r in train], [r["rec"] for r in train], out / "autoencoder_loss.png",
               "autoencoder L1 reconstruction loss")
    shutil.copy(sorted((run_dir / "images").glob("reconstructions-*.png"))[-1],
                out / "autoencoder_reconstructions.png")
    return {"psnr": val["val/psnr"], "ssim": val["val/ssim"], "baseline_psnr": mean_image_psnr(cfg),
            "export": str(run_dir / "export" / "autoencoder.safetensors")}


def run_quickstart(out: str | Path, size: str = "full") -> dict[str, Any]:
    out, sizes = Path(out), SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    data = out / "data"
    if not (data / "train" / "manifest.json").exists():
        write_synthetic_shards(data / "train", num_samples=sizes.train_samples, resolution=32, seed=0,
                               samples_per_shard=128)
        write_synthetic_shards(data / "holdout", num_samples=sizes.holdout_samples, resolution=32, seed=1,
                               samples_per_shard=128)
    timings["shards"] = time.perf_counter() - start

    start = time.perf_counter()
    autoencoder = train_autoencoder(out, data, sizes)
    timings["autoencoder"] = time.perf_counter() - start

    report = {"autoencoder": autoencoder, "seconds": timings}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_report(report))
    return report


def render_report(report: dict[str, Any]) -> str:
    ae, seconds = report["autoencoder"], report["seconds"]
    lines = ["# ldmscale quickstart report", "",
             "Synthetic coloured shapes, 32 px, one CPU process under DeepSpeed.", "",
             "## Autoencoder (KL, f = 4)", "",
             f"- held-out PSNR: {ae['psnr']:.2f} dB (mean-image baseline {ae['baseline_psnr']:.2f} dB)",
             f"- held-out SSIM: {ae['ssim']:.3f}",
             "- reconstructions: `autoencoder_reconstructions.png` (inputs above, reconstructions below)",
             "- loss curve: `autoencoder_loss.png`", "", "## Time per stage", "",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {value:.1f} |" for stage, value in seconds.items()]
    return "\n".join(lines) + "\n"
