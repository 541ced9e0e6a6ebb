"""Sparse non-negative concept decompositions (SpLiCE: Bhalla et al., NeurIPS 2024): an embedding written as a
non-negative sparse mix of concept-word embeddings, with the reconstruction cosine reported.

Recipe of AI4LIFE-GROUP/SpLiCE (splice/splice.py, splice/model.py): concept embeddings are normalised, centred
on their mean and normalised again (the dictionary D); an image embedding is normalised, centred on the image
mean (the modality gap: SpLiCE's is MSCOCO's; here that of a reference set, by default the data itself) and
normalised (z); the weights minimise ||z - wD||^2 + l1_penalty * ||w||_1 with w >= 0 (the objective scikit-learn's
Lasso(alpha = l1_penalty / (2 d), positive=True) solves, which SpLiCE uses); the reconstruction is
normalise(normalise(wD) + image mean). `n_concepts` instead bisects each row's penalty to at most that many
concepts. Directions (probe / CBM / PCA vectors) are decomposed without the image mean.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data import ImageDataset
from ..errors import ConceptlensError
from ..estimator import BaseEstimator, TransformerMixin
from ..models import Encoder
from ..features import embed
from .decode import query_vectors
from .prox import fista
from .vocab import concept_matrix


def _unit(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), 1e-12)


def nonneg_lasso(D: np.ndarray, Z: np.ndarray, lam: np.ndarray | float, W: np.ndarray | None = None,
                 tol: float = 1e-4, max_iter: int = 3000) -> tuple[np.ndarray, int]:
    """Rows of W >= 0 minimising ||z - w D||^2 + lam ||w||_1 for every row z of Z at once (lam: one value or one
    per row, [n, 1]). D [K, d], Z [n, d], in Z's dtype (float32: twice float64's GEMM speed). Returns (W [n, K],
    iterations). The gradient 2 (W G - Z Dᵀ) uses the Gram matrix G = D Dᵀ and, while the iterates are sparse (a
    few dozen concepts of thousands), a sparse product: measured 2-8x faster than (W D - Z) Dᵀ per solve here."""
    from scipy import sparse
    from scipy.sparse.linalg import eigsh
    W = np.zeros((len(Z), len(D)), Z.dtype) if W is None else np.array(W, dtype=Z.dtype)
    lam = np.asarray(lam, dtype=Z.dtype)
    G, B = D @ D.T, Z @ D.T

    def grad(v):
        V = v[0]
        WG = sparse.csr_matrix(V) @ G if np.count_nonzero(V) < 0.05 * V.size else V @ G
        return [2 * (np.asarray(WG, Z.dtype) - B)]

    def prox(v, step):
        return [np.maximum(v[0] - Z.dtype.type(step) * lam, 0)]

    L = 2.0 * 1.01 * float(eigsh(G.astype(np.float64), k=1, which="LA", return_eigenvectors=False)[0])  # Lanczos, 1% margin
    (W,), it = fista(grad, prox, [W], 1.0 / L, tol, max_iter)
    return W, it


class ConceptDecomposer(TransformerMixin, BaseEstimator):
    """SpLiCE decomposition over a concept dictionary [K, d] (text embeddings of the concepts).

    fit(X): the image mean of reference embeddings X (rows normalised, then averaged; `center=False`: none, for
    directions). transform(X) -> non-negative weights [n, K]; inverse_transform(W) -> reconstructed unit
    embeddings; score(X) -> mean reconstruction cosine. `n_concepts` (optional) caps the concepts per row by
    bisecting its penalty (the largest mix with at most that many), else `l1_penalty` for every row. `dtype`: the
    solver's arithmetic (float32 by default, float64 to match a float64 reference to tight tolerances).
    """

    def __init__(self, dictionary, l1_penalty: float = 0.25, n_concepts: int | None = None, center: bool = True,
                 tol: float = 1e-4, max_iter: int = 3000, dtype: str = "float32"):
        self.dictionary, self.l1_penalty, self.n_concepts = dictionary, l1_penalty, n_concepts
        self.center, self.tol, self.max_iter, self.dtype = center, tol, max_iter, dtype

    def fit(self, X, y=None) -> "ConceptDecomposer":
        D = np.asarray(self.dictionary, dtype=np.float64)
        if D.ndim != 2 or len(D) < 2:
            raise ConceptlensError(f"the concept vocabulary needs at least two concepts (got a dictionary of shape "
                                   f"{D.shape})")
        if not np.isfinite(D).all():
            raise ConceptlensError("the concept embeddings contain NaN or inf")
        if self.l1_penalty < 0 or (self.n_concepts is not None and self.n_concepts < 1):
            raise ConceptlensError("l1_penalty must be >= 0 and n_concepts positive")
        if self.dtype not in ("float32", "float64"):
            raise ConceptlensError(f"dtype is float32 or float64, not {self.dtype!r}")
        U = _unit(D)
        self.dictionary_ = _unit(U - U.mean(0)).astype(self.dtype)
        self.n_features_in_ = D.shape[1]
        X = self._check(X)
        self.image_mean_ = _unit(X).mean(0) if self.center else np.zeros(D.shape[1])
        return self

    def _check(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        X = X[None] if X.ndim == 1 else X
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ConceptlensError(f"embeddings of shape {tuple(X.shape)}: the concept dictionary has "
                                   f"{self.n_features_in_} dims")
        if not np.isfinite(X).all():
            raise ConceptlensError("the embeddings contain NaN or inf")
        return X

    def _targets(self, X) -> np.ndarray:
        return _unit(_unit(self._check(X)) - self.image_mean_).astype(self.dtype)

    def transform(self, X) -> np.ndarray:
        Z, D = self._targets(X), self.dictionary_
        if self.n_concepts is None:
            return nonneg_lasso(D, Z, self.l1_penalty, tol=self.tol, max_iter=self.max_iter)[0]
        # per-row bisection on log(penalty): above 2 max_k <z, d_k> every weight is zero
        hi = np.maximum(2.0 * (Z @ D.T).max(1, keepdims=True), 1e-12)
        lo = hi * 1e-4
        best = np.zeros((len(Z), len(D)), Z.dtype)
        W = None
        for _ in range(16):
            mid = np.sqrt(lo * hi)
            W, _ = nonneg_lasso(D, Z, mid, W, tol=self.tol, max_iter=self.max_iter)
            ok = ((W > 0).sum(1, keepdims=True) <= self.n_concepts)
            best = np.where(ok, W, best)
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
        return best

    def inverse_transform(self, W) -> np.ndarray:
        return _unit(_unit(np.asarray(W, dtype=np.float64) @ self.dictionary_.astype(np.float64)) + self.image_mean_)

    def cosines(self, X, W) -> np.ndarray:
        """Cosine of each embedding with its reconstruction from weights W."""
        return (_unit(self._check(X)) * self.inverse_transform(W)).sum(1)

    def score(self, X, y=None) -> float:
        return float(self.cosines(X, self.transform(X)).mean())


def decompose(model: Encoder, concepts: Sequence[str], vectors: np.ndarray | None = None,
              data: ImageDataset | None = None, per_image: bool = True, direction: bool = False,
              reference: ImageDataset | None = None, l1_penalty: float = 0.25, n_concepts: int | None = None,
              top: int = 10, **embed_kw) -> dict:
    """SpLiCE decompositions of `model`-space vectors (image features of `data`, each or per class, or given
    vectors; through the map for an aligned model) over `concepts`. The image mean comes from `reference`, else
    from `data` (given vectors: from `reference`, or none when `direction`). JSON-able result."""
    if not concepts:
        raise ConceptlensError("the concept vocabulary is empty")
    V, names = query_vectors(model, vectors, data, per_image, direction, **embed_kw)
    if reference is not None:
        R = np.asarray(embed(model, reference, **embed_kw).X, np.float32)
    elif data is not None and not direction:
        R = V if per_image else query_vectors(model, None, data, True, False, **embed_kw)[0]
    elif direction:
        R = V
    else:
        raise ConceptlensError("given vectors need --reference data for the image mean (or --direction)")
    dec = ConceptDecomposer(concept_matrix(model, concepts).numpy(), l1_penalty=l1_penalty, n_concepts=n_concepts,
                            center=not direction).fit(R)
    W = dec.transform(V)
    cos = dec.cosines(V, W)
    nnz = (W > 0).sum(1)
    out = []
    for name, w, c, k in zip(names, W, cos, nnz):
        idx = [i for i in np.argsort(-w) if w[i] > 0][:top]
        out.append({"name": name, "n_concepts": int(k), "cosine": float(c),
                    "concepts": [{"concept": concepts[i], "weight": float(w[i])} for i in idx]})
    return {"model": model.name, "n_vocabulary": len(concepts), "l1_penalty": None if n_concepts else l1_penalty,
            "n_concepts_cap": n_concepts, "centred": not direction, "mean_concepts": float(nnz.mean()),
            "mean_cosine": float(cos.mean()), "decomposed": out}
