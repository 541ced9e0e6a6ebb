"""One HTML report (+ its JSON) per capability, written from the library's JSON-able results.

Every page opens with the run's provenance (`res["provenance"]`, see `conceptlens.io.provenance`), shows accuracy
with its 95 % Wilson interval wherever numbers are compared, and labels every thumbnail (rank, score, class).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..data import ImageDataset, images_at
from ..io import atomic_write_json
from .html import (acc_text, bar_figure, confusion_figure, curve_figure, fig_b64, heatmap_figure, image_cards, prediction_cards,
                   stratified_positions, write_html)

THUMBS = 24  # thumbnails per prediction grid, sampled across classes


def _write(report: Path, title: str, sections: list[dict], name: str, res: dict) -> Path:
    report = Path(report)
    atomic_write_json(report / f"{name}.json", res)  # results first: a figure never takes them down
    write_html(report / "index.html", title, sections, res.get("provenance"))
    return report / "index.html"


def _labels(data: ImageDataset, keys: Sequence[str]) -> list[str]:
    """The class name of each key ("" when unlabelled), through one key -> row index."""
    row = {k: i for i, k in enumerate(data.keys)}
    out = []
    for k in keys:
        y = int(data.labels[row[k]]) if k in row else -1
        out.append("" if y < 0 else data.classnames[y] if data.classnames else str(y))
    return out


def _labelled_cards(data: ImageDataset, keys: Sequence[str], scores: Sequence[float] | None = None,
                    what: str = "score") -> list[dict]:
    """Ranked thumbnails: `#rank · score · class` under each."""
    meta = [" · ".join(x for x in (f"#{i + 1}", f"{what} {scores[i]:.3f}" if scores is not None else "", label) if x)
            for i, label in enumerate(_labels(data, keys))]
    return image_cards(images_at(data, list(keys)), list(keys), meta)


def predictions_section(title: str, data: ImageDataset, keys: Sequence[str], labels: np.ndarray, scores,
                        classnames: Sequence[str], n: int = THUMBS) -> dict:
    """Thumbnails sampled across classes with their top-5 predictions (softmax of the scores)."""
    s = np.asarray(scores, np.float64)
    finite = s[np.isfinite(s)]
    s = np.nan_to_num(s, nan=finite.min() if finite.size else 0.0, posinf=(finite.max() if finite.size else 0.0) + 10,
                      neginf=(finite.min() if finite.size else 0.0) - 10)  # a strategy's pick (inf) stays on top
    probs = np.exp(s - s.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.asarray(labels)
    pos = stratified_positions(labels, n)
    shown = [keys[i] for i in pos]
    truths = [classnames[labels[i]] if labels[i] >= 0 else None for i in pos]
    return {"title": title, "note": f"{len(pos)} of {len(probs)} images, taken in turn from every class",
            "cards": prediction_cards(images_at(data, shown), shown, probs[pos], classnames, truths)}


def classification_report(res: dict, data: ImageDataset, keys: Sequence[str], labels, scores, report: Path,
                          name: str, what: str) -> Path:
    """Zero-shot (CLIP or diffusion) results on the images `keys` (true `labels`): accuracy with intervals,
    per-class recall, confusion matrix and labelled predictions sampled across classes."""
    scores = np.asarray(scores, np.float64)
    classnames = res.get("classnames") or data.classnames
    labels = np.asarray(labels)
    preds = np.nan_to_num(scores, nan=-np.inf).argmax(1)
    n = len(scores)
    m = {k.removeprefix("lp_"): v for k, v in res["metrics"].items()}  # linear probes prefix their metrics
    table = [["dataset", "model", "images", "acc1 [95 % Wilson]", "acc5", "mean per-class recall"],
             [res["dataset"], res.get("model_uri", res["model"]), n, acc_text(m["acc1"], n),
              f"{m['acc5']:.3f}" if m.get("acc5") is not None and np.isfinite(m["acc5"]) else "-",
              f"{m.get('mean_per_class_recall', float('nan')):.3f}"]]
    if "weight_decay" in m:
        table[0].append("train images / weight decay")
        table[1].append(f"{res.get('n_train', '?')} / {m['weight_decay']:.2e}")
    recall = [float((preds[labels == c] == c).mean()) if (labels == c).any() else 0.0 for c in range(len(classnames))]
    sections = [{"title": what, "table": table},
                {"title": "recall per class", "image": fig_b64(bar_figure(list(classnames), recall, "", "recall"))},
                {"title": "confusion matrix (rows: true class, normalised)",
                 "image": fig_b64(confusion_figure(labels, preds, classnames, res["dataset"]))},
                predictions_section("predictions (top 5)", data, keys, labels, scores, classnames)]
    return _write(report, f"{what} — {res['dataset']}", sections, name, res)


def zeroshot_report(res: dict, data: ImageDataset, features, scores, report: Path) -> Path:
    """CLIP zero-shot on `features` (conceptlens.features.Features of `data`)."""
    return classification_report(res, data, features.keys, features.labels, scores, report, "zeroshot",
                                 "Zero-shot classification")


def diffusion_report(res: dict, data: ImageDataset, scores, report: Path) -> Path:
    """Diffusion zero-shot: the images it scored are `res["predictions"]` (unreadable ones were skipped)."""
    keys = [p["key"] for p in res["predictions"]]
    row = {k: i for i, k in enumerate(data.keys)}
    return classification_report(res, data, keys, np.asarray(data.labels)[[row[k] for k in keys]], scores, report,
                                 "diffusion", f"Diffusion zero-shot classification ({res.get('strategy', '')})")


def linear_probe_report(res: dict, data: ImageDataset, features, scores, report: Path) -> Path:
    """A linear probe scored on `features` of the test set `data`."""
    return classification_report(res, data, features.keys, features.labels, scores, report, "linear_probe",
                                 "Linear probe")


def cbm_report(res: dict, report: Path) -> Path:
    """Accuracy (with intervals) and one class x concept heat map of the sparse head's weights on one scale."""
    n = res["n_test"]
    sections = [{"title": "accuracy", "table": [
        ["model", "train / test images", "concepts", "CBM acc1 [95 %]", "linear probe acc1 [95 %]", "max non-zero / class"],
        [res["model"], f"{res['n_train']} / {n}", res["n_concepts"], acc_text(res["cbm_acc1"], n),
         acc_text(res["linear_probe_acc1"], n), max(res["nonzero_per_class"].values())]]}]
    tops = res["top_concepts"]
    cols: list[str] = []
    for ws in tops.values():
        for w in ws[:4]:
            if w["concept"] not in cols:
                cols.append(w["concept"])
    if cols:
        weight = {(c, w["concept"]): w["weight"] for c, ws in tops.items() for w in ws}
        M = np.array([[weight.get((c, k), 0.0) for k in cols[:48]] for c in tops])
        sections.append({"title": "class × concept weights (each class's top 4 concepts; 0 = not used)",
                         "image": fig_b64(heatmap_figure(M, list(tops), cols[:48], "", "weight"))})
    sections.append({"title": "top concepts per class", "table": [["class", "concepts (weight)"]] + [
        [c, ", ".join(f"{w['concept']} ({w['weight']:+.2f})" for w in ws[:8])] for c, ws in tops.items()]})
    return _write(report, f"Concept bottleneck — {res['model']}", sections, "cbm", res)


def _q(q: float) -> str:
    return "< 1e-300" if q == 0 else f"{q:.1e}"


def diagnose_report(res: dict, data_a: ImageDataset, data_b: ImageDataset, report: Path, top: int = 20) -> Path:
    """Most shifted concepts (table, effect sizes with a legend) and, per concept, A and B side by side."""
    head = res["concepts"][:top]
    sections = [{"title": f"top {len(head)} shifted concepts (B − A) of {res['n_concepts']}",
                 "note": f"A = {res['a']} ({res['n_a']} images), B = {res['b']} ({res['n_b']} images); "
                         "q: Benjamini-Hochberg adjusted p of Welch's t-test; scores: " +
                         (f"SpLiCE weights (L1 penalty {res['l1_penalty']})" if res.get("scores") == "splice"
                          else "cosines with the concepts"),
                 "table": [["concept", "mean A", "mean B", "diff", "Welch t", "Cohen's d", "q (BH)"]] +
                 [[r["concept"], f"{r['mean_a']:.3f}", f"{r['mean_b']:.3f}", f"{r['diff']:+.3f}", f"{r['t']:.1f}",
                   f"{r['cohens_d']:+.2f}", _q(r["q"])] for r in head]},
                {"title": "effect sizes", "image": fig_b64(bar_figure(
                    [r["concept"] for r in head], [r["cohens_d"] for r in head], "Cohen's d (B − A)", "d",
                    legend=(f"more in B ({res['b']})", f"more in A ({res['a']})")))}]
    for ex in res["examples"]:
        sections.append({"title": f"'{ex['concept']}': most activating images, A beside B", "pair": [
            {"label": f"A: {res['a']}", "cards": _labelled_cards(data_a, ex["a"])},
            {"label": f"B: {res['b']}", "cards": _labelled_cards(data_b, ex["b"])}]})
    return _write(report, f"Distribution shift — {res['a']} vs {res['b']}", sections, "diagnose", res)


def search_report(res: dict, data: ImageDataset, report: Path) -> Path:
    """The ranked results of a concept-logic query: rank, score and label on every thumbnail."""
    negation = (f"; negated concepts taken relative to the asked-for ones at --partial {res['partial']:g} (0 = the "
                "paper's global threshold)" if "!" in res["query"] and "partial" in res else "")
    n = len(res["keys"])
    sections = [{"title": f"{n} result{'s' * (n != 1)} for {res['query']!r} ({res['model']})",
                 "note": (res.get("note") or f"top {n} of {res['n_images']} images; score = the "
                                             "query's soft-logic margin (higher is a better match)") + negation,
                 "cards": _labelled_cards(data, res["keys"], res["scores"])}]
    return _write(report, f"search: {res['query']}", sections, "search", res)


def decode_report(res: dict, report: Path) -> Path:
    """Each vector's nearest captions (with cosine) and the words they share."""
    best = [o["captions"][0]["score"] if o["captions"] else 0.0 for o in res["decoded"][:40]]
    sections = [{"title": "cosine of each vector's nearest caption", "note": "low values: no caption in the banks "
                 "is close; read the captions with care", "image": fig_b64(bar_figure(
                     [o["name"] for o in res["decoded"][:40]], best, "", "cosine"))},
                {"title": f"{len(res['decoded'])} vectors decoded into {', '.join(res['banks'])}",
                 "note": (f"generated: DeCap text decoder {Path(res['decoder']['path']).name}, beam width "
                          f"{res['decoder']['beams']}" if "decoder" in res else ""),
                 "table": [["vector"] + (["generated"] if "decoder" in res else []) +
                           ["shared words", "nearest captions (cosine)"]] +
                 [[o["name"]] + ([o["generated"]] if "decoder" in res else []) + [", ".join(o["shared_words"][:8]),
                   " | ".join(f"{c['caption']} ({c['score']:.3f})" for c in o["captions"][:res["k"]])]
                  for o in res["decoded"]]}]
    return _write(report, f"Decoded vectors — {res['model']}", sections, "decode", res)


def decompose_report(res: dict, report: Path, shown: int = 12) -> Path:
    """SpLiCE decompositions: each vector's concept weights (bars for the first `shown`), concepts used and the
    reconstruction cosine, all vectors in a table."""
    items = res["decomposed"]
    sections = [{"title": f"{len(items)} vectors over {res['n_vocabulary']} concepts: {res['mean_concepts']:.1f} concepts "
                 f"and reconstruction cosine {res['mean_cosine']:.3f} on average",
                 "note": "weights are non-negative; a low cosine means the concepts explain little of the vector"}]
    for o in items[:shown]:
        if o["concepts"]:
            sections.append({"title": f"{o['name']}: {o['n_concepts']} concepts, cosine {o['cosine']:.3f}",
                             "image": fig_b64(bar_figure([c["concept"] for c in o["concepts"]],
                                                         [c["weight"] for c in o["concepts"]], "", "weight"))})
    sections.append({"title": "all vectors", "table": [["vector", "concepts", "cosine", "top concepts (weight)"]] +
                     [[o["name"], o["n_concepts"], f"{o['cosine']:.3f}",
                       ", ".join(f"{c['concept']} ({c['weight']:.2f})" for c in o["concepts"][:8])] for o in items]})
    return _write(report, f"Concept decompositions — {res['model']}", sections, "decompose", res)


VIEW_TEXT = {"context": "each Grad-CAM crop with its whole image as context", "crop": "the Grad-CAM crops alone",
             "whole": "the whole images"}


def explain_report(results: list[dict], data: ImageDataset, model_name: str, vl_name: str, report: Path,
                   provenance: dict | None = None) -> Path:
    """Per explanation: word and phrase scores (two charts), the Grad-CAM crops of the highly activating images,
    their Grad-CAM heat maps, the captions retrieved for them, and the low-activating counterfactuals.
    Pops `_crops` and `_overlays`."""
    sections = []
    for res in results:
        crops, overlays = res.pop("_crops", []), res.pop("_overlays", [])
        name, seen = res["name"], VIEW_TEXT.get(res.get("view"), "the crops")
        sections.append({"title": f"{name}: {', '.join(w['concept'] for w in res['words'][:5])}",
                         "text": "removed by the contrastive step: " + (", ".join(res["removed_by_contrast"]) or "none")
                         + (f" · generated description (DeCap decoder, views' mean): {res['generated']}"
                            if res.get("generated") else "")})
        for kind in ("words", "phrases"):
            if res[kind]:
                sections.append({"title": f"{name}: {kind}", "image": fig_b64(bar_figure(
                    [w["concept"] for w in res[kind]], [w["score"] for w in res[kind]], "", "score"))})
        shown = min(len(crops), THUMBS)
        sections.append({"title": f"{name}: highly activating crops",
                         "note": f"{shown} of {res['n_high']} images shown; crop coherence {res['crop_coherence']:.2f}",
                         "cards": image_cards(crops[:shown], res["high_keys"][:shown],
                                              [f"#{i + 1} · {c}" for i, c in
                                               enumerate(_labels(data, res["high_keys"][:shown]))])})
        if overlays:
            sections.append({"title": f"{name}: Grad-CAM heat maps of the same images",
                             "note": "yellow: where the explained features respond; the crop above is the largest "
                                     "region above 0.6 of the map",
                             "cards": image_cards(overlays[:shown], res["high_keys"][:shown],
                                                  [f"#{i + 1}" for i in range(min(shown, len(overlays)))])})
        if res.get("captions"):
            sections.append({"title": f"{name}: captions retrieved for the top images ({seen})",
                             "table": [["image", "captions"]] + [
                [res["high_keys"][i] if i < len(res["high_keys"]) else i,
                 " | ".join(c if isinstance(c, str) else str(c) for c in caps)] for i, caps in enumerate(res["captions"])]})
        if res["low_keys"]:
            sections.append({"title": f"{name}: low-activating counterfactuals",
                             "cards": _labelled_cards(data, res["low_keys"])})
    out = {"model": model_name, "vl_model": vl_name, "explanations": results}
    if provenance:
        out["provenance"] = provenance
    return _write(report, f"FALCON explanations — {model_name}", sections, "explanations", out)


def train_report(res: dict, report: Path) -> Path:
    """A training run: loss (and learning rate or logit scale) per step with a moving average, the settings,
    where it stopped and what it wrote. `res`: kind, history (rows of step, loss, ...), config, result."""
    hist = res.get("history") or []
    sections = [{"title": "run", "table": [["kind", "steps done", "final loss (last 50 steps)", "output"],
                                           [res["kind"], hist[-1]["step"] if hist else 0,
                                            f"{np.mean([float(h['loss']) for h in hist[-50:]]):.4f}" if hist else "-",
                                            res.get("result", {}).get("exported") or res.get("result", {}).get("model", "-")]]}]
    if hist:
        panels = {k: [float(h[k]) for h in hist] for k in ("loss", "lr", "logit_scale") if k in hist[0]}
        sections.append({"title": "training curves", "note": f"{len(hist)} steps logged",
                         "image": fig_b64(curve_figure([float(h["step"]) for h in hist], panels, log=("loss",)))})
    else:
        sections[0]["note"] = "no step was logged yet"
    sections.append({"title": "settings", "table": [["setting", "value"]] + [[k, str(v)] for k, v in
                                                                         sorted(res.get("config", {}).items())]})
    return _write(report, f"Training — {res['kind']}", sections, "train", res)
