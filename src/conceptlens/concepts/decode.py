"""Concept-to-text (Text-to-Concept §6, with DeCap's support-memory projection; Li et al., ICLR 2023):
turn a vector of a vision-language space (or of any space, through its aligner) into captions and words, and,
with a DeCap text decoder (`models.captioner`), into a generated sentence.

The caption bank is embedded once with the model's text tower and cached. A query vector v is first
projected onto the caption memory M (rows normalised): v' = normalise(softmax(M v / τ)ᵀ M), which moves
an image-side vector across the modality gap into the span of real caption embeddings; the captions
nearest v' are returned with the words they share.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageDataset
from ..errors import ConceptlensError
from ..features import embed, embed_texts
from ..models import Encoder, MappedEncoder
from ..models.captioner import DEFAULT_BEAMS, load_decoder
from .vocab import caption_bank
from .words import caption_concepts

DEFAULT_BANKS = ("coco", "flickr8k", "cc3m")


@dataclass
class CaptionMemory:
    captions: list[str]
    emb: torch.Tensor  # [N, D], rows normalised

    @classmethod
    def build(cls, model: Encoder, banks: Sequence[str] = DEFAULT_BANKS, limit: int | None = None
              ) -> "CaptionMemory":
        """Embed (once; cached) the caption banks with `model`'s text tower."""
        caps = caption_bank(banks, limit=limit)
        return cls(caps, F.normalize(embed_texts(model, caps), dim=-1))

    def without(self, captions: Sequence[str]) -> "CaptionMemory":
        """The memory minus `captions` (compared case- and space-insensitively): a held-out set's references."""
        return self._filter(captions, False)

    def within(self, captions: Sequence[str]) -> "CaptionMemory":
        """Only the memory's rows that are among `captions`."""
        return self._filter(captions, True)

    def _filter(self, captions: Sequence[str], inside: bool) -> "CaptionMemory":
        wanted = {" ".join(c.lower().split()) for c in captions}
        keep = [i for i, c in enumerate(self.captions) if (" ".join(c.lower().split()) in wanted) == inside]
        return CaptionMemory([self.captions[i] for i in keep], self.emb[keep])

    def project(self, v: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
        """DeCap's projection of vectors [B, D] onto the memory."""
        w = torch.softmax(F.normalize(v, dim=-1) @ self.emb.T / temperature, dim=-1)
        return F.normalize(w @ self.emb, dim=-1)

    def decode(self, v, k: int = 5, project: bool = True, temperature: float = 0.01) -> list[dict]:
        """For each vector: its top-k captions with cosines and the words they share."""
        v = torch.as_tensor(np.asarray(v, np.float32))
        if v.ndim == 1:
            v = v[None]
        if v.shape[1] != self.emb.shape[1]:
            raise ConceptlensError(f"vector has {v.shape[1]} dims; the caption memory has {self.emb.shape[1]}")
        if not torch.isfinite(v).all():
            raise ConceptlensError("vector contains NaN or inf")
        q = self.project(v, temperature) if project else F.normalize(v, dim=-1)
        sims, idx = (q @ self.emb.T).topk(min(k, len(self.captions)), dim=1)
        out = []
        for s_row, i_row in zip(sims.tolist(), idx.tolist()):
            caps = [self.captions[i] for i in i_row]
            out.append({"captions": [{"caption": c, "score": s} for c, s in zip(caps, s_row)],
                        "shared_words": shared_words(caps)})
        return out


def shared_words(captions: Sequence[str], min_count: int = 2) -> list[str]:
    """Content words (lemmatised as FALCON's concepts are: `words.caption_concepts`) in at least `min_count` of
    the captions, most common first."""
    counts: Counter = Counter()
    for c in captions:
        counts.update(caption_concepts(c)[0])
    return [w for w, n in counts.most_common() if n >= min_count]


def query_vectors(model: Encoder, vectors: np.ndarray | None, data: ImageDataset | None, per_image: bool = False,
                  direction: bool = False, **embed_kw) -> tuple[np.ndarray, list[str]]:
    """The vectors to describe, in `model`'s space, and their names: given vectors of the source space (through
    an aligned model's map; `direction`: without its bias), else the class means (`per_image`: each image) of a
    dataset's features."""
    if (vectors is None) == (data is None):
        raise ConceptlensError("give exactly one of vectors or data")
    if not model.has_text:
        raise ConceptlensError(f"{model.name} has no text tower: give an aligner (see `conceptlens align`)")
    if vectors is not None:
        V = np.asarray(vectors, np.float32)
        V = V[None] if V.ndim == 1 else V
        want = model.base.embed_dim if isinstance(model, MappedEncoder) else model.embed_dim
        if V.ndim != 2 or V.shape[1] != want:
            raise ConceptlensError(f"vectors of shape {tuple(V.shape)}: {model.name} takes [{want}] or [N, {want}]")
        if not np.isfinite(V).all():
            raise ConceptlensError("vector contains NaN or inf")
        if isinstance(model, MappedEncoder):
            V = model.map_direction(V) if direction else model.map_features(V)
        return V, [f"vector {i}" for i in range(len(V))]
    f = embed(model, data, **embed_kw)
    X = np.asarray(f.X, np.float32)
    if per_image or not f.labelled_ok:
        return X, list(f.keys)
    names = list(f.classnames)
    return np.stack([X[f.labels == c].mean(0) for c in range(len(names))]), names


def decode(model: Encoder, vectors: np.ndarray | None = None, data: ImageDataset | None = None,
           per_image: bool = False, direction: bool = False, banks: Sequence[str] = DEFAULT_BANKS, k: int = 5,
           generate: bool = False, beams: int = DEFAULT_BEAMS, decoder: str | Path | None = None, **embed_kw) -> dict:
    """Captions for vectors of `model`'s space (through its map for an aligned model; `direction`: no bias),
    or for the class means (`per_image`: each image) of a dataset's features. `generate`: also write a sentence
    for each vector with a DeCap text decoder (`decoder`, default the one shipped for the model's text tower)
    from its projection onto the caption memory, greedy (beams=1) or by beam search."""
    if k < 1 or beams < 1:
        raise ConceptlensError("k (captions per vector) and beams must be positive")
    dec = load_decoder(model.text_model, decoder) if generate else None  # a missing decoder fails before any work
    V, names = query_vectors(model, vectors, data, per_image, direction, **embed_kw)
    mem = CaptionMemory.build(model, banks)
    q = mem.project(torch.from_numpy(V))  # once: retrieval and generation start from the same projection
    out = [{"name": n} | d for n, d in zip(names, mem.decode(q, k=k, project=False))]
    res = {"model": model.name, "banks": list(banks), "k": k, "decoded": out}
    if dec is not None:
        for o, text in zip(out, dec.generate(q, beams=beams)):
            o["generated"] = text
        res["decoder"] = {"path": dec.meta["path"], "sha256": dec.meta["sha256"], "beams": beams}
    return res
