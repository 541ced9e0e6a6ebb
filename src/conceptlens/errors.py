"""One error type for every user-facing failure: the CLI prints its message on one line and exits 2."""
from __future__ import annotations

from difflib import get_close_matches
from typing import Iterable


class ConceptlensError(Exception):
    """A problem with the user's input or environment, described in one line."""


def did_you_mean(name: str, known: Iterable[str], n: int = 3, cutoff: float = 0.5, fallback: bool = False) -> str:
    """The "; did you mean A, B?" tail of an unknown-name error ("" when nothing is close; with `fallback`,
    "; known: ..." instead). The one place every registry, layer and split name is suggested from."""
    known = list(known)
    close = get_close_matches(name, known, n=n, cutoff=cutoff)
    if close:
        return f"; did you mean {', '.join(close)}?"
    return f"; known: {', '.join(known[:20])}" if fallback and known else ""
