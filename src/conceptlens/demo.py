"""`conceptlens demo`: zero-shot with the embedded model on bundled photos and, when present, ../shared data
(plus the embedded diffusion classifier on CIFAR-10 test images beside lite-clip)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import load_dataset
from .diffusion import DiffusionClassifier, evaluate as diffusion_evaluate
from .eval import zeroshot
from .features import embed
from .io import atomic_write_json, shared_dir
from .models import load_model
from .report import acc_text, confusion_figure, fig_b64, predictions_section, table_text, write_html

DIFFUSION_DEMO = {"images": 40, "strategy": "halving", "budget": 200}
SHARED_SETS = [("imagenette", "data/imagenette/val", 500), ("cifar10", "data/cifar10/test-000000.tar.gz", 1000),
               ("pacs_photo", "data/pacs/photo", 500)]


NOT_ZERO_SHOT = {"imagenette": "lite-clip's image tower and its ConSE text map were trained on ImageNet-1k, whose "
                                "classes include Imagenette's ten: not strictly zero-shot for lite-clip"}
SECONDS_PER_IMAGE = 0.06  # embedding on this 2-core CPU (README, Benchmarks); diffusion: 1.3 s per image


def estimate(jobs: list[tuple[str, str, int | None]], diffusion: bool) -> float:
    """Seconds the demo should take on a 2-core CPU with an empty cache (cached features make it seconds)."""
    n = sum(limit or 50 for _, _, limit in jobs)
    return n * SECONDS_PER_IMAGE + (DIFFUSION_DEMO["images"] * 1.3 if diffusion else 0) + 15


def run(report: Path, model_name: str = "builtin:lite-clip", templates: str = "openai", device: str = "cpu",
        limit: int | None = None, provenance: dict | None = None) -> dict:
    """Zero-shot on the bundled photos and the ../shared sets present (at most `limit` images each), plus the
    diffusion classifier, on `device`; an HTML report with intervals and predictions sampled across classes."""
    jobs = [("samples", "samples", None)]
    shared = shared_dir()
    for name, rel, n in SHARED_SETS:
        if (shared / rel).exists():
            jobs.append((name, str(shared / rel), min(n, limit) if limit else n))
    cifar = shared / SHARED_SETS[1][1]
    print(f"demo: {len(jobs)} sets, about {estimate(jobs, cifar.exists()) / 60:.0f} min on a 2-core CPU with an empty "
          "cache (much less when cached; --limit N to shorten)")
    if len(jobs) == 1:
        print(f"(no ../shared data at {shared}: running on the bundled sample photos only)")
    model = load_model(model_name, device=device)
    rows = [["dataset", "images", "acc1 [95 % Wilson]", "acc5", "mean_per_class_recall", "note"]]
    sections, results = [], {}
    for name, spec, n in jobs:
        ds = load_dataset(spec, limit=n)
        feats = embed(model, ds)
        res = zeroshot.evaluate(model, feats, templates=templates)
        scores = res.pop("_scores")
        m = res["metrics"]
        note = NOT_ZERO_SHOT.get(name, "") if "lite-clip" in model.name else ""
        rows.append([name, len(feats.labels), acc_text(m["acc1"], len(feats.labels)), f"{m['acc5']:.3f}",
                     f"{m['mean_per_class_recall']:.3f}", note])
        results[name] = res | ({"note": note} if note else {})
        preds = scores.argmax(1).numpy()
        sections.append(predictions_section(f"{name}: top-5 predictions", ds, feats.keys, feats.labels, scores.numpy(),
                                            feats.classnames, 16 if name == "samples" else 12))
        sections.append({"title": f"{name}: confusion matrix (acc1 {m['acc1']:.3f})",
                         "image": fig_b64(confusion_figure(np.asarray(feats.labels), preds, feats.classnames, name))})
    print(table_text(rows))
    if cifar.exists():
        sections.append(diffusion_section(cifar, model, templates, results, device))
    report = Path(report)
    sections.insert(0, {"title": f"Zero-shot with {model.name} ({templates} templates)", "table": rows})
    if provenance:
        results["provenance"] = provenance
    atomic_write_json(report / "results.json", results)
    write_html(report / "index.html", f"conceptlens demo — {model.name}", sections, provenance)
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
    m, n = res["metrics"], res["n_images"]
    rows = [["classifier", "images", "acc1 [95 % Wilson]", "denoiser evals/image", "s/image"],
            [f"{clf.model.name} ({clf.strategy}, budget {clf.budget})", n, acc_text(m["acc1"], n),
             f"{m['evals_per_image']:.0f}", f"{m['seconds_per_image']:.2f}"],
            [f"{model.name} zero-shot", n, acc_text(lite, n), "-", "-"]]
    print(table_text(rows))
    results["cifar10_diffusion"] = res | {"lite_clip_acc1_same_images": lite}
    return {"title": "Diffusion zero-shot on CIFAR-10 test (unseen prompt templates)", "table": rows,
            "note": f"on {n} images the two intervals overlap unless they are far apart: read a difference with them",
            "image": fig_b64(confusion_figure(np.asarray(ds.labels), preds, ds.classnames, "diffusion classifier"))}
