"""`conceptlens demo`: zero-shot with the embedded model on bundled photos and, when present, ../shared data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import zeroshot
from .data import iter_shard, load_dataset
from .features import embed
from .models import load_model
from .report import confusion_figure, fig_b64, table_text, thumb_b64, write_html
from .utils import atomic_write_json, shared_dir

SHARED_SETS = [("imagenette", "data/imagenette/val", 500), ("cifar10", "data/cifar10/test-000000.tar.gz", 1000),
               ("pacs_photo", "data/pacs/photo", 500)]


def prediction_cards(dataset, scores: torch.Tensor, classnames, limit: int = 24) -> list[dict]:
    """Thumbnails with their top-5 zero-shot predictions (softmax of the 100x logits)."""
    probs = scores.softmax(1)
    cards, pos = [], 0
    for shard in dataset.shards:
        for i, im, _ in iter_shard(shard):
            if pos >= min(limit, len(probs)):
                return cards
            top = probs[pos].topk(min(5, len(classnames)))
            truth = classnames[dataset.labels[pos]] if dataset.labels[pos] >= 0 else None
            cards.append({"thumb": thumb_b64(im), "title": dataset.keys[pos], "truth": truth,
                          "preds": [{"name": classnames[j], "prob": float(p), "ok": classnames[j] == truth}
                                    for p, j in zip(top.values.tolist(), top.indices.tolist())]})
            pos += 1
    return cards


def run(report: Path, model_name: str = "builtin:lite-clip", templates: str = "openai") -> dict:
    model = load_model(model_name)
    jobs = [("samples", "samples", None)]
    shared = shared_dir()
    for name, rel, limit in SHARED_SETS:
        if (shared / rel).exists():
            jobs.append((name, str(shared / rel), limit))
    if len(jobs) == 1:
        print(f"(no ../shared data at {shared}: running on the bundled sample photos only)")
    rows, sections, results = [["dataset", "images", "acc1", "acc5", "mean_per_class_recall"]], [], {}
    for name, spec, limit in jobs:
        ds = load_dataset(spec, limit=limit)
        feats = embed(model, ds)
        res = zeroshot.evaluate(model, feats, templates=templates)
        scores = res.pop("_scores")
        m = res["metrics"]
        rows.append([name, len(feats.labels), f"{m['acc1']:.3f}", f"{m['acc5']:.3f}", f"{m['mean_per_class_recall']:.3f}"])
        results[name] = res
        preds = scores.argmax(1).numpy()
        sections.append({"title": f"{name}: top-5 predictions", "cards": prediction_cards(ds, scores, feats.classnames,
                                                                                        limit=16 if name == "samples" else 12)})
        sections.append({"title": f"{name}: confusion matrix (acc1 {m['acc1']:.3f})",
                         "image": fig_b64(confusion_figure(np.asarray(feats.labels), preds, feats.classnames, name))})
    print(table_text(rows))
    report = Path(report)
    sections.insert(0, {"title": f"Zero-shot with {model.name} ({templates} templates)", "table": rows})
    write_html(report / "index.html", f"conceptlens demo — {model.name}", sections)
    atomic_write_json(report / "results.json", results)
    print(f"report: {report / 'index.html'}")
    return results
