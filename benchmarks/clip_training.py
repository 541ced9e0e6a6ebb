"""CLIP training and the margin regularizer of CLIP theory (Chen et al., ICLR 2024), three offline testbeds.

For each testbed: zero-shot and linear-probe accuracy for CLIP (InfoNCE) vs CLIP + one-sided regularizer over
5 seeds (mean ± std), a λ sweep, and the margin (positive minus hardest negative similarity, held out). Heads
are trained on cached frozen features (LiT-style, conceptlens.train.clip.fit_heads). Linear probes are
scikit-learn logistic regression (C = 1) on the learned, normalised image embeddings.
Writes benchmarks/results/clip_training.json and clip_training.png.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from common import RESULTS, save, shared_dir, table_text
from conceptlens.data import load_dataset
from conceptlens.features import embed, embed_texts
from conceptlens.models import load_model
from conceptlens.train.clip import fit_heads
from conceptlens.train.contrastive import margin

SEEDS = [int(s) for s in os.environ.get("CLIP_SEEDS", "0,1,2,3,4").split(",")]
LAMBDAS = [0.0, 0.3, 1.0, 3.0]
BASE = {"embed_dim": 64, "epochs": 10, "batch_size": 256, "lr": 3e-3, "warmup": 20, "weight_decay": 0.05,
        "ckpt_every": 0}


def zeroshot_acc(res, X, y, prompts) -> float:
    with torch.no_grad():
        g = F.normalize(res["image_head"](X), dim=-1)
        h = F.normalize(res["text_head"](prompts), dim=-1)
    return float(((g @ h.T).argmax(1).numpy() == y).mean())


def probe_acc(res, Xtr, ytr, Xte, yte) -> float:
    with torch.no_grad():
        a = F.normalize(res["image_head"](Xtr), dim=-1).numpy()
        b = F.normalize(res["image_head"](Xte), dim=-1).numpy()
    return float(LogisticRegression(C=1.0, max_iter=2000).fit(a, ytr).score(b, yte))


def heldout_margin(res, X, T) -> float:
    with torch.no_grad():
        return margin(res["image_head"](X), res["text_head"](T))


# ----------------------------------------------------------------------------------------- testbeds
def synthetic(seed: int = 0):
    """Chen et al.'s data model: sparse shared latent features seen through both modalities, plus features
    unique to each modality and noise. Class k of the zero-shot task = shared feature k; its prompt is the
    text view of e_k alone."""
    rng = np.random.default_rng(100 + seed)
    k, u, d, n = 20, 10, 64, 6000
    A, B = rng.normal(size=(k + u, d)) / np.sqrt(k), rng.normal(size=(k + u, d)) / np.sqrt(k)

    def views(z):
        zx = np.c_[z, rng.random((len(z), u)) < 0.3]
        zy = np.c_[z, rng.random((len(z), u)) < 0.3]
        return (zx @ A + 0.3 * rng.normal(size=(len(z), d))).astype(np.float32), \
               (zy @ B + 0.3 * rng.normal(size=(len(z), d))).astype(np.float32)
    z = (rng.random((n, k)) < 0.1).astype(float)
    z[np.arange(n), rng.integers(0, k, n)] = 1
    X, Y = views(z)
    yt = rng.integers(0, k, 2000)
    zt = np.eye(k)[yt]
    Xt, Yt = views(zt)
    prompts = (np.c_[np.eye(k), np.zeros((k, u))] @ B).astype(np.float32)
    t = torch.from_numpy
    return {"train": ([t(X)], t(Y), np.arange(n)), "test": (t(Xt), yt, t(prompts)), "pairs_test": (t(Xt), t(Yt)),
            "probe": (t(X[:3000]), z[:3000].argmax(1), t(Xt), yt)}


def pacs_compositional(seed: int = 0):
    """PACS photo + sketch; captions "a {photo|sketch} of a {class}"; (domain, class) pairs held out of training."""
    root = shared_dir() / "data/pacs"
    img, txt = load_model("builtin:efficientnet-lite0"), load_model("builtin:minilm")
    doms = ["photo", "sketch"]
    fs = {d: embed(img, load_dataset(root / d), show_progress=False) for d in doms}
    names = fs["photo"].classnames
    held = {("sketch", "dog"), ("sketch", "house"), ("photo", "giraffe"), ("photo", "guitar")}
    caps = [f"a {d} of a {c}." for d in doms for c in names]
    E = embed_texts(txt, caps)
    cap_of = {(d, c): i for i, (d, c) in enumerate((d, c) for d in doms for c in names)}
    Xtr, own, Xte, yte, dte = [], [], [], [], []
    for d in doms:
        X = torch.from_numpy(np.array(fs[d].X))
        for i, lab in enumerate(fs[d].labels):
            (Xte if (d, names[lab]) in held else Xtr).append(X[i])
            if (d, names[lab]) in held:
                yte.append(lab)
                dte.append(d)
            else:
                own.append(cap_of[(d, names[lab])])
    Xtr, Xte = torch.stack(Xtr), torch.stack(Xte)
    own = np.asarray(own)
    # each training image is paired with its caption: text rows = captions of images
    T = E[own]
    yte = np.asarray(yte)
    # zero-shot over the 7 classes in the held-out image's own domain
    prompts = {d: E[[cap_of[(d, c)] for c in names]] for d in doms}
    return {"train": ([Xtr], T, np.arange(len(Xtr))), "names": names, "test_pacs": (Xte, yte, dte, prompts),
            "pairs_test": (Xte, torch.stack([E[cap_of[(d, names[y])]] for d, y in zip(dte, yte)]))}


CIFAR_TRAIN_T = ["a photo of a {}.", "a blurry photo of a {}.", "a picture of a {}.", "an image of the {}.",
                 "a low resolution photo of a {}.", "a close-up photo of a {}.", "a small {}.", "a photo of the {}."]
CIFAR_TEST_T = ["a good photo of a {}.", "itap of a {}.", "a bright photo of the {}.", "art of the {}."]


def cifar(seed: int = 0):
    """CIFAR-10 train shards (10,000) captioned with varied templates; zero-shot on test with unseen templates."""
    root = shared_dir() / "data/cifar10"
    img, txt = load_model("builtin:efficientnet-lite0"), load_model("builtin:minilm")
    tr = embed(img, load_dataset(str(root / "train-00000{0..1}.tar.gz")), show_progress=False)
    te = embed(img, load_dataset(root / "test-000000.tar.gz"), show_progress=False)
    names = tr.classnames
    caps = [t.format(c) for c in names for t in CIFAR_TRAIN_T]
    E = embed_texts(txt, caps)
    rng = np.random.default_rng(seed)
    owner_img, rows = [], []
    for i, lab in enumerate(tr.labels):  # two captions per image, drawn from its class's templates
        for j in rng.choice(len(CIFAR_TRAIN_T), 2, replace=False):
            owner_img.append(i)
            rows.append(lab * len(CIFAR_TRAIN_T) + j)
    Xtr, Xte = torch.from_numpy(np.array(tr.X)), torch.from_numpy(np.array(te.X))
    P = embed_texts(txt, [t.format(c) for c in names for t in CIFAR_TEST_T]).view(len(names), len(CIFAR_TEST_T), -1)
    return {"train": ([Xtr], E[rows], np.asarray(owner_img)), "test_prompts": (Xte, te.labels, P),
            "probe": (Xtr[:5000], tr.labels[:5000], Xte, te.labels),
            "pairs_test": (Xte[:2000], E[[lab * len(CIFAR_TRAIN_T) for lab in te.labels[:2000]]])}


def evaluate(name: str, data: dict, res: dict) -> dict:
    out = {"margin": heldout_margin(res, *data["pairs_test"]), "logit_scale": res["temperature"]().item()}
    if name == "synthetic":
        X, y, P = data["test"]
        out["zeroshot"] = zeroshot_acc(res, X, y, P)
        out["linear_probe"] = probe_acc(res, *data["probe"])
    elif name == "pacs_compositional":
        X, y, d, prompts = data["test_pacs"]
        d = np.asarray(d)
        accs = [zeroshot_acc(res, X[torch.from_numpy(d == dom)], y[d == dom], prompts[dom]) * (d == dom).sum()
                for dom in prompts]
        out["zeroshot"] = float(sum(accs) / len(y))
    else:
        X, y, P = data["test_prompts"]
        with torch.no_grad():
            h = F.normalize(F.normalize(res["text_head"](P.flatten(0, 1)), dim=-1).view(*P.shape[:2], -1).mean(1), dim=-1)
            g = F.normalize(res["image_head"](X), dim=-1)
        out["zeroshot"] = float(((g @ h.T).argmax(1).numpy() == y).mean())
        out["linear_probe"] = probe_acc(res, *data["probe"])
    return out


def summarise(runs: list[dict]) -> dict:
    return {k: {"mean": float(np.mean([r[k] for r in runs])), "std": float(np.std([r[k] for r in runs])),
                "runs": [r[k] for r in runs]} for k in runs[0]}


def main() -> None:
    beds = {"synthetic": synthetic, "pacs_compositional": pacs_compositional, "cifar10": cifar}
    out, rows = {}, [["testbed", "objective", "zero-shot", "linear probe", "margin"]]
    temp_sweep = []
    for name, make in beds.items():
        data = make(0)
        res = {"seeds": SEEDS}
        for label, cfg in (("clip", {}), ("clip_reg", {"reg": "one-sided", "reg_weight": 1.0})):
            runs = [evaluate(name, data, fit_heads(*data["train"], BASE | cfg | {"seed": s})) for s in SEEDS]
            res[label] = summarise(runs)
            rows.append([name, label] + [f"{res[label][k]['mean']:.3f}±{res[label][k]['std']:.3f}"
                                         if k in res[label] else "-" for k in ("zeroshot", "linear_probe", "margin")])
        res["lambda_sweep"] = [{"lambda": lam} | evaluate(name, data, fit_heads(*data["train"], BASE | {
            "reg": "one-sided" if lam else "none", "reg_weight": lam, "seed": SEEDS[0]})) for lam in LAMBDAS]
        res["ablation"] = {kind: evaluate(name, data, fit_heads(*data["train"], BASE | {
            "reg": kind, "reg_weight": 1.0, "seed": SEEDS[0]})) for kind in ("two-sided", "negatives")}
        res["square_loss"] = evaluate(name, data, fit_heads(*data["train"], BASE | {"loss": "square", "seed": SEEDS[0]}))
        rows.append([name, "square loss", f"{res['square_loss']['zeroshot']:.3f}",
                     f"{res['square_loss'].get('linear_probe', float('nan')):.3f}", f"{res['square_loss']['margin']:.3f}"])
        if name == "synthetic":
            for tau in (1.0, 0.1, 0.03, 0.01):
                temp_sweep.append({"temperature": tau} | evaluate(name, data, fit_heads(*data["train"], BASE | {
                    "init_temperature": tau, "learn_temperature": False, "seed": SEEDS[0]})))
            res["temperature_sweep"] = temp_sweep
        out[name] = res
        print(table_text(rows), flush=True)
    verdict = {name: ("helped" if out[name]["clip_reg"]["zeroshot"]["mean"] - out[name]["clip"]["zeroshot"]["mean"]
                      > out[name]["clip"]["zeroshot"]["std"] + out[name]["clip_reg"]["zeroshot"]["std"] else
                      "hurt" if out[name]["clip"]["zeroshot"]["mean"] - out[name]["clip_reg"]["zeroshot"]["mean"]
                      > out[name]["clip"]["zeroshot"]["std"] + out[name]["clip_reg"]["zeroshot"]["std"]
                      else "no clear effect") for name in out}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, res) in zip(axes, out.items()):
        lam = [r["lambda"] for r in res["lambda_sweep"]]
        ax.plot(lam, [r["zeroshot"] for r in res["lambda_sweep"]], "o-", label="zero-shot")
        ax.plot(lam, [r["margin"] for r in res["lambda_sweep"]], "s--", label="margin")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("λ (one-sided)")
        ax.set_title(name)
        ax.legend()
    fig.savefig(RESULTS / "clip_training.png", dpi=110, bbox_inches="tight")
    print(table_text(rows))
    print("regularizer verdict (zero-shot, difference beyond the summed std):", verdict)
    save("clip_training", {"testbeds": out, "regularizer_verdict": verdict, "config": BASE,
                           "regularizer_form": "one-sided: lambda * mean_i (1 - <g_i, h_i>) on normalised embeddings"})


if __name__ == "__main__":
    main()
