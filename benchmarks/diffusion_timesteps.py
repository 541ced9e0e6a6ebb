"""Which timesteps tell CIFAR-10 classes apart? The dev study behind `halving_window` (diffusion.py).

On CIFAR-10 *train* images (never the test images diffusion.py evaluates; the denoiser was trained on these
20,000 images, which the report states), every class is scored at S timesteps stratified over [0, T) with one
noise draw each (the classifier's own `noise`, so the same pairing as every strategy). From that error matrix:
- accuracy of the argmin class using only the samples in each eighth of [0, T) (where the signal is);
- accuracy using all samples inside each window [a, b) of eighths (what a restricted range gives at equal
  samples per timestep).
Then, on other train images (DEV2, DEV2_N), successive halving at a tenth of adaptive's evaluations (275) with
each candidate `t_range` in WINDOWS, paired against the full range: the window diffusion.py's `halving_window`
uses is the best of these on this second dev set, and is chosen before any test image is scored with it.
DEV_N images (default 96), S samples (default 64); DEV_SHARD=i/k splits images over k processes (each appends
to its own log in the cache, so an interrupted run resumes); DEV_PHASE=matrix|halving|both (default both);
DEV_REPORT=1 only writes the report, and refuses to replace the committed study with one over fewer images (the
logs stay in the cache of the machine that ran each shard; DEV_FORCE=1 overrides). Writes
benchmarks/results/diffusion_timesteps.json + a plot.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from common import RESULTS, save, shared_dir, table_text
from diffusion import ADAPTIVE_EVALS, paired_bootstrap
from conceptlens.data import load_dataset
from conceptlens.diffusion.classifier import DiffusionClassifier, default_templates, image_tensors
from conceptlens.io import cache_dir
from conceptlens.models import load_model

N = int(os.environ.get("DEV_N", "96"))
N2 = int(os.environ.get("DEV2_N", "200"))
S = int(os.environ.get("S", "64"))
SHARD, SHARDS = (int(v) for v in os.environ.get("DEV_SHARD", "0/1").split("/"))
PHASE = os.environ.get("DEV_PHASE", "both")
PRECISION = os.environ.get("DIFFUSION_PRECISION", "bf16")
BINS = 8
DEV, DEV2 = "data/cifar10/train-000000.tar.gz", "data/cifar10/train-000001.tar.gz"
BUDGET = ADAPTIVE_EVALS // 10  # a tenth of adaptive's evaluations, as diffusion.py's halving_tenth
WINDOWS = [(0.0, 1.0), (0.125, 1.0), (0.25, 1.0), (0.5, 1.0), (0.375, 0.875), (0.5, 0.875)]
os.environ.setdefault("CONCEPTLENS_TEXT_BACKEND", "torch")  # the denoiser was conditioned on sentence-transformers' MiniLM


def log_path(sha: str, phase: str, shard: int):
    tag = f"S{S}" if phase == "matrix" else f"b{BUDGET}"
    return cache_dir() / "bench" / f"diffusion_timesteps_{phase}_{sha}_{tag}_{PRECISION}_{shard}.jsonl"


def read_logs(sha: str, phase: str) -> list[dict]:
    rows = {}
    for k in range(SHARDS):
        if log_path(sha, phase, k).exists():
            for ln in log_path(sha, phase, k).read_text().splitlines():
                r = json.loads(ln)
                rows[(r["key"], tuple(r.get("t_range", ())))] = r
    return list(rows.values())


def run(model, phase: str) -> None:
    """Score this process's shard of the phase's dev images, appending one line per image (and window)."""
    ds = load_dataset(shared_dir() / (DEV if phase == "matrix" else DEV2), limit=N if phase == "matrix" else N2)
    x, y, keys = image_tensors(ds, model.image_size)
    sha = model.meta["sha"]
    path = log_path(sha, phase, SHARD)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["key"], tuple(r.get("t_range", ()))) for r in read_logs(sha, phase)}
    if SHARDS > 1:
        torch.set_num_threads(1)
    base = DiffusionClassifier(model, "fixed", loss="l1", precision=PRECISION)
    cond = base.prompt_embeddings(ds.classnames, default_templates(model))
    C = len(cond)
    windowed = {w: DiffusionClassifier(model, "halving", loss="l1", budget=BUDGET, t_range=w, precision=PRECISION)
                for w in (WINDOWS if phase == "halving" else [])}
    with open(path, "a") as f:
        for i in range(SHARD, len(keys), SHARDS):
            if phase == "matrix" and (keys[i], ()) not in done:
                z0 = model.to_model_space(x[i][None].float())
                ts, noise = base.noise(z0, S, image_seed=10_000 + i)  # seeds apart from the test images' 0..9,999
                e = base.evaluate_pairs(z0, cond, ts, noise, [(c, s) for c in range(C) for s in range(S)]).view(C, S)
                f.write(json.dumps({"key": keys[i], "label": int(y[i]), "t": ts.tolist(), "errors": e.tolist()}) + "\n")
            for w, clf in windowed.items():
                if (keys[i], w) in done:
                    continue
                o = clf.classify_one(x[i], cond, image_seed=20_000 + i)
                f.write(json.dumps({"key": keys[i], "label": int(y[i]), "t_range": list(w), "pred": o["pred"],
                                    "evals": o["evals"]}) + "\n")
            f.flush()
            print(f"[{SHARD}/{SHARDS}] {phase} image {i + 1}/{len(keys)}", flush=True)


def matrix_report(rows: list[dict], T: int) -> dict:
    E = np.array([r["errors"] for r in rows])  # [N, C, S]
    t = np.array([r["t"] for r in rows])  # [N, S]
    y = np.array([r["label"] for r in rows])
    b = np.minimum(t * BINS // T, BINS - 1)

    def acc(mask: np.ndarray) -> float:  # argmin of the mean error over the masked samples, per image
        m = np.where(mask[:, None, :], E, 0).sum(2) / np.maximum(mask.sum(1), 1)[:, None]
        return float(np.mean(m.argmin(1) == y))

    per_bin = [acc(b == k) for k in range(BINS)]
    windows = {f"{a}/{BINS}-{z}/{BINS}": acc((b >= a) & (b < z)) for a in range(BINS) for z in range(a + 1, BINS + 1)}
    print(table_text([["timesteps", "dev acc1"]] + [[f"[{k * T // BINS}, {(k + 1) * T // BINS})", f"{v:.3f}"]
                                                    for k, v in enumerate(per_bin)]))
    best = sorted(windows.items(), key=lambda kv: -kv[1])[:8]
    print("best windows (all samples inside):", ", ".join(f"{k} {v:.3f}" for k, v in best))
    return {"dev_set": DEV, "n_images": len(rows), "samples": S, "per_bin_acc1": per_bin,
            "bin_edges": [k * T // BINS for k in range(BINS + 1)], "window_acc1": windows,
            "all_samples_acc1": acc(np.ones_like(b, dtype=bool))}


def halving_report(rows: list[dict]) -> dict:
    by = {}
    for r in rows:
        by.setdefault(tuple(r["t_range"]), {})[r["key"]] = r
    keys = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
    if not keys:
        return {}
    full = np.array([by[(0.0, 1.0)][k]["pred"] == by[(0.0, 1.0)][k]["label"] for k in keys], dtype=float)
    out, table = [], [["t_range", "dev acc1", "minus full range", "95% CI"]]
    for w in WINDOWS:
        ok = np.array([by[w][k]["pred"] == by[w][k]["label"] for k in keys], dtype=float)
        ci = paired_bootstrap(ok, full)
        out.append({"t_range": list(w), "acc1": float(ok.mean()), "minus_full_range": float(ok.mean() - full.mean()),
                    "ci95": ci, "evals_per_image": float(np.mean([by[w][k]["evals"] for k in keys]))})
        table.append([f"[{w[0]:g}, {w[1]:g})", f"{ok.mean():.3f}", f"{ok.mean() - full.mean():+.3f}",
                      f"{ci[0]:+.3f}..{ci[1]:+.3f}"])
    print(table_text(table))
    best = max(out, key=lambda o: o["acc1"])
    print(f"chosen on {len(keys)} dev images: t_range {best['t_range']}")
    return {"dev_set": DEV2, "n_images": len(keys), "budget": BUDGET, "windows": out, "chosen_t_range": best["t_range"]}


def keep_more_images(res: dict) -> None:
    """Refuse to replace the committed study with one over fewer images (the logs live in the cache of the machine
    that ran each shard, so a report written elsewhere may see only some of them); DEV_FORCE=1 overrides."""
    path = RESULTS / "diffusion_timesteps.json"
    if os.environ.get("DEV_FORCE") == "1" or not path.exists():
        return
    old = json.loads(path.read_text())
    for part in ("matrix", "halving"):
        had, now = (old.get(part) or {}).get("n_images", 0), (res.get(part) or {}).get("n_images", 0)
        if now < had:
            raise SystemExit(f"the logs here cover {now} of the {had} {part} images in {path.name} (the other shards "
                             "ran elsewhere): not overwriting it; run the missing shards or set DEV_FORCE=1")


def report(sha: str, T: int) -> None:
    mat, hal = read_logs(sha, "matrix"), read_logs(sha, "halving")
    if not mat and not hal:
        raise SystemExit("no dev image scored yet: run the study first")
    res = {"matrix": matrix_report(mat, T) if mat else None, "halving": halving_report(hal) if hal else None}
    keep_more_images(res)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    if mat:
        m = res["matrix"]
        axes[0].bar([(k + 0.5) * T / BINS for k in range(BINS)], m["per_bin_acc1"], width=T / BINS * 0.9)
        axes[0].axhline(0.1, color="lightgrey", ls=":", label="chance")
        axes[0].set_xlabel("timestep t")
        axes[0].set_ylabel(f"dev accuracy ({S // BINS} samples per bin)")
        axes[0].set_title(f"CIFAR-10 train ({m['n_images']} images): one eighth of [0, T) alone", fontsize=10)
        axes[0].legend()
    if res["halving"]:
        h = res["halving"]
        ws = h["windows"]
        axes[1].errorbar(range(len(ws)), [w["minus_full_range"] for w in ws], fmt="o", capsize=4,
                         yerr=np.abs(np.array([w["ci95"] for w in ws]).T - [w["minus_full_range"] for w in ws]))
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_xticks(range(len(ws)), [f"[{w['t_range'][0]:g}, {w['t_range'][1]:g})" for w in ws], fontsize=8, rotation=20)
        axes[1].set_ylabel("accuracy minus full range (95% CI)")
        axes[1].set_title(f"halving, {h['budget']} evals/image, t_range (other train images, {h['n_images']})",
                          fontsize=10)
    fig.savefig(RESULTS / "diffusion_timesteps.png", dpi=110, bbox_inches="tight")
    save("diffusion_timesteps", {"protocol": __doc__, "model_sha": sha, "precision": PRECISION, **res})


def main() -> None:
    model = load_model("builtin:tiny-diffusion-cifar10")
    if os.environ.get("DEV_REPORT") != "1":
        for phase in ("matrix", "halving") if PHASE == "both" else (PHASE,):
            run(model, phase)
    if SHARDS == 1 or os.environ.get("DEV_REPORT") == "1":
        report(model.meta["sha"], model.scheduler.config.num_train_timesteps)


if __name__ == "__main__":
    main()
