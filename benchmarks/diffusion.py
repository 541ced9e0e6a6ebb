"""Diffusion zero-shot classification with the embedded model on CIFAR-10 test: accuracy vs denoiser cost.

Strategies on the same images and the same noise: fixed, Li et al.'s adaptive preset (keep 5,1; 50,500; L1),
Clark & Jaini's t-test pruning, and our successive halving at a quarter of adaptive's evaluations; builtin:lite-clip
zero-shot on the same images beside them. Per-image results are appended to a JSONL file, so an interrupted run
resumes where it stopped (DIFFUSION_N images, default 500). Writes benchmarks/results/diffusion.json + a plot.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from common import RESULTS, save, shared_dir, table_text
from conceptlens import zeroshot
from conceptlens.data import load_dataset
from conceptlens.diffusion.classifier import PRESETS, DiffusionClassifier, default_templates, image_tensors
from conceptlens.features import embed
from conceptlens.models import load_model

N = int(os.environ.get("DIFFUSION_N", "500"))
PRE = PRESETS["cifar10"]
ADAPTIVE_EVALS = 10 * 50 + 5 * 450


def strategies(model):
    return {
        "fixed": DiffusionClassifier(model, "fixed", loss="l1", n_samples=50),
        "adaptive": DiffusionClassifier(model, "adaptive", loss=PRE["loss"], to_keep=PRE["to_keep"],
                                        stage_samples=PRE["n_samples"]),
        "ttest": DiffusionClassifier(model, "ttest", loss="l1"),
        "halving": DiffusionClassifier(model, "halving", loss="l1", budget=ADAPTIVE_EVALS // 4),
    }


def main() -> None:
    torch.manual_seed(0)
    ds = load_dataset(shared_dir() / "data/cifar10/test-000000.tar.gz", limit=N)
    clfs = strategies("builtin:tiny-diffusion-cifar10")
    model = clfs["fixed"].model
    x, y, keys = image_tensors(ds, model.image_size)
    tmpl = default_templates(model)
    log = RESULTS / "diffusion_per_image.jsonl"
    done = {}
    if log.exists():
        for ln in log.read_text().splitlines():
            r = json.loads(ln)
            if r.get("model_sha") == model.meta["sha"] and r["key"] in keys:
                done[(r["strategy"], r["key"])] = r
    with open(log, "a") as f:
        for name, clf in clfs.items():
            cond = clf.prompt_embeddings(ds.classnames, tmpl)
            for i, key in enumerate(keys):
                if (name, key) in done:
                    continue
                t0 = time.perf_counter()
                o = clf.classify_one(x[i], cond, image_seed=i)
                r = {"strategy": name, "key": key, "label": int(y[i]), "pred": o["pred"], "evals": o["evals"],
                     "seconds": time.perf_counter() - t0, "model_sha": model.meta["sha"]}
                f.write(json.dumps(r) + "\n")
                f.flush()
                done[(name, key)] = r
            print(f"{name}: done", flush=True)
    rows, out = [["strategy", "acc1", "evals/image", "s/image"]], []
    for name in clfs:
        rs = [done[(name, k)] for k in keys]
        acc = float(np.mean([r["pred"] == r["label"] for r in rs]))
        out.append({"strategy": name, "acc1": acc, "evals_per_image": float(np.mean([r["evals"] for r in rs])),
                    "seconds_per_image": float(np.mean([r["seconds"] for r in rs]))})
        rows.append([name, f"{acc:.4f}", f"{out[-1]['evals_per_image']:.0f}", f"{out[-1]['seconds_per_image']:.2f}"])
    lite = load_model("builtin:lite-clip")
    zs = zeroshot.evaluate(lite, embed(lite, ds))["metrics"]["acc1"]
    rows.append(["builtin:lite-clip zero-shot", f"{zs:.4f}", "-", "-"])
    print(table_text(rows))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for o in out:
        ax.scatter(o["evals_per_image"], o["acc1"], s=40)
        ax.annotate(o["strategy"], (o["evals_per_image"], o["acc1"]), textcoords="offset points", xytext=(5, 5))
    ax.axhline(zs, color="grey", ls="--", label="lite-clip zero-shot")
    ax.set_xscale("log")
    ax.set_xlabel("denoiser evaluations per image")
    ax.set_ylabel("accuracy")
    ax.set_title(f"CIFAR-10 test ({len(keys)} images), {model.name}")
    ax.legend()
    fig.savefig(RESULTS / "diffusion.png", dpi=110, bbox_inches="tight")
    save("diffusion", {"model": model.name, "model_meta": {k: model.meta.get(k) for k in ("step", "final_loss", "command", "sha")},
                       "n_images": len(keys), "templates": tmpl, "strategies": out, "lite_clip_acc1": zs,
                       "halving_budget": ADAPTIVE_EVALS // 4})


if __name__ == "__main__":
    main()
