"""CLIP evaluation: zero-shot classification (zeroshot), linear probes (probe), CLIP_benchmark metrics (metrics)."""
from .metrics import caption_metrics, metrics, result_json, retrieval_metrics
from .probe import LinearProbe, linear_probe
from .zeroshot import build_classifier, evaluate, load_templates, logits, openai_templates

__all__ = ["LinearProbe", "build_classifier", "caption_metrics", "evaluate", "linear_probe", "load_templates", "logits",
           "metrics",
           "openai_templates", "result_json", "retrieval_metrics"]
