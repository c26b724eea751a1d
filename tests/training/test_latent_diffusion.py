"""The latent diffusion stage in one process: the loss against a hand computation from the schedule,
conditioning dropout, frozen networks outside the optimizer, the export's scale factor, build-time
checks, and sampling from an export reproducing the training-time grid."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from ldmscale.checkpoint.export import export_weights
from ldmscale.config.load import ConfigError, config_from_dict, config_to_dict, load_yaml_with_overrides
from ldmscale.config.schema import RunConfig, load_run_config
from ldmscale.distributed import env as dist_env
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.training.tasks.latent_diffusion import ENGINE, LatentDiffusionTask

pytest.importorskip("open_clip")

ROOT = Path(__file__).resolve().parents[2]
LDM = ROOT / "configs" / "debug" / "ldm.yaml"
CAPTIONS = ["a red circle in the center", "a blue square in the top left", "a green triangle in the bottom right",
            "a yellow circle in the top right"]
SCALE = 0.5


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models: one intra-op thread is much faster than two contended ones on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_autoencoder_export(path: Path, meta_scale: float, buffer_scale: float) -> Path:
    """A tiny random KL autoencoder (f = 4, 4 latent channels) exported as the autoencoder stage does."""
    cfg = load_run_config(str(ROOT / "configs" / "debug" / "autoencoder.yaml"))
    torch.manual_seed(0)
    model = Autoencoder(dataclasses.replace(cfg.task.model, scale_factor=buffer_scale))
    return export_weights(model.state_dict(), path, config=config_to_dict(cfg),
                          metadata={"stage": "autoencoder", "network": "autoencoder", "scale_factor": meta_scale})


@pytest.fixture(scope="module")
def autoencoder_export(tmp_path_factory) -> Path:
    return write_autoencoder_export(tmp_path_factory.mktemp("ae") / "autoencoder.safetensors", SCALE, SCALE)


def make_task(run_dir: Path, export: Path, *overrides: str, conditioner: dict | None = None) -> LatentDiffusionTask:
    data = load_yaml_with_overrides(LDM, [f"task.autoencoder={export}", f"run.dir={run_dir}", *overrides])
    if conditioner is not None:  # another kind: replace the node (a dotted override would merge into it)
        data["task"]["conditioner"] = conditioner
        data["task"]["sample"]["prompts"] = []
    cfg = config_from_dict(RunConfig, data)
    torch.manual_seed(cfg.seed)
    return LatentDiffusionTask(cfg, penv=dist_env.ProcessEnv(), run_dir=run_dir)


def batch_of(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
            "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)],
            "label": torch.randint(0, 12, (n,), generator=g), "key": [f"k{i}" for i in range(n)]}


CLASS_CONTEXT = {"kind": "class", "num_classes": 12, "output": "context", "embed_dim": 32, "ucg_rate": 0.1}


@pytest.mark.parametrize("prediction,weighting", [("eps", "uniform"), ("v", "min_snr"), ("x0", "min_snr")])
def test_loss_equals_hand_computation(tmp_path, autoencoder_export, prediction, weighting):
    """training_step's loss = mean_b w_b |target_b - net(z_t, t, c)|^2 with z_t, target and w from the closed
    forms of the scaled-linear schedule (DDPM eq. 4, v of Salimans & Ho, min-SNR-5 of Hang et al.)."""
    task = make_task(tmp_path, autoencoder_export, f"task.prediction.kind={prediction}",
                     f"task.loss_weighting.kind={weighting}", "task.conditioner.ucg_rate=0.0")
    batch = batch_of(4)
    with torch.no_grad():  # the output conv starts at zero: make the output depend on z_t, t and the context
        torch.nn.init.normal_(task.engine.module.unet.out[2].weight, std=0.1)
    net_before = copy.deepcopy(task.engine.module)
    torch.manual_seed(123)
    loss = task.training_step(batch, 0)["loss"]

    torch.manual_seed(123)  # the documented draw order: posterior sample, t, noise (no dropout at rate 0)
    with torch.no_grad():
        mean, logvar = task.autoencoder.encode_moments(batch["image"]).chunk(2, dim=1)  # (B, 4, 8, 8) each
        z0 = SCALE * (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape))
        t = torch.randint(0, 1000, (4,))
        noise = torch.randn(z0.shape)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ab = torch.cumprod(1 - betas, 0)[t].view(4, 1, 1, 1)
        a, s = ab.sqrt().float(), (1 - ab).sqrt().float()
        z_t = a * z0 + s * noise
        out = net_before.unet(z_t, t, context=task.conditioner(batch["caption"])["context"])
        target = {"eps": noise, "v": a * noise - s * z0, "x0": z0}[prediction]
        snr = (ab / (1 - ab)).flatten()
        weight = torch.ones(4, dtype=torch.float64) if weighting == "uniform" else \
            snr.clamp(max=5.0) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
        expected = (weight.float() * (out - target).pow(2).flatten(1).mean(1)).mean()
        assert out.abs().mean() > 0.05  # a real network output, not the zero-initialised one
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert 0.05 < loss < 20


def _contexts_seen(task: LatentDiffusionTask, batch: dict) -> torch.Tensor:
    """The context (B, L, D) the UNet receives for `batch`, through the same path as training_step."""
    seen = []
    hook = task.engine.module.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["context"].detach().clone()), with_kwargs=True)
    z = torch.randn(len(batch["key"]), 4, 8, 8)
    with torch.no_grad():
        task.engine(z, torch.full((z.shape[0],), 10), **task.conditioning(batch))
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("conditioner", ["openclip", "class-context"])
def test_conditioning_dropout_rate(tmp_path, autoencoder_export, conditioner):
    """A fraction ucg_rate of the samples get the unconditional context (empty prompt / null class):
    frozen text tower outside the engine, trainable class table inside it."""
    n, rate = 400, 0.25
    for ucg_rate in (0.0, rate, 1.0):
        cond = dict(CLASS_CONTEXT, ucg_rate=ucg_rate) if conditioner == "class-context" else None
        task = make_task(tmp_path, autoencoder_export, f"task.conditioner.ucg_rate={ucg_rate}", conditioner=cond)
        batch = batch_of(n)
        if conditioner == "openclip":
            uncond = task.conditioner.unconditional(1, "cpu")["context"][0]  # (L, D): the empty prompt
        else:
            table = task.engine.module.conditioner.embedding.weight
            uncond = table[12].detach()[None]  # (1, D): the null class row
        torch.manual_seed(1)
        context = _contexts_seen(task, batch)
        dropped = (context == uncond).flatten(1).all(1).float().mean().item()
        if ucg_rate in (0.0, 1.0):
            assert dropped == ucg_rate
        else:  # binomial(400, 0.25): std 0.022
            assert abs(dropped - rate) < 0.08, dropped


@pytest.mark.parametrize("conditioner", ["openclip", "class-context"])
def test_frozen_networks_have_no_grad_and_stay_out_of_the_optimizer(tmp_path, autoencoder_export, conditioner):
    task = make_task(tmp_path, autoencoder_export,
                     conditioner=CLASS_CONTEXT if conditioner == "class-context" else None)
    frozen = [task.autoencoder] + ([task.conditioner] if conditioner == "openclip" else [])
    before = [copy.deepcopy(m.state_dict()) for m in frozen]
    trained_before = copy.deepcopy(task.engine.module.state_dict())
    for step in range(3):  # zero-initialised output convs: gradients reach the cross-attention at step 3
        task.training_step(batch_of(4, seed=step), step)

    optimized = {id(p) for group in task.engine.optimizer.param_groups for p in group["params"]}
    engine_params = {id(p) for p in task.engine.module.parameters()}
    assert optimized and optimized <= engine_params
    for module, state in zip(frozen, before):
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
        assert not {id(p) for p in module.parameters()} & (optimized | engine_params)
        for name, value in module.state_dict().items():
            assert torch.equal(value, state[name]), name
    after = task.engine.module.state_dict()
    moved = {k for k in after if not torch.equal(after[k], trained_before[k])}
    assert "unet.out.2.weight" in moved  # the zero-initialised output conv learns
    if conditioner == "class-context":  # the class table trains with the UNet, inside the engine
        assert id(task.engine.module.conditioner.embedding.weight) in engine_params
        assert "conditioner.embedding.weight" in moved
    else:
        assert task.engine.module.conditioner is None and all(k.startswith("unet.") for k in after)


def test_scale_factor_comes_from_the_export_metadata(tmp_path):
    """The latents are the posterior sample times the metadata's scale factor, even if the stored
    buffer disagrees."""
    export = write_autoencoder_export(tmp_path / "ae.safetensors", meta_scale=0.25, buffer_scale=1.0)
    task = make_task(tmp_path, export)
    images = batch_of(2)["image"]
    assert float(task.autoencoder.scale_factor) == 0.25
    torch.manual_seed(5)
    z = task.encode(images)
    torch.manual_seed(5)
    with torch.no_grad():
        unscaled = task.autoencoder.encode(images).sample()
    torch.testing.assert_close(z, 0.25 * unscaled)
    assert task.export_metadata()["scale_factor"] == 0.25
    assert task.export_metadata()["latent_shape"] == (4, 8, 8)


def test_build_time_and_config_errors_name_the_keys(tmp_path, autoencoder_export):
    with pytest.raises(ValueError) as e:
        make_task(tmp_path, autoencoder_export, "task.unet.in_channels=3", "data.resolution=36")
    assert "task.unet.in_channels: must equal the latent channels (4)" in str(e.value)
    assert "data.resolution: must be a multiple of 8" in str(e.value)
    with pytest.raises(ValueError, match="task.autoencoder: .* is not a file"):
        make_task(tmp_path, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError) as e:
        load_run_config(str(LDM), ["task.unet.context_dim=64", "task.sample.steps=5000", "task.autoencoder=''",
                                   "task.sample.classes=[3]"])
    message = str(e.value)
    for expected in ("task.unet.context_dim: must be 32", "task.sample.steps: must be <= schedule.num_timesteps",
                     "task.autoencoder: required", "task.sample.classes: only for conditioner kind class"):
        assert expected in message


# SD1's CLIP ViT-L/14 text encoder has no projection (123,060,480, peers.md §3); OpenCLIP-H's published
# 354,032,640 includes a 1024 x 1024 `text_projection` that conditioning does not use.
@pytest.mark.parametrize("name,unet_params,text_params", [("sd15.yaml", 859_520_964, 123_060_480),
                                                          ("sd2-base.yaml", 865_910_724, 354_032_640 - 1024 * 1024)])
def test_sd_configs_are_full_run_configs(name, unet_params, text_params):
    """SD1.5 / SD2-base configs load as latent-diffusion runs; `ldmscale info` counts the UNet and the
    frozen text tower with their published sizes."""
    cfg = load_run_config(str(ROOT / "configs" / "ldm" / name))
    assert cfg.stage == "latent_diffusion" and cfg.task.conditioner.kind == "openclip"
    with torch.device("meta"):
        components = LatentDiffusionTask.build_components(cfg)
    count = {k: sum(p.numel() for p in c.module.parameters()) for k, c in components.items()}
    assert count["unet"] == unet_params and components["unet"].trainable
    assert count["conditioner"] == text_params and not components["conditioner"].trainable
    assert load_yaml_with_overrides(ROOT / "configs" / "ldm" / name)["task"]["prediction"]["kind"] == "eps"


def test_export_samples_the_training_grid(tmp_path, autoencoder_export):
    """log_images writes the EMA grid; the export, loaded as `ldmscale sample` loads it, draws the same
    images for the same prompts and seed."""
    from ldmscale.pipelines.sample import load_pipeline
    from ldmscale.training.ema import EMA
    from PIL import Image

    task = make_task(tmp_path, autoencoder_export)
    cfg = task.cfg
    task.emas = {ENGINE: EMA(task.engine.module, cfg.ema)}
    task.training_step(batch_of(4), 0)
    task.emas[ENGINE].update(task.engine.module, 1)
    task.log_images(batch_of(4), 1, tmp_path / "images")
    with Image.open(tmp_path / "images" / "samples-00000001.png") as grid:
        assert grid.size == (4 * 34 + 2, 36)  # 4 images of 32 px in one row, 2 px padding

    state = task.emas[ENGINE].state_dict()
    path = export_weights(state, tmp_path / "export" / f"{ENGINE}.safetensors", config=config_to_dict(cfg),
                          metadata={"stage": cfg.stage, **task.export_metadata()})
    pipeline = load_pipeline(tmp_path)  # a run directory resolves to export/ldm.safetensors
    grid = cfg.task.sample
    expected = task.sampling_pipeline(state).generate(CAPTIONS, 4, steps=grid.steps, guidance=grid.guidance_scale,
                                                      generator=torch.Generator().manual_seed(0))
    images = pipeline.generate(CAPTIONS, 4, steps=grid.steps, guidance=grid.guidance_scale,
                               generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 32, 32) and images.std() > 0
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert path.exists()
    config = config_to_dict(cfg)
    assert config["task"]["autoencoder"] == str(autoencoder_export)


def test_sample_arguments_must_fit_the_model(tmp_path, autoencoder_export):
    """`ldmscale sample` refuses --class for a text model, --prompt or a bad K for a class model."""
    from ldmscale.pipelines.sample import raw_conditioning

    text = make_task(tmp_path, autoencoder_export).conditioner
    assert raw_conditioning(text, 3, prompt="a red circle") == ["a red circle"] * 3
    with pytest.raises(ValueError, match="--prompt: this model is text-conditional.*not --class"):
        raw_conditioning(text, 3, class_label=2)
    table = make_task(tmp_path, autoencoder_export, conditioner=CLASS_CONTEXT).engine.module.conditioner
    assert raw_conditioning(table, 2, class_label=11).tolist() == [11, 11]
    for kwargs in ({"class_label": 12}, {"prompt": "a red circle"}):
        with pytest.raises(ValueError, match=r"--class: this model is class-conditional; give --class K"):
            raw_conditioning(table, 2, **kwargs)
