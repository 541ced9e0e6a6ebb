"""Provenance of benchmark results: what each result file ran from, for `stale.py`.

This module and stale.py record and compare; they measure nothing, so they are not among the recorded files (a
change here does not make every result stale). Everything else a benchmark process loads from benchmarks/ is.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT, PACKAGE = HERE.parent, HERE.parent / "src" / "conceptlens"
# benchmarks whose work runs in child processes (the CLI, Ray workers): their code is the whole package
CHILD_PROCESSES = {"startup", "cli_timings", "embed_memory", "reliability", "scale"}
NOT_RECORDED = {HERE / "provenance.py", HERE / "stale.py"}
INPUTS: set[Path] = set()  # files of the repository a result is computed from (other results, logs)


def read_input(path: Path) -> str:
    """The text of a file this result is computed from; recorded in its `source` like the code that ran."""
    INPUTS.add(Path(path).resolve())
    return Path(path).read_text()


def file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()


def ran_files(name: str) -> list[Path]:
    """What a result came from: the benchmark scripts this process loaded, the conceptlens modules it loaded
    (the whole package where the work ran in child processes), the shipped assets it asked for and its `read_input`
    files."""
    loaded = {Path(f).resolve() for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    files = ({f for f in loaded if f.parent == HERE} | {HERE / f"{name}.py", HERE / "common.py"}) - NOT_RECORDED
    files |= {f for f in INPUTS if ROOT in f.parents}
    if name in CHILD_PROCESSES:
        files |= {f for f in PACKAGE.rglob("*") if f.is_file() and "__pycache__" not in f.parts}
    else:
        files |= {f for f in loaded if PACKAGE in f.parents}
        from conceptlens.io import ASSETS_USED  # only the shipped files this process asked for
        files |= {PACKAGE / "assets" / name for name in ASSETS_USED}
    return sorted(f for f in files if f.is_file())


def git(*args: str) -> str:
    """Output of a git command in the repository; empty where git or the repository is missing."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def source(name: str) -> dict:
    """Provenance of a result: the commit, whether the tree differed from it, and a digest of every file in
    `ran_files` (benchmarks/stale.py compares them with today's files: a result whose code changed is stale)."""
    changed = git("status", "--porcelain", "-uno", "--", "src", "benchmarks", ":!benchmarks/results")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(changed),
            "files": {str(f.relative_to(ROOT)): file_digest(f) for f in ran_files(name)}}
