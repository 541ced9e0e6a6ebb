"""Datasets as lists of shards, and the pure per-shard decoding every heavy path (local or Ray) calls.

A dataset is a list of shards; each shard is a plain description (kind, source, items), so `iter_shard`
is a pure function of it and can run anywhere.
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, ImageFile

from ..errors import ConceptlensError
from ..io import digest
from .named import named_arrays

ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files are errors we report, not silently grey pixels
MAX_SIDECAR = 1 << 20  # a label / caption member larger than 1 MiB is not a label: skipped unread
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass(frozen=True)
class Shard:
    """One unit of work: `kind` is files | tar | array; `items` are paths, tar keys or array indices."""

    kind: str
    source: str
    items: tuple


@dataclass
class ImageDataset:
    """An ordered, labelled (or not) set of images split into shards."""

    name: str
    shards: list[Shard]
    keys: list[str]
    labels: np.ndarray  # int64, -1 where unknown
    classnames: list[str] | None
    identity: str  # changes when any file changes: part of the feature-cache key
    root: str = ""
    precomputed: str | None = None  # a clip-retrieval export of exactly these images (see data.exported)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def labelled(self) -> bool:
        return self.classnames is not None and bool(len(self.labels)) and bool((self.labels >= 0).all())

    def subset(self, limit: int | None) -> "ImageDataset":
        """An evenly spaced, deterministic subset of about `limit` items (every class keeps its share)."""
        if not limit or limit >= len(self):
            return self
        keep = set(np.linspace(0, len(self) - 1, limit).round().astype(int).tolist())
        keys, labels, shards, pos = [], [], [], 0
        for sh in self.shards:
            kept = []
            for it in sh.items:
                if pos in keep:
                    kept.append(it)
                    keys.append(self.keys[pos])
                    labels.append(self.labels[pos])
                pos += 1
            if kept:
                shards.append(Shard(sh.kind, sh.source, tuple(kept)))
        return ImageDataset(self.name, shards, keys, np.asarray(labels, dtype=np.int64), self.classnames,
                            digest([self.identity, sorted(keep)]), self.root)


# ----------------------------------------------------------------------------------------- decoding
def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: grayscale, palette, RGBA (over white), CMYK, 16-bit and float modes."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB") if im.mode != "RGB" else im


DECODE_VERSION = 2  # 2: EXIF orientation applied; part of the feature cache key


def decode_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode fully (so truncated files fail here, not later), turn upright by the EXIF orientation tag (as
    phone photos need, and as browsers show them) and convert to RGB."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


def split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the base name."""
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ("." + ext.lower() if dot else "")


def tar_members(path: str, with_images: bool) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of every file member; image bytes only `with_images`; other members over
    MAX_SIDECAR come back empty (unread)."""
    # tarfile directly (not webdataset's pipeline): we need member keys and labels before decoding
    # to size the feature cache and to resume a shard.
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_name(m.name)
                if ext in IMAGE_EXTS and not with_images or ext not in IMAGE_EXTS and m.size > MAX_SIDECAR:
                    yield key, ext, b""  # not read: memory stays bounded whatever a shard holds
                    continue
                f = tf.extractfile(m)
                yield key, ext, f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConceptlensError(f"cannot read shard {path}: {exc}") from None


def iter_shard(shard: Shard) -> Iterator[tuple[int, Image.Image | None, str | None]]:
    """Yield (position in shard, RGB image or None, error message or None) for every item."""
    if shard.kind == "files":
        for i, path in enumerate(shard.items):
            try:
                yield i, decode_image(path), None
            except Exception as exc:  # noqa: BLE001 - any decoder failure is a skipped file
                yield i, None, f"{path}: {type(exc).__name__}: {exc}"
    elif shard.kind == "tar":
        want = {k: i for i, k in enumerate(shard.items)}
        seen = set()
        for key, ext, data in tar_members(shard.source, with_images=True):
            if key in want and ext in IMAGE_EXTS and key not in seen:
                seen.add(key)
                try:
                    yield want[key], decode_image(data), None
                except Exception as exc:  # noqa: BLE001
                    yield want[key], None, f"{shard.source}:{key}{ext}: {type(exc).__name__}: {exc}"
        for k in set(want) - seen:
            yield want[k], None, f"{shard.source}:{k}: no image in shard"
    elif shard.kind == "array":
        arrays = named_arrays(shard.source)
        for i, idx in enumerate(shard.items):
            yield i, arrays.image(idx), None
    else:
        raise ValueError(shard.kind)


def iter_images(dataset: ImageDataset) -> Iterator[tuple[int, Image.Image | None, str | None]]:
    """(dataset row, image or None, error or None) for every image, shard by shard, decoded lazily."""
    pos = 0
    for shard in dataset.shards:
        for i, im, err in iter_shard(shard):
            yield pos + i, im, err
        pos += len(shard.items)


def images_at(dataset: ImageDataset, keys: Sequence[str]) -> list[Image.Image | None]:
    """Decode the images with these keys (for report grids), in the given order; None where unreadable."""
    want = {k: i for i, k in enumerate(keys)}
    rows = [r for r, k in enumerate(dataset.keys) if k in want]
    out: list[Image.Image | None] = [None] * len(keys)
    for row, im, _ in iter_images(dataset_rows(dataset, rows)):
        out[want[dataset.keys[rows[row]]]] = im
    return out


def dataset_rows(dataset: ImageDataset, rows: Sequence[int]) -> ImageDataset:
    """The sub-dataset of the given (sorted) rows, shards kept."""
    wanted, shards, keys, pos = set(rows), [], [], 0
    for sh in dataset.shards:
        hit = [j for j in range(len(sh.items)) if pos + j in wanted]
        if hit:
            shards.append(Shard(sh.kind, sh.source, tuple(sh.items[j] for j in hit)))
            keys += [dataset.keys[pos + j] for j in hit]
        pos += len(sh.items)
    labels = dataset.labels[np.asarray(sorted(wanted), dtype=np.int64)] if wanted else dataset.labels[:0]
    return ImageDataset(dataset.name, shards, keys, labels, dataset.classnames,
                        digest([dataset.identity, sorted(wanted)]), dataset.root)


def to_arrays(dataset: ImageDataset, size: int, what: str = "this model", skipped: list[str] | None = None
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode a whole dataset of `size`x`size` images into uint8 [N, size, size, 3] (+ labels, keys); another
    size is an error, never a silent resize. An unreadable image is an error too, unless `skipped` is given:
    then it is left out and its message appended there."""
    out = np.zeros((len(dataset), size, size, 3), np.uint8)
    keep = np.ones(len(dataset), bool)
    for row, im, err in iter_images(dataset):
        key = dataset.keys[row]
        if im is None:
            if skipped is None:
                raise ConceptlensError(f"unreadable image {key}: {err}")
            skipped.append(err)
            keep[row] = False
            continue
        if im.size != (size, size):
            raise ConceptlensError(f"{key} is {im.size[0]}x{im.size[1]}; {what} classifies {size}x{size} images")
        out[row] = np.asarray(im)
    if keep.all():
        return out, np.asarray(dataset.labels, dtype=np.int64), list(dataset.keys)
    return out[keep], np.asarray(dataset.labels, dtype=np.int64)[keep], [k for k, ok in zip(dataset.keys, keep) if ok]
