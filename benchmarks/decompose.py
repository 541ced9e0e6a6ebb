"""SpLiCE-style decompositions (`conceptlens.concepts.ConceptDecomposer`) of builtin:lite-clip image embeddings.

Vocabulary: the 3,000 most frequent caption-bank words (../shared/data/captions; SpLiCE uses 10,000 LAION words),
embedded with CONCEPT_TEMPLATES. Image mean (the modality-gap centring): Flickr8k images (SpLiCE: MSCOCO's), never
an evaluation set. At three L1 penalties, on every 4th Imagenette val image (982) and every 2nd PACS photo (835):
- mean concepts per image and reconstruction cosine;
- zero-shot top-1 (OpenAI templates) from the reconstructed sparse embeddings vs the dense ones (SpLiCE's
  retention figure);
- Imagenette only: a linear probe (CLIP_benchmark recipe) on the concept weights vs on the raw features, trained on
  every 10th Imagenette train image (947).
Solver: float32, tolerance 1e-4 (relative step), at most 3,000 FISTA steps (the decomposer's defaults).
Writes benchmarks/results/decompose.json.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from common import save, shared_dir, table_text
from conceptlens.concepts import ConceptDecomposer
from conceptlens.concepts.vocab import caption_bank, concept_matrix, frequent_words
from conceptlens.data import load_dataset
from conceptlens.eval import zeroshot
from conceptlens.eval.probe import LinearProbe
from conceptlens.features import embed
from conceptlens.models import load_model

PENALTIES = (0.1, 0.25, 0.5)
VOCAB = 3000
D = shared_dir() / "data"


def feats(model, spec, every: int = 1):
    f = embed(model, load_dataset(spec), show_progress=False)
    return np.asarray(f.X, np.float32)[::every], f.labels[::every], f.classnames


def main() -> dict:
    model = load_model("builtin:lite-clip")
    words = frequent_words(caption_bank(), n=VOCAB)
    C = concept_matrix(model, words).numpy()
    ref = feats(model, D / "flickr8k/images")[0]
    sets = {"imagenette_val": feats(model, D / "imagenette/val", 4), "pacs_photo": feats(model, D / "pacs/photo", 2)}
    Xtr, ytr, _ = feats(model, D / "imagenette/train", 10)
    rows, res = [], {"vocabulary": len(words), "reference": "flickr8k/images", "penalties": {}}
    raw_probe = LinearProbe().fit(Xtr, ytr).score(sets["imagenette_val"][0], sets["imagenette_val"][1])
    for lam in PENALTIES:
        dec = ConceptDecomposer(C, l1_penalty=lam).fit(ref)
        out = {}
        for name, (X, y, classes) in sets.items():
            t = time.perf_counter()
            W = dec.transform(X)
            sec = time.perf_counter() - t
            clf = zeroshot.build_classifier(model, classes, zeroshot.openai_templates())
            dense = zeroshot.metrics(zeroshot.logits(torch.from_numpy(X), clf), y)["acc1"]
            sparse = zeroshot.metrics(zeroshot.logits(torch.from_numpy(dec.inverse_transform(W).astype(np.float32)),
                                                      clf), y)["acc1"]
            out[name] = {"mean_concepts": float((W > 0).sum(1).mean()), "median_concepts": float(np.median((W > 0).sum(1))),
                         "reconstruction_cosine": float(dec.cosines(X, W).mean()), "zeroshot_dense_acc1": dense,
                         "zeroshot_sparse_acc1": sparse, "seconds": sec, "images": len(X)}
            if name == "imagenette_val":
                probe = LinearProbe().fit(dec.transform(Xtr), ytr).score(W, y)
                out[name] |= {"probe_on_concept_weights_acc1": probe, "probe_on_raw_features_acc1": raw_probe}
            rows.append([lam, name, f"{out[name]['mean_concepts']:.1f}", f"{out[name]['reconstruction_cosine']:.3f}",
                         f"{dense:.4f}", f"{sparse:.4f}", f"{out[name].get('probe_on_concept_weights_acc1', float('nan')):.4f}",
                         f"{sec:.1f}"])
        res["penalties"][str(lam)] = out
    res["probe_on_raw_features_acc1"] = raw_probe
    print(table_text([["l1 penalty", "set", "concepts", "cosine", "zero-shot dense", "zero-shot sparse",
                       "probe on weights", "seconds"]] + rows))
    print(f"linear probe on raw features (Imagenette val): {raw_probe:.4f}")
    save("decompose", res)
    return res


if __name__ == "__main__":
    main()
