"""A small CNN that names the shape, colour and position in a synthetic coloured-shapes image
(`ldmscale.data.synthetic`): the judge of prompt adherence for models trained on that dataset.

It trains on freshly rendered images, and optionally on their reconstructions by an autoencoder too,
so that it reads images with that autoencoder's blur as well as clean ones (samples of a latent
diffusion model are always decoded by it). The accuracy on rendered images it never saw is reported
beside every use: a judge that cannot read clean images would make any adherence figure meaningless.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldmscale.data.synthetic import COLORS, POSITIONS, SHAPES, render_sample

# The properties the classifier predicts, each with its class names (indices are the labels).
PROPERTIES = {"shape": SHAPES, "color": COLORS, "position": POSITIONS}


class ShapesClassifier(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> {"shape": (B, 3), "color": (B, 4), "position": (B, 5)} logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, 2 * width, 2 * width):  # 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(8, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, stride=2, padding=1), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers, nn.Flatten())  # position needs the spatial layout: no pooling
        self.heads = nn.ModuleDict({name: nn.Linear(channels * 16, len(names)) for name, names in PROPERTIES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (32, 32):
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


def render_labelled(num: int, seed: int, resolution: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`num` rendered samples: images (num, 3, R, R) in [-1, 1] and labels {property: (num,) long}."""
    images, labels = [], {name: [] for name in PROPERTIES}
    for index in range(num):
        sample = render_sample(index, seed=seed, resolution=resolution)
        images.append(torch.from_numpy(np.asarray(sample["image"], dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
        for name, names in PROPERTIES.items():
            labels[name].append(names.index(sample[name]))
    return torch.stack(images), {name: torch.tensor(v) for name, v in labels.items()}


@dataclasses.dataclass
class ClassifierTraining:
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


def train_shapes_classifier(images: torch.Tensor, labels: dict[str, torch.Tensor], cfg: ClassifierTraining,
                            progress: Callable[[int], None] | None = None) -> ShapesClassifier:
    """Adam on the summed cross-entropies of the three properties; deterministic for a given seed."""
    torch.manual_seed(cfg.seed)
    model = ShapesClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=generator)
        logits = model(images[idx])
        loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in PROPERTIES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step + 1)
    return model.eval()


@torch.no_grad()
def predict(model: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Predicted class index per property: {property: (N,) long}."""
    chunks = [model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return {name: torch.cat([c[name] for c in chunks]).argmax(1) for name in PROPERTIES}


def accuracy(model: ShapesClassifier, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction right per property, for the properties present in `labels`."""
    predicted = predict(model, images)
    return {name: float((predicted[name] == labels[name]).float().mean()) for name in labels}


def chance(name: str) -> float:
    """The accuracy of a uniform guess: every class is equally likely in the dataset and in the prompts."""
    return 1.0 / len(PROPERTIES[name])
