"""CLIP evaluation: zero-shot classification (zeroshot), linear probes (probe), CLIP_benchmark metrics (metrics).
Names load with their submodule on first use (conceptlens.lazy)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_package

_EXPORTS = {"caption_metrics": "metrics", "metrics": "metrics", "result_json": "metrics", "retrieval_metrics": "metrics",
            "LinearProbe": "probe", "linear_probe": "probe",
            "build_classifier": "zeroshot", "evaluate": "zeroshot", "load_templates": "zeroshot", "logits": "zeroshot",
            "openai_templates": "zeroshot"}
__all__ = ["LinearProbe", "build_classifier", "caption_metrics", "evaluate", "linear_probe", "load_templates",
           "logits", "metrics", "openai_templates", "result_json", "retrieval_metrics"]
lazy_package(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .metrics import caption_metrics, metrics, result_json, retrieval_metrics
    from .probe import LinearProbe, linear_probe
    from .zeroshot import build_classifier, evaluate, load_templates, logits, openai_templates
