"""Which further training makes the embedded denoiser a better classifier? Chosen on CIFAR-10 *train* images only.

The shipped denoiser (6,000 steps) is far from converged (README, Diffusion classifiers: 2,000 steps classify 0.260
against its 0.505 on the choice images). Each candidate recipe trains it further from its weights
(`train_diffusion(init="builtin")`, as `conceptlens train diffusion --init builtin` does); then the shipped weights and
every candidate are scored on DT_N CIFAR-10 train-000003 images (the denoiser trains on these 20,000 images, which the
report states) with `fixed` scoring, 64 samples per class, L1, the same noise for every model; each candidate's
difference to the shipped weights is paired over the images, with its 95 % interval. Rule, fixed before any run:
the candidate with the best accuracy is `chosen` when its interval lies above zero; it is then shipped and measured
on CIFAR-10 test by diffusion.py. No test image is used here.

Env: DT_CANDIDATES (default "plain,min-snr-5": the same loss, or Hang et al.'s min-SNR weighting with γ 5),
DT_STEPS further steps (default 6000), DT_SEED (1: other batches and noise than the shipped run's seed 0), DT_N
(200), DT_DEVICE (cpu; cuda on a GPU), DT_PRECISION (auto), DT_RUNS (where the runs go; default the cache). Both
stages resume: training from its checkpoint, scoring from a per-image log in the run folder. Writes
benchmarks/results/diffusion_training.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from common import save, shared_dir, table_text
from diffusion import paired_bootstrap
from conceptlens.data import load_dataset
from conceptlens.diffusion.classifier import DiffusionClassifier, default_templates, image_tensors
from conceptlens.io import cache_dir
from conceptlens.models.denoisers import default_path, load_tiny_diffusion
from conceptlens.train.diffusion import train_diffusion

CANDIDATES = os.environ.get("DT_CANDIDATES", "plain,min-snr-5").split(",")
STEPS = int(os.environ.get("DT_STEPS", "6000"))
SEED = int(os.environ.get("DT_SEED", "1"))
N = int(os.environ.get("DT_N", "200"))
DEVICE = os.environ.get("DT_DEVICE", "cpu")
PRECISION = os.environ.get("DT_PRECISION", "auto")
RUNS = Path(os.environ.get("DT_RUNS") or cache_dir("diffusion_training"))
DATA, DEV = "data/cifar10/train-*.tar.gz", "data/cifar10/train-000003.tar.gz"
SAMPLES = 64


def min_snr_of(name: str) -> float | None:
    """'plain' -> None; 'min-snr-G' -> G."""
    if name == "plain":
        return None
    if name.startswith("min-snr-"):
        return float(name.removeprefix("min-snr-"))
    raise SystemExit(f"unknown candidate {name!r}: plain or min-snr-GAMMA")


def train(name: str) -> Path:
    """Train the shipped weights STEPS further with this recipe (resumes); the exported EMA weights."""
    out, gamma = RUNS / f"{name}-seed{SEED}", min_snr_of(name)
    # the CLI call that is this run (the export's provenance; rerun with this --out, it resumes and exports the same)
    command = (f"conceptlens train diffusion --data '../shared/{DATA}' --out {out} --steps {STEPS} --seed {SEED} "
               f"--init builtin{f' --min-snr {gamma:g}' if gamma else ''} --device {DEVICE} --precision {PRECISION}")
    train_diffusion(str(shared_dir() / DATA), out, steps=STEPS, seed=SEED, init="builtin", min_snr=gamma,
                    device=DEVICE, precision=PRECISION, export=out / "model.safetensors", command=command)
    return out / "model.safetensors"


def score(weights: Path, x, y, cond) -> tuple[np.ndarray, dict]:
    """1 where the model classifies an image right (fixed, SAMPLES per class, L1; per-image log, resumable), and the
    model's metadata."""
    model = load_tiny_diffusion(str(weights)).to(DEVICE)
    cond = cond.to(model.device)
    clf = DiffusionClassifier(model, "fixed", loss="l1", n_samples=SAMPLES, precision=PRECISION)
    log = RUNS / f"scores-{model.meta['sha']}-{SAMPLES}.jsonl"
    done = {r["i"]: r["pred"] for r in map(json.loads, log.read_text().splitlines())} if log.exists() else {}
    with open(log, "a") as f:
        for i in range(len(y)):
            if i not in done:
                done[i] = int(clf.classify_one(x[i], cond, image_seed=i)["pred"])
                f.write(json.dumps({"i": i, "pred": done[i]}) + "\n")
                f.flush()
            if (i + 1) % 20 == 0:
                print(f"{weights.parent.name}: image {i + 1}/{len(y)}", flush=True)
    return np.array([done[i] == int(y[i]) for i in range(len(y))], dtype=float), model.meta


def main() -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(shared_dir() / DEV, limit=N)
    shipped = load_tiny_diffusion(str(default_path()))  # the key score() and the report load it by: read once
    x, y, _ = image_tensors(ds, shipped.image_size)
    cond = DiffusionClassifier(shipped, "fixed").prompt_embeddings(ds.classnames, default_templates(shipped))
    weights = {"shipped": default_path()} | {c: train(c) for c in CANDIDATES}
    scored = {name: score(w, x, y, cond) for name, w in weights.items()}
    right = {name: r for name, (r, _) in scored.items()}
    rows = {}
    for name, (_, meta) in scored.items():
        rows[name] = {"acc1": float(right[name].mean()), "total_step": meta.get("total_step", meta["step"]),
                      "min_snr": meta["train_config"].get("min_snr"), "sha": meta["sha"]}
        if name != "shipped":
            rows[name] |= {"minus_shipped": float(right[name].mean() - right["shipped"].mean()),
                           "ci95": paired_bootstrap(right[name], right["shipped"])}
    best = max(CANDIDATES, key=lambda c: rows[c]["acc1"]) if CANDIDATES else None
    chosen = best if best and rows[best]["ci95"][0] > 0 else None
    print(table_text([["denoiser", "steps", "acc1", "minus shipped", "95% interval"]] +
                     [[n, r["total_step"], f"{r['acc1']:.3f}", f"{r.get('minus_shipped', 0):+.3f}",
                       "…".join(f"{v:+.3f}" for v in r.get("ci95", [])) or "-"] for n, r in rows.items()]))
    print(f"chosen: {chosen or 'none (no candidate is above the shipped weights with 95 % confidence)'}")
    save("diffusion_training", {
        "protocol": f"CIFAR-10 train-000003, first {len(y)} images (the denoiser trains on CIFAR-10 train); fixed, "
                    f"{SAMPLES} samples per class, L1, precision {PRECISION}, the same noise for every model; candidates "
                    f"trained {STEPS} steps further from the shipped weights, seed {SEED}",
        "device": DEVICE, "n_images": len(y), "further_steps": STEPS, "seed": SEED, "models": rows, "chosen": chosen,
        "rule": "the best candidate, when its paired 95 % interval against the shipped weights lies above zero"})


if __name__ == "__main__":
    main()
