"""Small shared helpers: cache location, atomic writes, hashing, progress bars."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import platformdirs
from tqdm.auto import tqdm

from .errors import ConceptlensError


def cache_dir(sub: str = "") -> Path:
    """The cache root (`CONCEPTLENS_CACHE` or the platform cache dir), created and checked writable."""
    root = Path(os.environ.get("CONCEPTLENS_CACHE") or platformdirs.user_cache_dir("conceptlens"))
    path = root / sub if sub else root
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise ConceptlensError(f"cache directory {path} is not writable ({exc.strerror}); set CONCEPTLENS_CACHE") from None
    return path


def shared_dir() -> Path:
    """Where the real datasets live: `CONCEPTLENS_SHARED` or `../shared` beside the project root."""
    env = os.environ.get("CONCEPTLENS_SHARED")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared"
        if (parent / "pyproject.toml").exists() and cand.exists():
            return cand
    return Path.cwd().parent / "shared"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so readers never see a partial one (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, default=_json_default).encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def digest(parts: Iterable[Any], n: int = 16) -> str:
    """Stable short hash of a sequence of JSON-able parts."""
    h = hashlib.blake2b(digest_size=n)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def progress(iterable=None, **kw):
    """tqdm with our defaults (stderr, hidden when CONCEPTLENS_QUIET is set)."""
    kw.setdefault("disable", bool(os.environ.get("CONCEPTLENS_QUIET")))
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)
