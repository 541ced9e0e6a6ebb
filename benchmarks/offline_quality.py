"""Issue 18's table in one file: every offline-quality figure of the shipped embedded models beside the value the
issue was filed with, its goal, and the result file it comes from (that file's digest is in `source.files`). Run it
after the benchmarks it reads (`make bench` runs it last); it computes nothing itself, so it can never disagree.

Rows measured over 5 seeds of the shipped recipe (lite_clip.json) carry mean ± std; the others are measured on the
shipped weights (the seed-0 build) by their own benchmarks. Writes benchmarks/results/offline_quality.json.
"""
from __future__ import annotations

import json

from common import RESULTS, read_input, save, table_text

LITE = ("models", "lite-clip (shipped recipe, gate-mixed)")

# (row, source file, path into it, value when the issue was filed, goal, higher is better)
ROWS = [
    ("lite-clip CIFAR-10 test zero-shot", "lite_clip", LITE + ("zeroshot", "cifar10"), 0.567, 0.62),
    ("PACS sketch zero-shot (7 classes)", "lite_clip", LITE + ("zeroshot", "pacs_sketch"), 0.25, 0.40),
    ("sketch-vs-photo contrastive AUROC", "lite_clip", LITE + ("domain_auroc", "sketch"), 0.83, 0.95),
    ("Flickr8k text->image R@5", "lite_clip", LITE + ("retrieval", "flickr8k", "image_retrieval_recall@5"), 0.462, 0.50),
    ("Flickr8k image->text R@5", "lite_clip", LITE + ("retrieval", "flickr8k", "text_retrieval_recall@5"), 0.529, 0.55),
    ("search 'sketch & horse', PACS photo+sketch, P@20 (lite-clip)", "lite_clip",
     LITE + ("concepts", "search_sketch_and_horse_precision@20"), 0.0, 0.60),
    ("search 'horse & !grass' on PACS sketch, horses in top 20 (lite-clip)", "lite_clip",
     LITE + ("concepts", "search_horse_not_grass_on_sketch_horses@20"), 6.0, 15.0),
    ("diagnose PACS photo -> sketch: sketch-like word in top 3 (lite-clip; share of seeds)", "lite_clip",
     LITE + ("concepts", "diagnose_sketch_word_in_top3"), 0.0, 1.0),
    ("search 'sketch & horse' P@20 (mobilenetv2 aligned to lite-clip)", "text_to_concept",
     ("search", "sketch_and_horse_precision@20"), 0.0, 0.60),
    ("FALCON known-direction hit rate", "falcon", ("known_direction_hit_rate",), 0.55, 0.70),
    ("CBM (<= 30 concepts/class) minus linear probe, CIFAR-10, points", "text_to_concept",
     ("cbm", "cifar10", "gap_points"), 7.1, 4.0),
    ("aligned mobilenetv2 minus lite-clip zero-shot, PACS photo, points", "text_to_concept",
     ("zeroshot", "pacs_photo", "gap_points"), 5.8, 4.0),
    ("embedded diffusion classifier, CIFAR-10 (adaptive preset)", "diffusion", None, 0.549, 0.62),
]


def dig(d, path):
    for k in path:
        d = d[k]
    return d


def diffusion_adaptive(d: dict) -> dict:
    """The adaptive preset's accuracy in diffusion.json, with how many images it was measured on."""
    row = next(r for r in d["strategies"] if r["strategy"] == "adaptive")
    return {"value": row["acc1"], "n_images": row.get("n_images", d["n_images"]),
            "n_images_planned": d.get("n_images_planned"), "minus_lite_clip": d.get("adaptive_vs_lite_clip")}


EXTRA = ("n_images", "n_images_planned", "minus_lite_clip")  # what the diffusion row carries besides its value


def main() -> None:
    out_rows, table = [], [["figure", "filed", "now", "goal", "met"]]
    for name, src, path, filed, goal in ROWS:
        f = RESULTS / f"{src}.json"
        data = json.loads(read_input(f))
        v = diffusion_adaptive(data) if path is None else dig(data, path)
        now, std, runs = (v.get("mean", v.get("value")), v.get("std"), v.get("runs")) if isinstance(v, dict) else (v, None, None)
        lower = name.endswith("points")  # gap rows: smaller is better
        met = now <= goal if lower else now >= goal
        out_rows.append({"figure": name, "filed": filed, "now": now, "std": std, "runs": runs, "goal": goal,
                         "lower_is_better": lower, "met": bool(met), "source": f"benchmarks/results/{src}.json",
                         **({k: v[k] for k in EXTRA if isinstance(v, dict) and k in v})})
        shown = f"{now:.3f}" + (f" ± {std:.3f}" if std is not None else "")
        table.append([name, f"{filed:g}", shown, f"{goal:g}", "yes" if met else "no"])
    lc = json.loads(read_input(RESULTS / "lite_clip.json"))
    top5 = dig(lc, LITE + ("concepts", "diagnose_sketch_top5"))
    print(table_text(table))
    save("offline_quality", {"protocol": __doc__, "rows": out_rows, "diagnose_sketch_top5_per_seed": top5,
                             "filed_diagnose_top5": ["skiing", "ski", "skis", "causal agent", "sun"]})


if __name__ == "__main__":
    main()
