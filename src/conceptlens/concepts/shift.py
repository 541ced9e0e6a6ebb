"""Distribution-shift diagnosis in words (Text-to-Concept §4): which concepts' activations move from A to B."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import special

from ..data import ImageDataset
from ..errors import ConceptlensError
from ..features import Features, as_features
from ..models import Encoder
from .vocab import activations, concept_matrix


def welch_t(A_b: np.ndarray, A_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Welch's t (b − a) and its two-sided p per column, as scipy.stats.ttest_ind(equal_var=False) computes them
    (written here on scipy.special: importing scipy.stats costs ~1.4 s of every `diagnose` call)."""
    va, vb = A_a.var(0, ddof=1) / len(A_a), A_b.var(0, ddof=1) / len(A_b)
    se2 = va + vb
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (A_b.mean(0) - A_a.mean(0)) / np.sqrt(se2)
        df = se2 ** 2 / (va ** 2 / (len(A_a) - 1) + vb ** 2 / (len(A_b) - 1))
    return t, 2 * special.stdtr(df, -np.abs(t))


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (scipy.stats.false_discovery_control(method="bh"))."""
    order = np.argsort(p)
    q = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    out = np.empty_like(q)
    out[order] = np.clip(q, 0, 1)
    return out


def diagnose(A_a: np.ndarray, A_b: np.ndarray, concepts: Sequence[str]) -> list[dict]:
    """Per concept: mean difference (b − a), Welch's t, Cohen's d, Benjamini–Hochberg q; ranked by |d|."""
    if len(A_a) < 2 or len(A_b) < 2:
        raise ConceptlensError("shift diagnosis needs at least 2 images on each side")
    t, p = welch_t(A_b, A_a)
    pooled = np.sqrt((A_a.var(0, ddof=1) * (len(A_a) - 1) + A_b.var(0, ddof=1) * (len(A_b) - 1))
                     / (len(A_a) + len(A_b) - 2))
    diff = A_b.mean(0) - A_a.mean(0)
    d = diff / np.maximum(pooled, 1e-12)
    q = bh_qvalues(np.nan_to_num(p, nan=1.0))
    rows = [{"concept": c, "mean_a": float(A_a[:, i].mean()), "mean_b": float(A_b[:, i].mean()),
             "diff": float(diff[i]), "t": float(t[i]), "cohens_d": float(d[i]), "p": float(p[i]), "q": float(q[i])}
            for i, c in enumerate(concepts)]
    return sorted(rows, key=lambda r: -abs(r["cohens_d"]))


def run_diagnose(model: Encoder, data_a: ImageDataset | Features, data_b: ImageDataset | Features, concepts: Sequence[str],
                 examples: int = 5, per_side: int = 6, scores: str = "cosine", l1_penalty: float = 0.25,
                 **embed_kw) -> dict:
    """Rank concepts by how much they shift from A to B; with the most activating images of each side
    for the top `examples` concepts (keys, for reports). `scores`: each image's cosine with each concept
    (Text-to-Concept), or "splice": its weights in a SpLiCE decomposition over the concepts (image mean of
    A and B together), where concepts compete to explain an image instead of all rising with it."""
    if scores not in ("cosine", "splice"):
        raise ConceptlensError(f"scores are cosine or splice, not {scores!r}")
    fa, fb = as_features(model, data_a, **embed_kw), as_features(model, data_b, **embed_kw)
    C = concept_matrix(model, concepts)
    if scores == "splice":
        from .decompose import ConceptDecomposer  # scikit-learn's import only where SpLiCE scores are asked for
        dec = ConceptDecomposer(C.numpy(), l1_penalty=l1_penalty).fit(np.concatenate([fa.X, fb.X]))
        Aa, Ab = dec.transform(fa.X), dec.transform(fb.X)
    else:
        Aa, Ab = activations(fa.X, C), activations(fb.X, C)
    rows = diagnose(Aa, Ab, concepts)
    idx = {c: i for i, c in enumerate(concepts)}
    ex = [{"concept": r["concept"],
           "a": [fa.keys[i] for i in np.argsort(-Aa[:, idx[r["concept"]]])[:per_side]],
           "b": [fb.keys[i] for i in np.argsort(-Ab[:, idx[r["concept"]]])[:per_side]]} for r in rows[:examples]]
    return {"model": model.name, "a": fa.dataset, "b": fb.dataset, "n_a": len(Aa), "n_b": len(Ab),
            "n_concepts": len(concepts), "scores": scores, "l1_penalty": l1_penalty if scores == "splice" else None,
            "concepts": rows, "examples": ex}
