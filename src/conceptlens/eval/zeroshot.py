"""CLIP zero-shot classification (Radford et al. 2021), in CLIP_benchmark's layout.

Follows LAION-AI/CLIP_benchmark (clip_benchmark/metrics/zeroshot_classification.py, linear_probe.py):
class vector = normalise(mean over templates of normalise(encode_text(template.format(c)))),
logits = 100 * normalise(image) @ classes.T.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConceptlensError
from ..features import embed_texts
from ..io import read_text
from ..models import Encoder
from .metrics import metrics, result_json


def openai_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates (as shipped by open_clip), as '{c}' format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES  # heavy: open_clip only where used
    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def simple_templates() -> list[str]:
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES  # heavy: open_clip only where used
    return [t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES]


def load_templates(spec: str | Sequence[str] | None) -> list[str]:
    """`openai` (80), `simple`, a file with one template per line ({c} or {} marks the class), or a list."""
    if spec is None or spec == "openai":
        return openai_templates()
    if spec == "simple":
        return simple_templates()
    if isinstance(spec, (list, tuple)):
        out = list(spec)
    else:
        path = Path(spec)
        if not path.exists():
            raise ConceptlensError(f"templates: {spec!r} is not openai, simple or an existing file")
        out = [ln.strip() for ln in read_text(path).splitlines() if ln.strip()]
    out = [t.replace("{}", "{c}") for t in out]
    bad = [t for t in out if "{c}" not in t]
    if not out or bad:
        raise ConceptlensError(f"templates need a {{c}} (or {{}}) where the class name goes: {bad[:1] or 'empty list'}")
    for t in out:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
        except ValueError as exc:
            raise ConceptlensError(f"template {t!r}: {exc} (write a literal brace as {{{{ or }}}})") from None
        if fields != {"c"}:
            raise ConceptlensError(f"template {t!r} has fields {sorted(fields - {'c'})}: only {{c}} is filled in")
    return out


def _format(template: str | Callable[[str], str], c: str) -> str:
    return template(c) if callable(template) else template.format(c=c)


def build_classifier(model: Encoder, classnames: Sequence[str],
                     templates: Sequence[str | Callable[[str], str]] | dict[str, Sequence[str]]) -> torch.Tensor:
    """[C, D] class embeddings: prompt-ensemble of normalised text embeddings, normalised again.

    `templates` may be a dict of per-class prompt lists (CuPL), as in CLIP_benchmark.
    """
    if not classnames:
        raise ConceptlensError("empty class list")
    prompts = [list(templates[c]) if isinstance(templates, dict) else [_format(t, c) for t in templates]
               for c in classnames]
    emb = F.normalize(embed_texts(model, [p for ps in prompts for p in ps]).float(), dim=-1)  # cached, by text tower
    ends = torch.tensor([len(ps) for ps in prompts]).cumsum(0).tolist()
    return torch.stack([F.normalize(emb[e - len(ps):e].mean(dim=0), dim=-1) for e, ps in zip(ends, prompts)])


def logits(image_features: torch.Tensor, classifier: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    return scale * F.normalize(image_features.float(), dim=-1) @ classifier.T


def evaluate(model: Encoder, features, classnames: Sequence[str] | None = None,
             templates: str | Sequence[str] | None = "openai") -> dict:
    """Zero-shot evaluation of cached `features` (conceptlens.features.Features); returns CLIP_benchmark JSON."""
    classnames = list(classnames or features.classnames or [])
    if not classnames:
        raise ConceptlensError(f"{features.dataset} has no class names: give --classes FILE")
    if (features.labels < 0).any():
        raise ConceptlensError(f"{features.dataset} is unlabelled: zero-shot accuracy needs labels")
    tmpl = load_templates(templates) if not isinstance(templates, dict) else templates
    clf = build_classifier(model, classnames, tmpl)
    scores = logits(features.tensor(), clf)
    out = result_json(features.dataset, model.name, "zeroshot_classification", metrics(scores, features.labels))
    out.update({"classnames": classnames, "templates": tmpl if not isinstance(tmpl, dict) else "per-class",
                "n_images": int(len(features.labels)), "skipped": list(features.skipped),
                "n_skipped": len(features.skipped)})
    out["_scores"] = scores  # for reports; dropped when written
    return out
