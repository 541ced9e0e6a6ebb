"""Diffusion zero-shot classification with the embedded model on CIFAR-10 test: accuracy vs denoiser cost.

Strategies on the same images and the same noise: fixed, Li et al.'s adaptive preset (keep 5,1; 50,500; L1),
Clark & Jaini's t-test pruning, and our successive halving at a quarter and at a tenth of adaptive's evaluations
(`halving`, `halving_tenth`), and at a tenth with its timesteps drawn from the window chosen on CIFAR-10 train
images by diffusion_timesteps.py (`halving_window`; absent until that study has chosen one; each log record
names its window), each with the paired 95% interval of its difference to adaptive; builtin:lite-clip
zero-shot on the same images beside them. Images are processed one at a time (all strategies, then the next
image) and appended to a JSONL log, so an interrupted run resumes where it stopped and a partial run still
compares every strategy on the same images. DIFFUSION_N images (default 500); DIFFUSION_SHARD=i/k runs the
images with index % k == i (start k processes to use k cores; `DIFFUSION_REPORT=1` only writes the report).
The denoiser runs under DIFFUSION_PRECISION (default bf16 autocast, 2x faster on a CPU with native bf16; each log
record names its precision) on DIFFUSION_DEVICE (default cpu; e.g. cuda: records name a device other than the CPU,
and the report gives each strategy's devices, since seconds per image are only comparable on one);
DIFFUSION_MODEL=FILE measures a denoiser file not shipped yet (diffusion_training.py's choice) under its own sha in
the same log and reports it as diffusion_candidate.json; DIFFUSION_VS=SHA pairs each strategy against itself with
another denoiser logged earlier (default: the shipped one, for a candidate); the first 20
images are also classified with `fixed` in fp32 to show that bf16 does
not change predictions. DIFFUSION_ONLY=a,b runs only those strategies: on the images adaptive has done, or, when
adaptive is one of them, on every image. The report gives each strategy over the images it has done and each
difference to adaptive paired over the images both have.
Writes benchmarks/results/diffusion.json + a plot.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, read_input, save, shared_dir, table_text
from provenance import INPUTS
from conceptlens.eval import zeroshot
from conceptlens.data import load_dataset
from conceptlens.diffusion.classifier import PRESETS, DiffusionClassifier, default_templates, image_tensors
from conceptlens.features import embed
from conceptlens.models import load_model
from conceptlens.models.denoisers import load_tiny_diffusion

N = int(os.environ.get("DIFFUSION_N", "500"))
SHARD, SHARDS = (int(v) for v in os.environ.get("DIFFUSION_SHARD", "0/1").split("/"))
PRE = PRESETS["cifar10"]
ADAPTIVE_EVALS = 10 * 50 + 5 * 450
FP32_CHECK = 20
LOG = RESULTS / "diffusion_per_image.jsonl"
PRECISION = os.environ.get("DIFFUSION_PRECISION", "bf16")  # the logged runs: bf16 on a CPU with native kernels
ONLY = [s for s in os.environ.get("DIFFUSION_ONLY", "").split(",") if s]  # run only these strategies
DEVICE = os.environ.get("DIFFUSION_DEVICE", "cpu")
# a denoiser file not yet shipped (e.g. diffusion_training.py's choice): logged under its sha, reported apart
CANDIDATE = os.environ.get("DIFFUSION_MODEL")
VS = os.environ.get("DIFFUSION_VS")  # the sha of a denoiser logged earlier to compare with
OUT = "diffusion_candidate" if CANDIDATE else "diffusion"
# the denoiser was trained, and the logged runs conditioned, on sentence-transformers' MiniLM embeddings
os.environ.setdefault("CONCEPTLENS_TEXT_BACKEND", "torch")


def chosen_window() -> tuple[float, float] | None:
    """The t_range diffusion_timesteps.py chose on train images (None before it has)."""
    path = RESULTS / "diffusion_timesteps.json"
    chosen = ((json.loads(read_input(path)).get("halving") or {}).get("chosen_t_range")) if path.exists() else None
    return tuple(chosen) if chosen else None


def strategies(model, precision: str = PRECISION) -> dict[str, DiffusionClassifier]:
    kw = dict(precision=precision)
    window = chosen_window()
    return {
        "fixed": DiffusionClassifier(model, "fixed", loss="l1", n_samples=50, **kw),
        "adaptive": DiffusionClassifier(model, "adaptive", loss=PRE["loss"], to_keep=PRE["to_keep"],
                                        stage_samples=PRE["n_samples"], **kw),
        "ttest": DiffusionClassifier(model, "ttest", loss="l1", **kw),
        "halving": DiffusionClassifier(model, "halving", loss="l1", budget=ADAPTIVE_EVALS // 4, **kw),
        "halving_tenth": DiffusionClassifier(model, "halving", loss="l1", budget=ADAPTIVE_EVALS // 10, **kw),
    } | ({"halving_window": DiffusionClassifier(model, "halving", loss="l1", budget=ADAPTIVE_EVALS // 10,
                                                t_range=window, **kw)} if window else {})


def read_log(sha: str, keys: list[str], clfs: dict) -> dict:
    """The logged records of this model on these images, for the strategies as configured now (a record of another
    timestep window is not this strategy's)."""
    done = {}
    if LOG.exists():
        for ln in read_input(LOG).splitlines():
            r = json.loads(ln)
            clf = clfs.get(r["strategy"])
            if (r.get("model_sha") == sha and r["key"] in keys and clf is not None
                    and r.get("t_range", [0.0, 1.0]) == list(clf.t_range)):
                done[(r["strategy"], r["key"])] = r
    return done


def run(clfs: dict, x, y, keys, cond: torch.Tensor, sha: str) -> None:
    """Classify this process's shard of images, every strategy per image, appending to the log."""
    done = read_log(sha, keys, clfs)
    if SHARDS > 1:
        torch.set_num_threads(1)
    with open(LOG, "a") as f:
        for i in range(SHARD, len(keys), SHARDS):
            if ONLY and "adaptive" not in ONLY and ("adaptive", keys[i]) not in done:  # added strategies join
                continue  # the images the others have
            for name, clf in clfs.items():
                if (name, keys[i]) in done or (name == "fixed_fp32" and i >= FP32_CHECK) or (ONLY and name not in ONLY):
                    continue
                t0 = time.perf_counter()
                o = clf.classify_one(x[i], cond, image_seed=i)
                r = {"strategy": name, "key": keys[i], "label": int(y[i]), "pred": o["pred"], "evals": o["evals"],
                     "seconds": time.perf_counter() - t0, "model_sha": sha, "precision": clf.precision,
                     **({"device": clf.model.device.type} if clf.model.device.type != "cpu" else {}),
                     **({"t_range": list(clf.t_range)} if tuple(clf.t_range) != (0.0, 1.0) else {})}
                f.write(json.dumps(r) + "\n")
                f.flush()
            print(f"[{SHARD}/{SHARDS}] image {i + 1}/{len(keys)}", flush=True)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int = 10_000) -> list[float]:
    """95% interval of mean(a) - mean(b) over images resampled together (the strategies share images)."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), (n, len(a)))
    d = a[idx].mean(1) - b[idx].mean(1)
    return [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))]


def hits(done: dict, name: str, keys: list[str]) -> np.ndarray:
    """1.0 where this strategy's logged prediction is the image's label, per key."""
    return np.array([done[(name, k)]["pred"] == done[(name, k)]["label"] for k in keys], dtype=float)


def report(clfs: dict, ds, keys, model, tmpl) -> None:
    """Every strategy over the images it has done (a later run may extend only some strategies to more images);
    each difference to adaptive is paired over the images both have."""
    done = read_log(model.meta["sha"], keys, clfs)
    names = [n for n in clfs if n != "fixed_fp32"]
    have = {n: [k for k in keys if (n, k) in done] for n in names}
    if not have["adaptive"]:
        raise SystemExit("adaptive has no image yet: run the benchmark first")
    lite = load_model("builtin:lite-clip")
    feats = embed(lite, ds)
    lite_pred = dict(zip(feats.keys, zeroshot.evaluate(lite, feats)["_scores"].argmax(1).tolist()))
    label = {k: done[("adaptive", k)]["label"] for k in have["adaptive"]}
    rows, out = [["strategy", "images", "acc1", "evals/image", "s/image"]], []
    for name in names:
        rs = [done[(name, k)] for k in have[name]]
        if not rs:
            continue
        out.append({"strategy": name, "n_images": len(rs), "acc1": float(hits(done, name, have[name]).mean()),
                    "evals_per_image": float(np.mean([r["evals"] for r in rs])),
                    "seconds_per_image": float(np.mean([r["seconds"] for r in rs]))})
        rows.append([name, len(rs), f"{out[-1]['acc1']:.4f}", f"{out[-1]['evals_per_image']:.0f}",
                     f"{out[-1]['seconds_per_image']:.2f}"])
    lite_ok = np.array([lite_pred[k] == label[k] for k in have["adaptive"]], dtype=float)
    zs = float(lite_ok.mean())
    ad_ok = hits(done, "adaptive", have["adaptive"])
    vs_lite = {"n_images": len(ad_ok), "adaptive_minus_lite_clip_acc1": float(ad_ok.mean() - lite_ok.mean()),
               "ci95": paired_bootstrap(ad_ok, lite_ok)}
    rows.append(["builtin:lite-clip zero-shot", len(have["adaptive"]), f"{zs:.4f}", "-", "-"])
    print(table_text(rows))
    gaps, ad_evals = {}, out[[o["strategy"] for o in out].index("adaptive")]["evals_per_image"]
    for name in names:
        both = [k for k in have[name] if k in label] if name != "adaptive" else []
        if not both:
            continue
        ha, ad = hits(done, name, both), hits(done, "adaptive", both)
        evals = float(np.mean([done[(name, k)]["evals"] for k in both]))
        gaps[name] = {"n_images": len(both), "acc1": float(ha.mean()), "adaptive_acc1": float(ad.mean()),
                      "minus_adaptive_acc1": float(ha.mean() - ad.mean()), "ci95": paired_bootstrap(ha, ad),
                      "same_prediction": float(np.mean([done[(name, k)]["pred"] == done[("adaptive", k)]["pred"]
                                                        for k in both])),
                      "evals_ratio": evals / ad_evals}
        g = gaps[name]
        print(f"{name} - adaptive on {len(both)} images: {g['minus_adaptive_acc1']:+.4f} "
              f"(95% CI {g['ci95'][0]:+.3f}..{g['ci95'][1]:+.3f}), evals ratio {g['evals_ratio']:.3f}")
    precisions = {n: sorted({done[(n, k)].get("precision", "bf16") for k in have[n]}) for n in names}
    devices = {n: sorted({done[(n, k)].get("device", "cpu") for k in have[n]}) for n in names if have[n]}
    chk = [k for k in have["fixed"] if ("fixed_fp32", k) in done]
    agree = float(np.mean([done[("fixed_fp32", k)]["pred"] == done[("fixed", k)]["pred"] for k in chk])) if chk else None
    print(f"adaptive - lite-clip on {len(ad_ok)} images: {vs_lite['adaptive_minus_lite_clip_acc1']:+.4f} "
          f"(95% CI {vs_lite['ci95'][0]:+.3f}..{vs_lite['ci95'][1]:+.3f})")
    print(f"fixed: bf16 vs fp32 same prediction on {len(chk)} images: {agree}")
    vs, vs_sha = {}, VS or (load_tiny_diffusion().meta["sha"] if CANDIDATE else None)
    if vs_sha:  # each strategy against itself with the other denoiser, paired over the images both have
        other = read_log(vs_sha, keys, clfs)
        for name in names:
            both = [k for k in have[name] if (name, k) in other]
            if both:
                c, s = hits(done, name, both), hits(other, name, both)
                vs[name] = {"n_images": len(both), "acc1": float(c.mean()), "other_acc1": float(s.mean()),
                            "minus_other_acc1": float(c.mean() - s.mean()), "ci95": paired_bootstrap(c, s)}
                v = vs[name]
                print(f"{name}: this - denoiser {vs_sha} on {len(both)} images: {v['minus_other_acc1']:+.4f} "
                      f"(95% CI {v['ci95'][0]:+.3f}..{v['ci95'][1]:+.3f}; {vs_sha} {v['other_acc1']:.4f})")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for j, o in enumerate(out):
        ax.scatter(o["evals_per_image"], o["acc1"], s=40, color=f"C{j}", label=f"{o['strategy']} ({o['n_images']})")
    ax.axhline(zs, color="grey", ls="--", label=f"lite-clip zero-shot ({len(ad_ok)})")
    if "adaptive" in vs:
        ax.axhline(vs["adaptive"]["other_acc1"], color="C1", ls=":",
                   label=f"adaptive, denoiser {vs_sha} ({vs['adaptive']['n_images']})")
    ax.set_ylim(ax.get_ylim()[0] - 0.01, ax.get_ylim()[1])  # lines at the lowest value stay off the frame
    ax.set_xscale("log")
    ticks = sorted({round(o["evals_per_image"]) for o in out})
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("denoiser evaluations per image")
    ax.set_ylabel("accuracy (chance 0.1)")
    shown = f"not shipped: {CANDIDATE} ({model.meta['sha']})" if CANDIDATE else model.name
    ax.set_title(f"CIFAR-10 test, {shown} (images in brackets)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    names_g = [n for n in names if n in gaps]
    ds_ = [gaps[n]["minus_adaptive_acc1"] for n in names_g]
    err = np.abs(np.array([gaps[n]["ci95"] for n in names_g]).T - ds_)
    bx.errorbar(ds_, range(len(names_g)), xerr=err, fmt="o", capsize=4)
    bx.axvline(0, color="grey", lw=0.8)
    bx.axvspan(-0.01, 0.01, color="C2", alpha=0.12, label="within 1 pt")
    bx.set_yticks(range(len(names_g)), [f"{n} ({gaps[n]['evals_ratio']:.2f}x evals, {gaps[n]['n_images']} img)"
                                         for n in names_g], fontsize=8)
    bx.set_xlabel("accuracy minus adaptive, paired 95% interval")
    bx.set_title("each strategy against Li et al.'s adaptive on the same images", fontsize=10)
    bx.legend(fontsize=8)
    fig.savefig(RESULTS / f"{OUT}.png", dpi=110, bbox_inches="tight")
    meta = {k: model.meta.get(k) for k in ("step", "final_loss", "command", "sha")}
    save(OUT, {"model": CANDIDATE or model.name, "model_meta": meta,
               "n_images": len(have["adaptive"]), "n_images_planned": N, "images": have["adaptive"],
               "templates": tmpl, "precision_by_strategy": precisions,
               "device_by_strategy": devices, "strategies": out, "lite_clip_acc1": zs,
               "halving_budget": ADAPTIVE_EVALS // 4, "halving_tenth_budget": ADAPTIVE_EVALS // 10,
               "halving_window_t_range": list(clfs["halving_window"].t_range) if "halving_window" in clfs else None,
               "halving_window_chosen_by": "benchmarks/results/diffusion_timesteps.json (CIFAR-10 train images)",
               "vs_adaptive": gaps, "adaptive_vs_lite_clip": vs_lite,
               "bf16_fp32_agreement_fixed": {"n_images": len(chk), "same_prediction": agree}}
               | ({"vs_denoiser": {"sha": vs_sha, "strategies": vs}} if vs_sha else {}))


def main() -> None:
    ds = load_dataset(shared_dir() / "data/cifar10/test-000000.tar.gz", limit=N)
    if CANDIDATE:
        INPUTS.add(Path(CANDIDATE).resolve())  # its source records the weights, as it records the shipped assets
    model = (load_tiny_diffusion(CANDIDATE).to(DEVICE) if CANDIDATE
             else load_model("builtin:tiny-diffusion-cifar10", device=DEVICE))
    clfs = strategies(model)
    clfs["fixed_fp32"] = DiffusionClassifier(model, "fixed", loss="l1", n_samples=50, precision="fp32")
    x, y, keys = image_tensors(ds, model.image_size)
    tmpl = default_templates(model)
    if os.environ.get("DIFFUSION_REPORT") != "1":
        cond = clfs["fixed"].prompt_embeddings(ds.classnames, tmpl)  # depends on the model only: shared
        run(clfs, x, y, keys, cond.to(model.device), model.meta["sha"])
    if SHARDS == 1 or os.environ.get("DIFFUSION_REPORT") == "1":
        report(clfs, ds, keys, model, tmpl)


if __name__ == "__main__":
    main()
