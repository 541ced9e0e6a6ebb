"""MiniLM text embedding against the machine's roofline, side by side in one run on the same 10,000 short texts.

Texts: the 2,500 most frequent caption-bank words (../shared/data/captions) in CONCEPT_TEMPLATES, i.e. the
prompts `cbm`, `diagnose` and `search` embed. Paths: sentence-transformers (CONCEPTLENS_TEXT_BACKEND=torch)
and the default ONNX Runtime path, both through `embed_texts` (the library call, cache off); the runtime alone
on the same batches tokenised beforehand. Roofline: measured fp32 GEMM throughput times FLOPs per text (the six
transformer layers' matrix products and attention at each text's own token count; a multiply-add = 2 FLOPs).
Writes benchmarks/results/text_speed.json.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from common import save, table_text
from embed_speed import gemm_gflops, timed
from conceptlens.concepts.vocab import CONCEPT_TEMPLATES, caption_bank, frequent_words
from conceptlens.features import embed_texts
from conceptlens.models import load_model, onnx
from conceptlens.models.text import ORT_BATCH

N = 10_000


def flops_per_text(tokens: np.ndarray, d: int = 384, layers: int = 6) -> float:
    """Mean FLOPs per text: per token and layer 24 d^2 (Q, K, V, O and the 4d feed-forward) + 4 n d (attention)."""
    return float(np.mean(layers * tokens * (24 * d * d + 4 * tokens * d)))


def main() -> dict:
    words = frequent_words(caption_bank(), n=N // len(CONCEPT_TEMPLATES))
    texts = [t.format(c=w) for w in words for t in CONCEPT_TEMPLATES][:N]
    model = load_model("builtin:minilm")
    enc = model.st.tokenizer(texts, padding=True, truncation=True, max_length=model.st.max_seq_length, return_tensors="np")
    tokens = enc["attention_mask"].sum(1)
    fpt = flops_per_text(tokens)
    roof = gemm_gflops(torch.float32)
    ceiling = roof * 1e9 / fpt
    runs = {}
    for backend in ("torch", "onnxruntime", "torch", "onnxruntime"):  # interleaved, best of two
        os.environ["CONCEPTLENS_TEXT_BACKEND"] = backend
        embed_texts(model, texts[:256], use_cache=False, show_progress=False)  # warm (and the one-off export)
        X, sec = timed(embed_texts, model, texts, use_cache=False, show_progress=False)
        if backend not in runs or sec < runs[backend][1]:
            runs[backend] = (X, sec)
    path = model._exported()
    ordered = sorted(texts, key=len)  # as embed_texts orders them: batches of similar lengths pad less
    feeds = []
    for i in range(0, N, ORT_BATCH):
        b = model.st.tokenizer(ordered[i:i + ORT_BATCH], padding=True, return_tensors="np")
        feeds.append({k: np.asarray(b[k], np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    _, alone = timed(lambda: [onnx.run_inputs(path, f) for f in feeds])
    ref = runs["torch"][0]
    rows = [{"path": f"embed_texts, {'sentence-transformers' if b == 'torch' else 'onnxruntime (default)'}",
             "texts_per_s": N / sec, "roofline_fraction": N / sec / ceiling,
             "cosine_min_vs_sentence_transformers": torch.nn.functional.cosine_similarity(X, ref).min().item()}
            for b, (X, sec) in runs.items()]
    rows.append({"path": f"onnxruntime alone (tokenised beforehand, batches of {ORT_BATCH})", "texts_per_s": N / alone,
                 "roofline_fraction": N / alone / ceiling})
    res = {"texts": N, "mean_tokens": float(tokens.mean()), "gemm_gflops_fp32": roof, "flops_per_text": fpt,
           "roofline_texts_per_s": ceiling, "paths": rows, "target_texts_per_s": 500,
           "onnxruntime_speedup": runs["torch"][1] / runs["onnxruntime"][1]}
    print(f"GEMM fp32 {roof:.0f} GFLOP/s; {tokens.mean():.1f} tokens, {fpt / 1e6:.0f} MFLOP/text -> roofline "
          f"{ceiling:.0f} texts/s")
    print(table_text([["path", "texts/s", "of roofline", "cosine min"]] +
                     [[r["path"], f"{r['texts_per_s']:.0f}", f"{r['roofline_fraction']:.0%}",
                       f"{r.get('cosine_min_vs_sentence_transformers', float('nan')):.6f}"] for r in rows]))
    save("text_speed", res)
    return res


if __name__ == "__main__":
    main()
