"""The autoencoder's latent bottleneck: KL (diagonal Gaussian posterior) or VQ (codebook).

Both map the `quant_conv` output ("moments", (B, m * E, h, w) with m = `moments_per_channel`) to the
latent the decoder sees, (B, E, h, w), and report unweighted loss terms plus detached statistics.

KL (Rombach et al. 2022, §3.1 and appendix G): the encoder predicts the mean and log-variance of a
diagonal Gaussian q(z|x); the loss term is KL(q(z|x) || N(0, I)), summed over latent dims and
averaged over the batch, which is how LDM's `kl_weight` of 1e-6 is meant.

VQ (van den Oord et al. 2017, eq. 3): nearest-codebook quantisation with a straight-through
gradient, codebook loss ||z_q - sg(z)||^2 plus commitment loss beta * ||sg(z_q) - z||^2. Options:
EMA codebook updates (the same paper, appendix A.1) and restarts of dead codes to random encoder
outputs (Dhariwal et al. 2020, Jukebox, §3.2 "random restarts").

The bottleneck module is called `quantize` inside the autoencoder for both kinds, because the
CompVis VQ checkpoint stores the codebook as `quantize.embedding.weight`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldmscale.config.registry import Registry

REGULARIZERS = Registry("regularizer")

# LDM's `DiagonalGaussianDistribution` clamps the log-variance to this range so that exp() stays finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass
class KLConfig:
    kind: str = "kl"


@dataclasses.dataclass
class VQConfig:
    kind: str = "vq"
    n_embed: int = 8192
    beta: float = 0.25
    ema: bool = False
    decay: float = 0.99
    dead_code: Literal["none", "restart"] = "none"
    restart_threshold: float = 1.0

    def validate(self) -> list[str]:
        problems = []
        if self.n_embed < 2:
            problems.append(f"n_embed: must be at least 2, got {self.n_embed}")
        if self.beta < 0:
            problems.append(f"beta: must be >= 0, got {self.beta}")
        if not 0.0 < self.decay < 1.0:
            problems.append(f"decay: must lie in (0, 1), got {self.decay}")
        if self.restart_threshold <= 0:
            problems.append(f"restart_threshold: must be > 0, got {self.restart_threshold}")
        return problems


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); tensors are (B, C, h, w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """Splits (B, 2C, h, w) channel-wise into mean and log-variance, as LDM does."""
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise  # (B, C, h, w), reparameterised

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over (C, h, w): 0.5 * sum(mu^2 + var - 1 - logvar); (B,).

        Summed in fp32: thousands of bf16 terms would lose the small KL values.
        """
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(dim=1)


@dataclasses.dataclass
class RegularizerOutput:
    z: torch.Tensor  # (B, E, h, w): what `post_quant_conv` receives
    losses: dict[str, torch.Tensor]  # unweighted scalar loss terms, weighted by the loss config
    stats: dict[str, torch.Tensor]  # detached scalars for logging


@dataclasses.dataclass
class QuantizerOutput(RegularizerOutput):
    indices: torch.Tensor  # (B, h, w) codebook indices


class Regularizer(nn.Module, ABC):
    """The bottleneck between `quant_conv` and `post_quant_conv`."""

    # Encoder output channels per latent channel (2 for KL: mean and log-variance; CompVis `double_z`).
    moments_per_channel: int

    @abstractmethod
    def forward(self, moments: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> RegularizerOutput:
        """Training/reconstruction path: latent for the decoder plus loss terms and stats."""

    @abstractmethod
    def encode(self, moments: torch.Tensor) -> DiagonalGaussian | QuantizerOutput:
        """The posterior (KL) or the quantisation result (VQ), without any training-time update."""

    @abstractmethod
    def to_latent(self, moments: torch.Tensor, sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        """The (unscaled) latent a diffusion model is trained on."""

    @abstractmethod
    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Maps a diffusion latent back to what `post_quant_conv` expects."""


class GaussianRegularizer(Regularizer):
    """KL bottleneck; no parameters (the moments come from `quant_conv`)."""

    moments_per_channel = 2

    def forward(self, moments, sample=True, generator=None):
        posterior = DiagonalGaussian.from_moments(moments)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, E, h, w)
        # LDM: kl_loss = sum(kl) / batch, i.e. the batch mean of the per-sample sum.
        kl = posterior.kl().mean()
        stats = {"posterior_std": posterior.std.detach().mean(), "latent_std": z.detach().float().std()}
        return RegularizerOutput(z=z, losses={"kl": kl}, stats=stats)

    def encode(self, moments):
        return DiagonalGaussian.from_moments(moments)

    def to_latent(self, moments, sample, generator=None):
        posterior = DiagonalGaussian.from_moments(moments)
        return posterior.sample(generator) if sample else posterior.mode()

    def from_latent(self, z):
        return z


class Codebook(nn.Module):
    """K x D code vectors: a Parameter when learned by gradients, a buffer when learned by EMA.

    A buffer under EMA keeps the in-place updates away from optimizers and ZeRO-3 partitioning.
    """

    def __init__(self, n_embed: int, embed_dim: int, learned: bool):
        super().__init__()
        # taming's VectorQuantizer2 initialisation.
        weight = torch.empty(n_embed, embed_dim).uniform_(-1.0 / n_embed, 1.0 / n_embed)
        if learned:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)


class VectorQuantizer(Regularizer):
    """Nearest-neighbour vector quantiser with a straight-through estimator.

    Loss (van den Oord et al. 2017, eq. 3): beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2 (means over
    elements). With `ema`, the codebook term is replaced by exponential moving averages of the
    assigned encoder outputs (appendix A.1, with Laplace smoothing of the counts as in Sonnet) and
    only the commitment term remains. With `dead_code="restart"`, a code whose moving average of
    per-batch assignments falls below `restart_threshold` is replaced by a random encoder output of
    the current batch (Jukebox, §3.2).

    Updates happen only in `forward` in training mode and only use this module's own batch. When
    ranks should agree on EMA statistics, the caller may set `stat_reducer` to a function that sums a
    tensor over ranks; the model itself never communicates. Restarts draw from the local batch.
    """

    moments_per_channel = 1

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, ema: bool = False, decay: float = 0.99,
                 dead_code: str = "none", restart_threshold: float = 1.0, eps: float = 1e-5,
                 stat_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        assert dead_code in ("none", "restart"), dead_code
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.dead_code, self.restart_threshold = dead_code, restart_threshold
        self.stat_reducer = stat_reducer
        self.embedding = Codebook(n_embed, embed_dim, learned=not ema)
        if ema:
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if dead_code == "restart":
            # Starts at the threshold, so a code unused in the first batches is restarted from data early.
            self.register_buffer("code_usage", torch.full((n_embed,), float(restart_threshold)))

    def lookup(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code per position; (B, D, h, w) -> quantised (B, D, h, w), indices (B, h, w)."""
        b, d, h, w = z.shape
        codes = self.embedding.weight  # (K, D)
        with torch.no_grad():
            flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (N, D), N = B*h*w
            # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, in fp32 so that ties do not depend on precision.
            dist = flat.pow(2).sum(1, keepdim=True) + codes.float().pow(2).sum(1) - 2.0 * flat @ codes.float().t()
            indices = dist.argmin(dim=1)  # (N,)
        z_q = codes[indices].view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)  # (B, D, h, w)
        return z_q, indices.view(b, h, w)

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantises `z` with loss terms and codebook statistics, without updating the codebook."""
        z_q, indices = self.lookup(z)
        commitment = F.mse_loss(z, z_q.detach())
        loss = self.beta * commitment if self.ema else self.beta * commitment + F.mse_loss(z_q, z.detach())
        z_st = z + (z_q - z).detach()  # straight-through: forward z_q, gradient of the identity to z
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed).float()  # (K,)
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        stats = {"perplexity": perplexity, "usage": (counts > 0).float().mean(), "commitment": commitment.detach()}
        return QuantizerOutput(z=z_st, losses={"codebook": loss}, stats=stats, indices=indices)

    def forward(self, moments, sample=True, generator=None):
        out = self.quantize(moments)
        if self.training and (self.ema or self.dead_code == "restart"):
            self._update(moments.detach(), out.indices.flatten())
        return out

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.stat_reducer(t) if self.stat_reducer is not None else t

    @torch.no_grad()
    def _update(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()  # (N, D)
        counts = torch.bincount(indices, minlength=self.n_embed).float()  # (K,)
        counts = self._reduce(counts)
        if self.ema:
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)  # (K, D)
            sums = self._reduce(sums)
            self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
            self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
            n = self.ema_cluster_size.sum()
            # Laplace smoothing keeps an unused code from dividing by zero.
            smoothed = (self.ema_cluster_size + self.eps) / (n + self.n_embed * self.eps) * n
            self.embedding.weight.copy_(self.ema_embed_sum / smoothed[:, None])
        if self.dead_code == "restart":
            self.code_usage.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
            dead = (self.code_usage < self.restart_threshold).nonzero().flatten()  # (n_dead,)
            if dead.numel() > 0:
                pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
                new = flat[pick].to(self.embedding.weight.dtype)  # (n_dead, D)
                self.embedding.weight[dead] = new
                self.code_usage[dead] = self.restart_threshold
                if self.ema:
                    # Restarted codes start as if they had one assignment at their new position.
                    self.ema_cluster_size[dead] = 1.0
                    self.ema_embed_sum[dead] = new.float()

    def encode(self, moments):
        return self.quantize(moments)

    def to_latent(self, moments, sample, generator=None):
        # LDM's VQModelInterface trains the diffusion model on the pre-quantisation latent and
        # quantises only when decoding.
        return moments

    def from_latent(self, z):
        return self.lookup(z)[0]


def build_kl(cfg: KLConfig, *, embed_dim: int) -> GaussianRegularizer:
    return GaussianRegularizer()


def build_vq(cfg: VQConfig, *, embed_dim: int) -> VectorQuantizer:
    return VectorQuantizer(cfg.n_embed, embed_dim, beta=cfg.beta, ema=cfg.ema, decay=cfg.decay,
                           dead_code=cfg.dead_code, restart_threshold=cfg.restart_threshold)


REGULARIZERS.register("kl", KLConfig, build_kl)
REGULARIZERS.register("vq", VQConfig, build_vq)
