"""Linear alignment of one representation into another (Moayeri et al., Text-To-Concept, ICML 2023).

f_target(x) ≈ W f_source(x) + b, fitted on cached features of the same images. By default (`normalize`, ours) the
rows of both sides are first scaled to unit length, and source rows again before the map is applied: the map is fitted
in the cosine geometry that zero-shot, search and the CBM read, not spent on feature norms they ignore. Chosen on
PACS-free proxies (mobilenetv2 -> lite-clip, the benchmark's general fit set with OpenMoji's dev fifth held out):
OpenMoji-dev caption -> line art / colour drawing R@5 0.252 / 0.277 -> 0.282 / 0.301, "sketch & X" ranking the
emoji's line art in the top 5 (of dev drawings + 1,000 CIFAR-10 photos) 0.159 -> 0.167, aligned zero-shot on CIFAR-10
train shards 2 / 3 0.5625 / 0.5533 -> 0.5637 / 0.5557. `normalize=False` is the reference's geometry (one scalar a side):
- `ridge`: closed form from streaming sufficient statistics (n, Σx, Σy, XᵀX, XᵀY, per-dim ΣY²), so any
  number of rows fits in O(D²) memory; the ridge penalty is chosen on a held-out split, exactly, from the
  held-out split's own statistics.
- `procrustes`: orthogonal map with one scale (Schönemann 1966), after PCA (source wider) or zero padding
  (source narrower) to the target's width.
- `sgd`: the published recipe (k1rezaei/Text-to-concept, LinearAligner.py) for comparison: both sides scaled
  by one scalar c = sqrt(4.5 / Var), nn.Linear + MSE, SGD(lr 0.01, momentum 0.9, wd 5e-4), batch 100,
  CosineAnnealingLR(T_max=200) per epoch, 5 epochs. Un-scaling: W = W'·c1/c2 and b = b'/c2. The reference
  code uses b'·c1/c2 for the bias, which is off by the factor c1; we implement the algebraically correct form.
An aligner file is safetensors (W, b) + JSON metadata (conceptlens.models.mapped.LinearMap); loading never
unpickles. `load_model(NAME, aligner=FILE)` turns a vision model + its aligner into a vision-language model.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch


from ..data import ImageDataset, load_dataset
from ..errors import ConceptlensError
from ..estimator import BaseEstimator
from ..eval import zeroshot
from ..features import embed
from ..io import digest
from ..models import Encoder, load_model
from ..models.mapped import AlignedModel, LinearMap, affine
from ..runtime import resolve_device, to_device

METHODS = ("ridge", "procrustes", "sgd")
CHUNK = 8192


def check_finite(name: str, X) -> None:
    for i in range(0, len(X), CHUNK):
        if not np.isfinite(np.asarray(X[i:i + CHUNK])).all():
            raise ConceptlensError(f"{name} contains NaN or inf values (rows {i}..{min(i + CHUNK, len(X)) - 1})")


def _products(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[np.ndarray, ...]:
    """XᵀX, XᵀY and the column sums of a float32 chunk: numpy BLAS on the CPU (`x.T @ x` is one SYRK, half a GEMM's
    work; the sums are two GEMVs, no float64 reduction passes), torch on an accelerator."""
    if device.type == "cpu":
        ones = np.ones(len(x), np.float32)
        return x.T @ x, x.T @ y, ones @ x, ones @ y
    tx, ty = to_device(torch.from_numpy(x), device), to_device(torch.from_numpy(y), device)
    return tuple(t.cpu().numpy() for t in (tx.T @ tx, tx.T @ ty, tx.sum(0), ty.sum(0)))


class Stats:
    """Sufficient statistics of (X, Y) rows, accumulated chunk by chunk in float64 (products on `device`)."""

    def __init__(self, dx: int, dy: int, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.n = 0
        self.sx, self.sy = np.zeros(dx), np.zeros(dy)
        self.xx, self.xy, self.yy = np.zeros((dx, dx)), np.zeros((dx, dy)), np.zeros(dy)

    def add(self, x: np.ndarray, y: np.ndarray) -> "Stats":
        """Add a chunk of float32 rows: products in float32 BLAS (2x faster), sums kept in float64."""
        self.n += len(y)
        xx, xy, sx, sy = _products(x, y, self.device)
        self.xx += xx
        self.xy += xy
        self.sx += sx
        self.sy += sy
        self.yy += np.einsum("ij,ij->j", y, y)
        return self

    def __iadd__(self, other: "Stats") -> "Stats":
        """Pool another row set's statistics into these (in place)."""
        self.n += other.n
        for k in ("sx", "sy", "xx", "xy", "yy"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    def centered(self):
        """(mean x, mean y, XcᵀXc, XcᵀYc, per-dim ΣYc²)."""
        mx, my = self.sx / self.n, self.sy / self.n
        return (mx, my, self.xx - self.n * np.outer(mx, mx), self.xy - self.n * np.outer(mx, my),
                self.yy - self.n * my * my)


def unit_rows(A: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit length, in place (a zero row stays zero)."""
    A /= np.sqrt(np.einsum("ij,ij->i", A, A))[:, None] + 1e-12
    return A


def _stats(X, Y, rows: np.ndarray, device: torch.device | None = None, normalize: bool = False) -> Stats:
    """Statistics of X[rows], Y[rows] (arrays or memmaps; rows scaled to unit length if `normalize`), gathered chunk
    by chunk into two reused contiguous buffers (`np.take` into them: 3x faster than fancy indexing, which makes a
    fresh array for every chunk)."""
    dx, dy = X.shape[1], Y.shape[1]
    st = Stats(dx, dy, device)
    k = min(CHUNK, len(rows))
    bx, by = np.empty((k, dx), np.float32), np.empty((k, dy), np.float32)
    for i in range(0, len(rows), CHUNK):
        r = np.sort(rows[i:i + CHUNK])
        x, y = bx[:len(r)], by[:len(r)]
        _gather(X, r, x)
        _gather(Y, r, y)
        if normalize:
            unit_rows(x), unit_rows(y)
        st.add(x, y)
    return st


def _gather(A, rows: np.ndarray, out: np.ndarray) -> None:
    """out[:] = A[rows] as float32 (`np.take` straight into `out` where A is float32; "clip": the rows are valid, and
    take's default mode would copy through a buffer)."""
    if A.dtype == np.float32:
        np.take(A, rows, axis=0, out=out, mode="clip")
    else:
        out[:] = A[rows]


def r2(sse, sy: np.ndarray, syy, n: int) -> float:
    """Variance-weighted R² = 1 − ΣSSE / ΣSST (the paper's 1 − MSE/Var(y)) from ΣSSE and Σy² (per dim or
    totals) and per-dim Σy."""
    return float(1 - np.sum(sse) / (np.sum(syy) - np.sum(sy ** 2) / n))


class Aligner(BaseEstimator):
    """Linear map between representations, a scikit-learn estimator: fit / transform / score / save.

    `alphas` (ridge penalties, relative to the mean feature variance) default to logspace(-6, 2, 9); `normalize`
    fits on rows scaled to unit length and scales source rows so before mapping (module docstring).
    Learned state: `W_` [d_target, d_source], `b_` [d_target], `alpha_` (ridge), `metrics_` (held out).
    """

    def __init__(self, method: str = "ridge", holdout: float = 0.2, alphas: Iterable[float] | None = None,
                 seed: int = 0, epochs: int = 5, device: str = "cpu", normalize: bool = True):
        self.method, self.holdout, self.alphas, self.seed, self.epochs = method, holdout, alphas, seed, epochs
        self.device, self.normalize = device, normalize

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
        if self.method not in METHODS:
            raise ConceptlensError(f"unknown alignment method {self.method!r}: use {', '.join(METHODS)}")
        if not 0 < self.holdout < 1:
            raise ConceptlensError("holdout must be a fraction in (0, 1)")
        if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
            raise ConceptlensError(f"features do not pair up: source {tuple(X.shape)} vs target {tuple(Y.shape)} "
                                   "(the same images, one row each, are needed on both sides)")
        check_finite("source features", X)
        check_finite("target features", Y)
        tr, ho = self.split(len(X))
        self.train_rows_, self.heldout_rows_ = tr, ho
        getattr(self, f"_fit_{self.method}")(X, Y, tr)
        self.metrics_ = {**self._evaluate(X, Y, ho), "n_train": int(len(tr)), "n_heldout": int(len(ho))}
        return self

    def _fit_ridge(self, X, Y, rows: np.ndarray) -> None:
        inner, val = self.split(len(rows))  # penalty chosen on a split of the training rows
        st_in = _stats(X, Y, rows[inner], resolve_device(self.device), self.normalize)
        st_val = _stats(X, Y, rows[val], resolve_device(self.device), self.normalize)
        mx, my, xx, xy, _ = st_in.centered()
        scale = np.trace(xx) / X.shape[1] or 1.0
        alphas = [float(a) for a in np.logspace(-6, 2, 9)] if self.alphas is None else list(self.alphas)
        # One eigendecomposition XcᵀXc = V diag(λ) Vᵀ serves every penalty: W(α) = V diag(inv) Q, inv = 1/(λ+α),
        # Q = VᵀXcᵀYc. The validation R² needs only the *total* SSE over target dims, so after five d×d GEMMs (all in
        # float32: the search only ranks) each candidate costs O(d²): tr(WᵀXᵥᵀYᵥ) = inv·rowsum(Q∘H), tr(WᵀXᵥᵀXᵥW) =
        # invᵀ(M∘QQᵀ)inv, b(α) = my − Qᵀ(inv∘Vᵀmx), with H = VᵀXᵥᵀYᵥ and M = VᵀXᵥᵀXᵥV.
        from scipy.linalg import eigh
        lam, V = eigh(xx.astype(np.float32), driver="evd", check_finite=False)  # float32 LAPACK: 2x float64's speed
        lam, Vt = lam.astype(np.float64), V.T
        Q, H = Vt @ xy.astype(np.float32), Vt @ st_val.xy.astype(np.float32)  # VᵀXcᵀYc, VᵀXᵥᵀYᵥ
        M = Vt @ st_val.xx.astype(np.float32) @ Vt.T  # VᵀXᵥᵀXᵥV
        P = (M * (Q @ Q.T)).astype(np.float64)
        qh = np.einsum("ij,ij->i", Q, H, dtype=np.float64)
        Q64, sxV, mxV = Q.astype(np.float64), st_val.sx @ V, mx @ V
        sst = np.sum(st_val.yy - st_val.sy ** 2 / st_val.n)
        tol = max(lam.max(), 0) * len(lam) * np.finfo(np.float32).eps
        self.search_r2_ = {}
        for a in alphas:
            d = np.maximum(lam, 0) + a * scale  # directions with d ≈ 0 (α = 0, rank-deficient X) dropped: pseudo-inverse
            inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > tol)
            b = my - Q64.T @ (inv * mxV)
            sse = (st_val.yy.sum() - 2 * inv @ qh + inv @ P @ inv
                   - 2 * b @ st_val.sy + 2 * b @ (Q64.T @ (inv * sxV)) + st_val.n * b @ b)
            self.search_r2_[a] = float(1 - sse / sst)
        best = max(alphas, key=lambda a: self.search_r2_[a])  # the first of equals, as before
        st_in += st_val  # refit on all training rows with the chosen penalty
        self.alpha_ = best * scale
        W, b = self._ridge_solve(st_in, self.alpha_)
        self.W_, self.b_ = W.T.astype(np.float32), b.astype(np.float32)

    @staticmethod
    def _ridge_solve(st: Stats, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """The ridge solution in float64 by Cholesky (XcᵀXc + αI is symmetric positive definite for α > 0)."""
        from scipy.linalg import LinAlgError, cho_factor, cho_solve
        mx, my, xx, xy, _ = st.centered()
        A = xx + alpha * np.eye(len(xx))
        try:
            W = cho_solve(cho_factor(A, check_finite=False), xy, check_finite=False)
        except LinAlgError:  # singular (alpha 0 on rank-deficient features): the least-squares solution
            W = np.linalg.lstsq(A, xy, rcond=None)[0]
        return W, my - mx @ W

    def _fit_procrustes(self, X, Y, rows: np.ndarray) -> None:
        st = _stats(X, Y, rows, resolve_device(self.device), self.normalize)
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
        x, y = (np.array(A[rows], np.float32) for A in (X, Y))
        if self.normalize:
            unit_rows(x), unit_rows(y)
        x, y = torch.from_numpy(x), torch.from_numpy(y)
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
        return affine(X, self.W_, self.b_, self.normalize)

    def score(self, X, Y) -> float:
        """Variance-weighted R² of the map on (X, Y) (Y's rows at unit length if the map was fitted so)."""
        return self._evaluate(X, Y, np.arange(len(X)))["r2"]

    def _evaluate(self, X, Y, rows: np.ndarray) -> dict:
        """Variance-weighted R² and mean cosine of the map on `rows`, from its predictions in one chunked pass
        (n·d_s·d_t work instead of the n·d_s² of these rows' statistics)."""
        sse, sy, syy, cos = 0.0, 0.0, 0.0, 0.0
        for i in range(0, len(rows), CHUNK):
            r = rows[i:i + CHUNK]
            p, y = self.transform(X[r]), np.array(Y[r], np.float32)
            if self.normalize:
                unit_rows(y)
            yy = np.einsum("ij,ij->i", y, y)  # row-wise products: no [rows, d] temporaries besides p
            cos += float((np.einsum("ij,ij->i", p, y) / (np.sqrt(np.einsum("ij,ij->i", p, p) * yy) + 1e-12)).sum())
            p -= y
            sse += np.einsum("ij,ij->i", p, p).sum(dtype=np.float64)
            sy, syy = sy + y.sum(0, dtype=np.float64), syy + yy.sum(dtype=np.float64)
        return {"r2": r2(sse, sy, syy, len(rows)), "cosine": cos / len(rows)}

    def save(self, path: Path, meta: dict) -> Path:
        """W, b and metadata (source/target ids, layer, preprocessing, method, held-out metrics, data fingerprint)."""
        full = dict(meta, method=self.method, normalize=bool(self.normalize), metrics=getattr(self, "metrics_", {}),
                    alpha=getattr(self, "alpha_", None), d_source=int(self.W_.shape[1]), d_target=int(self.W_.shape[0]))
        try:
            return LinearMap(self.W_, self.b_, full).save(path)
        except OSError as exc:
            raise ConceptlensError(f"cannot write {path}: {exc.strerror}") from None

    def to_model(self, source: Encoder, target: Encoder) -> AlignedModel:
        """The fitted map as a model: `source` seen through it, with `target`'s text tower (no file needed)."""
        meta = {"source": source.name, "layer": source.layer, "target": target.name, "path": "in-memory",
                "normalize": bool(self.normalize),
                "sha": digest([self.W_.tobytes().hex()[:4096], self.W_.shape, float(self.b_.sum()), self.normalize])}
        return AlignedModel(source, LinearMap(self.W_, self.b_, meta), target)

    @classmethod
    def load(cls, path: Path) -> "Aligner":
        lm = LinearMap.load(path)
        a = cls(lm.meta.get("method", "ridge"), normalize=lm.normalize)
        a.W_, a.b_, a.meta_, a.metrics_ = lm.W, lm.b, lm.meta, lm.meta.get("metrics", {})
        return a


def _paired(src: Encoder, tgt: Encoder, ds: ImageDataset, embed_kw: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both models' features of `ds` (cached) and its labels, on the rows both could read."""
    fs, ft = embed(src, ds, **embed_kw), embed(tgt, ds, **embed_kw)
    if fs.keys == ft.keys:
        return fs.X, ft.X, fs.labels
    common = sorted(set(fs.keys) & set(ft.keys))  # an image unreadable by one model's preprocessing
    pos_s, pos_t = {k: i for i, k in enumerate(fs.keys)}, {k: i for i, k in enumerate(ft.keys)}
    rows_s = [pos_s[k] for k in common]
    return fs.X[rows_s], ft.X[[pos_t[k] for k in common]], fs.labels[rows_s]


def fit(source: Encoder | str, target: Encoder | str, data, method: str = "ridge", holdout: float = 0.2,
        seed: int = 0, also: Sequence = (), normalize: bool = True, **embed_kw) -> tuple[Aligner, dict]:
    """Embed `data` (and the label-free sets in `also`, e.g. "openmoji:black" / "openmoji:color": drawings teach
    the map the photo -> drawing direction photos alone never show) with both models (cached), fit an Aligner;
    returns it and its metadata (with zero-shot top-1 agreement on `data`'s held-out rows when the target is a
    vision-language model and `data` has class names)."""
    src = load_model(source) if isinstance(source, str) else source
    tgt = load_model(target) if isinstance(target, str) else target
    sets = [d if isinstance(d, ImageDataset) else load_dataset(d) for d in (data, *also)]
    parts = [_paired(src, tgt, d, embed_kw) for d in sets]
    Xs, Xt, _ = (np.concatenate(c) if len(c) > 1 else c[0] for c in zip(*parts))  # one set: its memmap, no copy
    ds, labels = sets[0], parts[0][2]
    n_main = len(labels)
    al = Aligner(method, holdout=holdout, seed=seed, device=str(embed_kw.get("device") or "cpu"),
                 normalize=normalize).fit(Xs, Xt)
    ho = al.heldout_rows_[al.heldout_rows_ < n_main]  # held-out rows of `data` itself
    if tgt.has_text and ds.classnames and (labels >= 0).all() and len(ho):
        clf = zeroshot.build_classifier(tgt, ds.classnames, zeroshot.openai_templates())
        own = zeroshot.logits(torch.from_numpy(np.asarray(Xt[ho], np.float32)), clf)
        mapped = zeroshot.logits(torch.from_numpy(al.transform(Xs[ho])), clf)
        al.metrics_.update({"zeroshot_top1_agreement": float((own.argmax(1) == mapped.argmax(1)).float().mean()),
                            "target_zeroshot_acc1": float((own.argmax(1).numpy() == labels[ho]).mean()),
                            "aligned_zeroshot_acc1": float((mapped.argmax(1).numpy() == labels[ho]).mean())})
    meta = {"source": src.name, "target": tgt.name, "layer": src.layer, "source_preprocess": src.preprocess_id(),
            "source_fingerprint": src.image_fingerprint, "target_fingerprint": tgt.fingerprint,
            "data": ds.root or ds.name, "data_fingerprint": digest([d.identity for d in sets]) if also else ds.identity,
            "n_images": int(len(Xs))}
    if also:
        meta["also"] = [d.root or d.name for d in sets[1:]]
    return al, meta
