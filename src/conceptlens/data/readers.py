"""Resolve a --data argument into an ImageDataset: named sets, folders, WebDataset shards, CSV/JSONL lists."""
from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from contextvars import ContextVar
from pathlib import Path
from typing import Sequence

import braceexpand
import numpy as np

from ..errors import ConceptlensError
from ..io import digest, pick_column, read_rows, read_text
from .dataset import IMAGE_EXTS, ImageDataset, Shard, tar_members
from .exported import SIDE, is_exported, read_metadata
from .named import FASHION_DIR, NAMED_SETS, named_arrays
from .styles import STYLE_SETS, openmoji_images

FILES_PER_SHARD = 1024


# ----------------------------------------------------------------------------------------- listing
IDENTITIES = ("content", "stat")


def load_dataset(spec: str | Path, classes: str | Path | None = None, limit: int | None = None,
                 identity: str = "content") -> ImageDataset:
    """Resolve a --data argument: named set, folder (class subfolders or flat), tar shards, CSV/JSONL.
    `identity` keys the feature cache: "content" hashes every file's bytes (about 30 µs per 100 kB image, far
    below decoding it), "stat" uses path, size, mtime, ctime and inode (for sets too large to read twice)."""
    if identity not in IDENTITIES:
        raise ConceptlensError(f"identity must be one of {', '.join(IDENTITIES)}, not {identity!r}")
    token = _IDENTITY.set(identity)
    try:
        return _load(str(spec), classes, limit)
    finally:
        _IDENTITY.reset(token)


def _load(spec: str, classes: str | Path | None, limit: int | None) -> ImageDataset:
    if spec in NAMED_SETS or spec.split(":")[0] in ("fashion-mnist",):
        ds = _named(spec)
    elif spec in STYLE_SETS:  # OpenMoji drawings, rasterised once into the cache
        ds = _folder(openmoji_images()[spec.split(":")[1]])
        ds.name = spec.replace(":", "_")
    elif is_shard_spec(spec):
        ds = tars(spec)
    elif not os.path.exists(spec):
        raise ConceptlensError(f"data not found: {spec} (a folder, tar shards, CSV/JSONL or one of "
                               f"{', '.join(NAMED_SETS + STYLE_SETS)})")
    elif is_exported(Path(spec)):
        ds = _exported(Path(spec))
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


def _exported(root: Path) -> ImageDataset:
    """A clip-retrieval folder: the exact dataset an export was made from (its sidecar; `embed` then uses the
    stored rows for the same model), or, for a folder written elsewhere, the images of its `path` column."""
    if (root / SIDE).exists():
        d = json.loads((root / SIDE).read_text())["dataset"]
        return ImageDataset(d["name"], [Shard(s["kind"], s["source"], tuple(s["items"])) for s in d["shards"]],
                            d["keys"], np.asarray(d["labels"], np.int64), d["classnames"], d["identity"], d["root"],
                            precomputed=str(root))
    meta = read_metadata(root)
    col = next((c for c in ("path", "image_path", "filepath") if c in meta), None)
    if col is None:
        raise ConceptlensError(f"{root}: metadata has no path/image_path column to find the images by")
    paths = resolve_paths(root / SIDE, [str(p) for p in meta[col]])  # relative paths: from the folder
    names = meta.get("label")
    classnames = sorted({n for n in names if n}) if names else None
    labels = [classnames.index(n) if n else -1 for n in names] if names else [-1] * len(paths)
    return ImageDataset(root.name, file_shards(paths), [str(k) for k in meta.get("key", paths)],
                        np.asarray(labels, np.int64), classnames or None, file_identity(paths), str(root))


def read_class_file(path: Path) -> tuple[list[str], list[str] | None]:
    """`classes.txt` (one name a line) or `classes.tsv` (id<TAB>name). Returns (names, ids or None)."""
    if not path.exists():
        raise ConceptlensError(f"class file not found: {path}")
    lines = [ln.rstrip("\n\r") for ln in read_text(path).splitlines()]
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


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def _apply_class_file(path: Path, ds: ImageDataset, folder_ids: list[str] | None = None) -> list[str]:
    """Class names from a file. ids (classes.tsv) map folder ids to names; a names-only file is matched to the
    data's own class names *by name* when it has them (extra names stay as extra candidates, with a warning),
    and by position only for integer labels without names."""
    names, ids = read_class_file(path)
    _check_classnames(names, str(path))
    if ids is not None and folder_ids is not None:
        lookup = dict(zip(ids, names))
        missing = [f for f in folder_ids if f not in lookup]
        if missing:
            raise ConceptlensError(f"{path} has no name for {', '.join(missing[:5])}")
        return [lookup[f] for f in folder_ids]
    if ds.classnames is not None and ids is None:
        index = {_norm(n): i for i, n in enumerate(names)}
        unknown = [c for c in ds.classnames if _norm(c) not in index]
        if unknown:
            raise ConceptlensError(f"{path} has no class named {', '.join(repr(u) for u in unknown[:5])} "
                                   f"(the data's classes: {', '.join(ds.classnames[:8])})")
        remap = np.asarray([index[_norm(c)] for c in ds.classnames], np.int64)
        ds.labels = np.where(ds.labels >= 0, remap[np.clip(ds.labels, 0, None)], -1)
        extra = len(names) - len(ds.classnames)
        if extra:
            warnings.warn(f"{path}: {extra} class name(s) with no images kept as extra candidates", stacklevel=3)
        return names
    n_labels = int(ds.labels.max()) + 1 if len(ds.labels) and ds.labels.max() >= 0 else 0
    if n_labels > len(names):
        raise ConceptlensError(f"{path} lists {len(names)} classes but the data has label {n_labels - 1}")
    return names


_IDENTITY: ContextVar[str] = ContextVar("identity", default="content")


def file_identity(paths: Sequence[str]) -> str:
    """What the feature cache is keyed by (see `load_dataset`): the BLAKE2b of every file's bytes with its path,
    or path, size, mtime, ctime and inode (a same-size file with its mtime set back still changes ctime, which
    no user call can set)."""
    parts: list = ["stat" if _IDENTITY.get() == "stat" else "content"]
    for p in paths:
        if parts[0] == "stat":
            st = os.stat(p)
            parts.append((os.path.abspath(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            continue
        try:
            with open(p, "rb") as fh:
                parts.append((os.path.abspath(p), hashlib.file_digest(fh, "blake2b").hexdigest()))
        except OSError as exc:  # unreadable: skipped (and logged) when embedded; keyed by its error
            parts.append((os.path.abspath(p), type(exc).__name__))
    return digest(parts)


def _folder(root: Path) -> ImageDataset:
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    if subdirs:
        for ci, d in enumerate(subdirs):
            found = [str(f) for f in sorted((root / d).rglob("*")) if f.suffix.lower() in IMAGE_EXTS and f.is_file()]
            if not found:
                raise ConceptlensError(f"class folder {root / d} has no images (remove it, or list the class in "
                                       "--classes to keep it as a candidate)")
            files += found
            labels += [ci] * len(found)
        classnames = list(subdirs)
    else:
        files = sorted(str(f) for f in root.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        labels = [-1] * len(files)
        classnames = None
    ds = ImageDataset(root.name, file_shards(files), [os.path.relpath(f, root) for f in files],
                      np.asarray(labels, dtype=np.int64), classnames, file_identity(files), str(root))
    if subdirs and (cf := _beside(root)) is not None:
        names, ids = read_class_file(cf)
        if ids is not None and set(subdirs) <= set(ids):
            ds.classnames = _apply_class_file(cf, ds, folder_ids=subdirs)
    return ds


def resolve_paths(table: Path, paths: Sequence[str]) -> list[str]:
    """Paths in a table, relative ones taken from the table's folder."""
    return [str((table.parent / p).resolve()) if not os.path.isabs(p) else p for p in paths]


def file_shards(files: list[str]) -> list[Shard]:
    return [Shard("files", "", tuple(files[i:i + FILES_PER_SHARD])) for i in range(0, len(files), FILES_PER_SHARD)]


def _table(path: Path) -> ImageDataset:
    rows = read_rows(path)
    col = pick_column(rows, ("path", "filepath", "image", "file"), path, "path")
    files = resolve_paths(path, [r[col] for r in rows])
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
    ds = ImageDataset(path.stem, file_shards(files), [os.path.basename(f) for f in files],
                      np.asarray(labels, dtype=np.int64), classnames, file_identity(files + [str(path)]),
                      str(path.parent))
    if classnames is None and max(labels) >= 0 and (cf := _beside(path.parent)) is not None:
        ds.classnames = _apply_class_file(cf, ds)
    return ds


def is_shard_spec(spec: str) -> bool:
    """A brace/glob pattern or a tar file: WebDataset shards."""
    return any(ch in spec for ch in "*?{") or spec.endswith((".tar", ".tar.gz", ".tgz"))


def expand_shards(spec: str) -> list[str]:
    """Brace and glob patterns (`train-00000{0..3}.tar.gz`, `*.tar`) to an ordered list of files."""
    out: list[str] = []
    for pat in braceexpand.braceexpand(spec):
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else ([pat] if os.path.exists(pat) else [])
        out += [h for h in hits if h not in out]
    if not out:
        raise ConceptlensError(f"no shards match {spec}")
    return out


def tars(spec: str) -> ImageDataset:
    paths = expand_shards(spec)
    shards, keys, labels = [], [], []
    for p in paths:
        order, seen, cls = [], set(), {}
        for key, ext, data in tar_members(p, with_images=False):
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
                      file_identity(paths), str(root))
    if labels and min(labels) >= 0 and (cf := _beside(root)) is not None:
        ds.classnames = _apply_class_file(cf, ds)
    return ds


def _named(name: str) -> ImageDataset:
    arr = named_arrays(name)
    n = len(arr.labels)
    shards = [Shard("array", name, tuple(range(i, min(n, i + FILES_PER_SHARD)))) for i in range(0, n, FILES_PER_SHARD)]
    ident = digest([name, n, str(FASHION_DIR) if name.startswith("fashion") else ""])
    return ImageDataset(name.replace(":", "_"), shards, list(arr.keys), np.asarray(arr.labels, dtype=np.int64),
                        list(arr.classnames), ident, name)
