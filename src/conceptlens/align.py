"""Linear alignment of one representation into another (Moayeri et al., Text-To-Concept, ICML 2023).

f_target(x) ≈ W f_source(x) + b, fitted on cached features of the same images:
- `ridge`: closed form from streaming sufficient statistics (n, Σx, Σy, XᵀX, XᵀY, per-dim ΣY²), so any
  number of rows fits in O(D²) memory; the ridge penalty is chosen on a held-out split, exactly, from the
  held-out split's own statistics.
- `procrustes`: orthogonal map with one scale (Schönemann 1966), after PCA (source wider) or zero padding
  (source narrower) to the target's width.
- `sgd`: the published recipe (k1rezaei/Text-to-concept, LinearAligner.py) for comparison: both sides scaled
  by one scalar c = sqrt(4.5 / Var), nn.Linear + MSE, SGD(lr 0.01, momentum 0.9, wd 5e-4), batch 100,
  CosineAnnealingLR(T_max=200) per epoch, 5 epochs. Un-scaling: W = W'·c1/c2 and b = b'/c2. The reference
  code uses b'·c1/c2 for the bias, which is off by the factor c1; we implement the algebraically correct form.
An aligner file is safetensors (W, b) + JSON metadata; loading never unpickles.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import ConceptlensError
from .models.base import Encoder

METHODS = ("ridge", "procrustes", "sgd")
CHUNK = 8192


def check_finite(name: str, X) -> None:
    for i in range(0, len(X), CHUNK):
        if not np.isfinite(np.asarray(X[i:i + CHUNK])).all():
            raise ConceptlensError(f"{name} contains NaN or inf values (rows {i}..{min(i + CHUNK, len(X)) - 1})")


class Stats:
    """Sufficient statistics of (X, Y) rows, accumulated chunk by chunk in float64."""

    def __init__(self, dx: int, dy: int):
        self.n = 0
        self.sx, self.sy = np.zeros(dx), np.zeros(dy)
        self.xx, self.xy, self.yy = np.zeros((dx, dx)), np.zeros((dx, dy)), np.zeros(dy)

    def add(self, x: np.ndarray, y: np.ndarray) -> "Stats":
        """Add a chunk: products in float32 BLAS (2x faster), sums kept in float64."""
        x32, y32 = np.asarray(x, np.float32), np.asarray(y, np.float32)
        self.n += len(x)
        self.sx += x.sum(0, dtype=np.float64)
        self.sy += y.sum(0, dtype=np.float64)
        self.xx += x32.T @ x32
        self.xy += x32.T @ y32
        self.yy += (y32.astype(np.float64) ** 2).sum(0)
        return self

    def centered(self):
        """(mean x, mean y, XcᵀXc, XcᵀYc, per-dim ΣYc²)."""
        mx, my = self.sx / self.n, self.sy / self.n
        return (mx, my, self.xx - self.n * np.outer(mx, mx), self.xy - self.n * np.outer(mx, my),
                self.yy - self.n * my * my)


def _stats(X, Y, rows: np.ndarray) -> Stats:
    st = Stats(X.shape[1], Y.shape[1])
    for i in range(0, len(rows), CHUNK):
        r = np.sort(rows[i:i + CHUNK])
        st.add(np.asarray(X[r], np.float32), np.asarray(Y[r], np.float32))
    return st


def _sse(held: Stats, W: np.ndarray, b: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Per-target-dim sum of squared errors of y ≈ x W + b over the held-out rows, from their statistics
    (`dtype` float32 for the fast penalty search, float64 for reported metrics)."""
    n, sx, sy, xx, xy, yy = held.n, held.sx, held.sy, held.xx, held.xy, held.yy
    xw = sx @ W
    xxw = (xx.astype(dtype) @ W.astype(dtype)).astype(np.float64)
    return (yy - 2 * np.einsum("ij,ij->j", W, xy) + np.einsum("ij,ij->j", W, xxw)
            - 2 * b * sy + 2 * b * xw + n * b * b)


def r2_from_sse(sse: np.ndarray, held: Stats) -> float:
    """Variance-weighted R² = 1 − ΣSSE / ΣSST (the paper's 1 − MSE/Var(y))."""
    sst = held.yy - held.sy ** 2 / held.n
    return float(1 - sse.sum() / sst.sum())


class Aligner:
    """Linear map between representations, scikit-learn style: fit / transform / score / save.

    Learned state: `W_` [d_target, d_source], `b_` [d_target], `alpha_` (ridge), `metrics_` (held out).
    """

    def __init__(self, method: str = "ridge", holdout: float = 0.2, alphas: Iterable[float] | None = None,
                 seed: int = 0, epochs: int = 5):
        if method not in METHODS:
            raise ConceptlensError(f"unknown alignment method {method!r}: use {', '.join(METHODS)}")
        if not 0 < holdout < 1:
            raise ConceptlensError("holdout must be a fraction in (0, 1)")
        self.method, self.holdout, self.seed, self.epochs = method, holdout, seed, epochs
        self.alphas = list(alphas) if alphas is not None else [float(a) for a in np.logspace(-6, 2, 9)]

    # -- fitting
    def split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Seeded train / held-out row indices."""
        perm = np.random.default_rng(self.seed).permutation(n)
        k = max(1, int(round(n * self.holdout)))
        if n - k < 2:
            raise ConceptlensError(f"too few rows to align ({n})")
        return np.sort(perm[k:]), np.sort(perm[:k])

    def fit(self, X, Y) -> "Aligner":
        """X [n, d_source], Y [n, d_target] (arrays or memmaps; rows are read in chunks)."""
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
            raise ConceptlensError(f"features do not pair up: source {tuple(X.shape)} vs target {tuple(Y.shape)} "
                                   "(the same images, one row each, are needed on both sides)")
        check_finite("source features", X)
        check_finite("target features", Y)
        tr, ho = self.split(len(X))
        self.train_rows_, self.heldout_rows_ = tr, ho
        getattr(self, f"_fit_{self.method}")(X, Y, tr)
        held = _stats(X, Y, ho)
        self.metrics_ = {"r2": r2_from_sse(_sse(held, self.W_.T.astype(np.float64), self.b_.astype(np.float64)), held),
                         "cosine": self._mean_cosine(X, Y, ho), "n_train": int(len(tr)), "n_heldout": int(len(ho))}
        return self

    def _fit_ridge(self, X, Y, rows: np.ndarray) -> None:
        inner, val = self.split(len(rows))  # penalty chosen on a split of the training rows
        st_in = _stats(X, Y, rows[inner])
        st_val = _stats(X, Y, rows[val])
        best = None
        scale = np.trace(st_in.centered()[2]) / X.shape[1] or 1.0
        for a in self.alphas:  # the search runs in float32 (it only ranks penalties); the final solve in float64
            W, b = self._ridge_solve(st_in, a * scale, np.float32)
            r2 = r2_from_sse(_sse(st_val, W, b, np.float32), st_val)
            if best is None or r2 > best[0]:
                best = (r2, a)
        st_in.n += st_val.n  # refit on all training rows with the chosen penalty
        for k in ("sx", "sy", "xx", "xy", "yy"):
            setattr(st_in, k, getattr(st_in, k) + getattr(st_val, k))
        self.alpha_ = best[1] * scale
        W, b = self._ridge_solve(st_in, self.alpha_)
        self.W_, self.b_ = W.T.astype(np.float32), b.astype(np.float32)

    @staticmethod
    def _ridge_solve(st: Stats, alpha: float, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        mx, my, xx, xy, _ = st.centered()
        W = np.linalg.solve((xx + alpha * np.eye(len(xx))).astype(dtype), xy.astype(dtype)).astype(np.float64)
        return W, my - mx @ W

    def _fit_procrustes(self, X, Y, rows: np.ndarray) -> None:
        st = _stats(X, Y, rows)
        mx, my, xx, xy, _ = st.centered()
        ds, dt = X.shape[1], Y.shape[1]
        if ds > dt:  # PCA of the source down to the target's width
            evals, evecs = np.linalg.eigh(xx)
            P = evecs[:, ::-1][:, :dt]  # [ds, dt]
        else:  # zero padding of the source up to the target's width
            P = np.eye(ds, dt)
        m = P.T @ xy  # cross-covariance of projected source and target [dt, dt]
        U, S, Vt = np.linalg.svd(m)
        R = U @ Vt
        s = S.sum() / np.trace(P.T @ xx @ P)
        W = s * P @ R  # [ds, dt]
        self.W_, self.b_ = W.T.astype(np.float32), (my - mx @ W).astype(np.float32)

    def _fit_sgd(self, X, Y, rows: np.ndarray) -> None:
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        x = torch.from_numpy(np.asarray(X[rows], np.float32))
        y = torch.from_numpy(np.asarray(Y[rows], np.float32))
        c1, c2 = math.sqrt(4.5 / x.var().item()), math.sqrt(4.5 / y.var().item())
        x, y = x * c1, y * c2
        lin = torch.nn.Linear(x.shape[1], y.shape[1])
        opt = torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
        for _ in range(self.epochs):
            for b in torch.randperm(len(x), generator=g).split(100):
                loss = torch.nn.functional.mse_loss(lin(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        with torch.no_grad():
            self.W_ = (lin.weight * c1 / c2).numpy().astype(np.float32)
            self.b_ = (lin.bias / c2).numpy().astype(np.float32)  # reference: b·c1/c2 (off by c1)
        self.scales_ = (c1, c2)

    # -- using
    def transform(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.shape[-1] != self.W_.shape[1]:
            raise ConceptlensError(f"aligner expects {self.W_.shape[1]}-d source features, got {X.shape[-1]}-d")
        return X @ self.W_.T + self.b_

    def score(self, X, Y) -> float:
        """Variance-weighted R² of the map on (X, Y)."""
        st = _stats(X, Y, np.arange(len(X)))
        return r2_from_sse(_sse(st, self.W_.T.astype(np.float64), self.b_.astype(np.float64)), st)

    def _mean_cosine(self, X, Y, rows: np.ndarray) -> float:
        tot = 0.0
        for i in range(0, len(rows), CHUNK):
            r = rows[i:i + CHUNK]
            p, y = self.transform(X[r]), np.asarray(Y[r], np.float32)
            tot += float((np.sum(p * y, 1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)).sum())
        return tot / len(rows)

    def save(self, path: Path, meta: dict) -> Path:
        """W, b and metadata (source/target ids, layer, preprocessing, method, held-out metrics, data fingerprint)."""
        from safetensors.torch import save_file
        full = dict(meta, method=self.method, metrics=getattr(self, "metrics_", {}),
                    alpha=getattr(self, "alpha_", None), d_source=int(self.W_.shape[1]), d_target=int(self.W_.shape[0]))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"W": torch.from_numpy(self.W_).contiguous(), "b": torch.from_numpy(self.b_).contiguous()},
                  str(path), metadata={"conceptlens": json.dumps(full)})
        return path

    @classmethod
    def load(cls, path: Path) -> "Aligner":
        from safetensors.torch import load_file

        from .train.checkpoint import read_meta
        path = Path(path)
        if not path.exists():
            raise ConceptlensError(f"aligner file not found: {path}")
        meta = read_meta(path)
        t = load_file(str(path))
        if "W" not in t or "b" not in t:
            raise ConceptlensError(f"{path} is not an aligner file (no W, b)")
        a = cls(meta.get("method", "ridge"))
        a.W_, a.b_, a.meta_ = t["W"].float().numpy(), t["b"].float().numpy(), meta
        a.metrics_ = meta.get("metrics", {})
        return a


def fit(source: Encoder | str, target: Encoder | str, data, method: str = "ridge", holdout: float = 0.2,
        seed: int = 0, **embed_kw) -> tuple[Aligner, dict]:
    """Embed `data` with both models (cached), fit an Aligner; returns it and its metadata (with zero-shot
    top-1 agreement when the target is a vision-language model and the data has class names)."""
    from .data import ImageDataset, load_dataset
    from .features import embed
    from .models import load_model
    src = load_model(source) if isinstance(source, str) else source
    tgt = load_model(target) if isinstance(target, str) else target
    ds = data if isinstance(data, ImageDataset) else load_dataset(data)
    fs, ft = embed(src, ds, **embed_kw), embed(tgt, ds, **embed_kw)
    if fs.keys != ft.keys:  # an image unreadable by one model's preprocessing: keep the common rows
        common = sorted(set(fs.keys) & set(ft.keys))
        pos_s, pos_t = {k: i for i, k in enumerate(fs.keys)}, {k: i for i, k in enumerate(ft.keys)}
        Xs, Xt = fs.X[[pos_s[k] for k in common]], ft.X[[pos_t[k] for k in common]]
        labels = fs.labels[[pos_s[k] for k in common]]
    else:
        Xs, Xt, labels = fs.X, ft.X, fs.labels
    al = Aligner(method, holdout=holdout, seed=seed).fit(Xs, Xt)
    if tgt.has_text and ds.classnames and (labels >= 0).all():
        from . import zeroshot
        ho = al.heldout_rows_
        clf = zeroshot.build_classifier(tgt, ds.classnames, zeroshot.openai_templates())
        own = zeroshot.logits(torch.from_numpy(np.asarray(Xt[ho], np.float32)), clf)
        mapped = zeroshot.logits(torch.from_numpy(al.transform(Xs[ho])), clf)
        al.metrics_.update({"zeroshot_top1_agreement": float((own.argmax(1) == mapped.argmax(1)).float().mean()),
                            "target_zeroshot_acc1": float((own.argmax(1).numpy() == labels[ho]).mean()),
                            "aligned_zeroshot_acc1": float((mapped.argmax(1).numpy() == labels[ho]).mean())})
    meta = {"source": src.name, "target": tgt.name, "layer": src.layer, "source_preprocess": src.preprocess_id(),
            "source_fingerprint": src.image_fingerprint, "target_fingerprint": tgt.fingerprint,
            "data": ds.root or ds.name, "data_fingerprint": ds.identity, "n_images": int(len(Xs))}
    return al, meta


class AlignedModel(Encoder):
    """A vision model seen through an aligner: it behaves as the image tower of the target space."""

    kind = "vision-language"

    def __init__(self, base: Encoder, aligner: Aligner, target: Encoder):
        self.base, self.aligner, self.target = base, aligner, target
        self.name = f"{base.name}@{Path(aligner.meta_.get('path', 'aligner')).stem}"
        self.preprocess, self.layer = base.preprocess, base.layer
        self.embed_dim = int(aligner.W_.shape[0])
        self.W = torch.from_numpy(aligner.W_)
        self.b = torch.from_numpy(aligner.b_)

    def modules(self):
        return self.base.modules()

    @property
    def fingerprint(self) -> str:
        return f"{self.base.fingerprint}-{self.aligner.meta_.get('sha', '')}"

    @property
    def image_fingerprint(self) -> str:
        return self.fingerprint

    def features(self, batch):
        return self.base.features(batch)

    def encode_image(self, images) -> torch.Tensor:
        return self.base.encode_image(images).float() @ self.W.T + self.b

    def encode_text(self, texts) -> torch.Tensor:
        return self.target.encode_text(texts)


def apply_aligner(model: Encoder, path: str | Path) -> AlignedModel:
    """Wrap `model` with the aligner in `path`; a file fitted for another model or layer is a clear error."""
    from .models import load_model
    from .utils import file_sha256
    al = Aligner.load(Path(path))
    meta = al.meta_
    if meta.get("source") != model.name or meta.get("layer") != model.layer:
        raise ConceptlensError(f"aligner {path} maps {meta.get('source')} (layer {meta.get('layer')}), "
                               f"not {model.name} (layer {model.layer})")
    if al.W_.shape[1] != model.embed_dim:
        raise ConceptlensError(f"aligner {path} expects {al.W_.shape[1]}-d features; {model.name} gives {model.embed_dim}")
    meta["path"] = str(path)
    meta["sha"] = file_sha256(Path(path))[:16]
    return AlignedModel(model, al, load_model(meta["target"]))
