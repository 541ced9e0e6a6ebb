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

from .errors import ConceptlensError

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
