"""Decode, resize-shorter-side + crop, flip, [-1, 1] scaling; augmentation from (seed, epoch, key)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from ldmscale.data.transforms import decode_image, image_transform, resize_and_crop, to_tensor


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def bands() -> np.ndarray:
    """80 x 20 image: blue columns 0-19, red 20-59, green 60-79."""
    a = np.zeros((20, 80, 3), np.uint8)
    a[:, :20] = (0, 0, 255)
    a[:, 20:60] = (255, 0, 0)
    a[:, 60:] = (0, 255, 0)
    return a


def test_resize_shorter_side_then_center_crop_keeps_the_middle():
    # Shorter side 20 -> 10 makes it 40 x 10 (bands 0-9 / 10-29 / 30-39); the centre 10 x 10
    # window is columns 15-24, inside the red band even after the antialiasing filter's spread.
    out = np.asarray(resize_and_crop(Image.fromarray(bands()), 10, "center"))
    assert out.shape == (10, 10, 3)
    assert np.abs(out.astype(int) - (255, 0, 0)).max() <= 2


def test_to_tensor_scales_to_minus_one_one_chw():
    x = to_tensor(Image.fromarray(bands()))
    assert x.shape == (3, 20, 80) and x.dtype == torch.float32
    assert torch.equal(x[:, 0, 30], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(x[:, 5, 0], torch.tensor([-1.0, -1.0, 1.0]))


def test_random_crop_and_flip_come_from_seed_epoch_key():
    gradient = np.broadcast_to(np.linspace(0, 255, 48)[None, :, None], (32, 48, 3)).copy()
    data = png_bytes(gradient)

    def run(seed=0, epoch=0, key="a", crop="random", flip=True):
        return image_transform(data, resolution=32, crop=crop, flip=flip, seed=seed, epoch=epoch, key=key)

    assert torch.equal(run(), run())
    outputs = [run(epoch=e) for e in range(8)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])  # a new crop/flip per epoch
    assert any(not torch.equal(run(key="a"), run(key=k)) for k in "bcdefgh")  # and per sample
    # A centre crop with a flip is either the plain centre crop or its mirror image; both occur.
    plain = run(crop="center", flip=False)
    flipped = [run(crop="center", key=k) for k in "abcdefghijkl"]
    assert all(torch.equal(f, plain) or torch.equal(f, plain.flip(2)) for f in flipped)
    assert any(torch.equal(f, plain) for f in flipped) and any(torch.equal(f, plain.flip(2)) for f in flipped)
    assert plain.min() >= -1.0 and plain.max() <= 1.0 and plain.shape == (3, 32, 32)


def test_decode_rejects_garbage_and_converts_to_rgb():
    with pytest.raises(UnidentifiedImageError):
        decode_image(b"definitely not an image")
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).mode == "RGB"
