"""WordNet 3.0 nouns from Debian's `wordnet-base` (noun offsets = ImageNet wnids).

Our own ~40-line reader of `data.noun`: NLTK's current reader refuses this layout (no `lexnames`, and
it will not open files linked or copied from outside nltk_data without its sense-index files), and we
need only noun lemmas, glosses and the hypernym tree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import ConceptlensError

WORDNET_DIR = Path(os.environ.get("CONCEPTLENS_WORDNET", "/usr/share/wordnet"))


@dataclass
class Synset:
    wnid: str  # "n" + 8-digit offset, as ImageNet names classes
    lemmas: list[str]
    gloss: str
    hypernyms: list[str] = field(default_factory=list)
    hyponyms: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def nouns() -> dict[str, Synset]:
    """All noun synsets by wnid, with hypernym (@, @i) and hyponym (~, ~i) links."""
    path = WORDNET_DIR / "data.noun"
    if not path.exists():
        raise ConceptlensError(f"WordNet not found in {WORDNET_DIR}: apt-get install wordnet-base "
                               "(make setup does this as root) or set CONCEPTLENS_WORDNET")
    out: dict[str, Synset] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):
                continue  # licence header
            data, _, gloss = line.partition(" | ")
            parts = data.split()
            offset, w_cnt = parts[0], int(parts[3], 16)
            lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
            lemmas = [lm.split("(")[0] for lm in lemmas]  # strip adjective markers such as "(p)"
            k = 4 + 2 * w_cnt
            p_cnt = int(parts[k])
            syn = Synset("n" + offset, lemmas, gloss.strip())
            for j in range(p_cnt):
                sym, target, pos = parts[k + 1 + 4 * j: k + 4 + 4 * j]
                if pos != "n":
                    continue
                if sym in ("@", "@i"):
                    syn.hypernyms.append("n" + target)
                elif sym in ("~", "~i"):
                    syn.hyponyms.append("n" + target)
            out[syn.wnid] = syn
    return out


def synset(wnid: str) -> Synset:
    try:
        return nouns()[wnid]
    except KeyError:
        raise ConceptlensError(f"{wnid} is not a WordNet 3.0 noun id") from None


def ancestors(wnid: str) -> list[str]:
    """All hypernyms of a synset (transitive, nearest first, without duplicates)."""
    seen: list[str] = []
    frontier = list(synset(wnid).hypernyms)
    while frontier:
        nxt = []
        for h in frontier:
            if h not in seen:
                seen.append(h)
                nxt += nouns()[h].hypernyms
        frontier = nxt
    return seen


POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# WordNet's morphy detachment rules (morph.c), applied after the exception lists
MORPHY = {"n": [("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                ("men", "man"), ("ies", "y")],
          "v": [("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")],
          "a": [("er", ""), ("est", ""), ("er", "e"), ("est", "e")], "r": []}


@lru_cache(maxsize=4)
def index(pos: str) -> dict[str, list[str]]:
    """lemma -> synset offsets (most frequent sense first) from index.POS."""
    path = WORDNET_DIR / f"index.{POS_FILES[pos]}"
    if not path.exists():
        raise ConceptlensError(f"WordNet index not found in {WORDNET_DIR}: apt-get install wordnet-base")
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):
                continue
            parts = line.split()
            n_ptr = int(parts[3])
            n_sense = int(parts[2])
            out[parts[0]] = parts[6 + n_ptr: 6 + n_ptr + n_sense]
    return out


@lru_cache(maxsize=4)
def exceptions(pos: str) -> dict[str, str]:
    path = WORDNET_DIR / f"{POS_FILES[pos]}.exc"
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out.setdefault(parts[0], parts[1])
    return out


def lemmatize(word: str, pos: str = "n") -> str | None:
    """WordNet's morphy: the base form of `word` as part of speech `pos` (n, v, a, r), or None."""
    w = word.lower().replace(" ", "_")
    idx = index(pos)
    if w in exceptions(pos):
        return exceptions(pos)[w].replace("_", " ")
    if w in idx:
        return w.replace("_", " ")
    for suffix, repl in MORPHY[pos]:
        if w.endswith(suffix) and (base := w[: len(w) - len(suffix)] + repl) in idx:
            return base.replace("_", " ")
    return None


def is_word(word: str, pos: str = "nva") -> bool:
    """Whether `word` (or an inflection of it) is a WordNet lemma of one of the parts of speech."""
    return any(lemmatize(word, p) is not None for p in pos)


def hypernym_words(name: str, depth: int = 3) -> list[str]:
    """First lemmas of the nearest `depth` hypernyms of the most frequent noun sense of `name`."""
    base = lemmatize(name, "n")
    if base is None:
        return []
    offsets = index("n").get(base.replace(" ", "_"), [])
    if not offsets:
        return []
    return [nouns()[h].lemmas[0] for h in ancestors("n" + offsets[0])[:depth]]
