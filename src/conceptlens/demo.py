"""`conceptlens demo`: a tour of the capabilities on the embedded models. Zero-shot with lite-clip on bundled
photos and, when ../shared is present, Imagenette / CIFAR-10 / PACS; then text-to-concept (MobileNetV2 aligned
into lite-clip, zero-shot through the map), concept-logic search and shift diagnosis on PACS, a FALCON
explanation of MobileNetV2 features, and the embedded diffusion classifier beside lite-clip on CIFAR-10."""
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
SHARED_SETS = [("imagenette", "data/imagenette/val", 500), ("cifar10", "data/cifar10/test-000000.tar.gz", 500),
               ("pacs_photo", "data/pacs/photo", 500)]
TOUR = {"align_images": 300, "sketches": 300, "explain_images": 300, "bank_captions": 2000}


NOT_ZERO_SHOT = {"imagenette": "lite-clip's image tower and its ConSE text map were trained on ImageNet-1k, whose "
                                "classes include Imagenette's ten: not strictly zero-shot for lite-clip"}
SECONDS_PER_IMAGE = 0.06  # embedding on this 2-core CPU (README, Benchmarks); diffusion: 1.3 s per image


def estimate(jobs: list[tuple[str, str, int | None]], diffusion: bool) -> float:
    """Seconds the demo should take on a 2-core CPU with an empty cache (cached features make it seconds)."""
    n = sum(limit or 50 for _, _, limit in jobs)
    tour = 2 * TOUR["align_images"] + TOUR["sketches"] + TOUR["explain_images"] if len(jobs) > 1 else 0
    return (n + tour) * SECONDS_PER_IMAGE + (DIFFUSION_DEMO["images"] * 1.3 if diffusion else 0) + 40


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
    if len(jobs) > 1:
        sections += tour(shared / "data", model, report, results, device, provenance)
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


def tour(data: Path, vl, report: Path, results: dict, device: str, provenance: dict | None) -> list[dict]:
    """Text-to-concept, search, diagnose and FALCON on small real subsets; each writes its own report under
    `report/` and adds a summary section here."""
    from .concepts import default_concepts, fit, run_diagnose, search
    from .concepts.vocab import caption_bank
    from .explain import run_falcon
    from .report import diagnose_report, explain_report, search_report
    prov = {"provenance": provenance} if provenance else {}
    sections = []
    # text-to-concept: MobileNetV2 (an ImageNet classifier with no text) mapped into lite-clip's space
    mbv2 = load_model("builtin:mobilenetv2", device=device)
    al, meta = fit(mbv2, vl, load_dataset(data / "imagenette/train", limit=TOUR["align_images"]), holdout=0.2)
    al.save(report / "mbv2_to_lite-clip.safetensors", meta)
    aligned = load_model("builtin:mobilenetv2", aligner=str(report / "mbv2_to_lite-clip.safetensors"), device=device)
    val = load_dataset(data / "imagenette/val", limit=SHARED_SETS[0][2])
    zs = zeroshot.evaluate(aligned, embed(aligned, val))
    zs.pop("_scores")
    m = al.metrics_
    results["text_to_concept"] = {"held_out_r2": m["r2"], "held_out_cosine": m["cosine"], "imagenette_zeroshot": zs}
    sections.append({"title": "Text-to-concept: MobileNetV2 aligned into lite-clip (ridge, 300 Imagenette train images)",
                     "table": [["held-out R²", "held-out cosine", "zero-shot acc1 on Imagenette val [95 %]"],
                               [f"{m['r2']:.3f}", f"{m['cosine']:.3f}", acc_text(zs["metrics"]["acc1"], zs["n_images"])]],
                     "note": "a vision model with no text tower becomes a zero-shot classifier through one linear map"})
    # concept-logic search and shift diagnosis on PACS sketches
    sketch = load_dataset(data / "pacs/sketch", limit=TOUR["sketches"])
    photo = load_dataset(data / "pacs/photo", limit=SHARED_SETS[2][2])
    q = search(vl, sketch, "horse & !grass", k=12)
    search_report(q | prov, sketch, report / "search")
    d = run_diagnose(vl, photo, sketch, default_concepts(photo.classnames), examples=3)
    diagnose_report(d | prov, photo, sketch, report / "diagnose", top=15)
    results["search"] = {k: q[k] for k in ("query", "keys", "scores", "note")}
    results["diagnose_top"] = d["concepts"][:10]
    sections.append({"title": "Concept-logic search and shift diagnosis (PACS photo vs sketch)", "table": [
        ["what", "result", "report"],
        ["search 'horse & !grass' in sketches", f"{len(q['keys'])} results, top score {q['scores'][0]:.2f}"
         if q["keys"] else "no result", "search/index.html"],
        ["most shifted concepts (photo → sketch)", ", ".join(f"{r['concept']} ({r['cohens_d']:+.1f})"
                                                              for r in d["concepts"][:5]), "diagnose/index.html"]]})
    # FALCON: the most activating MobileNetV2 feature group on Imagenette, explained with words
    bank = report / "captions.txt"
    bank.write_text("\n".join(caption_bank(limit=TOUR["bank_captions"])) + "\n")
    ex_ds = load_dataset(data / "imagenette/val", limit=TOUR["explain_images"])
    ex = run_falcon(mbv2, ex_ds, vl, top_groups=1, banks=[str(bank)], top_n=12)
    explain_report(ex, ex_ds, mbv2.name, vl.name, report / "explain", provenance)
    results["explain"] = [{k: r[k] for k in ("name", "words", "phrases")} for r in ex]
    sections.append({"title": "FALCON: MobileNetV2's largest feature group explained with words", "table": [
        ["group", "words", "phrases", "report"]] + [[r["name"], ", ".join(w["concept"] for w in r["words"][:6]),
                                                     ", ".join(p["concept"] for p in r["phrases"][:4]),
                                                     "explain/index.html"] for r in ex]})
    print(table_text([["tour", "result"], ["aligned mbv2 zero-shot acc1", f"{zs['metrics']['acc1']:.3f}"],
                      ["search results", len(q["keys"])], ["top shifted concept", d["concepts"][0]["concept"]],
                      ["explained group words", ", ".join(w["concept"] for w in ex[0]["words"][:5]) if ex else "-"]]))
    return sections


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
