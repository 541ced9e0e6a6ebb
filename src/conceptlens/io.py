"""Files: the cache location, atomic writes, digests, safetensors with JSON metadata, tables, packaged assets.

Every file conceptlens writes goes through `atomic_output` (temp file in the same folder + fsync + rename),
so a reader never sees a partial file and a killed run leaves the previous version in place.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import csv
import hashlib
import io
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import platformdirs
from tqdm.auto import tqdm

from .errors import ConceptlensError

if TYPE_CHECKING:
    import torch

META_KEY = "conceptlens"

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: new files get 0666 minus the process umask


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


ASSETS_USED: set[str] = set()  # the shipped files this process asked for: a result's provenance names only these


def asset_path(name: str) -> Path:
    """A file shipped inside the package (`src/conceptlens/assets/NAME`); noted in `ASSETS_USED` (NAME "" is the
    folder)."""
    if name:
        ASSETS_USED.add(name)
    return Path(str(resources.files("conceptlens") / "assets" / name))


def is_stdout(path: Path | str) -> bool:
    """`-`, or a path that is this process's standard output (`/dev/stdout`, `/proc/self/fd/1`)."""
    if str(path) == "-":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(1))
    except OSError:
        return False


@contextlib.contextmanager
def atomic_output(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is fsynced and renamed over `path`, on failure removed.
    `suffix` keeps writers that insist on an extension (np.save adds ".npy") from renaming the temp file.
    Standard output (`-`, `/dev/stdout`), pipes and devices are written through, and a symlink's target is
    replaced, never the link itself."""
    path = Path(path)
    if is_stdout(path) or (path.exists() and not path.is_file()):
        with tempfile.TemporaryDirectory(prefix="conceptlens-out-") as d:
            tmp = Path(d) / f"out{suffix}"
            yield tmp
            data = tmp.read_bytes()
        if is_stdout(path):  # the real standard output, even while our messages are redirected to stderr
            sys.stdout.flush()
            sys.__stdout__.buffer.write(data + (b"" if data.endswith(b"\n") else b"\n"))
            sys.__stdout__.flush()
        else:
            with open(path, "wb") as f:
                f.write(data)
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write a file so readers never see a partial one."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Strict JSON (NaN and inf become null: other tools reject them), written atomically."""
    atomic_write_bytes(Path(path), json.dumps(json_safe(obj), indent=2, allow_nan=False).encode())


def json_safe(o: Any) -> Any:
    """`o` with numpy scalars/arrays and paths as JSON types and non-finite floats as None."""
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if isinstance(o, np.ndarray):
        return json_safe(o.tolist())
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return o


def atomic_save_npy(path: Path | str, array: np.ndarray) -> None:
    with atomic_output(path, suffix=".npy") as tmp:
        np.save(tmp, array)


def save_safetensors(path: Path | str, tensors: dict[str, "torch.Tensor"], meta: dict) -> Path:
    """Tensors + our JSON metadata (under the "conceptlens" key), written atomically; never pickle."""
    from safetensors.torch import save_file  # imports torch: the data layer below stays torch-free
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={META_KEY: json.dumps(json_safe(meta), allow_nan=False)})
    return Path(path)


def read_safetensors_meta(path: Path | str, required: bool = True) -> dict:
    """The JSON metadata of a conceptlens safetensors file ({} if absent and not `required`)."""
    from safetensors import safe_open  # only where weights are read
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise ConceptlensError(f"cannot read {path}: {exc}") from None
    if raw is None:
        if required:
            raise ConceptlensError(f"{path} has no conceptlens metadata")
        return {}
    return json.loads(raw)


def read_text(path: Path | str) -> str:
    """A UTF-8 text file (a BOM is fine); anything else is one line naming the file."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConceptlensError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    except IsADirectoryError:
        raise ConceptlensError(f"{path} is a directory, not a text file") from None
    except OSError as exc:
        raise ConceptlensError(f"cannot read {path}: {exc.strerror}") from None


def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV, TSV or JSONL table (JSONL errors name the line); an empty table is an error."""
    path = Path(path)
    if not path.exists():
        raise ConceptlensError(f"file not found: {path}")
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConceptlensError(f"{path}:{n}: not valid JSON") from None
    else:
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter="\t" if path.suffix == ".tsv" else ","))
    if not rows:
        raise ConceptlensError(f"no rows in {path}")
    return rows


def pick_column(rows: list[dict], names: tuple[str, ...], path: Path, what: str) -> str:
    """The first of `names` that the table has, else a one-line error listing its columns."""
    col = next((c for c in names if c in rows[0]), None)
    if col is None:
        raise ConceptlensError(f"{path} needs a {what!r} column (found: {', '.join(rows[0])})")
    return col


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


@functools.lru_cache(maxsize=1)
def _code_version() -> dict:
    from . import __version__
    out = {"conceptlens": __version__, "git": None}
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            out["git"] = (sha + ("-dirty" if dirty else "")) or None
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def provenance(**extra: Any) -> dict:
    """What produced a result: command line, conceptlens version and git sha (when run from a checkout), UTC
    date, Python / torch / platform, plus `extra` (data paths and fingerprints, sizes, limit, seed, device...).
    Every results JSON and report carries it."""
    import platform
    import torch
    return {"command": "conceptlens " + shlex.join(sys.argv[1:]) if Path(sys.argv[0]).name == "conceptlens"
            else shlex.join(sys.argv), **_code_version(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            **extra}
