"""Concept-logic image search (Text-to-Concept §5): "horse & sketch & !grass" over image embeddings.

Each concept j is a text embedding t_j (template ensemble); image i passes "+j" when its cosine
s_ij > mean_j + k_j·std_j and "!j" when s_ij < mean_j − k_j·std_j (the reference's thresholds; defaults
k = 1 for +, 0 for !; write "horse:2" to set k). Images passing are ranked by Σ ±(s_ij − mean_j)/std_j.
A negated concept is first made partly relative to the query's asked-for concepts (ours, `partial` ρ): its
direction t becomes t − ρ·Pᵀβ, β the least-squares regression of its scores on the positive concepts' scores
over the collection, so "horse & !grass" does not throw out horses only because a model's grass direction
follows horses (ρ = 0 is the reference; ρ = 1 negates only what the positives do not explain). ρ = 0.5 was
chosen on CIFAR-10 train + Imagenette train (14 queries such as "ship & !water", 20 results each): results of
the asked-for class with less of the negated concept than that class's mean, 154 (ρ = 0) / 174 / 220 (0.5) /
198 / 187 (ρ = 1) of 280.
The statistics are exact for any collection size from its mean vector and covariance (mean_j = m·t_j,
std_j² = t_jᵀ C t_j), and the ranking score is one inner product with q = Σ ±t_j/std_j, so a FAISS index
answers the query: flat (exact) for small collections, IVF for large ones; candidates come from the index
in growing batches and are checked against every constraint exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..data import ImageDataset
from ..errors import ConceptlensError
from ..eval.zeroshot import build_classifier, load_templates
from ..features import Features, as_features
from ..models import Encoder

TOKEN = re.compile(r"\s*(?:(?P<op>[&|!()])|(?P<term>[A-Za-z][A-Za-z0-9 '\-]*?)(?::(?P<k>-?\d+(?:\.\d+)?))?(?=\s*(?:[&|)]|$)))")


@dataclass(frozen=True)
class Term:
    text: str
    k: float | None = None


MAX_TERMS, MAX_DEPTH = 64, 32
PARTIAL = 0.5  # weight of the partial-regression correction of negated concepts (module docstring)


def parse(query: str):
    """Parse AND (&), OR (|), NOT (!), parentheses and `word:k` into a tree of tuples; errors say where."""
    pos, toks = 0, []
    query = query.strip()
    while pos < len(query):
        m = TOKEN.match(query, pos)
        if not m or m.end() == pos:
            raise ConceptlensError(f"cannot parse query at {query[pos:]!r} (use words with &, |, !, ( ) and word:k)")
        toks.append(("op", m["op"]) if m["op"] else ("term", Term(m["term"].strip(), float(m["k"]) if m["k"] else None)))
        pos = m.end()
    if not toks:
        raise ConceptlensError("empty query")
    n_terms, deepest, bangs = 0, 0, [0]  # bounded before parsing: too deep is an error, not a RecursionError
    for kind, val in toks:
        if val == "!":
            bangs[-1] += 1
        elif val == "(":
            bangs.append(0)
        elif val == ")" and len(bangs) > 1:
            bangs.pop()
            bangs[-1] = 0
        elif kind == "term":
            n_terms += 1
            bangs[-1] = 0
        deepest = max(deepest, len(bangs) - 1 + sum(bangs))
    if n_terms > MAX_TERMS or deepest > MAX_DEPTH:
        raise ConceptlensError(f"query too large: at most {MAX_TERMS} concepts and {MAX_DEPTH} levels of ( and !")
    i = 0

    def peek():
        return toks[i] if i < len(toks) else (None, None)

    def chain(op: str, name: str, operand):
        """operand (op operand)*, left-associative: `|` over `&` over unary."""
        nonlocal i
        node = operand()
        while peek() == ("op", op):
            i += 1
            node = (name, node, operand())
        return node

    def expr():
        return chain("|", "or", conj)

    def conj():
        return chain("&", "and", unary)

    def unary():
        nonlocal i
        kind, val = peek()
        if (kind, val) == ("op", "!"):
            i += 1
            return ("not", unary())
        if (kind, val) == ("op", "("):
            i += 1
            node = expr()
            if peek() != ("op", ")"):
                raise ConceptlensError(f"unbalanced parenthesis in {query!r}")
            i += 1
            return node
        if kind == "term":
            i += 1
            return ("term", val)
        if kind is None:
            raise ConceptlensError(f"query {query!r} ends where a concept is expected")
        raise ConceptlensError(f"unexpected {val!r} in {query!r}")

    tree = expr()
    if i != len(toks):
        raise ConceptlensError(f"unexpected {toks[i][1]!r} in {query!r}")
    return tree


def terms_of(tree, negated: bool = False) -> list[tuple[Term, bool]]:
    """Every concept with whether it appears under an odd number of NOTs."""
    if tree[0] == "term":
        return [(tree[1], negated)]
    if tree[0] == "not":
        return terms_of(tree[1], not negated)
    return terms_of(tree[1], negated) + terms_of(tree[2], negated)


class ConceptIndex:
    """Image embeddings (rows L2-normalised) + their mean and covariance + a FAISS inner-product index."""

    def __init__(self, embeddings, exact_below: int = 200_000, nlist: int | None = None, nprobe: int = 32):
        import faiss
        X = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
        if X.ndim != 2 or not len(X):
            raise ConceptlensError("search needs a non-empty [n, d] embedding matrix")
        if not np.isfinite(X).all():
            raise ConceptlensError("embeddings contain NaN or inf")
        X = X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-12)  # a copy: never write into a cached memmap
        self.X, (n, d) = X, X.shape
        self.mean = X.mean(0, dtype=np.float64)
        self.cov = np.cov(X, rowvar=False, dtype=np.float64) if n > 1 else np.zeros((d, d))
        if n < exact_below:
            self.index = faiss.IndexFlatIP(d)
        else:
            nlist = nlist or int(4 * np.sqrt(n))
            quant = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = X[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)]
            self.index.train(sample)
            self.index.nprobe = nprobe
        self.index.add(X)
        self.exact = n < exact_below

    def query(self, tree, text_emb: dict[str, np.ndarray], k: int = 20, k_pos: float = 1.0,
              k_neg: float = 0.0, partial: float = PARTIAL) -> tuple[np.ndarray, np.ndarray]:
        """Top-k image rows passing the query, best first, and their scores."""
        terms = terms_of(tree)
        unit = {w: np.asarray(v, np.float64) / (np.linalg.norm(v) + 1e-12) for w, v in text_emb.items()}
        positives = sorted({term.text for term, neg in terms if not neg})
        P = np.stack([unit[w] for w in positives]) if positives and partial else None
        PC = None if P is None else P @ self.cov
        stats = {}
        for term, neg in terms:
            t = unit[term.text]
            if neg and P is not None:  # regress out what the asked-for concepts explain (module docstring)
                t = t - partial * P.T @ np.linalg.lstsq(PC @ P.T, PC @ t, rcond=None)[0]
            mu, sd = float(self.mean @ t), float(np.sqrt(max(t @ self.cov @ t, 1e-12)))
            kk = term.k if term.k is not None else (k_neg if neg else k_pos)
            stats[(term.text, neg)] = (t, mu, sd, mu - kk * sd if neg else mu + kk * sd)
        q = sum((-1 if neg else 1) * st[0] / st[2] for (_, neg), st in stats.items()).astype(np.float32)
        n, want, rows, scores = len(self.X), max(4 * k, 256), np.zeros(0, np.int64), np.zeros(0)
        while True:
            want = min(want, n)
            _, idx = self.index.search(q[None], want)
            idx = idx[0][idx[0] >= 0]
            keep = idx[self._passes(tree, idx, stats)]
            if len(keep) >= k or want >= n or (not self.exact and len(idx) < want):
                rows = keep[:k]
                break
            want *= 4
        const = sum((-1 if neg else 1) * st[1] / st[2] for (_, neg), st in stats.items())
        scores = self.X[rows] @ q - const
        return rows, scores

    def _passes(self, tree, rows: np.ndarray, stats) -> np.ndarray:
        sims = {}

        def ev(node, neg=False):
            if node[0] == "term":
                t, _, _, thr = stats[(node[1].text, neg)]
                key = (node[1].text, neg)
                if key not in sims:
                    sims[key] = self.X[rows] @ t.astype(np.float32)
                return sims[key] < thr if neg else sims[key] > thr
            if node[0] == "not":
                return ev(node[1], not neg)
            a, b = ev(node[1], neg), ev(node[2], neg)
            # De Morgan: under a NOT, AND and OR swap (thresholds flip with the sign)
            return (a & b) if (node[0] == "and") != neg else (a | b)
        return ev(tree)


def search(model: Encoder, data: ImageDataset | Features, query: str, k: int = 20, templates=None,
           index: ConceptIndex | None = None, k_pos: float = 1.0, k_neg: float = 0.0, partial: float = PARTIAL,
           **embed_kw) -> dict:
    """Run a concept-logic query over the (cached) features of a vision-language (or aligned) model."""
    if k < 1:
        raise ConceptlensError("k (results to return) must be positive")
    if not 0 <= partial <= 1:
        raise ConceptlensError(f"partial must lie in [0, 1] (0 = the reference's negation), not {partial}")
    tree = parse(query)
    features = as_features(model, data, **embed_kw)
    words = sorted({t.text for t, _ in terms_of(tree)})
    tmpl = load_templates(templates or ["a photo of a {c}.", "a picture of a {c}.", "an image of {c}."])
    emb = build_classifier(model, words, tmpl)
    text_emb = {w: emb[i].numpy() for i, w in enumerate(words)}
    index = index or ConceptIndex(features.X)
    rows, scores = index.query(tree, text_emb, k=k, k_pos=k_pos, k_neg=k_neg, partial=partial)
    n = len(features.keys)
    note = None
    if len(rows) < k:  # fewer than asked: always say why
        got = f"{len(rows)} result{'s' * (len(rows) != 1)}, not {k}"
        note = (f"{got}: the set has {n} images" if n < k else
                f"{got}: only {len(rows)} of {n} images pass every constraint of the query")
    return {"query": query, "model": model.name, "dataset": features.dataset, "n_images": n, "k": k,
            "partial": partial, "note": note,
            "rows": rows.tolist(), "keys": [features.keys[r] for r in rows], "scores": scores.tolist(),
            "labels": [int(features.labels[r]) for r in rows]}
