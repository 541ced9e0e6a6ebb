"""Concept vocabularies and concept activations over any vision-language (or aligned) representation
(Text-to-Concept §4): caption banks, frequent caption words, WordNet hypernyms, style words."""
from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.wordnet import WORDNET_DIR, hypernym_words, is_word
from ..errors import ConceptlensError
from ..eval.zeroshot import build_classifier
from ..io import atomic_write_json, cache_dir, digest, read_text, shared_dir
from ..models import Encoder
from .words import stop_words

CONCEPT_TEMPLATES = ["a photo of {c}.", "a picture showing {c}.", "an image of {c}.", "{c}"]


def bank_path(name: str, root: Path | None = None) -> Path:
    """A caption bank's file: a path as given, else ../shared/data/captions/NAME.txt.gz."""
    return Path(name) if Path(name).exists() else Path(root or shared_dir() / "data" / "captions") / f"{name}.txt.gz"


def caption_bank(names: Sequence[str] = ("coco", "flickr8k", "cc3m"), root: Path | None = None,
                 limit: int | None = None) -> list[str]:
    """Captions from ../shared/data/captions/NAME.txt.gz (or a plain text file path), one per line, deduplicated."""
    out, seen = [], set()
    for name in names:
        path = bank_path(name, root)
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
    stop = stop_words()
    counts = Counter(w for c in captions for w in re.findall(r"[a-z]+", c.lower())
                     if len(w) >= min_len and w not in stop)
    return [w for w, _ in counts.most_common(n * 3) if is_word(w)][:n]


def _files_key(paths: Sequence[Path]) -> list:
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.exists()]


def _disk_cached(name: str, key_parts: list, compute) -> list[str]:
    """A list of words cached in the cache folder under a key of its inputs (recomputed if absent or damaged)."""
    path = cache_dir("vocab") / f"{name}-{digest(key_parts)}.json"
    try:
        words = json.loads(path.read_text())
        if isinstance(words, list) and all(isinstance(w, str) for w in words):
            return words
    except (OSError, ValueError):
        pass
    words = compute()
    atomic_write_json(path, words)
    return words


def default_concepts(classnames: Sequence[str] | None = None, n_words: int = 400,
                     banks: Sequence[str] = ("coco", "flickr8k", "cc3m")) -> list[str]:
    """Class names, their WordNet hypernyms, and frequent caption words (plus domain/style words); cached on disk
    by its inputs (class names, the caption-bank and WordNet files): building it reads WordNet and 200,000
    captions, seconds that every cbm / diagnose run would pay again."""
    files = [bank_path(b) for b in banks] + sorted(WORDNET_DIR.glob("*"))
    return _disk_cached("concepts", ["default-concepts-1", list(classnames or []), n_words, list(banks), _files_key(files)],
                        lambda: _default_concepts(classnames, n_words, banks))


def _default_concepts(classnames: Sequence[str] | None, n_words: int, banks: Sequence[str]) -> list[str]:
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
    words = [ln.strip() for ln in read_text(path).splitlines() if ln.strip() and not ln.startswith("#")]
    if not words:
        raise ConceptlensError(f"concept file {spec} is empty")
    return words


def concept_matrix(model: Encoder, concepts: Sequence[str]) -> torch.Tensor:
    """[K, D] normalised template-ensemble text embeddings of the concepts."""
    return build_classifier(model, list(concepts), CONCEPT_TEMPLATES)


def activations(X, concept_emb: torch.Tensor) -> np.ndarray:
    """Cosine of every (aligned) image feature with every concept [n, K]."""
    x = F.normalize(torch.from_numpy(np.array(X, np.float32)), dim=-1)
    return (x @ concept_emb.T).numpy()
