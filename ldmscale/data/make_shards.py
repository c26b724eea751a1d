"""An image folder -> webdataset tar shards + `manifest.json` (`ldmscale make-shards`).

Two layouts are accepted:
  flat     SRC/*.jpg                     no labels
  classes  SRC/<class>/**/*.jpg          `cls` = index of <class> in the sorted subfolder names
An optional caption sits beside an image as `<same stem>.txt` and is stored as `txt`.

Every image is decoded once before it is written, so an unreadable file is skipped, counted, logged
and listed in the manifest instead of surfacing as a corrupt sample in the middle of training.
With `resolution`, images are resized (shorter side) and center-cropped once here, which makes the
shards smaller and the training transform cheaper.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from ldmscale.data.synthetic import CountingShardWriter, check_empty_output, write_manifest
from ldmscale.data.transforms import decode_image, resize_and_crop

log = logging.getLogger(__name__)

SOURCE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# Formats stored as their original bytes when no resize is asked; anything else is re-encoded.
STORED_AS_IS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
JPEG_QUALITY = 95


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in paths if p.is_file() and p.suffix.lower() in SOURCE_EXTENSIONS)


def scan_image_folder(src: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """Lists (image path, class id or -1) in a deterministic order, and the class names."""
    if not src.is_dir():
        raise ValueError(f"src_dir: {src} is not a folder")
    top_level = _images_under(src, recursive=False)
    class_dirs = sorted(d for d in src.iterdir() if d.is_dir() and _images_under(d, recursive=True))
    if class_dirs and top_level:
        raise ValueError(f"src_dir: {src} has images both at the top level ({top_level[0].name}, ...) and in "
                         f"class subfolders ({class_dirs[0].name}, ...); use one layout: flat or class subfolders")
    if not class_dirs:
        if not top_level:
            raise ValueError(f"src_dir: no images ({', '.join(SOURCE_EXTENSIONS)}) found in {src}")
        return [(p, -1) for p in top_level], []
    classes = [d.name for d in class_dirs]
    items = [(p, label) for label, d in enumerate(class_dirs) for p in _images_under(d, recursive=True)]
    return items, classes


def encode_image(path: Path, data: bytes, resolution: int | None) -> tuple[str, bytes]:
    """(extension, bytes) to store for one source image; raises if the image cannot be decoded."""
    image = decode_image(data)
    suffix = path.suffix.lower()
    if resolution is None and suffix in STORED_AS_IS:
        return STORED_AS_IS[suffix], data
    if resolution is not None:
        image = resize_and_crop(image, resolution, "center")
    buffer = io.BytesIO()
    # Keep lossy sources lossy (JPEG q95) and lossless ones lossless, so shards do not balloon.
    if STORED_AS_IS.get(suffix) == "jpg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return "jpg", buffer.getvalue()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def make_shards(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int | None = None,
                samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """Packs the images of `src_dir` into `out_dir/shard-XXXXXX.tar` and writes `manifest.json`.

    Sample keys: `<8-digit index>` in sorted path order; extensions `png|jpg|webp`, `txt` (caption,
    when `<stem>.txt` exists), `cls` (class layout only), `json` ({"source": path relative to
    src_dir, "class": name or null}). Returns the manifest: {"shards": [{"name", "num_samples"}],
    "total", "classes", "resolution", "skipped": {"count", "files": [{"path", "error"}]}}.
    """
    if resolution is not None and resolution < 1:
        raise ValueError(f"resolution: must be >= 1 or None, got {resolution}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: must be >= 1, got {samples_per_shard}")
    src, out = Path(src_dir), Path(out_dir)
    items, classes = scan_image_folder(src)
    out.mkdir(parents=True, exist_ok=True)
    check_empty_output(out)

    writer: CountingShardWriter | None = None
    skipped: list[dict] = []
    written = 0
    for path, label in tqdm(items, desc="make-shards", unit="img", disable=not progress):
        rel = path.relative_to(src).as_posix()
        try:
            ext, payload = encode_image(path, path.read_bytes(), resolution)
        except Exception as e:  # any decoder failure (PIL raises many types) means "unreadable"
            log.warning("make-shards: skipping unreadable image %s: %s: %s", rel, type(e).__name__, e)
            skipped.append({"path": rel, "error": f"{type(e).__name__}: {e}"})
            continue
        record = {"__key__": f"{written:08d}", ext: payload,
                  "json": json.dumps({"source": rel, "class": classes[label] if label >= 0 else None}).encode()}
        caption = path.with_suffix(".txt")
        if caption.is_file():
            record["txt"] = caption.read_text(encoding="utf-8").strip().encode("utf-8")
        if label >= 0:
            record["cls"] = str(label).encode("ascii")
        # The writer opens its first shard on construction; open it lazily so that a folder of
        # only unreadable images leaves no empty tar behind.
        writer = writer or CountingShardWriter(out, samples_per_shard)
        writer.write(record)
        written += 1
    if writer is None:
        raise ValueError(f"src_dir: none of the {len(items)} images in {src} could be read "
                         f"(first error: {skipped[0]['path']}: {skipped[0]['error']})")
    shards = writer.close()
    if skipped:
        log.warning("make-shards: skipped %d unreadable image(s) of %d; listed in %s",
                    len(skipped), len(items), out / "manifest.json")
    manifest = {
        "shards": shards,
        "total": written,
        "classes": classes,
        "resolution": resolution,
        "source": str(src.resolve()),
        "skipped": {"count": len(skipped), "files": skipped},
    }
    write_manifest(out, manifest)
    return manifest
