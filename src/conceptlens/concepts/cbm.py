"""Label-free concept bottleneck models over concept activations (Text-to-Concept §4; Oikarinen et al. 2023)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data import ImageDataset
from ..errors import ConceptlensError
from ..estimator import BaseEstimator, ClassifierMixin
from ..eval.probe import LinearProbe
from ..features import embed
from ..models import Encoder, MappedEncoder
from .prox import fista
from .vocab import activations, concept_matrix


def _cross_entropy(logits: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean multinomial cross-entropy against one-hot Y (log-sum-exp stabilised) and the softmax, from one exp."""
    m = logits.max(1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(1, keepdims=True)
    return float(np.mean(np.log(s) + m - (logits * Y).sum(1, keepdims=True), dtype=np.float64)), e / s


def l1_logistic(Z: np.ndarray, Y: np.ndarray, lam: float, W: np.ndarray | None = None, b: np.ndarray | None = None,
                tol: float = 1e-5, max_iter: int = 5000, L: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise mean multinomial cross-entropy + lam * ||W||_1 (intercept unpenalised) by FISTA with backtracking and
    gradient restart (`prox.fista`). scikit-learn's objective at C is lam = 1 / (C n).
    Z [n, p] inputs, Y [n, K] one-hot; W [p, K], b [K] warm start; L the loss's Lipschitz constant if known.
    Stops when no weight moves by more than tol (relative to the largest) nor by more than lam / 10 per unit step:
    under weak penalties a warm start otherwise stops while far off (CIFAR-10: after one step, with hundreds of
    barely non-zero weights). Returns (W, b, iterations).
    Own solver: full-batch proximal gradient over a dense [n, concepts] matrix is two GEMMs per step, ~20x faster
    than scikit-learn's per-sample SAGA on these problems at the same objective (tests/test_concepts.py parity).
    """
    n, p = Z.shape
    Y = Y.astype(Z.dtype, copy=False)  # all in Z's precision: float32 halves each step's memory-bound GEMMs
    W = np.zeros((p, Y.shape[1]), Z.dtype) if W is None else np.array(W, dtype=Z.dtype)
    b = np.zeros(Y.shape[1], Z.dtype) if b is None else np.array(b, dtype=Z.dtype)

    last: list = [None, 0.0]  # fista asks for the value where it just took the gradient: computed there, once

    def grad(v):
        last[0], (last[1], P) = v, _cross_entropy(Z @ v[0] + v[1], Y)
        R = (P - Y) / n
        return [Z.T @ R, R.sum(0)]

    def value(v) -> float:
        return last[1] if v is last[0] else _cross_entropy(Z @ v[0] + v[1], Y)[0]

    def prox(v, step):  # soft-threshold the weights; the intercept is free
        return [np.sign(v[0]) * np.maximum(np.abs(v[0]) - step * lam, 0.0), v[1]]

    (W, b), it = fista(grad, prox, [W, b], 1.0 / (lipschitz(Z) if L is None else L), tol, max_iter, value,
                       gtol=0.1 * lam)
    return W, b, it


def relaxed_logistic(Z: np.ndarray, Y: np.ndarray, mask: np.ndarray, W: np.ndarray, b: np.ndarray, l2: float,
                     max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Mean multinomial cross-entropy + l2/2 ||W||² over the weights in `mask` only (the others stay zero), from
    (W, b), by L-BFGS (`lbfgs`): a support of a few hundred weights is a small smooth problem, where FISTA's
    first-order steps converge slowly without the L1 term."""
    rows = np.flatnonzero(mask.any(1))  # concepts used by some class
    Zs, M = Z[:, rows], mask[rows]
    n = len(Z)

    def unpack(x):
        Ws = np.zeros(M.shape)
        Ws[M] = x[:M.sum()]
        return Ws, x[M.sum():]

    def f(x):
        Ws, bb = unpack(x)
        loss, P = _cross_entropy(Zs @ Ws + bb, Y)
        loss += 0.5 * l2 * (Ws ** 2).sum()
        R = (P - Y) / n
        return loss, np.concatenate([(Zs.T @ R + l2 * Ws)[M], R.sum(0)])

    x0 = np.concatenate([W[rows][M], b])
    x = lbfgs(f, x0, max_iter)
    Ws, bb = unpack(x)
    out = np.zeros_like(W)
    out[rows] = Ws
    return out, bb


def lbfgs(f, x: np.ndarray, max_iter: int, m: int = 10, gtol: float = 1e-5, ftol: float = 2.2e-9) -> np.ndarray:
    """Minimise a smooth f (returning value and gradient) by L-BFGS (Nocedal & Wright Alg. 7.4, two-loop recursion)
    with an Armijo backtracking line search; scipy's L-BFGS-B criteria (projected gradient max <= gtol, relative
    decrease <= ftol). Own code: scipy.optimize's import alone is ~0.5 s of every `cbm` call."""
    fx, g = f(x)
    S: list = []
    Yk: list = []
    for _ in range(max_iter):
        if np.abs(g).max() <= gtol:
            break
        q, alpha = g.copy(), []
        for s, y in zip(reversed(S), reversed(Yk)):
            a = (s @ q) / (y @ s)
            alpha.append(a)
            q -= a * y
        if S:
            q *= (S[-1] @ Yk[-1]) / (Yk[-1] @ Yk[-1])
        for (s, y), a in zip(zip(S, Yk), reversed(alpha)):
            q += s * (a - (y @ q) / (y @ s))
        d = -q
        if g @ d >= 0:  # not a descent direction: restart from the gradient
            d, S, Yk = -g, [], []
        t = 1.0 if S else min(1.0, 1.0 / max(np.abs(g).max(), 1e-12))
        while True:
            fn, gn = f(x + t * d)
            if fn <= fx + 1e-4 * t * (g @ d) or t < 1e-12:
                break
            t /= 2
        s, y = t * d, gn - g
        x, done = x + s, (fx - fn) <= ftol * max(abs(fx), abs(fn), 1.0)
        fx, g = fn, gn
        if y @ s > 1e-12:
            S.append(s)
            Yk.append(y)
            if len(S) > m:
                S.pop(0)
                Yk.pop(0)
        if done:
            break
    return x


def standardizer(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard deviations (constant columns scaled by 1), as scikit-learn's StandardScaler."""
    mean, std = A.mean(0), A.std(0)
    return mean, np.where(std < 10 * np.finfo(std.dtype).eps, 1.0, std)


def lipschitz(Z: np.ndarray) -> float:
    """Lipschitz constant of the mean softmax loss's gradient: the logit Hessian is <= I/2, so
    L <= ||[Z 1]||_2^2 / (2n)."""
    return 0.5 * (np.linalg.norm(Z, 2) ** 2 + len(Z)) / len(Z)


def top_per_class(W: np.ndarray, k: int) -> np.ndarray:
    """Mask of each class's (column's) `k` largest |weights| among its non-zero ones: the concepts kept when an L1
    solution beyond the budget is thresholded to it (ties broken by concept order)."""
    M = np.zeros(W.shape, bool)
    np.put_along_axis(M, np.argsort(-np.abs(W), axis=0, kind="stable")[:k], True, axis=0)
    return M & (W != 0)


class ConceptBottleneck(ClassifierMixin, BaseEstimator):
    """Label-free CBM: standardised concept activations -> sparse multinomial logistic regression with at most
    `max_concepts` non-zero weights per class.

    The concepts come from an L1 regularisation path (scikit-learn's scale: loss summed over samples + ||W||_1 / C),
    each fit warm-started from the previous, stronger-penalty one, as glmnet and LF-CBM's GLM-SAGA do. Where an L1
    solution keeps more than the budget, each class keeps its `max_concepts` largest weights (the thresholded lasso,
    Zhou 2009), and with `relax` the kept concepts are refitted without the L1 shrinkage (the relaxed lasso,
    Meinshausen 2007: an L2 logistic regression, ridge `l2`, on that support). C is chosen by accuracy on a held-out
    fifth of the training data: on `Cs` (default logspace(-3, 1, 9)), walked until the held-out accuracy falls once
    the L1 solution is over the budget, then `refine` log-bisection steps either side of the best; `relaxed_` says
    whether the refit beat the thresholded L1 weights there. The final fit on all the training data repeats the
    chosen C's steps, so the budget holds by construction.
    """

    def __init__(self, max_concepts: int = 30, Cs: Sequence[float] | None = None, seed: int = 0, tol: float = 1e-5,
                 refine: int = 1, relax: bool = True, l2: float = 1e-3):
        self.max_concepts, self.Cs, self.seed, self.tol = max_concepts, Cs, seed, tol
        self.refine, self.relax, self.l2 = refine, relax, l2

    def fit(self, A: np.ndarray, y: np.ndarray) -> "ConceptBottleneck":
        """A [n, concepts] activations, y [n] labels."""
        A, y = np.asarray(A, dtype=np.float64), np.asarray(y)
        if A.ndim != 2 or len(A) != len(y) or len(A) < 5:
            raise ConceptlensError(f"a concept bottleneck needs [n >= 5, concepts] activations and n labels "
                                   f"(got {A.shape}, {y.shape})")
        if self.max_concepts < 1:
            raise ConceptlensError("max_concepts must be positive")
        Cs = sorted(float(c) for c in (np.logspace(-3, 1, 9) if self.Cs is None else self.Cs))
        self.classes_, yi = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ConceptlensError("a concept bottleneck needs at least two classes")
        self.mean_, self.scale_ = standardizer(A)
        Z = (A - self.mean_) / self.scale_
        Y = np.eye(len(self.classes_))[yi]
        perm = np.random.default_rng(self.seed).permutation(len(Z))
        cut = int(0.8 * len(Z))
        tr, va = perm[:cut], perm[cut:]
        Ztr, Ytr, L = Z[tr], Y[tr], lipschitz(Z[tr])  # indexed once: every path point reads them
        Zva, yva = Z[va], yi[va]
        Z32 = Z.astype(np.float32)  # L1 fits in float32 (half the time a step; the relaxed refit is float64)
        Ztr32 = Z32[tr]
        path: dict[float, tuple] = {}  # C -> (held-out accuracy, relaxed?, L1 weights, intercept)

        def held(W, b) -> float:
            return float(((Zva @ W + b).argmax(1) == yva).mean())

        def point(C: float, W, b) -> None:
            W, b, _ = self._l1(Ztr32, Ytr, C, W, b, L)
            M = top_per_class(W, self.max_concepts)
            Wt = np.where(M, W, 0)
            acc, relaxed = held(Wt, b), False
            if self.relax:  # the refit is kept where it scores better than the thresholded L1 weights
                acc_r = held(*relaxed_logistic(Ztr, Ytr, M, Wt, b, self.l2))
                relaxed, acc = acc_r > acc, max(acc, acc_r)
            path[C] = (acc, relaxed, W, b)

        def best() -> float:  # the first (strongest-penalty) of equals
            return max(sorted(path), key=lambda c: path[c][0])

        W = b = None
        for C in Cs:
            point(C, W, b)
            W, b = path[C][2:]
            if best() != C and int((W != 0).sum(0).max()) > self.max_concepts:
                break  # over the budget and no longer gaining
        for _ in range(self.refine):
            grid, c = sorted(path), best()
            i = grid.index(c)
            for other in grid[max(i - 1, 0):i] + grid[i + 1:i + 2]:
                mid = float(np.sqrt(c * other))
                point(mid, *path[min(path, key=lambda k: abs(np.log(k / mid)))][2:])
        self.C_ = best()
        _, self.relaxed_, W, b = path[self.C_]
        W, b, self.n_iter_ = self._l1(Z32, Y, self.C_, W, b, lipschitz(Z), final=True)
        M = top_per_class(W, self.max_concepts)
        W = np.where(M, W, 0)
        if self.relaxed_:
            W, b = relaxed_logistic(Z, Y, M, W, b, self.l2)
        self.coef_, self.intercept_ = W.T.copy(), b  # [classes, concepts], as scikit-learn's multinomial models
        return self

    def _l1(self, Z: np.ndarray, Y: np.ndarray, C: float, W, b, L: float, final: bool = False):
        """The L1 fit at C, (W, b, iterations); path points stop at a 10x looser `tol` (they only rank penalties)."""
        return l1_logistic(Z, Y, 1.0 / (C * len(Z)), W, b, tol=self.tol if final else 10 * self.tol, L=L)

    def decision_function(self, A: np.ndarray) -> np.ndarray:
        return (np.asarray(A, dtype=np.float64) - self.mean_) / self.scale_ @ self.coef_.T + self.intercept_

    def predict(self, A: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(A).argmax(1)]

    def nonzero_per_class(self) -> list[int]:
        return (self.coef_ != 0).sum(1).tolist()

    def top_concepts(self, concepts: Sequence[str], classnames: Sequence[str], n: int = 8
                     ) -> dict[str, list[tuple[str, float]]]:
        """Per class, its `n` largest positive concept weights, named."""
        out = {}
        for ci, c in enumerate(classnames):
            w = self.coef_[ci]
            idx = [i for i in np.argsort(-w) if w[i] > 0][:n]
            out[c] = [(concepts[i], float(w[i])) for i in idx]
        return out


def run_cbm(model: Encoder, train: ImageDataset, test: ImageDataset, concepts: Sequence[str],
            max_concepts: int = 30, **embed_kw) -> dict:
    """Fit the CBM on train, score test, and compare with a linear probe on the model's raw features
    (an aligned model's own, unaligned ones). JSON-able result."""
    tr, te = embed(model, train, **embed_kw), embed(model, test, **embed_kw)
    if not tr.labelled_ok or not te.labelled_ok:
        raise ConceptlensError("a concept bottleneck needs labelled train and test data")
    if tr.classnames != te.classnames:
        raise ConceptlensError("train and test data have different class names")
    C = concept_matrix(model, concepts)
    cbm = ConceptBottleneck(max_concepts=max_concepts).fit(activations(tr.X, C), tr.labels)
    acc = cbm.score(activations(te.X, C), te.labels)
    raw_tr, raw_te = (embed(model.base, train, **embed_kw), embed(model.base, test, **embed_kw)) \
        if isinstance(model, MappedEncoder) else (tr, te)
    probe_acc = LinearProbe().fit(np.asarray(raw_tr.X), raw_tr.labels).score(np.asarray(raw_te.X), raw_te.labels)
    names = tr.classnames
    return {"model": model.name, "train": tr.dataset, "test": te.dataset, "n_train": len(tr.labels),
            "n_test": len(te.labels), "n_concepts": len(concepts), "cbm_acc1": acc, "linear_probe_acc1": probe_acc,
            "C": cbm.C_, "nonzero_per_class": dict(zip(names, cbm.nonzero_per_class())),
            "top_concepts": {c: [{"concept": w, "weight": v} for w, v in ws]
                             for c, ws in cbm.top_concepts(list(concepts), names).items()}}
