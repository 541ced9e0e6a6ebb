"""One HTML report (+ its JSON) per capability, written from the library's JSON-able results."""
from __future__ import annotations

from pathlib import Path

from ..data import ImageDataset, images_at
from ..io import atomic_write_json
from .html import bar_figure, fig_b64, image_cards, write_html


def _write(report: Path, title: str, sections: list[dict], name: str, res) -> Path:
    report = Path(report)
    write_html(report / "index.html", title, sections)
    atomic_write_json(report / f"{name}.json", res)
    return report / "index.html"


def cbm_report(res: dict, report: Path) -> Path:
    """Accuracy table and each class's top concept weights."""
    sections = [{"title": "accuracy", "table": [["model", "CBM acc1", "linear probe acc1", "max non-zero / class"],
                                                [res["model"], f"{res['cbm_acc1']:.4f}", f"{res['linear_probe_acc1']:.4f}",
                                                 max(res["nonzero_per_class"].values())]]}]
    for c, ws in res["top_concepts"].items():
        if ws:
            sections.append({"title": f"{c}: top concepts", "image": fig_b64(bar_figure(
                [w["concept"] for w in ws], [w["weight"] for w in ws], c, "weight"))})
    return _write(report, f"Concept bottleneck — {res['model']}", sections, "cbm", res)


def diagnose_report(res: dict, data_a: ImageDataset, data_b: ImageDataset, report: Path, top: int = 20) -> Path:
    """Table and effect-size plot of the most shifted concepts, and their most activating images per side."""
    head = res["concepts"][:top]
    sections = [{"title": f"top {top} shifted concepts (B − A)", "table": [["concept", "mean A", "mean B", "diff",
                                                                          "Welch t", "Cohen's d", "q (BH)"]] +
                 [[r["concept"], f"{r['mean_a']:.3f}", f"{r['mean_b']:.3f}", f"{r['diff']:+.3f}", f"{r['t']:.1f}",
                   f"{r['cohens_d']:+.2f}", f"{r['q']:.1e}"] for r in head]},
                {"title": "effect sizes", "image": fig_b64(bar_figure([r["concept"] for r in head],
                                                                      [r["cohens_d"] for r in head],
                                                                      "Cohen's d (B − A)", "d"))}]
    for ex in res["examples"]:
        for side, ds in (("a", data_a), ("b", data_b)):
            sections.append({"title": f"'{ex['concept']}': most activating images of {side.upper()}",
                             "cards": image_cards(images_at(ds, ex[side]), ex[side])})
    return _write(report, f"Distribution shift — {res['a']} vs {res['b']}", sections, "diagnose", res)


def search_report(res: dict, data: ImageDataset, report: Path) -> Path:
    """The ranked results of a concept-logic query."""
    sections = [{"title": f"{len(res['keys'])} results for {res['query']!r} ({res['model']})",
                 "cards": image_cards(images_at(data, res["keys"]), res["keys"])}]
    return _write(report, f"search: {res['query']}", sections, "search", res)


def explain_report(results: list[dict], data: ImageDataset, model_name: str, vl_name: str, report: Path) -> Path:
    """Per explanation: concept scores, crops of the highly activating images, counterfactuals. Pops `_crops`."""
    sections = []
    for res in results:
        crops = res.pop("_crops", [])
        ws = res["words"] + res["phrases"]
        sections.append({"title": f"{res['name']}: {', '.join(w['concept'] for w in res['words'][:5])}",
                         "image": fig_b64(bar_figure([w["concept"] for w in ws], [w["score"] for w in ws],
                                                     res["name"], "score")) if ws else None,
                         "text": "removed by the contrastive step: " + (", ".join(res["removed_by_contrast"]) or "none")})
        sections.append({"title": f"{res['name']}: highly activating crops ({res['n_high']} images, "
                                  f"crop coherence {res['crop_coherence']:.2f})",
                         "cards": image_cards(crops[:12], res["high_keys"][:12])})
        if res["low_keys"]:
            sections.append({"title": f"{res['name']}: low-activating counterfactuals",
                             "cards": image_cards(images_at(data, res["low_keys"]), res["low_keys"])})
    return _write(report, f"FALCON explanations — {model_name}", sections, "explanations",
                  {"model": model_name, "vl_model": vl_name, "explanations": results})
