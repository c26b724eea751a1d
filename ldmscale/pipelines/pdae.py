"""PDAE inference on a latent DPM: autoencoding, interpolation and attribute editing through z
(Zhang, Zhao & Lin 2022, §4.2-4.4), plus a linear probe of z.

- reconstruct: z = E(x0); x_T = shifted DDIM inversion of the latent with the image's own z (eq. 8 with
  eq. 6's eps); x0' = shifted DDIM decoding of x_T with z; pixels = D(x0' / scale_factor).
- interpolate: lerp of z, slerp of x_T (the official `_ddim_trajectory_interpolation`).
- edit: a logistic-regression direction w on standardised z; z_n' = z_n + s sqrt(d) w / ||w||, then
  de-standardised; x_T inferred with the original z, decoded with the edited one.
- probe: per-attribute logistic regression on standardised z, accuracy on a held-out split; for a
  categorical attribute stored one-hot (the synthetic shards' shape and colour), one softmax regression
  over its values as well.

The frozen UNet, autoencoder and schedule come from the LDM export the PDAE run was trained on; the
heads from the PDAE export (its EMA weights). Latents are never clamped.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from ldmscale.diffusion.objectives import Prediction
from ldmscale.diffusion.pdae import shifted_ddim_invert, shifted_ddim_sample, x0_prediction_errors
from ldmscale.diffusion.schedule import NoiseSchedule
from ldmscale.models.autoencoder import Autoencoder
from ldmscale.models.pdae import PDAEHeads, ShiftedUNet
from ldmscale.models.unet import UNet

# The PDAE stage's engine, hence its export: run_dir/export/pdae.safetensors.
PDAE_NETWORK = "pdae"


@dataclasses.dataclass
class PDAEPipeline:
    """Plain modules on one device: the frozen LDM parts and the trained heads."""

    unet: UNet
    heads: PDAEHeads
    autoencoder: Autoencoder
    schedule: NoiseSchedule
    prediction: Prediction
    uncond: dict[str, torch.Tensor]  # the LDM's unconditional conditioning (batch 1): empty prompt / null class
    encoder_input: Literal["image", "latent"]
    resolution: int  # of the images (the LDM's data.resolution)

    def __post_init__(self):
        self.model = ShiftedUNet(self.unet, self.heads).eval()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def cond(self, batch: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self.uncond.items()}

    @torch.no_grad()
    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, E, h, w): the posterior mode, deterministic."""
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.encode_to_latent(images.to(self.device, dtype), sample=False).float()

    @torch.no_grad()
    def to_images(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.decode_from_latent(latents.to(dtype)).float().clamp(-1, 1)  # (B, 3, H, W)

    @torch.no_grad()
    def encode_z(self, images: torch.Tensor, latents: torch.Tensor | None = None) -> torch.Tensor:
        """z = E(x0) (B, d) from the images or their latents, as the heads were trained."""
        if self.encoder_input == "latent":
            x = latents if latents is not None else self.to_latent(images)
        else:
            x = images.to(self.device)
        return self.heads.encoder(x.to(next(self.heads.parameters()).dtype)).float()

    @torch.no_grad()
    def invert(self, latents: torch.Tensor, z: torch.Tensor, steps: int, fixed_point_iters: int = 0) -> torch.Tensor:
        return shifted_ddim_invert(self.model, latents, z, self.schedule, prediction=self.prediction,
                                   cond=self.cond(len(z)), steps=steps, fixed_point_iters=fixed_point_iters)

    @torch.no_grad()
    def decode(self, x_T: torch.Tensor, z: torch.Tensor, steps: int, scale: float = 1.0) -> torch.Tensor:
        """Shifted DDIM x_T -> latent -> pixels (B, 3, H, W)."""
        latents = shifted_ddim_sample(self.model, x_T, z, self.schedule, prediction=self.prediction,
                                      cond=self.cond(len(z)), steps=steps, scale=scale)
        return self.to_images(latents)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, *, encode_steps: int = 100, decode_steps: int = 100,
                    scale: float = 1.0) -> torch.Tensor:
        """Autoencoding with inferred x_T: (B, 3, H, W) -> (B, 3, H, W)."""
        latents = self.to_latent(images)
        z = self.encode_z(images, latents)
        return self.decode(self.invert(latents, z, encode_steps), z, decode_steps, scale)

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, num: int, *, encode_steps: int = 100,
                    decode_steps: int = 100) -> torch.Tensor:
        """(P, 3, H, W) pairs -> (P * num, 3, H, W): per pair, `num` images from a to b (row-major)."""
        latents = self.to_latent(torch.cat([a, b]))
        z = self.encode_z(torch.cat([a, b]), latents)
        x_T = self.invert(latents, z, encode_steps)
        (z_a, z_b), (x_a, x_b) = z.chunk(2), x_T.chunk(2)
        rows = []
        for w in torch.linspace(0, 1, num).tolist():
            rows.append(self.decode(slerp(x_a, x_b, w), torch.lerp(z_a, z_b, w), decode_steps))
        return torch.stack(rows, dim=1).flatten(0, 1)  # (P, num, 3, H, W) -> (P * num, ...)

    @torch.no_grad()
    def x0_errors(self, images: torch.Tensor, t: int, seed: int = 0) -> tuple[float, float]:
        """(pre-trained, shifted) MSE of the one-step latent x0 prediction at `t` (see `x0_prediction_errors`)."""
        latents = self.to_latent(images)
        z = self.encode_z(images, latents)
        generator = torch.Generator(self.device).manual_seed(seed)
        return x0_prediction_errors(self.model, latents, z, t, self.schedule, prediction=self.prediction,
                                    cond=self.cond(len(z)), generator=generator)

    @torch.no_grad()
    def edit(self, images: torch.Tensor, direction: torch.Tensor, stats: ZStats, scales: list[float], *,
             encode_steps: int = 100, decode_steps: int = 100) -> torch.Tensor:
        """(B, 3, H, W) -> (B * len(scales), 3, H, W): each image decoded with z moved by every scale."""
        latents = self.to_latent(images)
        z = self.encode_z(images, latents)
        x_T = self.invert(latents, z, encode_steps)  # inferred with the original z (official manipulation)
        d = z.shape[1]
        unit = direction.to(z) / direction.norm()
        rows = [self.decode(x_T, stats.denormalise(stats.normalise(z) + s * d ** 0.5 * unit), decode_steps)
                for s in scales]
        return torch.stack(rows, dim=1).flatten(0, 1)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation per sample of (B, ...) tensors (Shoemake 1985), as DDIM's x_T interpolation."""
    fa, fb = a.flatten(1), b.flatten(1)
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1))  # (B,)
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]  # (B, 1)
    sin = torch.sin(theta).clamp(min=1e-8)
    out = torch.where(theta < 1e-4, (1 - w) * fa + w * fb,
                      (torch.sin((1 - w) * theta) * fa + torch.sin(w * theta) * fb) / sin)
    return out.view_as(a)


@dataclasses.dataclass
class ZStats:
    """Per-dimension mean and std of z over a dataset (PDAE standardises z for classifiers and edits)."""

    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)

    @classmethod
    def of(cls, z: torch.Tensor) -> ZStats:
        return cls(z.mean(0), z.std(0).clamp(min=1e-6))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.mean) / self.std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean


def _fit_linear(features: torch.Tensor, num_outputs: int, loss_of_logits: Callable[[torch.Tensor], torch.Tensor], *,
                steps: int, lr: float, weight_decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch Adam on `loss_of_logits(features @ w.T + b) + weight_decay * ||w||^2` from zeros:
    (weights (num_outputs, d), bias (num_outputs,)). Deterministic."""
    w = torch.zeros(num_outputs, features.shape[1], requires_grad=True)
    b = torch.zeros(num_outputs, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    x = features.float()
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_of_logits(x @ w.T + b) + weight_decay * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def fit_linear_classifier(features: torch.Tensor, labels: torch.Tensor, *, steps: int = 500, lr: float = 0.1,
                          weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression (BCE with logits, full-batch Adam) per label column.

    features (N, d), labels (N, K) in {0, 1} -> (weights (K, d), bias (K,)). Deterministic.
    """
    y = labels.float()
    return _fit_linear(features, labels.shape[1], lambda logits: F.binary_cross_entropy_with_logits(logits, y),
                       steps=steps, lr=lr, weight_decay=weight_decay)


def probe_accuracy(train_z: torch.Tensor, train_y: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-probe accuracy per attribute on the held-out split, and the majority-class baseline: (K,), (K,)."""
    stats = ZStats.of(train_z)
    w, b = fit_linear_classifier(stats.normalise(train_z), train_y)
    predicted = (stats.normalise(test_z) @ w.T + b) > 0  # (N_test, K)
    accuracy = (predicted == test_y.bool()).float().mean(0)
    majority = train_y.float().mean(0) >= 0.5  # (K,): the constant guess from the training split
    baseline = (test_y.bool() == majority).float().mean(0)
    return accuracy, baseline


def fit_softmax_classifier(features: torch.Tensor, classes: torch.Tensor, num_classes: int, *, steps: int = 500,
                           lr: float = 0.1, weight_decay: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (cross-entropy, full-batch Adam): features (N, d), classes (N,) in
    [0, num_classes) -> (weights (num_classes, d), bias (num_classes,)). Deterministic."""
    return _fit_linear(features, num_classes, lambda logits: F.cross_entropy(logits, classes),
                       steps=steps, lr=lr, weight_decay=weight_decay)


def probe_categorical_accuracy(train_z: torch.Tensor, train_onehot: torch.Tensor, test_z: torch.Tensor,
                               test_onehot: torch.Tensor) -> tuple[float, float]:
    """Linear-probe accuracy of one categorical attribute given one-hot (N, C), and the majority-class
    baseline, on the held-out split. One softmax over the C values, rather than C one-vs-rest probes whose
    majority baseline ("not this value") is already (C - 1) / C."""
    num_classes = train_onehot.shape[1]
    train_y, test_y = train_onehot.argmax(1), test_onehot.argmax(1)  # (N,)
    stats = ZStats.of(train_z)
    w, b = fit_softmax_classifier(stats.normalise(train_z), train_y, num_classes)
    accuracy = ((stats.normalise(test_z) @ w.T + b).argmax(1) == test_y).float().mean()
    majority = torch.bincount(train_y, minlength=num_classes).argmax()
    return float(accuracy), float((test_y == majority).float().mean())


# ------------------------------------------------------------------------------------------------------
# `ldmscale pdae {reconstruct,interpolate,edit,probe}`

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_inputs(source: str, resolution: int, limit: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (N, 3, R, R) in [-1, 1] and attributes (N, K) or None, in a fixed order.

    `source`: a folder of shards or a shard pattern (attributes from each sample's json), or an image
    file or folder of images (no attributes).
    """
    from pathlib import Path

    from ldmscale.data.transforms import decode_image, resize_and_crop, to_tensor

    path = Path(source)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else \
        [path] if path.suffix.lower() in IMAGE_SUFFIXES else []
    if files:
        files = files[:limit] if limit is not None else files
        images = [to_tensor(resize_and_crop(decode_image(f.read_bytes()), resolution)) for f in files]
        return torch.stack(images), None
    from ldmscale.data.shards import ImageDataConfig, build_image_loader

    cfg = ImageDataConfig(shards=source, resolution=resolution, flip=False, shuffle=False, num_workers=0)
    try:
        loader = build_image_loader(cfg, batch_size=1, rank=0, world_size=1, seed=0, epochs=1)
    except ValueError as e:
        raise ValueError(f"--input: {source} is neither an image, a folder of images, nor shards ({e})") from None
    images, attributes = [], []
    for batch in loader:
        images.append(batch["image"])
        attributes.append(batch["attributes"])  # (1, A); A = 0 when the shards carry no json attributes
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError(f"--input: no images in {source}")
    attributes = torch.cat(attributes)  # (N, A)
    return torch.cat(images), attributes if attributes.shape[1] else None


def _attribute_index(name: str) -> int:
    from ldmscale.data.synthetic import ATTRIBUTE_NAMES

    if name in ATTRIBUTE_NAMES:
        return ATTRIBUTE_NAMES.index(name)
    if name.isdigit():
        return int(name)
    raise ValueError(f"--attribute: unknown attribute {name!r}; valid names: {', '.join(ATTRIBUTE_NAMES)} "
                     "(or a column index of the shards' attribute vector)")


def _load(checkpoint: str, device: str | None) -> PDAEPipeline:
    from ldmscale.training.tasks.pdae import load_pdae_pipeline

    return load_pdae_pipeline(checkpoint, device or ("cuda" if torch.cuda.is_available() else "cpu"))


def reconstruct_to_png(checkpoint: str, source: str, out: str, *, num: int = 8, encode_steps: int = 100,
                       decode_steps: int = 100, device: str | None = None) -> tuple[str, float]:
    """Inputs over reconstructions as a 2-row PNG; returns (path, pixel MSE in [0, 1] units)."""
    from ldmscale.observability.images import save_rows

    pipeline = _load(checkpoint, device)
    images, _ = read_inputs(source, pipeline.resolution, num)
    images = images.to(pipeline.device)
    recon = pipeline.reconstruct(images, encode_steps=encode_steps, decode_steps=decode_steps)
    mse = float(((recon - images) / 2).pow(2).mean())
    return str(save_rows([images, recon], out)), mse


def interpolate_to_png(checkpoint: str, source: str, out: str, *, pairs: int = 2, num: int = 7,
                       encode_steps: int = 100, decode_steps: int = 100, device: str | None = None) -> str:
    """One row per pair of consecutive inputs (0-1, 2-3, ...): `num` images from the first to the second."""
    from ldmscale.observability.images import save_image_grid

    pipeline = _load(checkpoint, device)
    images, _ = read_inputs(source, pipeline.resolution, 2 * pairs)
    if len(images) < 2:
        raise ValueError(f"--input: interpolation needs at least 2 images, {source} has {len(images)}")
    images = images[:len(images) // 2 * 2].to(pipeline.device)
    grid = pipeline.interpolate(images[0::2], images[1::2], num, encode_steps=encode_steps, decode_steps=decode_steps)
    return str(save_image_grid(grid, out, nrow=num))


def attribute_direction(pipeline: PDAEPipeline, images: torch.Tensor, attributes: torch.Tensor, column: int
                        ) -> tuple[torch.Tensor, ZStats]:
    """The logistic-regression weight row of one attribute on standardised z, and the z statistics."""
    z = torch.cat([pipeline.encode_z(chunk) for chunk in images.split(64)]).cpu()
    stats = ZStats.of(z)
    w, _ = fit_linear_classifier(stats.normalise(z), attributes[:, column:column + 1])
    return w[0], stats


def edit_to_png(checkpoint: str, source: str, out: str, *, attribute: str, scales: list[float],
                num: int = 4, encode_steps: int = 100, decode_steps: int = 100, device: str | None = None) -> str:
    """A classifier on all inputs' z for the attribute; the first `num` inputs edited at each scale, one row each."""
    from ldmscale.observability.images import save_image_grid

    pipeline = _load(checkpoint, device)
    images, attributes = read_inputs(source, pipeline.resolution)
    if attributes is None:
        raise ValueError(f"--input: editing needs shards with attribute vectors (json `attributes`); {source} has none")
    column = _attribute_index(attribute)
    if not 0 <= column < attributes.shape[1]:
        raise ValueError(f"--attribute: column {column} out of range; the shards have {attributes.shape[1]}")
    if len(set(attributes[:, column].tolist())) < 2:
        raise ValueError(f"--attribute: {attribute} is constant over {source}; nothing to learn a direction from")
    images = images.to(pipeline.device)
    direction, stats = attribute_direction(pipeline, images, attributes, column)
    stats = ZStats(stats.mean.to(pipeline.device), stats.std.to(pipeline.device))
    grid = pipeline.edit(images[:num], direction.to(pipeline.device), stats, scales, encode_steps=encode_steps,
                         decode_steps=decode_steps)
    return str(save_image_grid(grid, out, nrow=len(scales)))


def probe(checkpoint: str, source: str, *, held_out: float = 0.25, device: str | None = None
          ) -> dict[str, dict[str, float]]:
    """Linear-probe accuracy of z per attribute on the last `held_out` fraction of the inputs, with the
    majority-class baseline of that split: {name: {"accuracy", "baseline"}}. On the synthetic shards'
    attribute vector, also one softmax probe per one-hot property ("shape", "color") over its values."""
    from ldmscale.data.synthetic import ATTRIBUTE_NAMES, ONE_HOT_PROPERTIES

    if not 0 < held_out < 1:
        raise ValueError(f"--held-out: must be in (0, 1), got {held_out}")
    pipeline = _load(checkpoint, device)
    images, attributes = read_inputs(source, pipeline.resolution)
    if attributes is None:
        raise ValueError(f"--input: the probe needs shards with attribute vectors (json `attributes`); "
                         f"{source} has none")
    z = torch.cat([pipeline.encode_z(chunk.to(pipeline.device)) for chunk in images.split(64)]).cpu()
    split = len(z) - max(1, int(round(held_out * len(z))))
    if split < 2:
        raise ValueError(f"--input: {len(z)} samples are too few for a probe with a held-out split")
    accuracy, baseline = probe_accuracy(z[:split], attributes[:split], z[split:], attributes[split:])
    names = list(ATTRIBUTE_NAMES) if attributes.shape[1] == len(ATTRIBUTE_NAMES) else \
        [str(i) for i in range(attributes.shape[1])]
    report = {n: {"accuracy": float(a), "baseline": float(b)} for n, a, b in zip(names, accuracy, baseline)}
    if names == list(ATTRIBUTE_NAMES):
        for prop, columns in ONE_HOT_PROPERTIES.items():
            idx = [names.index(c) for c in columns]
            acc, base = probe_categorical_accuracy(z[:split], attributes[:split, idx], z[split:],
                                                   attributes[split:, idx])
            report[prop] = {"accuracy": acc, "baseline": base}
    return report
