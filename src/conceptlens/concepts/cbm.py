"""Label-free concept bottleneck models over concept activations (Text-to-Concept §4; Oikarinen et al. 2023)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ..data import ImageDataset
from ..errors import ConceptlensError
from ..eval.probe import LinearProbe
from ..features import embed
from ..models import Encoder, MappedEncoder
from .vocab import activations, concept_matrix


class ConceptBottleneck(ClassifierMixin, BaseEstimator):
    """Label-free CBM: standardised concept activations -> sparse (L1) multinomial logistic regression.

    The L1 strength is the largest C whose model keeps at most `max_concepts` non-zero weights per class
    (searched on `Cs`, default logspace(-3, 1, 9), chosen by accuracy on a held-out fifth of the training data).
    """

    def __init__(self, max_concepts: int = 30, Cs: Sequence[float] | None = None, seed: int = 0):
        self.max_concepts, self.Cs, self.seed = max_concepts, Cs, seed

    def fit(self, A: np.ndarray, y: np.ndarray) -> "ConceptBottleneck":
        """A [n, concepts] activations, y [n] labels."""
        A, y = np.asarray(A), np.asarray(y)
        if A.ndim != 2 or len(A) != len(y) or len(A) < 5:
            raise ConceptlensError(f"a concept bottleneck needs [n >= 5, concepts] activations and n labels "
                                   f"(got {A.shape}, {y.shape})")
        if self.max_concepts < 1:
            raise ConceptlensError("max_concepts must be positive")
        Cs = [float(c) for c in (np.logspace(-3, 1, 9) if self.Cs is None else self.Cs)]
        self.scaler_ = StandardScaler().fit(A)
        Z = self.scaler_.transform(A)
        perm = np.random.default_rng(self.seed).permutation(len(Z))
        cut = int(0.8 * len(Z))
        tr, va = perm[:cut], perm[cut:]
        best = None
        # one regularisation path, each fit warm-started from the previous (stronger-penalty) solution, as
        # glmnet does: SAGA then needs a fraction of the iterations (cbm on 500 Imagenette images: 37 s -> see
        # benchmarks/results/cli_timings.json)
        clf = LogisticRegression(l1_ratio=1.0, C=Cs[0], solver="saga", max_iter=300, tol=1e-3,
                                 random_state=self.seed, warm_start=True)
        for C in sorted(Cs):
            clf.set_params(C=C).fit(Z[tr], y[tr])
            nz = int((clf.coef_ != 0).sum(1).max())
            if nz > self.max_concepts:
                break
            acc = float((clf.predict(Z[va]) == y[va]).mean())
            if best is None or acc >= best[0]:
                best = (acc, C, clf.coef_.copy(), clf.intercept_.copy())
        if best is None:
            raise ConceptlensError(f"even the strongest L1 penalty keeps more than {self.max_concepts} concepts a class")
        self.C_ = best[1]
        final = LogisticRegression(l1_ratio=1.0, C=self.C_, solver="saga", max_iter=1000, tol=1e-4,
                                   random_state=self.seed, warm_start=True)
        final.coef_, final.intercept_ = best[2], best[3]  # start from the chosen path point
        self.clf_ = final.fit(Z, y)
        self.classes_ = self.clf_.classes_
        return self

    def decision_function(self, A: np.ndarray) -> np.ndarray:
        return self.clf_.decision_function(self.scaler_.transform(A))

    def predict(self, A: np.ndarray) -> np.ndarray:
        return self.clf_.predict(self.scaler_.transform(A))

    @property
    def coef_(self) -> np.ndarray:
        """[classes, concepts] weights (scikit-learn stores one row for two classes: class 1's, class 0 = −it)."""
        w = self.clf_.coef_
        return np.vstack([-w, w]) if w.shape[0] == 1 else w

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
