"""`conceptlens demo`: zero-shot with the embedded model on bundled photos and, when present, ../shared data
(plus the embedded diffusion classifier on CIFAR-10 test images beside lite-clip)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import iter_images, load_dataset
from .diffusion import DiffusionClassifier, evaluate as diffusion_evaluate
from .eval import zeroshot
from .features import embed
from .io import atomic_write_json, shared_dir
from .models import load_model
from .report import confusion_figure, fig_b64, table_text, thumb_b64, write_html

DIFFUSION_DEMO = {"images": 40, "strategy": "halving", "budget": 200}
SHARED_SETS = [("imagenette", "data/imagenette/val", 500), ("cifar10", "data/cifar10/test-000000.tar.gz", 1000),
               ("pacs_photo", "data/pacs/photo", 500)]


def prediction_cards(dataset, scores: torch.Tensor, classnames, limit: int = 24) -> list[dict]:
    """Thumbnails with their top-5 zero-shot predictions (softmax of the 100x logits)."""
    probs = scores.softmax(1)
    cards = []
    for pos, im, _ in iter_images(dataset):
        if pos >= min(limit, len(probs)):
            break
        top = probs[pos].topk(min(5, len(classnames)))
        truth = classnames[dataset.labels[pos]] if dataset.labels[pos] >= 0 else None
        cards.append({"thumb": thumb_b64(im), "title": dataset.keys[pos], "truth": truth,
                      "preds": [{"name": classnames[j], "prob": float(p), "ok": classnames[j] == truth}
                                for p, j in zip(top.values.tolist(), top.indices.tolist())]})
    return cards


def run(report: Path, model_name: str = "builtin:lite-clip", templates: str = "openai", device: str = "cpu") -> dict:
    """Zero-shot on the bundled photos and the ../shared sets present, plus the diffusion classifier, on `device`."""
    model = load_model(model_name, device=device)
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
    cifar = shared / SHARED_SETS[1][1]
    if cifar.exists():
        sections.append(diffusion_section(cifar, model, templates, results, device))
    report = Path(report)
    sections.insert(0, {"title": f"Zero-shot with {model.name} ({templates} templates)", "table": rows})
    write_html(report / "index.html", f"conceptlens demo — {model.name}", sections)
    atomic_write_json(report / "results.json", results)
    print(f"report: {report / 'index.html'}")
    return results


def diffusion_section(spec: Path, model, templates: str, results: dict, device: str = "cpu") -> dict:
    """The embedded diffusion classifier (our halving strategy; bf16 where native) on a few CIFAR-10 test images vs lite-clip."""
    ds = load_dataset(spec, limit=DIFFUSION_DEMO["images"])
    clf = DiffusionClassifier(load_model("builtin:tiny-diffusion-cifar10", device=device), DIFFUSION_DEMO["strategy"], loss="l1",
                              budget=DIFFUSION_DEMO["budget"])
    res = diffusion_evaluate(clf, ds)
    preds = res.pop("_scores").argmax(1).numpy()
    lite = zeroshot.evaluate(model, embed(model, ds), templates=templates)["metrics"]["acc1"]
    m = res["metrics"]
    rows = [["classifier", "images", "acc1", "denoiser evals/image", "s/image"],
            [f"{clf.model.name} ({clf.strategy}, budget {clf.budget})", res["n_images"], f"{m['acc1']:.3f}",
             f"{m['evals_per_image']:.0f}", f"{m['seconds_per_image']:.2f}"],
            [f"{model.name} zero-shot", res["n_images"], f"{lite:.3f}", "-", "-"]]
    print(table_text(rows))
    results["cifar10_diffusion"] = res | {"lite_clip_acc1_same_images": lite}
    return {"title": "Diffusion zero-shot on CIFAR-10 test (unseen prompt templates)", "table": rows,
            "image": fig_b64(confusion_figure(np.asarray(ds.labels), preds, ds.classnames, "diffusion classifier"))}
