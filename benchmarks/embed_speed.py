"""`conceptlens embed` vs a naive loop, side by side in one run; cached re-run; feature agreement.

Naive loop: PIL decode + model.preprocess per image, eager PyTorch, NCHW fp32, batch 64.
Ours: threaded decode, batched tensor normalisation, channels-last, bf16 where the CPU has native kernels.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from common import save, shared_dir, table_text
from conceptlens.runtime import resolve_precision
from conceptlens.eval import zeroshot
from conceptlens.models import load_model
from conceptlens.data import load_dataset
from conceptlens.features import embed

N = 640


def timed(fn, *args, **kw):
    """(result, wall seconds) of one call."""
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def naive(model, files) -> np.ndarray:
    out = []
    net = load_model("builtin:efficientnet-lite0")  # fresh NCHW copy
    for i in range(0, len(files), 64):
        x = torch.stack([net.preprocess(Image.open(f).convert("RGB")) for f in files[i:i + 64]])
        with torch.no_grad():
            out.append(net.encode_image(x).numpy())
    return np.concatenate(out)


def main() -> dict:
    root = shared_dir() / "data/imagenette/val"
    if not root.exists():
        print("needs ../shared/data/imagenette/val")
        return {}
    ds = load_dataset(root, limit=N)
    files = [str(root / k) for k in ds.keys]
    model = load_model("builtin:efficientnet-lite0")
    ref, t_naive = timed(naive, model, files)
    ours, t_ours = timed(embed, model, ds, use_cache=False, show_progress=False)
    _, t_cold = timed(embed, model, ds, show_progress=False)
    hit, t_hit = timed(embed, model, ds, show_progress=False)
    assert hit.cache_hit
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(ref), ours.tensor())
    lite = load_model("builtin:lite-clip")
    clf = zeroshot.build_classifier(lite, ds.classnames, zeroshot.openai_templates())
    acc_ref = zeroshot.metrics(zeroshot.logits(torch.from_numpy(ref), clf), ds.labels)["acc1"]
    acc_ours = zeroshot.metrics(zeroshot.logits(ours.tensor(), clf), ds.labels)["acc1"]
    res = {"images": N, "naive_s": t_naive, "ours_s": t_ours, "speedup": t_naive / t_ours,
           "naive_img_per_s": N / t_naive, "ours_img_per_s": N / t_ours, "cold_cached_s": t_cold, "hit_s": t_hit,
           "cache_speedup": t_cold / t_hit, "cosine_min": cos.min().item(), "cosine_mean": cos.mean().item(),
           "zeroshot_acc1_naive": acc_ref, "zeroshot_acc1_ours": acc_ours,
           "precision": resolve_precision("auto")}
    print(table_text([["what", "value"], ["naive img/s", f"{res['naive_img_per_s']:.1f}"],
                      ["conceptlens embed img/s", f"{res['ours_img_per_s']:.1f}"], ["speedup", f"{res['speedup']:.2f}x"],
                      ["cached re-run speedup", f"{res['cache_speedup']:.0f}x"],
                      ["feature cosine min / mean", f"{res['cosine_min']:.4f} / {res['cosine_mean']:.5f}"],
                      ["zero-shot acc1 naive -> ours", f"{acc_ref:.4f} -> {acc_ours:.4f}"]]))
    save("embed_speed", res)
    return res


if __name__ == "__main__":
    main()
