"""`ldmscale quickstart`: the whole pipeline end to end on one CPU, on the synthetic shapes dataset.

Every stage is a real run of the library (the training stages under DeepSpeed with one rank):

1. write webdataset shards of 32 px coloured shapes (a training set and a held-out set);
2. train a KL autoencoder (f = 4: 8x8x4 latents);
3. cache its latents, and the text tower's output for every caption;
4. train a text-conditioned latent diffusion model on the cache (a tiny OpenCLIP text tower with
   random weights, frozen; classifier-free guidance training);
5. train a judge (a small shape / colour / position classifier, `ldmscale.evaluation.shapes`) and score
   DDIM samples of one prompt per shape-colour pair: prompt adherence;
6. train PDAE heads on the frozen LDM (used unconditionally);
7. reconstruct and interpolate held-out images through the heads, probe z linearly for the attributes
   and measure the x0-error reduction of the learned mean shift.

Everything goes into one folder: PNG grids and loss curves, `report.md` (and `report.json`) with every
figure beside the threshold it must pass, and the time of each stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ldmscale.checkpoint.export import read_export_metadata
from ldmscale.config.schema import load_run_config
from ldmscale.data.shards import DATA_SOURCES
from ldmscale.data.synthetic import (ATTRIBUTE_NAMES, COLORS, ONE_HOT_PROPERTIES, POSITIONS, SHAPES, caption_for,
                                     write_synthetic_shards)
from ldmscale.evaluation.shapes import ClassifierTraining, accuracy, chance, render_labelled, train_shapes_classifier
from ldmscale.losses.metrics import psnr
from ldmscale.observability.images import save_curve, save_image_grid, save_rows
from ldmscale.pipelines.cache_latents import cache_latents, load_cache_config
from ldmscale.pipelines.pdae import probe_accuracy, read_inputs
from ldmscale.pipelines.sample import load_pipeline
from ldmscale.training.trainer import Trainer

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "quickstart"
# The attribute groups the report breaks the linear probe down into (the check is on all of them).
PROBE_GROUPS = {**ONE_HOT_PROPERTIES,
                "position": ["is_left", "is_right", "is_top", "is_bottom", "is_center"],
                "size": ["is_large"], "background": ["dark_background"]}
X0_ERROR_TIMESTEPS = (300, 450, 600)  # mid-range t, where PDAE's weighting lambda_t puts its mass


@dataclasses.dataclass
class QuickstartSize:
    """How much of everything; `thresholds` are the figures each size must reach (`report.md` lists them)."""

    train_samples: int = 2048
    holdout_samples: int = 256
    autoencoder_steps: int = 400
    autoencoder_batch: int = 16
    ldm_steps: int = 700
    ldm_overrides: tuple[str, ...] = ()  # config overrides of the LDM stage
    pdae_steps: int = 300
    judge_samples: int = 2048
    judge_steps: int = 200
    judge_batch: int = 64
    samples_per_prompt: int = 4
    sample_steps: int = 25
    pdae_inversion_steps: int = 25
    thresholds: dict[str, float] = dataclasses.field(default_factory=lambda: {
        # Reached on the reference machine (docs/benchmarks.md): 12.6 dB, shape +0.375, colour +0.438,
        # probe +0.175, x0 8.1%; the thresholds leave room for another CPU's arithmetic.
        "autoencoder_psnr_gain_db": 8.0,  # over the mean-image baseline
        "adherence_shape_gain": 0.2,  # accuracy above chance (1/3)
        "adherence_color_gain": 0.25,  # accuracy above chance (1/4)
        "probe_gain": 0.1,  # probe accuracy above the majority baseline, mean over all attributes
        "x0_error_reduction": 0.04,  # relative, averaged over X0_ERROR_TIMESTEPS
    })


SIZES = {
    "full": QuickstartSize(),
    # The end-to-end test's size: every stage runs, but briefly.
    "tiny": QuickstartSize(train_samples=256, holdout_samples=64, autoencoder_steps=200, autoencoder_batch=8,
                           ldm_steps=400, ldm_overrides=("task.unet.model_channels=32",), pdae_steps=60,
                           judge_samples=512, judge_steps=150, judge_batch=32, samples_per_prompt=4, sample_steps=10,
                           pdae_inversion_steps=10, thresholds={
                               # Measured when set: 9.5 dB, shape +0.06, colour +0.17, probe +0.19, x0 4.9%.
                               # 400 steps of a narrower UNet learn colour before shape, so shape is only
                               # held to not being clearly worse than chance (2 of 48 samples).
                               "autoencoder_psnr_gain_db": 5.0, "adherence_shape_gain": -0.05,
                               "adherence_color_gain": 0.08, "probe_gain": 0.1, "x0_error_reduction": 0.02}),
}


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _loss_curve(run_dir: Path, key: str, path: Path, title: str) -> None:
    train = [r for r in _records(run_dir) if key in r]
    save_curve([r["step"] for r in train], [r[key] for r in train], path, title)


def _train(config: str, overrides: list[str]) -> tuple[Any, Path]:
    """Trains one stage to completion: (its RunConfig, its run directory)."""
    cfg = load_run_config(str(CONFIGS / config), overrides)
    if Trainer(cfg).fit() != "completed":
        raise RuntimeError(f"the {cfg.stage} stage was stopped; run the quickstart again to resume it")
    return cfg, Path(cfg.run.dir)


# ------------------------------------------------------------------------------------------------------
# Stages


def write_data(out: Path, size: QuickstartSize) -> Path:
    data = out / "data"
    if not (data / "holdout" / "manifest.json").exists():
        write_synthetic_shards(data / "train", num_samples=size.train_samples, resolution=32, seed=0,
                               samples_per_shard=256)
        write_synthetic_shards(data / "holdout", num_samples=size.holdout_samples, resolution=32, seed=1,
                               samples_per_shard=256)
    return data


def mean_image_psnr(cfg, *, batch_size: int = 64) -> float:
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
    steps = size.autoencoder_steps
    overrides = [f"run.dir={out / 'autoencoder'}", f"data.shards={data / 'train'}",
                 f"data.validation_shards={data / 'holdout'}", f"train.max_steps={steps}",
                 f"train.validate_every={steps}", f"train.image_every={steps}", f"checkpoint.every_steps={steps}",
                 f"train.micro_batch_size={size.autoencoder_batch}", f"task.loss.disc_start={steps * 4 // 5}"]
    cfg, run_dir = _train("autoencoder.yaml", overrides)
    val = [r for r in _records(run_dir) if "val/psnr" in r][-1]
    _loss_curve(run_dir, "rec", out / "loss_autoencoder.png", "autoencoder reconstruction loss (squared error)")
    shutil.copy(sorted((run_dir / "images").glob("reconstructions-*.png"))[-1],
                out / "autoencoder_reconstructions.png")
    baseline = mean_image_psnr(cfg)
    return {"psnr": val["val/psnr"], "ssim": val["val/ssim"], "baseline_psnr": baseline,
            "export": str(run_dir / "export" / "autoencoder.safetensors")}


def cache(out: Path, data: Path, autoencoder: str) -> dict[str, Any]:
    latents = out / "latents"
    cfg = load_cache_config(str(CONFIGS / "cache_latents.yaml"), [
        f"run.dir={out / 'cache'}", f"cache.autoencoder={autoencoder}", f"cache.shards={data / 'train'}",
        f"cache.out={latents}"])
    summary = cache_latents(cfg)
    return {"out": str(latents), "samples": summary["samples"], "complete": summary["complete"]}


def train_ldm(out: Path, latents: str, autoencoder: str, size: QuickstartSize) -> dict[str, Any]:
    steps = size.ldm_steps
    _, run_dir = _train("ldm.yaml", [f"run.dir={out / 'ldm'}", f"data.shards={latents}",
                                     f"task.autoencoder={autoencoder}", f"train.max_steps={steps}",
                                     *size.ldm_overrides, f"train.image_every={steps}",
                                     f"checkpoint.every_steps={steps}"])
    _loss_curve(run_dir, "loss", out / "loss_ldm.png", "latent diffusion loss (eps MSE)")
    return {"export": str(run_dir / "export" / "ldm.safetensors"), "final_loss": _records(run_dir)[-1].get("loss")}


def train_judge(autoencoder: str, size: QuickstartSize) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shapes classifier, on rendered images and their reconstructions by the quickstart's autoencoder
    (samples are decoded by it); its accuracy on unseen rendered images and on their reconstructions."""
    from ldmscale.training.tasks.latent_diffusion import load_frozen_autoencoder

    autoencoder_model, _ = load_frozen_autoencoder(autoencoder)

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([autoencoder_model.decode_from_latent(autoencoder_model.encode_to_latent(c, sample=False))
                          for c in x.split(256)]).clamp(-1, 1)

    images, labels = render_labelled(size.judge_samples, seed=100)
    both = {k: torch.cat([v, v]) for k, v in labels.items()}
    bar = tqdm(total=size.judge_steps, desc="train judge", unit="step", dynamic_ncols=True)
    judge = train_shapes_classifier(torch.cat([images, reconstruct(images)]), both,
                                    ClassifierTraining(steps=size.judge_steps, batch_size=size.judge_batch),
                                    progress=lambda step: bar.update(1))
    bar.close()
    test, test_labels = render_labelled(256, seed=101)
    return judge, {"rendered": accuracy(judge, test, test_labels),
                   "reconstructed": accuracy(judge, reconstruct(test), test_labels)}


def prompt_adherence(out: Path, ldm: str, judge: torch.nn.Module, size: QuickstartSize) -> dict[str, Any]:
    """One prompt per shape-colour pair (positions cycled), `samples_per_prompt` DDIM samples each with
    classifier-free guidance; the judge's accuracy against what the prompt asked for."""
    pipeline = load_pipeline(ldm)
    guidance = read_export_metadata(ldm)["config"]["task"]["sample"]["guidance_scale"]  # as the LDM run's grids
    prompts, labels = [], {"shape": [], "color": [], "position": []}
    for i, (shape, color) in enumerate((s, c) for s in SHAPES for c in COLORS):
        position = POSITIONS[i % len(POSITIONS)]
        prompts.append(caption_for(shape, color, position))
        for name, value, names in (("shape", shape, SHAPES), ("color", color, COLORS),
                                   ("position", position, POSITIONS)):
            labels[name] += [names.index(value)] * size.samples_per_prompt
    generator = torch.Generator().manual_seed(0)
    images = []
    for prompt in tqdm(prompts, desc="sample prompts", unit="prompt", dynamic_ncols=True):
        images.append(pipeline.generate([prompt] * size.samples_per_prompt, size.samples_per_prompt,
                                        steps=size.sample_steps, guidance=guidance,
                                        generator=generator))
    images = torch.cat(images)  # (prompts * samples_per_prompt, 3, 32, 32), prompt-major
    save_image_grid(images, out / "ldm_samples.png", nrow=size.samples_per_prompt * 4)
    (out / "ldm_samples.txt").write_text(
        f"rows of ldm_samples.png: {size.samples_per_prompt} samples per prompt, 4 prompts per row\n"
        + "\n".join(prompts) + "\n")
    scores = accuracy(judge, images, {k: torch.tensor(v) for k, v in labels.items()})
    return {"accuracy": scores, "chance": {k: chance(k) for k in scores}, "prompts": prompts,
            "guidance": guidance, "steps": size.sample_steps}


def train_pdae(out: Path, data: Path, ldm: str, size: QuickstartSize) -> dict[str, Any]:
    steps = size.pdae_steps
    _, run_dir = _train("pdae.yaml", [f"run.dir={out / 'pdae'}", f"data.shards={data / 'train'}", f"task.ldm={ldm}",
                                      f"train.max_steps={steps}", f"train.image_every={steps}",
                                      f"checkpoint.every_steps={steps}"])
    _loss_curve(run_dir, "loss", out / "loss_pdae.png", "PDAE loss (weighted eps MSE with the shift)")
    return {"export": str(run_dir / "export" / "pdae.safetensors")}


def evaluate_pdae(out: Path, data: Path, export: str, size: QuickstartSize) -> dict[str, Any]:
    from ldmscale.training.tasks.pdae import load_pdae_pipeline

    pipeline = load_pdae_pipeline(export)
    steps = size.pdae_inversion_steps
    holdout, holdout_attributes = read_inputs(str(data / "holdout"), 32)
    train, train_attributes = read_inputs(str(data / "train"), 32, limit=1024)

    stages = tqdm(total=4, desc="PDAE evaluation", unit="part", dynamic_ncols=True)
    shown = holdout[:8]
    recon = pipeline.reconstruct(shown, encode_steps=steps, decode_steps=steps)
    save_rows([shown, recon], out / "pdae_reconstructions.png")
    stages.update(1)
    pairs = holdout[8:12]
    interpolation = pipeline.interpolate(pairs[0::2], pairs[1::2], 7, encode_steps=steps, decode_steps=steps)
    save_image_grid(interpolation, out / "pdae_interpolations.png", nrow=7)
    stages.update(1)

    def encode(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([pipeline.encode_z(c) for c in images.split(128)])

    accuracy_, baseline = probe_accuracy(encode(train), train_attributes, encode(holdout), holdout_attributes)
    probe = {"all": {"accuracy": float(accuracy_.mean()), "baseline": float(baseline.mean())}}
    for group, names in PROBE_GROUPS.items():
        idx = [ATTRIBUTE_NAMES.index(n) for n in names]
        probe[group] = {"accuracy": float(accuracy_[idx].mean()), "baseline": float(baseline[idx].mean())}
    stages.update(1)
    # On held-out images: the shift must carry over to images the heads never saw.
    errors = {t: pipeline.x0_errors(holdout, t) for t in X0_ERROR_TIMESTEPS}
    stages.update(1)
    stages.close()
    reduction = sum(1 - shifted / plain for plain, shifted in errors.values()) / len(errors)
    return {"probe": probe, "x0_errors": {str(t): {"pretrained": p, "shifted": s} for t, (p, s) in errors.items()},
            "x0_error_reduction": reduction, "reconstruction_mse": float(((recon - shown) / 2).pow(2).mean())}


# ------------------------------------------------------------------------------------------------------
# The run


def figures(report: dict[str, Any]) -> dict[str, float]:
    """Each thresholded figure of the report (the name of its threshold -> value)."""
    ae, adherence, pdae = report["autoencoder"], report["prompt_adherence"], report["pdae"]
    return {
        "autoencoder_psnr_gain_db": ae["psnr"] - ae["baseline_psnr"],
        "adherence_shape_gain": adherence["accuracy"]["shape"] - adherence["chance"]["shape"],
        "adherence_color_gain": adherence["accuracy"]["color"] - adherence["chance"]["color"],
        "probe_gain": pdae["probe"]["all"]["accuracy"] - pdae["probe"]["all"]["baseline"],
        "x0_error_reduction": pdae["x0_error_reduction"],
    }


def run_quickstart(out: str | Path, size: str = "full") -> dict[str, Any]:
    out, sizes = Path(out), SIZES[size]
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    seconds: dict[str, float] = {}
    stages = 8

    def stage(number: int, name: str, fn: Callable[[], Any]) -> Any:
        print(f"[{number}/{stages}] {name}", flush=True)
        start = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - start
        return result

    data = stage(1, "shards", lambda: write_data(out, sizes))
    autoencoder = stage(2, "autoencoder", lambda: train_autoencoder(out, data, sizes))
    latents = stage(3, "cache latents", lambda: cache(out, data, autoencoder["export"]))
    ldm = stage(4, "latent diffusion", lambda: train_ldm(out, latents["out"], autoencoder["export"], sizes))
    judge, judge_accuracy = stage(5, "judge", lambda: train_judge(autoencoder["export"], sizes))
    adherence = stage(6, "samples", lambda: prompt_adherence(out, ldm["export"], judge, sizes))
    adherence["judge"] = judge_accuracy
    pdae = stage(7, "pdae", lambda: train_pdae(out, data, ldm["export"], sizes))
    pdae.update(stage(8, "pdae evaluation", lambda: evaluate_pdae(out, data, pdae["export"], sizes)))

    report = {"size": size, "autoencoder": autoencoder, "latents": latents, "ldm": ldm, "prompt_adherence": adherence,
              "pdae": pdae, "seconds": seconds, "total_seconds": sum(seconds.values())}
    values = figures(report)
    report["checks"] = {name: {"value": values[name], "threshold": sizes.thresholds[name],
                               "passed": values[name] > sizes.thresholds[name]} for name in values}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_report(report))
    return report


def render_report(report: dict[str, Any]) -> str:
    ae, adherence, pdae = report["autoencoder"], report["prompt_adherence"], report["pdae"]
    judge = adherence["judge"]
    acc, ch = adherence["accuracy"], adherence["chance"]
    lines = [
        "# ldmscale quickstart report", "",
        f"Synthetic coloured shapes at 32 px (size `{report['size']}`), one CPU process; every training stage "
        "ran under DeepSpeed.", "",
        "## Checks", "", "| figure | value | must exceed | passed |", "|---|---|---|---|"]
    lines += [f"| {name} | {c['value']:.3f} | {c['threshold']:.3f} | {'yes' if c['passed'] else '**no**'} |"
              for name, c in report["checks"].items()]
    lines += [
        "", "## Autoencoder (KL, f = 4, 8x8x4 latents)", "",
        f"- held-out PSNR: {ae['psnr']:.2f} dB (mean-image baseline {ae['baseline_psnr']:.2f} dB), "
        f"SSIM {ae['ssim']:.3f}",
        "- `autoencoder_reconstructions.png`: held-out inputs above, reconstructions below; `loss_autoencoder.png`",
        "", "## Text-conditioned latent diffusion", "",
        f"- prompt adherence of {len(adherence['prompts'])} prompts (one per shape and colour), DDIM "
        f"{adherence['steps']} steps, guidance {adherence['guidance']}: shape {acc['shape']:.3f} (chance "
        f"{ch['shape']:.3f}), colour {acc['color']:.3f} (chance {ch['color']:.3f}), position "
        f"{acc['position']:.3f} (chance {ch['position']:.3f})",
        f"- the judge (shapes classifier) on unseen rendered images: shape {judge['rendered']['shape']:.3f}, colour "
        f"{judge['rendered']['color']:.3f}, position {judge['rendered']['position']:.3f}; on their autoencoder "
        f"reconstructions: shape {judge['reconstructed']['shape']:.3f}, colour {judge['reconstructed']['color']:.3f}, "
        f"position {judge['reconstructed']['position']:.3f}",
        "- `ldm_samples.png` (prompts in `ldm_samples.txt`); `loss_ldm.png`",
        "", "## PDAE heads", "",
        "- linear probe of z on held-out images, mean accuracy over the binary attributes (majority baseline): "
        + ", ".join(f"{group} {p['accuracy']:.3f} ({p['baseline']:.3f})" for group, p in pdae["probe"].items()),
        f"- x0-error reduction of the shift on held-out images: {100 * pdae['x0_error_reduction']:.1f}% "
        "(mean over t = " + ", ".join(
            f"{t}: {e['pretrained']:.4f} -> {e['shifted']:.4f}" for t, e in pdae["x0_errors"].items()) + ")",
        "- `pdae_reconstructions.png` (held-out inputs above, encoded to z and x_T, decoded below), "
        "`pdae_interpolations.png` (z lerped, x_T slerped); `loss_pdae.png`",
        "", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in report["seconds"].items()]
    lines += [f"| **total** | {report['total_seconds']:.1f} |"]
    return "\n".join(lines) + "\n"
