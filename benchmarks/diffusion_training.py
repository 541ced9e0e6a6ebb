"""Which further training makes the embedded denoiser a better classifier? Chosen on CIFAR-10 *train* images only.

Each candidate recipe trains the start weights (DT_START, default the shipped denoiser) further
(`train_diffusion(init=...)`, as `conceptlens train diffusion --init FILE` does); then the start weights and every
candidate are scored on DT_N CIFAR-10 train-000003 images (the denoiser trains on these 20,000 images, which the
report states) with `fixed` scoring, 64 samples per class, L1, the same noise for every model; each candidate's
difference to the start is paired over the images, with its 95 % interval. Rule, fixed before any run: the candidate
with the best accuracy is `chosen` when its interval lies above zero; it is then shipped and measured on CIFAR-10 test
by diffusion.py. No test image is used here.

Env: DT_START (the weights to continue; default the shipped file), DT_CANDIDATES (default "plain,min-snr-5": the same
loss, or Hang et al.'s min-SNR weighting with γ 5; or NAME=FILE, weights trained earlier from the start, which their
metadata must say: a record is regenerated without retraining), DT_STEPS further steps (default 6000), DT_SEED (1:
other batches and noise than the start's seed 0), DT_N (200), DT_DEVICE (cpu; cuda on a GPU), DT_PRECISION (auto),
DT_RUNS (where the runs go; default the cache). Both stages resume: training from its checkpoint, scoring from a
per-image log in the run folder. Writes benchmarks/results/diffusion_training.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from common import save, shared_dir, table_text
from diffusion import paired_bootstrap
from provenance import INPUTS
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
START = Path(os.environ.get("DT_START") or default_path())
DATA, DEV = "data/cifar10/train-*.tar.gz", "data/cifar10/train-000003.tar.gz"
SAMPLES = 64


def min_snr_of(name: str) -> float | None:
    """'plain' -> None; 'min-snr-G' -> G."""
    if name == "plain":
        return None
    if name.startswith("min-snr-"):
        return float(name.removeprefix("min-snr-"))
    raise SystemExit(f"unknown candidate {name!r}: plain or min-snr-GAMMA")


def train(name: str, start_sha: str) -> Path:
    """Train the start weights STEPS further with this recipe (resumes); the exported EMA weights. NAME=FILE: that
    file, once its metadata show it was trained from the start."""
    if "=" in name:
        path = Path(name.split("=", 1)[1])
        parent = load_tiny_diffusion(str(path)).meta.get("train_config", {}).get("init", {}).get("sha")
        if parent != start_sha:
            raise SystemExit(f"{path} was trained from {parent}, not from the start weights {start_sha}")
        return path
    out, gamma = RUNS / f"{name}-seed{SEED}", min_snr_of(name)
    init = "builtin" if START == default_path() else str(START)
    # the CLI call that is this run (the export's provenance; rerun with this --out, it resumes and exports the same)
    command = (f"conceptlens train diffusion --data '../shared/{DATA}' --out {out} --steps {STEPS} --seed {SEED} "
               f"--init {init}{f' --min-snr {gamma:g}' if gamma else ''} --device {DEVICE} --precision {PRECISION}")
    train_diffusion(str(shared_dir() / DATA), out, steps=STEPS, seed=SEED, init=init, min_snr=gamma,
                    device=DEVICE, precision=PRECISION, export=out / "model.safetensors", command=command)
    return out / "model.safetensors"


def score(name: str, weights: Path, x, y, cond) -> tuple[np.ndarray, dict]:
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
                print(f"{name}: image {i + 1}/{len(y)}", flush=True)
    return np.array([done[i] == int(y[i]) for i in range(len(y))], dtype=float), model.meta


def main() -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(shared_dir() / DEV, limit=N)
    start = load_tiny_diffusion(str(START))  # the key score() and the report load it by: read once
    x, y, _ = image_tensors(ds, start.image_size)
    cond = DiffusionClassifier(start, "fixed").prompt_embeddings(ds.classnames, default_templates(start))
    weights = {"start": START} | {c.split("=")[0]: train(c, start.meta["sha"]) for c in CANDIDATES}
    INPUTS.update(Path(w).resolve() for w in weights.values())  # the weights scored: the source records those in the repo
    scored = {name: score(name, w, x, y, cond) for name, w in weights.items()}
    right = {name: r for name, (r, _) in scored.items()}
    rows = {}
    for name, (_, meta) in scored.items():
        rows[name] = {"acc1": float(right[name].mean()), "total_step": meta.get("total_step", meta["step"]),
                      "min_snr": meta["train_config"].get("min_snr"), "sha": meta["sha"]}
        if name != "start":
            rows[name] |= {"minus_start": float(right[name].mean() - right["start"].mean()),
                           "ci95": paired_bootstrap(right[name], right["start"])}
    best = max((n for n in rows if n != "start"), key=lambda n: rows[n]["acc1"], default=None)
    chosen = best if best and rows[best]["ci95"][0] > 0 else None
    print(table_text([["denoiser", "steps", "acc1", "minus start", "95% interval"]] +
                     [[n, r["total_step"], f"{r['acc1']:.3f}", f"{r.get('minus_start', 0):+.3f}",
                       "…".join(f"{v:+.3f}" for v in r.get("ci95", [])) or "-"] for n, r in rows.items()]))
    print(f"chosen: {chosen or 'none (no candidate is above the start weights with 95 % confidence)'}")
    save("diffusion_training", {
        "protocol": f"CIFAR-10 train-000003, first {len(y)} images (the denoiser trains on CIFAR-10 train); fixed, "
                    f"{SAMPLES} samples per class, L1, precision {PRECISION}, the same noise for every model; candidates "
                    f"trained {STEPS} steps further from the start weights, seed {SEED}",
        "device": DEVICE, "n_images": len(y), "further_steps": STEPS, "seed": SEED, "models": rows, "chosen": chosen,
        "rule": "the best candidate, when its paired 95 % interval against the start weights lies above zero"})


if __name__ == "__main__":
    main()
