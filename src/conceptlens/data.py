"""Image datasets from folders, WebDataset shards, CSV/JSONL lists and named sets, read per shard.

A dataset is a list of shards; each shard is a plain description (kind, source, items) so that the
heavy work (`iter_shard`) is a pure function of it and can run anywhere (threads today, Ray later).
"""
from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile

from .errors import ConceptlensError
from .utils import cache_dir, digest

ImageFile.LOAD_TRUNCATED_IMAGES = False  # truncated files are errors we report, not silently grey pixels
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FILES_PER_SHARD = 1024
NAMED_SETS = ("fashion-mnist:train", "fashion-mnist:test", "digits", "samples")


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
    skipped: list[str] = field(default_factory=list)

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


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and convert to RGB."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as im:
        im.load()
        return to_rgb(im)


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
        for key, ext, data in _tar_members(shard.source, with_images=True):
            if key in want and ext in IMAGE_EXTS and key not in seen:
                seen.add(key)
                try:
                    yield want[key], decode_image(data), None
                except Exception as exc:  # noqa: BLE001
                    yield want[key], None, f"{shard.source}:{key}{ext}: {type(exc).__name__}: {exc}"
        for k in set(want) - seen:
            yield want[k], None, f"{shard.source}:{k}: no image in shard"
    elif shard.kind == "array":
        arrays = _named_arrays(shard.source)
        for i, idx in enumerate(shard.items):
            yield i, arrays.image(idx), None
    else:
        raise ValueError(shard.kind)


# ----------------------------------------------------------------------------------------- listing
def load_dataset(spec: str | Path, classes: str | Path | None = None, limit: int | None = None) -> ImageDataset:
    """Resolve a --data argument: named set, folder (class subfolders or flat), tar shards, CSV/JSONL."""
    spec = str(spec)
    if spec in NAMED_SETS or spec.split(":")[0] in ("fashion-mnist",):
        ds = _named(spec)
    elif any(ch in spec for ch in "*?{") or spec.endswith((".tar", ".tar.gz", ".tgz")):
        ds = _tars(spec)
    elif not os.path.exists(spec):
        raise ConceptlensError(f"data not found: {spec} (a folder, tar shards, CSV/JSONL or one of {', '.join(NAMED_SETS)})")
    elif os.path.isdir(spec):
        ds = _folder(Path(spec))
    elif spec.endswith((".csv", ".jsonl", ".tsv")):
        ds = _table(Path(spec))
    else:
        raise ConceptlensError(f"cannot read {spec}: expected a folder, .tar/.tar.gz shards, .csv or .jsonl")
    if classes is not None:
        ds.classnames = _apply_class_file(Path(classes), ds)
    if ds.classnames is not None:
        _check_classnames(ds.classnames, str(classes or spec))
    if len(ds) == 0:
        raise ConceptlensError(f"no images found in {spec}")
    return ds.subset(limit)


def read_class_file(path: Path) -> tuple[list[str], list[str] | None]:
    """`classes.txt` (one name a line) or `classes.tsv` (id<TAB>name). Returns (names, ids or None)."""
    if not path.exists():
        raise ConceptlensError(f"class file not found: {path}")
    lines = [ln.rstrip("\n\r") for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ConceptlensError(f"class file {path} is empty")
    if all("\t" in ln for ln in lines):
        ids, names = zip(*(ln.split("\t", 1) for ln in lines))
        return [n.strip() for n in names], [i.strip() for i in ids]
    return [ln.strip() for ln in lines], None


def _check_classnames(names: Sequence[str], where: str) -> None:
    if not names:
        raise ConceptlensError(f"empty class list for {where}")
    seen, dups = set(), []
    for n in names:
        if n.lower() in seen:
            dups.append(n)
        seen.add(n.lower())
    if dups:
        raise ConceptlensError(f"duplicate class names in {where}: {', '.join(sorted(set(dups)))}")


def _beside(root: Path) -> Path | None:
    for d in (root, root.parent):
        for name in ("classes.tsv", "classes.txt"):
            if (d / name).exists():
                return d / name
    return None


def _apply_class_file(path: Path, ds: ImageDataset, folder_ids: list[str] | None = None) -> list[str]:
    names, ids = read_class_file(path)
    if ids is not None and folder_ids is not None:
        lookup = dict(zip(ids, names))
        missing = [f for f in folder_ids if f not in lookup]
        if missing:
            raise ConceptlensError(f"{path} has no name for {', '.join(missing[:5])}")
        return [lookup[f] for f in folder_ids]
    n_labels = int(ds.labels.max()) + 1 if len(ds.labels) and ds.labels.max() >= 0 else 0
    if n_labels > len(names):
        raise ConceptlensError(f"{path} lists {len(names)} classes but the data has label {n_labels - 1}")
    return names


def _file_identity(paths: Sequence[str]) -> str:
    parts = []
    for p in paths:
        st = os.stat(p)
        parts.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
    return digest(parts)


def _folder(root: Path) -> ImageDataset:
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    if subdirs:
        for ci, d in enumerate(subdirs):
            for f in sorted((root / d).rglob("*")):
                if f.suffix.lower() in IMAGE_EXTS and f.is_file():
                    files.append(str(f))
                    labels.append(ci)
        classnames = list(subdirs)
    else:
        files = sorted(str(f) for f in root.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        labels = [-1] * len(files)
        classnames = None
    ds = ImageDataset(root.name, _file_shards(files), [os.path.relpath(f, root) for f in files],
                      np.asarray(labels, dtype=np.int64), classnames, _file_identity(files), str(root))
    if subdirs and (cf := _beside(root)) is not None:
        names, ids = read_class_file(cf)
        if ids is not None and set(subdirs) <= set(ids):
            ds.classnames = _apply_class_file(cf, ds, folder_ids=subdirs)
    return ds


def _file_shards(files: list[str]) -> list[Shard]:
    return [Shard("files", "", tuple(files[i:i + FILES_PER_SHARD])) for i in range(0, len(files), FILES_PER_SHARD)]


def _table(path: Path) -> ImageDataset:
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConceptlensError(f"{path}:{n}: not valid JSON") from None
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows:
        raise ConceptlensError(f"no rows in {path}")
    col = next((c for c in ("path", "filepath", "image", "file") if c in rows[0]), None)
    if col is None:
        raise ConceptlensError(f"{path} needs a 'path' column (found: {', '.join(rows[0])})")
    files = [str((path.parent / r[col]).resolve()) if not os.path.isabs(r[col]) else r[col] for r in rows]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise ConceptlensError(f"{len(missing)} paths in {path} do not exist, e.g. {missing[0]}")
    raw = [r.get("label") for r in rows]
    classnames = None
    if all(v not in (None, "") for v in raw):
        if all(str(v).lstrip("-").isdigit() for v in raw):
            labels = [int(v) for v in raw]
        else:
            classnames = sorted({str(v) for v in raw})
            labels = [classnames.index(str(v)) for v in raw]
    else:
        labels = [-1] * len(files)
    ds = ImageDataset(path.stem, _file_shards(files), [os.path.basename(f) for f in files],
                      np.asarray(labels, dtype=np.int64), classnames, _file_identity(files + [str(path)]),
                      str(path.parent))
    if classnames is None and max(labels) >= 0 and (cf := _beside(path.parent)) is not None:
        ds.classnames = _apply_class_file(cf, ds)
    return ds


def expand_shards(spec: str) -> list[str]:
    """Brace and glob patterns (`train-00000{0..3}.tar.gz`, `*.tar`) to an ordered list of files."""
    import braceexpand
    out: list[str] = []
    for pat in braceexpand.braceexpand(spec):
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if os.path.exists(pat) else [])
        out += [h for h in hits if h not in out]
    if not out:
        raise ConceptlensError(f"no shards match {spec}")
    return out


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is everything before the first dot of the base name.
    d, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ("." + ext.lower() if dot else "")


def _tar_members(path: str, with_images: bool) -> Iterator[tuple[str, str, bytes]]:
    # tarfile directly (not webdataset's pipeline): we need member keys and labels before decoding
    # to size the feature cache and to resume a shard.
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                if ext in IMAGE_EXTS and not with_images:
                    yield key, ext, b""
                    continue
                f = tf.extractfile(m)
                yield key, ext, f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConceptlensError(f"cannot read shard {path}: {exc}") from None


def _tars(spec: str) -> ImageDataset:
    paths = expand_shards(spec)
    shards, keys, labels = [], [], []
    for p in paths:
        order, seen, cls = [], set(), {}
        for key, ext, data in _tar_members(p, with_images=False):
            if ext in IMAGE_EXTS and key not in seen:
                order.append(key)
                seen.add(key)
            elif ext in (".cls", ".label"):
                try:
                    cls[key] = int(data.decode().strip())
                except ValueError:
                    raise ConceptlensError(f"{p}:{key}{ext} is not an integer label") from None
        shards.append(Shard("tar", p, tuple(order)))
        keys += [f"{os.path.basename(p)}/{k}" for k in order]
        labels += [cls.get(k, -1) for k in order]
    root = Path(paths[0]).parent
    ds = ImageDataset(root.name, shards, keys, np.asarray(labels, dtype=np.int64), None,
                      _file_identity(paths), str(root))
    if labels and min(labels) >= 0 and (cf := _beside(root)) is not None:
        ds.classnames = _apply_class_file(cf, ds)
    return ds


# ----------------------------------------------------------------------------------------- named sets
class _Arrays:
    """Array-backed named sets (uint8 images in memory-mapped files or small arrays)."""

    def __init__(self, images, labels, classnames, make):
        self.images, self.labels, self.classnames, self._make = images, labels, classnames, make

    def image(self, idx: int) -> Image.Image:
        return self._make(self.images[idx])


_ARRAYS: dict[str, _Arrays] = {}
FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_memmap(gz: Path) -> np.ndarray:
    """Decompress an IDX file once into the cache and memory-map it (peak memory stays small)."""
    out = cache_dir("datasets") / (gz.name[:-3] + ".u8")
    with gzip.open(gz, "rb") as f:
        header = f.read(4)
        ndim = header[3]
        shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
        if not out.exists() or out.stat().st_size != int(np.prod(shape)):
            tmp = out.with_suffix(".tmp")
            with open(tmp, "wb") as g:
                while block := f.read(1 << 20):
                    g.write(block)
            os.replace(tmp, out)
    return np.memmap(out, dtype=np.uint8, mode="r", shape=shape)


def _gray(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(a, dtype=np.uint8), "L").convert("RGB")


def sample_photos() -> list[tuple[str, np.ndarray, str]]:
    """The real photos bundled with scikit-image and scikit-learn: (name, HxWx3 uint8, label)."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images
    chosen = [("astronaut", "astronaut"), ("chelsea", "cat"), ("coffee", "coffee mug"), ("rocket", "rocket"),
              ("camera", "camera"), ("clock", "clock"), ("coins", "coin"), ("moon", "moon"),
              ("hubble_deep_field", "galaxy"), ("horse", "horse"), ("brick", "brick wall"), ("grass", "grass"),
              ("gravel", "gravel"), ("retina", "retina")]
    out = []
    for name, label in chosen:
        arr = getattr(sk, name)()
        if arr.dtype == bool:
            arr = (~arr).astype(np.uint8) * 255  # the horse silhouette: black horse on white
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        out.append((name, arr[..., :3].astype(np.uint8), label))
    sk_images = load_sample_images()
    for fname, img in zip(sk_images.filenames, sk_images.images):
        base = os.path.basename(fname).split(".")[0]
        out.append((base, img, {"china": "temple", "flower": "flower"}.get(base, base)))
    return out


def _named_arrays(name: str) -> _Arrays:
    if name in _ARRAYS:
        return _ARRAYS[name]
    if name.startswith("fashion-mnist:"):
        split = name.split(":", 1)[1]
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ConceptlensError(f"unknown split {split!r}: use fashion-mnist:train or fashion-mnist:test")
        img_gz = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
        if not img_gz.exists():
            raise ConceptlensError("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist "
                                   "(make setup does this when run as root)")
        labels = np.asarray(_idx_memmap(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"), dtype=np.int64)
        arr = _Arrays(_idx_memmap(img_gz), labels, FASHION_CLASSES, _gray)
    elif name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        arr = _Arrays((d.images * (255 / 16)).round().astype(np.uint8), d.target.astype(np.int64),
                      [str(i) for i in range(10)], _gray)
    elif name == "samples":
        photos = sample_photos()
        names = []
        for _, _, lab in photos:
            if lab not in names:
                names.append(lab)
        arr = _Arrays([p[1] for p in photos], np.asarray([names.index(p[2]) for p in photos]), names,
                      lambda a: Image.fromarray(a, "RGB"))
        arr.keys = [p[0] for p in photos]
    else:
        raise ConceptlensError(f"unknown dataset {name!r}; named sets: {', '.join(NAMED_SETS)}")
    _ARRAYS[name] = arr
    return arr


def _named(name: str) -> ImageDataset:
    arr = _named_arrays(name)
    n = len(arr.labels)
    keys = getattr(arr, "keys", None) or [f"{i:06d}" for i in range(n)]
    shards = [Shard("array", name, tuple(range(i, min(n, i + FILES_PER_SHARD)))) for i in range(0, n, FILES_PER_SHARD)]
    ident = digest([name, n, str(FASHION_DIR) if name.startswith("fashion") else ""])
    return ImageDataset(name.replace(":", "_"), shards, list(keys), np.asarray(arr.labels, dtype=np.int64),
                        list(arr.classnames), ident, name)



# ----------------------------------------------------------------------------------------- image-caption pairs
def read_flickr8k(root: Path) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Flickr8k's (image file, caption) pairs and its official split (image file -> train/dev/test)."""
    root = Path(root)
    for name in ("captions.tsv", "splits.tsv"):
        if not (root / name).exists():
            raise ConceptlensError(f"Flickr8k {name} not found under {root}")
    with open(root / "captions.tsv", newline="") as f:
        pairs = [(r["image"], r["caption"].strip()) for r in csv.DictReader(f, delimiter="\t") if r["caption"].strip()]
    with open(root / "splits.tsv", newline="") as f:
        split = {r["image"]: r["split"] for r in csv.DictReader(f, delimiter="\t")}
    return pairs, split


def images_at(dataset: ImageDataset, keys: Sequence[str]) -> list[Image.Image | None]:
    """Decode the images with these keys (for report grids), in the given order; None where unreadable."""
    want = {k: i for i, k in enumerate(keys)}
    out: list[Image.Image | None] = [None] * len(keys)
    pos = 0
    for shard in dataset.shards:
        hits = [j for j in range(len(shard.items)) if dataset.keys[pos + j] in want]
        if hits:
            sub = Shard(shard.kind, shard.source, tuple(shard.items[j] for j in hits))
            for i, im, _ in iter_shard(sub):
                out[want[dataset.keys[pos + hits[i]]]] = im
        pos += len(shard.items)
    return out


def read_pairs(path: str | Path) -> tuple[ImageDataset, list[str], np.ndarray]:
    """Image-caption pairs from a CSV/TSV/JSONL with `path` and `caption` (or `text`) columns (a path may repeat:
    several captions), or WebDataset shards with KEY.jpg + KEY.txt. Returns the unique-image dataset, the
    captions and each caption's image row."""
    spec = str(path)
    if any(ch in spec for ch in "*?{") or spec.endswith((".tar", ".tar.gz", ".tgz")):
        ds = _tars(spec)
        text = {}
        for p in expand_shards(spec):
            for key, ext, data in _tar_members(p, with_images=False):
                if ext in (".txt", ".caption"):
                    text[f"{os.path.basename(p)}/{key}"] = data.decode("utf-8", errors="replace").strip()
        missing = [k for k in ds.keys if not text.get(k)]
        if missing:
            raise ConceptlensError(f"{len(missing)} images in {spec} have no or an empty .txt caption, e.g. {missing[0]}")
        return ds, [text[k] for k in ds.keys], np.arange(len(ds))
    path = Path(path)
    if not path.exists():
        raise ConceptlensError(f"pairs file not found: {path}")
    if path.suffix == ".jsonl":
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows:
        raise ConceptlensError(f"no rows in {path}")
    tcol = next((c for c in ("caption", "text", "title") if c in rows[0]), None)
    pcol = next((c for c in ("path", "filepath", "image", "file") if c in rows[0]), None)
    if tcol is None or pcol is None:
        raise ConceptlensError(f"{path} needs 'path' and 'caption' columns (found: {', '.join(rows[0])})")
    empty = [i + 2 for i, r in enumerate(rows) if not str(r[tcol] or "").strip()]
    if empty:
        raise ConceptlensError(f"{path}: empty caption on line {empty[0]} ({len(empty)} in all)")
    files = [str((path.parent / r[pcol]).resolve()) if not os.path.isabs(r[pcol]) else r[pcol] for r in rows]
    missing = sorted({f for f in files if not os.path.exists(f)})
    if missing:
        raise ConceptlensError(f"{len(missing)} images in {path} do not exist, e.g. {missing[0]}")
    uniq = list(dict.fromkeys(files))
    row = {f: i for i, f in enumerate(uniq)}
    ds = ImageDataset(path.stem, _file_shards(uniq), uniq, np.full(len(uniq), -1, np.int64), None,
                      _file_identity(uniq + [str(path)]), str(path.parent))
    return ds, [str(r[tcol]).strip() for r in rows], np.asarray([row[f] for f in files])
