"""Image-caption pairs: CSV/TSV/JSONL tables, WebDataset shards (KEY.jpg + KEY.txt) and Flickr8k's files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConceptlensError
from ..io import pick_column, read_rows
from .dataset import ImageDataset, tar_members
from .readers import expand_shards, file_identity, file_shards, is_shard_spec, resolve_paths, tars


def read_flickr8k(root: Path) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Flickr8k's (image file, caption) pairs and its official split (image file -> train/dev/test)."""
    root = Path(root)
    for name in ("captions.tsv", "splits.tsv"):
        if not (root / name).exists():
            raise ConceptlensError(f"Flickr8k {name} not found under {root}")
    pairs = [(r["image"], r["caption"].strip()) for r in read_rows(root / "captions.tsv") if r["caption"].strip()]
    split = {r["image"]: r["split"] for r in read_rows(root / "splits.tsv")}
    return pairs, split


def flickr8k_captions(root: Path, splits: tuple[str, ...]) -> list[str]:
    """The captions of Flickr8k's images in `splits` (e.g. dev and test: what a text-only model trained on the caption
    banks must not see before it is scored on those images)."""
    pairs, split = read_flickr8k(root)
    return [c for img, c in pairs if split.get(img) in splits]


def read_pairs(path: str | Path) -> tuple[ImageDataset, list[str], np.ndarray]:
    """Image-caption pairs from a CSV/TSV/JSONL with `path` and `caption` (or `text`) columns (a path may repeat:
    several captions), or WebDataset shards with KEY.jpg + KEY.txt. Returns the unique-image dataset, the
    captions and each caption's image row."""
    spec = str(path)
    if is_shard_spec(spec):
        ds = tars(spec)
        text = {}
        for p in expand_shards(spec):
            for key, ext, data in tar_members(p, with_images=False):
                if ext in (".txt", ".caption"):
                    text[f"{os.path.basename(p)}/{key}"] = data.decode("utf-8", errors="replace").strip()
        missing = [k for k in ds.keys if not text.get(k)]
        if missing:
            raise ConceptlensError(f"{len(missing)} images in {spec} have no or an empty .txt caption, e.g. {missing[0]}")
        return ds, [text[k] for k in ds.keys], np.arange(len(ds))
    path = Path(path)
    if not path.exists():
        raise ConceptlensError(f"pairs file not found: {path}")
    rows = read_rows(path)
    tcol = pick_column(rows, ("caption", "text", "title"), path, "caption")
    pcol = pick_column(rows, ("path", "filepath", "image", "file"), path, "path")
    empty = [i + 2 for i, r in enumerate(rows) if not str(r[tcol] or "").strip()]
    if empty:
        raise ConceptlensError(f"{path}: empty caption on line {empty[0]} ({len(empty)} in all)")
    files = resolve_paths(path, [r[pcol] for r in rows])
    missing = sorted({f for f in files if not os.path.exists(f)})
    if missing:
        raise ConceptlensError(f"{len(missing)} images in {path} do not exist, e.g. {missing[0]}")
    uniq = list(dict.fromkeys(files))
    row = {f: i for i, f in enumerate(uniq)}
    ds = ImageDataset(path.stem, file_shards(uniq), uniq, np.full(len(uniq), -1, np.int64), None,
                      file_identity(uniq + [str(path)]), str(path.parent))
    return ds, [str(r[tcol]).strip() for r in rows], np.asarray([row[f] for f in files])
