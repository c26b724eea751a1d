"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features", eq. 1).

d(x, y) = sum_l mean_{h,w} || w_l * (f_l(x) - f_l(y)) ||^2 with f_l the channel-normalised VGG16
activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 and w_l the learned non-negative 1x1 heads
`lin0..lin4`. Layout and input scaling follow taming-transformers `lpips.py` and the `lpips` package,
so their `vgg.pth` head file (keys `lin{i}.model.1.weight`) and torchvision's VGG16 weights load as is.

Weights never come from a hard-coded URL: `vgg_weights` and `heads_weights` name local files
(safetensors, or torch files read with `weights_only=True`). Without `vgg_weights`, torchvision's
`VGG16_Weights.IMAGENET1K_V1` is tried (its cache or download); without `heads_weights`, the file
bundled with the `lpips` package, if that package is installed. The network is frozen and stays in
eval mode.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

# Ends of the relu1_2 .. relu5_3 slices in torchvision's `vgg16().features`.
SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)
# ImageNet statistics expressed for inputs in [-1, 1] (taming / lpips `ScalingLayer`).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_HELP = ("set task.loss.lpips.vgg_weights to a torchvision VGG16 state dict (vgg16-397923af.pth) and "
         "task.loss.lpips.heads_weights to the LPIPS v0.1 vgg.pth (keys lin0..lin4.model.1.weight), "
         "or task.loss.lpips.pretrained=false for an untrained network (tests only)")


@dataclasses.dataclass
class LPIPSConfig:
    vgg_weights: str | None = None  # torchvision VGG16 state dict (.pth or .safetensors)
    heads_weights: str | None = None  # LPIPS v0.1 `vgg.pth` linear heads
    pretrained: bool = True  # false: untrained VGG and uniform heads, for tests only


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LPIPS weights file {str(path)!r} does not exist; {_HELP}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


class LinearHead(nn.Module):
    """1x1 conv to one channel; `model.1` matches the (dropout, conv) layout of the published heads."""

    def __init__(self, channels: int):
        super().__init__()
        # Dropout is inert here because the network is always in eval mode.
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Perceptual distance between images in [-1, 1]; (B, 3, H, W) x 2 -> (B,)."""

    def __init__(self, cfg: LPIPSConfig):
        super().__init__()
        # torchvision is imported here, not at module level: importing it pulls in torch._dynamo (~2 s of
        # start-up for every process, whether or not LPIPS is used).
        from torchvision.models.vgg import cfgs, make_layers

        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        features = make_layers(cfgs["D"], batch_norm=False)[: SLICE_ENDS[-1]]  # torchvision vgg16 features
        starts = (0,) + SLICE_ENDS[:-1]
        self.slices = nn.ModuleList(features[a:b] for a, b in zip(starts, SLICE_ENDS))
        for i, c in enumerate(CHANNELS):
            self.add_module(f"lin{i}", LinearHead(c))
        if cfg.pretrained:
            self._load_pretrained(cfg)
        else:
            self._init_untrained()
        self.requires_grad_(False)
        self.eval()

    def heads(self) -> list[LinearHead]:
        return [getattr(self, f"lin{i}") for i in range(len(CHANNELS))]

    def train(self, mode: bool = True) -> "LPIPS":
        # Frozen metric: a parent's .train() must not switch on the heads' dropout (it does in taming).
        return super().train(False)

    def _init_untrained(self) -> None:
        for m in self.slices.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's VGG initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        # Uniform non-negative heads keep d(x, y) >= 0 (trained heads are clamped non-negative too).
        for head, c in zip(self.heads(), CHANNELS):
            nn.init.constant_(head.model[1].weight, 1.0 / c)

    def _load_pretrained(self, cfg: LPIPSConfig) -> None:
        heads_path = cfg.heads_weights or _bundled_heads()
        if heads_path is None:
            raise ValueError("LPIPS weights unavailable: task.loss.lpips.heads_weights is not set and the `lpips` "
                             f"package (which bundles them) is not installed; {_HELP}")
        heads = load_weights_file(heads_path)
        names = [f"lin{i}.model.1.weight" for i in range(len(CHANNELS))]
        missing = [k for k in names if k not in heads]
        if missing:
            raise ValueError(f"LPIPS heads file {heads_path!r} lacks {missing}; {_HELP}")
        with torch.no_grad():
            for head, name in zip(self.heads(), names):
                weight = head.model[1].weight
                if heads[name].shape != weight.shape:
                    raise ValueError(f"LPIPS heads file {heads_path!r}: {name} has shape {tuple(heads[name].shape)}, "
                                     f"expected {tuple(weight.shape)}; {_HELP}")
                weight.copy_(heads[name])

        if cfg.vgg_weights is not None:
            vgg = load_weights_file(cfg.vgg_weights)
        else:
            try:
                from torchvision.models import VGG16_Weights

                vgg = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
            except (OSError, RuntimeError) as e:  # no network (URLError is an OSError), no cache, bad hash
                raise ValueError(f"LPIPS weights unavailable: task.loss.lpips.vgg_weights is not set and torchvision "
                                 f"could not load VGG16_Weights.IMAGENET1K_V1 ({type(e).__name__}: {e}); "
                                 f"{_HELP}") from e
        features = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
        # The slices are features[0:30] in order, so their flattened indices equal torchvision's.
        flat = nn.Sequential(*[m for s in self.slices for m in s])  # shares modules with self.slices
        missing = [k for k in flat.state_dict() if k not in features]
        if missing:
            raise ValueError(f"VGG16 weights lack features.{missing[0]} (and {len(missing) - 1} more); "
                             f"expected a torchvision vgg16 state dict; {_HELP}")
        flat.load_state_dict({k: features[k] for k in flat.state_dict()}, strict=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = self.shift.dtype
        hx = (x.to(dtype) - self.shift) / self.scale  # (B, 3, H, W)
        hy = (y.to(dtype) - self.shift) / self.scale
        total = torch.zeros(x.shape[0], device=x.device, dtype=dtype)
        for block, head in zip(self.slices, self.heads()):
            hx, hy = block(hx), block(hy)  # (B, C_l, H_l, W_l)
            diff = (_unit_channels(hx) - _unit_channels(hy)).pow(2)
            total = total + head(diff).mean(dim=(1, 2, 3))  # spatial average of the (B, 1, H_l, W_l) map
        return total


def _unit_channels(feats: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalises each position's feature vector to unit length over channels (taming `normalize_tensor`)."""
    return feats / (feats.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _bundled_heads() -> str | None:
    """The LPIPS v0.1 VGG heads shipped inside the `lpips` package, located without importing it."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / "vgg.pth"
    return str(path) if path.is_file() else None
