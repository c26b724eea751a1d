"""A labelled synthetic image dataset ("coloured shapes") written as webdataset shards.

Every sample is one coloured shape at one of a few positions over a plain, lightly textured
background, with a caption, a class id and a binary attribute vector, so that every stage of the
pipeline (autoencoder, class- and text-conditional LDM, PDAE attribute manipulation) can be trained
and checked on a CPU in seconds.

Sample keys in each tar (webdataset layout, one file per key):
  png   the image, `resolution` x `resolution` RGB
  txt   caption, `caption_for(shape, color, position)`, e.g. "a red circle in the top left"
  cls   class id = SHAPES.index(shape) * len(COLORS) + COLORS.index(color)  (0 .. 11)
  json  {"shape", "color", "position", "attributes": [0/1 per ATTRIBUTE_NAMES]}

Everything is drawn from `derive_seed(seed, index)`, so the same seed gives byte-identical shards
(PNG pixels, captions, tar headers with mtime 0) regardless of `samples_per_shard`. For a held-out
set, call `write_synthetic_shards` again with another `seed` and another `out_dir`; keys carry the
seed (`s{seed}_{index:06d}`) so the two sets never share a key.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from ldmscale.data.transforms import derive_seed

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")

# The binary attribute vector stored in `json["attributes"]`, in this order. "center" has none of
# left/right/top/bottom set; `is_large` marks a shape whose half-size is above the median of the
# size jitter; `dark_background` marks the dark half of the background palette.
ATTRIBUTE_NAMES = (
    "is_circle", "is_square", "is_triangle",
    "is_red", "is_green", "is_blue", "is_yellow",
    "is_left", "is_right", "is_top", "is_bottom", "is_center",
    "is_large", "dark_background",
)
# The properties stored one-hot in the attribute vector, each with its attributes in value order.
ONE_HOT_PROPERTIES = {"shape": tuple(f"is_{s}" for s in SHAPES), "color": tuple(f"is_{c}" for c in COLORS)}

COLOR_RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
# Shape centre as a fraction of the image side (x, y).
POSITION_XY = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "bottom left": (0.28, 0.72),
               "bottom right": (0.72, 0.72), "center": (0.5, 0.5)}
# Half-size of a shape as a fraction of the side; `is_large` iff above the midpoint.
SIZE_RANGE = (0.13, 0.21)
NUM_CLASSES = len(SHAPES) * len(COLORS)
# Drawn at this multiple of the resolution and downsampled, for antialiased edges.
SUPERSAMPLE = 4


def caption_for(shape: str, color: str, position: str) -> str:
    """The caption of a sample, e.g. `caption_for("circle", "red", "top left")`."""
    if shape not in SHAPES or color not in COLORS or position not in POSITIONS:
        raise ValueError(f"unknown shape/color/position {shape!r}/{color!r}/{position!r}; valid: "
                         f"{', '.join(SHAPES)} / {', '.join(COLORS)} / {', '.join(POSITIONS)}")
    where = "the center" if position == "center" else f"the {position}"
    return f"a {color} {shape} in {where}"


def class_id(shape: str, color: str) -> int:
    """`shape * len(COLORS) + color` (indices into SHAPES and COLORS)."""
    return SHAPES.index(shape) * len(COLORS) + COLORS.index(color)


def class_names() -> list[str]:
    """Names of the class ids in order, e.g. index 0 is "red circle"."""
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def attributes_for(shape: str, color: str, position: str, large: bool, dark: bool) -> list[int]:
    values = {f"is_{shape}": 1, f"is_{color}": 1, "is_large": int(large), "dark_background": int(dark)}
    if position == "center":
        values["is_center"] = 1
    else:
        vertical, horizontal = position.split()
        values[f"is_{vertical}"] = values[f"is_{horizontal}"] = 1
    return [values.get(name, 0) for name in ATTRIBUTE_NAMES]


def render_sample(index: int, *, seed: int, resolution: int) -> dict:
    """Draws sample `index`: returns {"image": PIL RGB, "shape", "color", "position", "large", "dark"}."""
    rng = np.random.default_rng(derive_seed("synthetic", seed, index))
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLORS[rng.integers(len(COLORS))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    half = rng.uniform(*SIZE_RANGE)
    large = bool(half > sum(SIZE_RANGE) / 2)
    dark = bool(rng.random() < 0.5)
    base = rng.integers(20, 70) if dark else rng.integers(185, 235)
    tint = rng.integers(-12, 13, size=3)
    jitter = rng.uniform(-0.04, 0.04, size=2)
    color_jitter = rng.integers(-15, 16, size=3)

    side = resolution * SUPERSAMPLE
    background = np.clip(base + tint, 0, 255).astype(np.uint8)  # [3]
    canvas = Image.new("RGB", (side, side), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(canvas)
    cx = (POSITION_XY[position][0] + jitter[0]) * side
    cy = (POSITION_XY[position][1] + jitter[1]) * side
    r = half * side
    fill = tuple(int(v) for v in np.clip(np.array(COLOR_RGB[color]) + color_jitter, 0, 255))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.9  # same visual area as the circle, roughly
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        # Equilateral triangle pointing up whose centroid is the shape centre.
        draw.polygon([(cx, cy - r * 1.15), (cx - r * 1.15, cy + r * 0.75), (cx + r * 1.15, cy + r * 0.75)],
                     fill=fill)
    image = canvas.resize((resolution, resolution), Image.Resampling.LANCZOS)
    # Light texture: +-6 levels of per-pixel noise, so the background is not perfectly flat.
    noise = rng.integers(-6, 7, size=(resolution, resolution, 1))  # [R, R, 1]
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)  # [R, R, 3]
    return {"image": Image.fromarray(pixels, "RGB"), "shape": shape, "color": color, "position": position,
            "large": large, "dark": dark}


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_record(index: int, *, seed: int, resolution: int) -> dict:
    """The webdataset record (bytes per extension) of sample `index`."""
    s = render_sample(index, seed=seed, resolution=resolution)
    meta = {"shape": s["shape"], "color": s["color"], "position": s["position"],
            "attributes": attributes_for(s["shape"], s["color"], s["position"], s["large"], s["dark"])}
    return {
        "__key__": f"s{seed}_{index:06d}",
        "png": encode_png(s["image"]),
        "txt": caption_for(s["shape"], s["color"], s["position"]).encode("utf-8"),
        "cls": str(class_id(s["shape"], s["color"])).encode("ascii"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def check_empty_output(out_dir: Path) -> None:
    """Refuses a folder that already holds tars: stale shards would silently join the dataset."""
    stale = sorted(p.name for p in out_dir.glob("*.tar"))
    if stale:
        raise ValueError(f"out_dir: {out_dir} already contains shards ({', '.join(stale[:3])}, ...); "
                         "choose an empty folder")


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Writes `manifest.json` atomically (temp file, then rename)."""
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / "manifest.json")


class CountingShardWriter:
    """`webdataset.ShardWriter` named `shard-%06d.tar` that records each shard's name and sample count."""

    def __init__(self, out_dir: Path, samples_per_shard: int):
        self.shards: list[dict] = []
        # mtime=0 makes the tar headers, and so the shard files, reproducible byte for byte.
        self._writer = wds.ShardWriter(str(out_dir / "shard-%06d.tar"), maxcount=samples_per_shard,
                                       verbose=0, encoder=False, mtime=0, post=self._finished)

    def _finished(self, fname: str) -> None:
        self.shards.append({"name": os.path.basename(fname), "num_samples": self._writer.count})

    def write(self, record: dict) -> None:
        self._writer.write(record)

    def close(self) -> list[dict]:
        self._writer.close()
        return self.shards


def write_synthetic_shards(out_dir: str | os.PathLike, *, num_samples: int = 2000, resolution: int = 64,
                           seed: int = 0, samples_per_shard: int = 250, progress: bool = True) -> dict:
    """Writes `num_samples` coloured-shape samples into `out_dir/shard-XXXXXX.tar` + `manifest.json`.

    Returns the manifest: {"shards": [{"name", "num_samples"}], "total", "resolution", "seed",
    "classes", "attribute_names", "shapes", "colors", "positions"}.
    """
    problems = []
    if num_samples < 1:
        problems.append(f"num_samples: must be >= 1, got {num_samples}")
    if resolution < 8:
        problems.append(f"resolution: must be >= 8, got {resolution}")
    if samples_per_shard < 1:
        problems.append(f"samples_per_shard: must be >= 1, got {samples_per_shard}")
    if problems:
        raise ValueError("; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_empty_output(out)
    writer = CountingShardWriter(out, samples_per_shard)
    for index in tqdm(range(num_samples), desc="synth", unit="img", disable=not progress):
        writer.write(sample_record(index, seed=seed, resolution=resolution))
    shards = writer.close()
    manifest = {
        "shards": shards,
        "total": sum(s["num_samples"] for s in shards),
        "resolution": resolution,
        "seed": seed,
        "classes": class_names(),
        "attribute_names": list(ATTRIBUTE_NAMES),
        "shapes": list(SHAPES),
        "colors": list(COLORS),
        "positions": list(POSITIONS),
    }
    assert manifest["total"] == num_samples, manifest["total"]
    write_manifest(out, manifest)
    return manifest
