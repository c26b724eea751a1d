"""The coloured-shapes dataset: determinism, consistency of labels/captions/attributes, manifest."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldmscale.data.synthetic import (ATTRIBUTE_NAMES, COLOR_RGB, COLORS, POSITION_XY, POSITIONS, SHAPES, caption_for,
                                     write_synthetic_shards)


def read_samples(folder) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_same_seed_gives_identical_shards_and_other_seed_differs(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", num_samples=24, resolution=32, samples_per_shard=10, seed=3,
                               progress=False)
    b = write_synthetic_shards(tmp_path / "b", num_samples=24, resolution=32, samples_per_shard=10, seed=3,
                               progress=False)
    assert a == b
    for shard in a["shards"]:
        assert (tmp_path / "a" / shard["name"]).read_bytes() == (tmp_path / "b" / shard["name"]).read_bytes()
    # A sample does not depend on how the set is cut into shards.
    write_synthetic_shards(tmp_path / "c", num_samples=24, resolution=32, samples_per_shard=7, seed=3, progress=False)
    assert read_samples(tmp_path / "a") == read_samples(tmp_path / "c")
    # Another seed (a held-out set) has other images and never the same keys.
    write_synthetic_shards(tmp_path / "d", num_samples=24, resolution=32, samples_per_shard=10, seed=4, progress=False)
    first, other = read_samples(tmp_path / "a"), read_samples(tmp_path / "d")
    assert not set(first) & set(other)
    assert [s["png"] for s in first.values()] != [s["png"] for s in other.values()]


def test_manifest_counts_match_the_shards(tmp_path):
    manifest = write_synthetic_shards(tmp_path, num_samples=24, resolution=32, samples_per_shard=10, seed=0,
                                      progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert [(s["name"], s["num_samples"]) for s in manifest["shards"]] == [
        ("shard-000000.tar", 10), ("shard-000001.tar", 10), ("shard-000002.tar", 4)]
    assert manifest["total"] == 24 and manifest["resolution"] == 32 and manifest["seed"] == 0
    assert len(read_samples(tmp_path)) == 24
    assert manifest["classes"][:2] == ["red circle", "green circle"] and len(manifest["classes"]) == 12
    with pytest.raises(ValueError, match="already contains shards"):
        write_synthetic_shards(tmp_path, num_samples=4, progress=False)


def test_caption_class_attributes_and_pixels_agree(tmp_path):
    write_synthetic_shards(tmp_path, num_samples=60, resolution=32, samples_per_shard=60, seed=5, progress=False)
    samples = read_samples(tmp_path)
    seen_shapes, seen_positions = set(), set()
    for key, s in samples.items():
        meta = json.loads(s["json"])
        shape, color, position = meta["shape"], meta["color"], meta["position"]
        seen_shapes.add(shape), seen_positions.add(position)
        assert s["txt"].decode() == caption_for(shape, color, position)
        assert int(s["cls"]) == SHAPES.index(shape) * len(COLORS) + COLORS.index(color)
        attrs = dict(zip(ATTRIBUTE_NAMES, meta["attributes"], strict=True))
        assert [attrs[f"is_{x}"] for x in SHAPES] == [int(x == shape) for x in SHAPES]
        assert [attrs[f"is_{x}"] for x in COLORS] == [int(x == color) for x in COLORS]
        assert attrs["is_center"] == int(position == "center")
        assert attrs["is_top"] == int(position.startswith("top")) and attrs["is_left"] == int(position.endswith("left"))

        image = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"), dtype=np.float64)  # [32, 32, 3]
        assert image.shape == (32, 32, 3)
        # The pixel at the nominal shape centre is nearest to the captioned colour.
        x, y = (int(v * 32) for v in POSITION_XY[position])
        distances = {c: np.abs(image[y, x] - COLOR_RGB[c]).sum() for c in COLORS}
        assert min(distances, key=distances.get) == color, (key, image[y, x], color)
        # The shape covers well under half the image, so the median pixel is background.
        assert attrs["dark_background"] == int(np.median(image.mean(axis=2)) < 128), key
    assert seen_shapes == set(SHAPES) and seen_positions == set(POSITIONS)


def test_caption_for_rejects_unknown_values():
    assert caption_for("triangle", "blue", "center") == "a blue triangle in the center"
    with pytest.raises(ValueError, match="valid"):
        caption_for("hexagon", "blue", "center")
