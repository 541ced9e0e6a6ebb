"""Concepts in words over any vision-language (or aligned) representation (Text-to-Concept §4, §6):
concept sets, concept activations, a label-free concept bottleneck model, and distribution-shift diagnosis.
"""
from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConceptlensError
from .utils import shared_dir

CONCEPT_TEMPLATES = ["a photo of {c}.", "a picture showing {c}.", "an image of {c}.", "{c}"]
STOP = set("""a an the and or of in on at to with from by for is are was were be been being this that these those
it its his her their our your my as into onto over under near some two three one four five several many other
while there here who whom which what when where how very up down out off front back top side next each
image picture photo photograph view close shot stock""".split())


def caption_bank(names: Sequence[str] = ("coco", "flickr8k", "cc3m"), root: Path | None = None,
                 limit: int | None = None) -> list[str]:
    """Captions from ../shared/data/captions/NAME.txt.gz (or a plain text file path), one per line, deduplicated."""
    root = Path(root or shared_dir() / "data" / "captions")
    out, seen = [], set()
    for name in names:
        path = Path(name) if Path(name).exists() else root / f"{name}.txt.gz"
        if not path.exists():
            raise ConceptlensError(f"caption bank {name!r} not found (looked for {path})")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                c = line.strip()
                if c and c.lower() not in seen:
                    seen.add(c.lower())
                    out.append(c)
                    if limit and len(out) >= limit:
                        return out
    if not out:
        raise ConceptlensError(f"caption bank {', '.join(names)} is empty")
    return out


def frequent_words(captions: Sequence[str], n: int = 400, min_len: int = 3) -> list[str]:
    """The n most frequent content words (WordNet nouns/adjectives/verbs, stop words dropped) of a bank."""
    from .wordnet import is_word
    counts = Counter(w for c in captions for w in re.findall(r"[a-z]+", c.lower())
                     if len(w) >= min_len and w not in STOP)
    return [w for w, _ in counts.most_common(n * 3) if is_word(w)][:n]


def default_concepts(classnames: Sequence[str] | None = None, n_words: int = 400,
                     banks: Sequence[str] = ("coco", "flickr8k", "cc3m")) -> list[str]:
    """Class names, their WordNet hypernyms, and frequent caption words (plus domain/style words)."""
    from .wordnet import hypernym_words
    out: list[str] = []
    for c in classnames or []:
        out += [c] + hypernym_words(c)
    out += ["sketch", "drawing", "pencil drawing", "black and white", "line art", "doodle", "outline",
            "painting", "cartoon", "photo", "watercolor", "clipart", "texture", "blurry", "dark", "bright"]
    try:
        out += frequent_words(caption_bank(banks, limit=200_000), n_words)
    except ConceptlensError:
        pass  # no caption banks here: class, WordNet and style concepts only
    seen, uniq = set(), []
    for w in out:
        if w.lower() not in seen:
            seen.add(w.lower())
            uniq.append(w)
    return uniq


def load_concepts(spec: str | None, classnames: Sequence[str] | None = None) -> list[str]:
    """`default`, or a file with one concept per line."""
    if spec in (None, "default"):
        return default_concepts(classnames)
    path = Path(spec)
    if not path.exists():
        raise ConceptlensError(f"concept file not found: {spec}")
    words = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not words:
        raise ConceptlensError(f"concept file {spec} is empty")
    return words


def concept_matrix(model, concepts: Sequence[str]) -> torch.Tensor:
    """[K, D] normalised template-ensemble text embeddings of the concepts."""
    from .zeroshot import build_classifier
    return build_classifier(model, list(concepts), CONCEPT_TEMPLATES)


def activations(X, concept_emb: torch.Tensor) -> np.ndarray:
    """Cosine of every (aligned) image feature with every concept [n, K]."""
    x = F.normalize(torch.from_numpy(np.array(X, np.float32)), dim=-1)
    return (x @ concept_emb.T).numpy()


class ConceptBottleneck:
    """Label-free CBM: standardised concept activations -> sparse (L1) multinomial logistic regression.

    The L1 strength is the largest C whose model keeps at most `max_concepts` non-zero weights per class
    (searched on a grid, chosen by accuracy on a held-out part of the training data).
    """

    def __init__(self, max_concepts: int = 30, Cs: Sequence[float] | None = None, seed: int = 0):
        self.max_concepts, self.seed = max_concepts, seed
        self.Cs = list(Cs) if Cs is not None else [float(c) for c in np.logspace(-3, 1, 9)]

    def fit(self, A: np.ndarray, y: np.ndarray, concepts: Sequence[str]) -> "ConceptBottleneck":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
        self.concepts_ = list(concepts)
        self.scaler_ = StandardScaler().fit(A)
        Z = self.scaler_.transform(A)
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(len(Z))
        cut = int(0.8 * len(Z))
        tr, va = perm[:cut], perm[cut:]
        best = None
        for C in self.Cs:
            clf = LogisticRegression(l1_ratio=1.0, C=C, solver="saga", max_iter=300, tol=1e-3,
                                     random_state=self.seed)
            clf.fit(Z[tr], y[tr])
            nz = int((clf.coef_ != 0).sum(1).max())
            if nz > self.max_concepts:
                break
            acc = float((clf.predict(Z[va]) == y[va]).mean())
            if best is None or acc >= best[0]:
                best = (acc, C)
        if best is None:
            raise ConceptlensError(f"even the strongest L1 penalty keeps more than {self.max_concepts} concepts a class")
        self.C_ = best[1]
        self.clf_ = LogisticRegression(l1_ratio=1.0, C=self.C_, solver="saga", max_iter=1000, tol=1e-4,
                                       random_state=self.seed).fit(Z, y)
        self.classes_ = self.clf_.classes_
        return self

    def decision_function(self, A: np.ndarray) -> np.ndarray:
        return self.clf_.decision_function(self.scaler_.transform(A))

    def score(self, A: np.ndarray, y: np.ndarray) -> float:
        return float((self.clf_.predict(self.scaler_.transform(A)) == y).mean())

    @property
    def coef_(self) -> np.ndarray:
        """[classes, concepts] weights (scikit-learn stores one row for two classes: class 1's, class 0 = −it)."""
        w = self.clf_.coef_
        return np.vstack([-w, w]) if w.shape[0] == 1 else w

    def nonzero_per_class(self) -> list[int]:
        return (self.coef_ != 0).sum(1).tolist()

    def top_concepts(self, classnames: Sequence[str], n: int = 8) -> dict[str, list[tuple[str, float]]]:
        out = {}
        for ci, c in enumerate(classnames):
            w = self.coef_[ci]
            idx = [i for i in np.argsort(-w) if w[i] > 0][:n]
            out[c] = [(self.concepts_[i], float(w[i])) for i in idx]
        return out


def diagnose(A_a: np.ndarray, A_b: np.ndarray, concepts: Sequence[str]) -> list[dict]:
    """Per concept: mean difference (b − a), Welch's t, Cohen's d, Benjamini–Hochberg q; ranked by |d|."""
    from scipy import stats
    if len(A_a) < 2 or len(A_b) < 2:
        raise ConceptlensError("shift diagnosis needs at least 2 images on each side")
    t, p = stats.ttest_ind(A_b, A_a, axis=0, equal_var=False)
    pooled = np.sqrt((A_a.var(0, ddof=1) * (len(A_a) - 1) + A_b.var(0, ddof=1) * (len(A_b) - 1))
                     / (len(A_a) + len(A_b) - 2))
    diff = A_b.mean(0) - A_a.mean(0)
    d = diff / np.maximum(pooled, 1e-12)
    q = stats.false_discovery_control(np.nan_to_num(p, nan=1.0), method="bh")
    rows = [{"concept": c, "mean_a": float(A_a[:, i].mean()), "mean_b": float(A_b[:, i].mean()),
             "diff": float(diff[i]), "t": float(t[i]), "cohens_d": float(d[i]), "p": float(p[i]), "q": float(q[i])}
            for i, c in enumerate(concepts)]
    return sorted(rows, key=lambda r: -abs(r["cohens_d"]))


# ----------------------------------------------------------------------------------------- end-to-end uses
def run_cbm(model, train_feats, test_feats, concepts: Sequence[str], report: Path | None = None,
            max_concepts: int = 30, probe_feats: tuple | None = None) -> dict:
    """Fit the CBM on train features, compare with a linear probe on the raw features; JSON + HTML report."""
    from .report import bar_figure, fig_b64, write_html
    from .utils import atomic_write_json
    from .zeroshot import LinearProbe, metrics
    if not train_feats.labelled_ok or not test_feats.labelled_ok:
        raise ConceptlensError("a concept bottleneck needs labelled train and test data")
    C = concept_matrix(model, concepts)
    cbm = ConceptBottleneck(max_concepts=max_concepts).fit(activations(train_feats.X, C), train_feats.labels, concepts)
    acc = cbm.score(activations(test_feats.X, C), test_feats.labels)
    raw_tr, raw_te = probe_feats or (train_feats, test_feats)
    probe = LinearProbe().fit(np.asarray(raw_tr.X), raw_tr.labels)
    probe_acc = metrics(probe.decision_function(np.asarray(raw_te.X)), raw_te.labels)["acc1"]
    names = train_feats.classnames
    res = {"model": model.name, "n_concepts": len(concepts), "cbm_acc1": acc, "linear_probe_acc1": probe_acc,
           "C": cbm.C_, "nonzero_per_class": dict(zip(names, cbm.nonzero_per_class())),
           "top_concepts": {c: [{"concept": w, "weight": v} for w, v in ws] for c, ws in cbm.top_concepts(names).items()}}
    if report:
        sections = [{"title": "accuracy", "table": [["model", "CBM acc1", "linear probe acc1", "max non-zero / class"],
                                                    [model.name, f"{acc:.4f}", f"{probe_acc:.4f}",
                                                     max(cbm.nonzero_per_class())]]}]
        for c, ws in cbm.top_concepts(names).items():
            if ws:
                sections.append({"title": f"{c}: top concepts", "image": fig_b64(bar_figure(
                    [w for w, _ in ws], [v for _, v in ws], c, "weight"))})
        write_html(Path(report) / "index.html", f"Concept bottleneck — {model.name}", sections)
        atomic_write_json(Path(report) / "cbm.json", res)
    return res


def run_diagnose(model, feats_a, feats_b, concepts: Sequence[str], data_a=None, data_b=None,
                 report: Path | None = None, top: int = 20) -> dict:
    """Rank concepts by how much they shift from A to B; table, bar plot and example images per top concept."""
    from .data import images_at
    from .report import bar_figure, fig_b64, image_cards, write_html
    from .utils import atomic_write_json
    C = concept_matrix(model, concepts)
    Aa, Ab = activations(feats_a.X, C), activations(feats_b.X, C)
    rows = diagnose(Aa, Ab, concepts)
    res = {"model": model.name, "a": feats_a.dataset, "b": feats_b.dataset, "n_a": len(Aa), "n_b": len(Ab),
           "concepts": rows}
    if report:
        head = rows[:top]
        sections = [{"title": f"top {top} shifted concepts (B − A)", "table": [["concept", "mean A", "mean B", "diff",
                                                                              "Welch t", "Cohen's d", "q (BH)"]] +
                     [[r["concept"], f"{r['mean_a']:.3f}", f"{r['mean_b']:.3f}", f"{r['diff']:+.3f}", f"{r['t']:.1f}",
                       f"{r['cohens_d']:+.2f}", f"{r['q']:.1e}"] for r in head]},
                    {"title": "effect sizes", "image": fig_b64(bar_figure([r["concept"] for r in head],
                                                                          [r["cohens_d"] for r in head],
                                                                          "Cohen's d (B − A)", "d"))}]
        idx = {c: i for i, c in enumerate(concepts)}
        for r in head[:5]:
            j = idx[r["concept"]]
            for side, A, feats, ds in (("A", Aa, feats_a, data_a), ("B", Ab, feats_b, data_b)):
                if ds is None:
                    continue
                best = np.argsort(-A[:, j])[:6]
                keys = [feats.keys[i] for i in best]
                sections.append({"title": f"'{r['concept']}': most activating images of {side}",
                                 "cards": image_cards(images_at(ds, keys), keys)})
        write_html(Path(report) / "index.html", f"Distribution shift — {feats_a.dataset} vs {feats_b.dataset}", sections)
        atomic_write_json(Path(report) / "diagnose.json", res)
    return res
