"""Does ttest's wall time follow its denoiser calls? `fixed` and `ttest` side by side on the first DIFFUSION_N (12)
CIFAR-10 test images of benchmarks/diffusion.py (same images, seeds and prompts), one process, this machine's
precision (`auto`): milliseconds per denoiser evaluation for each, and their ratio (1.0 = ttest's batches are as
efficient as fixed's). Before the blocked ttest, benchmarks/results/diffusion.json recorded 13.6 ms per evaluation
for ttest against 6.9 for fixed (1.96x). Writes benchmarks/results/diffusion_batching.json.
"""
from __future__ import annotations

import os
import time

from common import save, shared_dir, table_text
from conceptlens.data import load_dataset
from conceptlens.diffusion.classifier import DiffusionClassifier, default_templates, image_tensors
from conceptlens.models import load_model
from conceptlens.runtime import resolve_precision

N = int(os.environ.get("DIFFUSION_N", "12"))
os.environ.setdefault("CONCEPTLENS_TEXT_BACKEND", "torch")  # the conditioning the denoiser was trained with


def main() -> dict:
    ds = load_dataset(shared_dir() / "data/cifar10/test-000000.tar.gz", limit=500)  # diffusion.py's images
    model = load_model("builtin:tiny-diffusion-cifar10")
    prec = resolve_precision("auto", model.device)
    clfs = {"fixed": DiffusionClassifier(model, "fixed", loss="l1", n_samples=50, precision=prec),
            "ttest": DiffusionClassifier(model, "ttest", loss="l1", precision=prec)}
    x, y, keys = image_tensors(ds, model.image_size)
    cond = clfs["fixed"].prompt_embeddings(ds.classnames, default_templates(model))
    stats = {n: {"evals": 0, "seconds": 0.0, "correct": 0} for n in clfs}
    for i in range(N):
        for name, clf in clfs.items():
            t = time.perf_counter()
            o = clf.classify_one(x[i], cond, image_seed=i)
            st = stats[name]
            st["seconds"] += time.perf_counter() - t
            st["evals"] += o["evals"]
            st["correct"] += int(o["pred"] == y[i])
    for st in stats.values():
        st["ms_per_eval"] = 1000 * st["seconds"] / st["evals"]
        st["evals_per_image"] = st["evals"] / N
    ratio = stats["ttest"]["ms_per_eval"] / stats["fixed"]["ms_per_eval"]
    res = {"images": N, "precision": prec, "strategies": stats, "ttest_over_fixed_ms_per_eval": ratio,
           "before": {"ttest_ms_per_eval": 13.57, "fixed_ms_per_eval": 6.94, "ratio": 1.96,
                      "source": "benchmarks/results/diffusion.json before the blocked ttest (bf16, another CPU)"}}
    print(table_text([["strategy", "evals/image", "ms/eval", "s/image"]] +
                     [[n, f"{s['evals_per_image']:.0f}", f"{s['ms_per_eval']:.2f}", f"{s['seconds'] / N:.2f}"]
                      for n, s in stats.items()]))
    print(f"ttest / fixed ms per evaluation: {ratio:.2f} (was 1.96)")
    save("diffusion_batching", res)
    return res


if __name__ == "__main__":
    main()
