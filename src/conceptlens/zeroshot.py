"""CLIP zero-shot classification (Radford et al. 2021) and linear probes, in CLIP_benchmark's layout.

Follows LAION-AI/CLIP_benchmark (clip_benchmark/metrics/zeroshot_classification.py, linear_probe.py):
class vector = normalise(mean over templates of normalise(encode_text(template.format(c)))),
logits = 100 * normalise(image) @ classes.T.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConceptlensError
from .models.base import Encoder


def openai_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates (as shipped by open_clip), as '{c}' format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def simple_templates() -> list[str]:
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES
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
        out = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = [t.replace("{}", "{c}") for t in out]
    bad = [t for t in out if "{c}" not in t]
    if not out or bad:
        raise ConceptlensError(f"templates need a {{c}} (or {{}}) where the class name goes: {bad[:1] or 'empty list'}")
    return out


def _format(template: str | Callable[[str], str], c: str) -> str:
    return template(c) if callable(template) else template.format(c=c)


@torch.no_grad()
def build_classifier(model: Encoder, classnames: Sequence[str],
                     templates: Sequence[str | Callable[[str], str]] | dict[str, Sequence[str]]) -> torch.Tensor:
    """[C, D] class embeddings: prompt-ensemble of normalised text embeddings, normalised again.

    `templates` may be a dict of per-class prompt lists (CuPL), as in CLIP_benchmark.
    """
    if not classnames:
        raise ConceptlensError("empty class list")
    rows = []
    for c in classnames:
        prompts = list(templates[c]) if isinstance(templates, dict) else [_format(t, c) for t in templates]
        emb = F.normalize(model.encode_text(prompts).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


def logits(image_features: torch.Tensor, classifier: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    return scale * F.normalize(image_features.float(), dim=-1) @ classifier.T


def metrics(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict[str, float]:
    """acc1, acc5 (NaN under 5 classes) and mean_per_class_recall, as CLIP_benchmark computes them."""
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels).long()
    n_cls = scores.shape[1]
    top = scores.topk(min(5, n_cls), dim=1).indices
    acc1 = (top[:, 0] == labels).double().mean().item()
    acc5 = (top == labels[:, None]).any(1).double().mean().item() if n_cls >= 5 else float("nan")
    pred = top[:, 0]
    recalls = [(pred[labels == c] == c).double().mean().item() for c in labels.unique().tolist()]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": float(np.mean(recalls))}


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


def result_json(dataset: str, model: str, task: str, metric: dict) -> dict:
    """CLIP_benchmark's result layout (`pretrained` is the URI's tag part)."""
    arch, _, pretrained = model.partition("/")
    return {"dataset": dataset, "model": arch, "pretrained": pretrained or arch.split(":")[0], "task": task,
            "metrics": metric, "language": "en"}


# ----------------------------------------------------------------------------------------- linear probe
class LinearProbe:
    """Logistic regression on L2-normalised cached features, CLIP_benchmark's recipe (metrics/linear_probe.py).

    nn.Linear + AdamW + cross-entropy, cosine LR without warmup, lr 0.1, 10 epochs, batch 64, seed 0;
    weight decay searched on a validation split over logspace(-6, 2, 97): 7 coarse points, then
    refinement with spans 8, 4, 2, 1; the final model is refit on train+val. scikit-learn habits:
    hyperparameters in __init__, learned state with a trailing underscore.
    """

    def __init__(self, lr: float = 0.1, epochs: int = 10, batch_size: int = 64, weight_decay: float | None = None,
                 val_proportion: float = 0.2, seed: int = 0):
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.weight_decay, self.val_proportion, self.seed = weight_decay, val_proportion, seed

    def _train(self, X: torch.Tensor, y: torch.Tensor, n_classes: int, wd: float) -> torch.nn.Linear:
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        lin = torch.nn.Linear(X.shape[1], n_classes)
        opt = torch.optim.AdamW(lin.parameters(), lr=self.lr, weight_decay=wd)
        steps_per_epoch = math.ceil(len(X) / self.batch_size)
        total, step = self.epochs * steps_per_epoch, 0
        for _ in range(self.epochs):
            perm = torch.randperm(len(X), generator=g)
            for i in range(0, len(X), self.batch_size):
                for group in opt.param_groups:
                    group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * self.lr
                idx = perm[i:i + self.batch_size]
                loss = F.cross_entropy(lin(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        return lin

    def fit(self, X, y) -> "LinearProbe":
        X = F.normalize(torch.as_tensor(np.asarray(X), dtype=torch.float32), dim=-1)
        y = torch.as_tensor(np.asarray(y)).long()
        self.n_classes_ = int(y.max()) + 1
        if self.weight_decay is not None:
            self.weight_decay_ = self.weight_decay
        else:
            perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(self.seed))
            n_val = max(1, int(len(X) * self.val_proportion))
            va, tr = perm[:n_val], perm[n_val:]
            wd_list = np.logspace(-6, 2, num=97).tolist()
            cache: dict[int, float] = {}

            def acc(i: int) -> float:
                if i not in cache:
                    lin = self._train(X[tr], y[tr], self.n_classes_, wd_list[i])
                    with torch.no_grad():
                        cache[i] = (lin(X[va]).argmax(1) == y[va]).float().mean().item()
                return cache[i]

            peak = max(range(0, 97, 16), key=acc)
            for span in (8, 4, 2, 1):
                cand = [max(peak - span, 0), peak, min(peak + span, 96)]
                peak = max(cand, key=acc)
            self.weight_decay_ = wd_list[peak]
            self.val_accuracy_ = cache[peak]
        self.linear_ = self._train(X, y, self.n_classes_, self.weight_decay_)
        return self

    @torch.no_grad()
    def decision_function(self, X) -> torch.Tensor:
        X = F.normalize(torch.as_tensor(np.asarray(X), dtype=torch.float32), dim=-1)
        return self.linear_(X)

    def predict(self, X) -> np.ndarray:
        return self.decision_function(X).argmax(1).numpy()

    def score(self, X, y) -> float:
        return float((self.predict(X) == np.asarray(y)).mean())


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_owner: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-text retrieval recall@k with CLIP_benchmark's names (zeroshot_retrieval.py):
    image_retrieval = text query -> its image among all images; text_retrieval = image query -> any of its texts."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    owner = torch.as_tensor(np.asarray(text_owner), dtype=torch.long)
    sim = txt @ img.T  # [texts, images]
    positive = torch.zeros_like(sim, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    out = {}
    for k in ks:
        top_i = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"image_retrieval_recall@{k}"] = float(positive.gather(1, top_i).any(1).float().mean())
        top_t = sim.T.topk(min(k, sim.shape[0]), dim=1).indices
        out[f"text_retrieval_recall@{k}"] = float(positive.T.gather(1, top_t).any(1).float().mean())
    return out
