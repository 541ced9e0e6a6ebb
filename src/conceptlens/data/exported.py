"""Embeddings in clip-retrieval's layout, the one embedding-reader reads and autofaiss indexes:

    OUT/img_emb/img_emb_{i}.npy           float32 [rows, D], row-aligned with
    OUT/metadata/metadata_{i}.parquet     key, path, label (class name or ""), label_id (-1 = none)
    OUT/conceptlens.json                  the model (name, fingerprint, layer, preprocessing, precision) and the
                                          dataset's shards, so `--data OUT` rebuilds the same dataset exactly

Read back by `--data OUT`: the dataset comes from conceptlens.json (or, for a folder written elsewhere, from
the metadata's `path`/`image_path` column), and `embed` uses the stored rows when the model matches.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConceptlensError
from ..io import atomic_output, atomic_save_npy, atomic_write_json

SIDE = "conceptlens.json"


def is_exported(path: Path) -> bool:
    return path.is_dir() and (path / "img_emb").is_dir() and (path / "metadata").is_dir()


def _parquet():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConceptlensError("reading and writing clip-retrieval folders needs pyarrow: pip install pyarrow") from None
    return pa, pq


def write_exported(out: Path, X: np.ndarray, keys: list[str], paths: list[str], labels: np.ndarray,
                   classnames: list[str] | None, side: dict, rows_per_file: int = 100_000) -> list[Path]:
    """Write the embeddings in parts of `rows_per_file` rows; the sidecar last (its presence marks a full export)."""
    pa, pq = _parquet()
    out = Path(out)
    if (out / SIDE).exists() or (out / "img_emb").exists():
        raise ConceptlensError(f"{out} already holds an export: choose a new --out")
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    written = []
    for part, s in enumerate(range(0, max(len(keys), 1), rows_per_file)):
        sl = slice(s, s + rows_per_file)
        atomic_save_npy(out / "img_emb" / f"img_emb_{part}.npy", np.ascontiguousarray(X[sl], np.float32))
        lab = np.asarray(labels[sl], np.int64)
        table = pa.table({"key": keys[sl], "path": paths[sl],
                          "label": [classnames[i] if classnames and i >= 0 else "" for i in lab], "label_id": lab})
        with atomic_output(out / "metadata" / f"metadata_{part}.parquet") as tmp:
            pq.write_table(table, tmp)
        written.append(out / "img_emb" / f"img_emb_{part}.npy")
    atomic_write_json(out / SIDE, side)
    return written


def _parts(root: Path, sub: str, ext: str) -> list[Path]:
    files = sorted((root / sub).glob(f"*.{ext}"), key=lambda p: (len(p.stem), p.stem))  # img_emb_2 before img_emb_10
    if not files:
        raise ConceptlensError(f"{root / sub} has no .{ext} files")
    return files


def read_metadata(root: Path) -> dict[str, list]:
    """All metadata columns, parts concatenated in order."""
    _, pq = _parquet()
    cols: dict[str, list] = {}
    for f in _parts(root, "metadata", "parquet"):
        try:
            t = pq.read_table(f).to_pydict()
        except Exception as exc:  # noqa: BLE001 - any unreadable part is one line
            raise ConceptlensError(f"cannot read {f}: {exc}") from None
        for k, v in t.items():
            cols.setdefault(k, []).extend(v)
    return cols


def read_embeddings(root: Path) -> np.ndarray:
    """The stored rows [n, D] (parts concatenated)."""
    parts = [np.load(f, mmap_mode="r", allow_pickle=False) for f in _parts(Path(root), "img_emb", "npy")]
    if len({p.shape[1] for p in parts}) != 1:
        raise ConceptlensError(f"{root}: parts of different widths")
    return np.concatenate([np.asarray(p, np.float32) for p in parts])
