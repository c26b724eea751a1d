"""Image decoding and the (deterministic) training transforms of the image pipeline.

The transform is the one used to train the LDM autoencoders (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", Sec. 4 / App. E): resize the shorter side to R with
an antialiasing filter, crop R x R (center, or a random window along the longer side), optional
horizontal flip, scale to [-1, 1].

Augmentation randomness comes only from `augment_rng(seed, epoch, key)`, never from a worker's or
the global RNG: a sample gets the same crop and flip whichever rank or worker reads it, so results
do not depend on the number of workers and an exactly resumed run sees identical tensors.
"""

from __future__ import annotations

import hashlib
import io
import random
from typing import Literal

import numpy as np
import torch
from PIL import Image

# Extensions (lower case) that hold the image of a webdataset sample, in order of preference.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from `parts` that is stable across processes and Python runs.

    Python's `hash()` of strings is salted per process, so it cannot be used for worker-independent
    randomness; a cryptographic digest of the parts' `repr` is.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def augment_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The RNG that decides the crop and flip of sample `key` in `epoch`."""
    return random.Random(derive_seed("augment", seed, epoch, key))


def decode_image(data: bytes) -> Image.Image:
    """Decodes encoded image bytes to an RGB PIL image; raises on undecodable data.

    `load()` forces the full decode here, so a truncated or corrupt file fails now (where the caller
    can skip and count it) rather than later inside a transform.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resizes so that the shorter side is `size`, keeping the aspect ratio (bicubic, antialiased).

    Pillow's `resize` widens the filter support when downsampling, which is the antialiasing that
    avoids the aliasing of torchvision's default tensor resize.
    """
    w, h = image.size
    short = min(w, h)
    if short == size:
        return image
    new_w = max(size, round(w * size / short))
    new_h = max(size, round(h * size / short))
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def crop_box(width: int, height: int, size: int, crop: Literal["center", "random"],
             rng: random.Random | None) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of a `size` x `size` crop of a `width` x `height` image."""
    if crop == "center":
        left, top = (width - size) // 2, (height - size) // 2
    elif crop == "random":
        assert rng is not None, "a random crop needs an rng"
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
    else:
        raise ValueError(f"crop: invalid value {crop!r}; valid values: center, random")
    return left, top, left + size, top + size


def resize_and_crop(image: Image.Image, size: int, crop: Literal["center", "random"] = "center",
                    rng: random.Random | None = None) -> Image.Image:
    """Shorter side to `size`, then a `size` x `size` crop."""
    image = resize_shorter_side(image, size)
    return image.crop(crop_box(image.width, image.height, size, crop, rng))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1] (x / 127.5 - 1)."""
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # [3, H, W]


def image_transform(data: bytes, *, resolution: int, crop: Literal["center", "random"], flip: bool,
                    seed: int, epoch: int, key: str) -> torch.Tensor:
    """Encoded bytes -> [3, R, R] in [-1, 1] with the crop and flip of (seed, epoch, key)."""
    rng = augment_rng(seed, epoch, key)
    image = resize_and_crop(decode_image(data), resolution, crop, rng)
    # Draw the flip after the crop so that turning the flip on or off leaves the crop unchanged.
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)  # [3, R, R]
