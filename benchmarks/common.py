"""Shared helpers for benchmarks: results folder, machine description, table printing."""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from conceptlens.runtime import resolve_precision  # noqa: E402
from conceptlens.report import table_text  # noqa: E402
from conceptlens.io import atomic_write_json, shared_dir  # noqa: E402

from provenance import RESULTS, read_input, source  # noqa: E402


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


def save(name: str, obj: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_json(path, obj | {"machine": machine(), "source": source(name)})
    print(f"wrote {path}")
    return path


__all__ = ["RESULTS", "SKETCHY", "concat", "json", "machine", "read_input", "save", "shared_dir", "table_text"]
