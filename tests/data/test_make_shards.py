"""`make_shards`: class-subfolder and flat layouts, captions, resizing, unreadable files."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldmscale.data.make_shards import make_shards
from ldmscale.data.shards import ImageDataConfig, build_image_loader


def save(path, size, color, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def read_tar_samples(folder) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_class_folders_captions_resize_and_a_corrupt_file(tmp_path, caplog):
    src = tmp_path / "src"
    save(src / "cats" / "a.png", (40, 20), (255, 0, 0))
    save(src / "cats" / "b.jpg", (20, 30), (0, 0, 255), fmt="JPEG")
    save(src / "dogs" / "c.png", (24, 24), (0, 255, 0))
    (src / "dogs" / "c.txt").write_text("a green dog\n")
    save(src / "dogs" / "nested" / "d.png", (30, 30), (255, 255, 0))
    (src / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")

    with caplog.at_level(logging.WARNING):
        manifest = make_shards(src, tmp_path / "out", resolution=16, samples_per_shard=3, progress=False)
    assert manifest["classes"] == ["cats", "dogs"]
    assert manifest["total"] == 4
    assert [(s["name"], s["num_samples"]) for s in manifest["shards"]] == [("shard-000000.tar", 3),
                                                                           ("shard-000001.tar", 1)]
    assert manifest["skipped"]["count"] == 1 and manifest["skipped"]["files"][0]["path"] == "dogs/broken.png"
    assert "dogs/broken.png" in caplog.text
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    by_source = {json.loads(s["json"])["source"]: s for s in read_tar_samples(tmp_path / "out").values()}
    assert sorted(by_source) == ["cats/a.png", "cats/b.jpg", "dogs/c.png", "dogs/nested/d.png"]
    assert {src_: int(s["cls"]) for src_, s in by_source.items()} == {
        "cats/a.png": 0, "cats/b.jpg": 0, "dogs/c.png": 1, "dogs/nested/d.png": 1}
    assert by_source["dogs/c.png"]["txt"] == b"a green dog"
    assert all("txt" not in s for k, s in by_source.items() if k != "dogs/c.png")
    assert "jpg" in by_source["cats/b.jpg"] and "png" in by_source["cats/a.png"]  # JPEG stays JPEG
    for s in by_source.values():
        image = Image.open(io.BytesIO(s.get("png") or s["jpg"]))
        assert image.size == (16, 16)
    red = np.asarray(Image.open(io.BytesIO(by_source["cats/a.png"]["png"])))
    assert (red == (255, 0, 0)).all()

    # The training pipeline reads the result: labels from cls, captions from txt ("" if absent).
    cfg = ImageDataConfig(shards=str(tmp_path / "out"), resolution=16, num_workers=0, shuffle=False, flip=False)
    batch = next(iter(build_image_loader(cfg, batch_size=8, rank=0, world_size=1, seed=0, epochs=1)))
    assert batch["label"].tolist() == [0, 0, 1, 1] and batch["caption"] == ["", "", "a green dog", ""]
    assert batch["attributes"].shape == (4, 0)


def test_flat_folder_keeps_original_bytes_and_has_no_labels(tmp_path):
    src = tmp_path / "flat"
    save(src / "x.png", (12, 9), (10, 20, 30))
    save(src / "y.png", (9, 12), (40, 50, 60))
    manifest = make_shards(src, tmp_path / "out", progress=False)
    assert manifest["classes"] == [] and manifest["total"] == 2 and manifest["skipped"]["count"] == 0
    samples = read_tar_samples(tmp_path / "out")
    assert sorted(s["png"] for s in samples.values()) == sorted([(src / "x.png").read_bytes(),
                                                                 (src / "y.png").read_bytes()])
    assert all("cls" not in s for s in samples.values())


def test_mixed_layout_and_unreadable_only_are_errors(tmp_path):
    save(tmp_path / "mixed" / "top.png", (8, 8), (0, 0, 0))
    save(tmp_path / "mixed" / "cls" / "inner.png", (8, 8), (0, 0, 0))
    with pytest.raises(ValueError, match="both at the top level"):
        make_shards(tmp_path / "mixed", tmp_path / "out1", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="could be read"):
        make_shards(tmp_path / "bad", tmp_path / "out2", progress=False)
    assert not list((tmp_path / "out2").glob("*.tar"))
