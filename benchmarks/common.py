"""Shared helpers for benchmarks: results folder, machine description, table printing."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from conceptlens.runtime import resolve_precision  # noqa: E402
from conceptlens.report import table_text  # noqa: E402
from conceptlens.io import atomic_write_json, shared_dir  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT, PACKAGE = HERE.parent, HERE.parent / "src" / "conceptlens"
# benchmarks whose work runs in child processes (the CLI, Ray workers): their code is the whole package
CHILD_PROCESSES = {"startup", "cli_timings", "embed_memory", "reliability", "scale"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where a result was measured; `precision_auto` is what --precision auto runs (bf16 only where native)."""
    return {"cpu": cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": "cpu", "precision_auto": resolve_precision("auto")}


# words that count as "a sketch-like word" in the diagnose rows (lite_clip.py, text_to_concept.py)
SKETCHY = {"sketch", "drawing", "pencil drawing", "pencil", "black and white", "line art", "doodle", "outline"}


def concat(fs: list, name: str):
    """Several cached feature sets of one model as one (keys prefixed by their dataset), e.g. PACS photo + sketch."""
    import numpy as np
    from conceptlens.features import Features
    return Features(np.concatenate([np.asarray(f.X) for f in fs]), np.concatenate([f.labels for f in fs]),
                    [f"{f.dataset}/{k}" for f in fs for k in f.keys], fs[0].classnames, [], fs[0].model, name)


INPUTS: set[Path] = set()  # files of the repository a result is computed from (other results, logs)


def read_input(path: Path) -> str:
    """The text of a file this result is computed from; recorded in its `source` like the code that ran."""
    INPUTS.add(Path(path).resolve())
    return Path(path).read_text()


def file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()


def ran_files(name: str) -> list[Path]:
    """What a result came from: the benchmark scripts this process loaded, the conceptlens modules it loaded
    (the whole package where the work ran in child processes), the shipped assets and its `read_input` files."""
    loaded = {Path(f).resolve() for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    files = {f for f in loaded if f.parent == HERE} | {HERE / f"{name}.py", HERE / "common.py"}
    files |= {f for f in INPUTS if ROOT in f.parents}
    if name in CHILD_PROCESSES:
        files |= {f for f in PACKAGE.rglob("*") if f.is_file() and "__pycache__" not in f.parts}
    else:
        files |= {f for f in loaded if PACKAGE in f.parents}
        files |= {f for f in (PACKAGE / "assets").rglob("*") if f.is_file()}
    return sorted(f for f in files if f.is_file())


def source(name: str) -> dict:
    """Provenance of a result: the commit, whether the tree differed from it, and a digest of every file in
    `ran_files` (benchmarks/stale.py compares them with today's files: a result whose code changed is stale)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""
    changed = git("status", "--porcelain", "-uno", "--", "src", "benchmarks", ":!benchmarks/results")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changed),
            "files": {str(f.relative_to(ROOT)): file_digest(f) for f in ran_files(name)}}


def save(name: str, obj: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, obj | {"machine": machine(), "source": source(name)})
    print(f"wrote {path}")
    return path


__all__ = ["RESULTS", "SKETCHY", "concat", "file_digest", "json", "machine", "read_input", "save", "shared_dir", "source",
           "table_text"]
