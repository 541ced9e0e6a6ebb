"""Text-to-concept on real models: builtin:mobilenetv2 aligned into builtin:lite-clip.

One general aligner is fitted (label-free) on Imagenette train + CIFAR-10 train (10,000) + Flickr8k images + OpenMoji
in both styles (line art and colour cartoons, the lite-clip recipe's style set: a map fitted on photos alone never sees
the photo -> drawing direction it is asked to carry), none of them evaluation images; it is then used for zero-shot,
CBM, shift diagnosis, search and decoding.
Per-dataset fits with a held-out split are reported beside it. Writes benchmarks/results/text_to_concept.json.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from common import SKETCHY, concat, save, shared_dir, table_text
from conceptlens.eval import zeroshot
from conceptlens.concepts.align import Aligner
from conceptlens.concepts import default_concepts, run_cbm, run_diagnose
from conceptlens.data import load_dataset
from conceptlens.data.styles import STYLE_SETS
from conceptlens.concepts.decode import CaptionMemory
from conceptlens.features import embed
from conceptlens.models import load_model
from conceptlens.concepts.search import ConceptIndex, parse, search
from conceptlens.data.wordnet import hypernym_words

D = shared_dir() / "data"
EVAL = {"imagenette": D / "imagenette/val", "cifar10": D / "cifar10/test-000000.tar.gz", "pacs_photo": D / "pacs/photo"}
FIT = [D / "imagenette/train", D / "cifar10/train-00000{0..1}.tar.gz", D / "flickr8k/images", *STYLE_SETS]


def feats(model, path):
    return embed(model, load_dataset(path), show_progress=False)


def main() -> None:
    src, tgt = load_model("builtin:mobilenetv2"), load_model("builtin:lite-clip")
    out: dict = {"source": src.name, "target": tgt.name}
    # -- one general aligner, label-free, on non-evaluation images
    Xs = np.concatenate([np.asarray(feats(src, p).X) for p in FIT])
    Xt = np.concatenate([np.asarray(feats(tgt, p).X) for p in FIT])
    timing = {}
    for method in ("ridge", "procrustes", "sgd"):
        t0 = time.perf_counter()
        al = Aligner(method).fit(Xs, Xt)
        timing[method] = {"seconds": time.perf_counter() - t0, **al.metrics_}
        if method == "ridge":
            general = al
    out["general_aligner"] = {"fit_on": [str(p) for p in FIT], "n_images": int(len(Xs)), "methods": timing,
                              "ridge_speedup_vs_sgd": timing["sgd"]["seconds"] / timing["ridge"]["seconds"],
                              "ridge_r2_minus_sgd_r2": timing["ridge"]["r2"] - timing["sgd"]["r2"]}
    aligned = general.to_model(src, tgt)
    # -- zero-shot: aligned vs lite-clip's own, same images; plus per-dataset held-out fits
    zs = {}
    for name, path in EVAL.items():
        fs, ft = feats(src, path), feats(tgt, path)
        own = zeroshot.evaluate(tgt, ft)["metrics"]["acc1"]
        fa = feats(aligned, path)
        al_acc = zeroshot.evaluate(aligned, fa)["metrics"]["acc1"]
        per = Aligner("ridge").fit(np.asarray(fs.X), np.asarray(ft.X))
        clf = zeroshot.build_classifier(tgt, fs.classnames, zeroshot.openai_templates())
        ho = per.heldout_rows_
        ho_acc = float((zeroshot.logits(torch.from_numpy(per.transform(fs.X[ho])), clf).argmax(1).numpy()
                        == fs.labels[ho]).mean())
        ho_own = float((zeroshot.logits(torch.from_numpy(np.asarray(ft.X[ho])), clf).argmax(1).numpy()
                        == fs.labels[ho]).mean())
        zs[name] = {"lite_clip_acc1": own, "aligned_acc1": al_acc, "gap_points": 100 * (own - al_acc),
                    "general_r2": general.score(np.asarray(fs.X), np.asarray(ft.X)),
                    "per_dataset_heldout": {"r2": per.metrics_["r2"], "cosine": per.metrics_["cosine"],
                                            "aligned_acc1": ho_acc, "lite_clip_acc1": ho_own}}
    out["zeroshot"] = zs
    # -- shift: PACS photo vs sketch
    concepts = default_concepts(load_dataset(D / "pacs/photo").classnames)
    fp = feats(src, D / "pacs/photo")
    fpa, fka = feats(aligned, D / "pacs/photo"), feats(aligned, D / "pacs/sketch")
    diag = run_diagnose(aligned, fpa, fka, concepts)["concepts"]
    top5 = [r["concept"] for r in diag[:5]]
    out["shift"] = {"n_concepts": len(concepts), "top10": diag[:10], "top5": top5,
                    "sketch_word_in_top5": bool(SKETCHY & set(top5))}
    # -- search over PACS photo + sketch
    both = concat([fpa, fka], "pacs_photo+sketch")
    domain = np.r_[np.zeros(len(fpa.labels)), np.ones(len(fka.labels))]
    names = fp.classnames
    idx = ConceptIndex(both.X)
    r1 = search(aligned, both, "sketch & horse", k=20, index=idx)
    p_at_20 = float(np.mean([(domain[r] == 1) and names[both.labels[r]] == "horse" for r in r1["rows"]])) if r1["rows"] else 0.0
    r2 = search(aligned, both, "photo & !dog", k=20, index=idx)
    dogs = int(sum(names[both.labels[r]] == "dog" for r in r2["rows"]))
    rng = np.random.default_rng(0)
    big = rng.normal(size=(1_000_000, 512)).astype(np.float32)
    t0 = time.perf_counter()
    bidx = ConceptIndex(big)
    build_s = time.perf_counter() - t0
    emb = {w: rng.normal(size=512) for w in ("horse", "sketch", "grass")}
    tree = parse("horse & sketch & !grass")
    bidx.query(tree, emb, k=20)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        bidx.query(tree, emb, k=20)
        times.append(time.perf_counter() - t0)
    del big, bidx
    out["search"] = {"sketch_and_horse_precision@20": p_at_20, "n_results_sketch_and_horse": len(r1["rows"]),
                     "photo_and_not_dog_dogs_in_top20": dogs, "n_results_photo_and_not_dog": len(r2["rows"]),
                     "one_million_512d": {"median_ms": 1000 * float(np.median(times)), "max_ms": 1000 * max(times),
                                          "index_build_s": build_s, "index": "IVF (faiss), nprobe 32"}}
    # -- CBM vs linear probe on the same (aligned) features; probe on raw source features too
    cbm = {}
    for name, tr_p, te_p in (("imagenette", D / "imagenette/train", D / "imagenette/val"),
                             ("cifar10", D / "cifar10/train-00000{0..1}.tar.gz", D / "cifar10/test-000000.tar.gz")):
        tr_ds, te_ds = load_dataset(tr_p), load_dataset(te_p)
        res = run_cbm(aligned, tr_ds, te_ds, default_concepts(tr_ds.classnames), 30, show_progress=False)
        cbm[name] = {k: res[k] for k in ("n_concepts", "cbm_acc1", "linear_probe_acc1", "C")} | {
            "max_nonzero_per_class": max(res["nonzero_per_class"].values()),
            "gap_points": 100 * (res["linear_probe_acc1"] - res["cbm_acc1"]),
            "top_concepts": {c: [w["concept"] for w in ws[:5]] for c, ws in res["top_concepts"].items()}}
    out["cbm"] = cbm
    # -- decode class means of Imagenette (aligned)
    mem = CaptionMemory.build(tgt)
    fi = feats(src, D / "imagenette/val")
    X = general.transform(fi.X)
    means = np.stack([X[fi.labels == c].mean(0) for c in range(len(fi.classnames))])
    dec = mem.decode(means, k=3)
    hits = {}
    for c, d in zip(fi.classnames, dec):
        words = {c.lower(), c.split()[-1].lower()} | {h.lower() for h in hypernym_words(c)} | \
            {h.split()[-1].lower() for h in hypernym_words(c)}
        text = " ".join(x["caption"].lower() for x in d["captions"])
        hits[c] = {"hit": any(w in text for w in words), "words": sorted(words),
                   "captions": [x["caption"] for x in d["captions"]]}
    out["decode"] = {"classes_hit": int(sum(h["hit"] for h in hits.values())), "n_classes": len(hits),
                     "per_class": hits, "bank_size": len(mem.captions)}
    rows = [["figure", "value", "target"],
            ["ridge fit speed-up vs sgd", f"{out['general_aligner']['ridge_speedup_vs_sgd']:.1f}x", ">= 20x"],
            ["ridge R2 - sgd R2", f"{out['general_aligner']['ridge_r2_minus_sgd_r2']:+.4f}", ">= 0"]]
    rows += [[f"zero-shot gap {k} (lite-clip {v['lite_clip_acc1']:.3f})", f"{v['gap_points']:.1f} pt", "<= 5 pt"]
             for k, v in zs.items()]
    rows += [["shift top5 (sketch word?)", ", ".join(top5), "sketch-like word"],
             ["search sketch & horse P@20", f"{p_at_20:.2f}", ">= 0.8"],
             ["search photo & !dog: dogs in top 20", dogs, "0"],
             ["1M x 512 query (median ms)", f"{out['search']['one_million_512d']['median_ms']:.1f}", "< 100"]]
    rows += [[f"CBM {k} (probe {v['linear_probe_acc1']:.3f}, nz {v['max_nonzero_per_class']})",
              f"{v['cbm_acc1']:.3f}", "within 5 pt"] for k, v in cbm.items()]
    rows += [["decode Imagenette classes hit", f"{out['decode']['classes_hit']}/10", ">= 8"]]
    print(table_text(rows))
    save("text_to_concept", out)


if __name__ == "__main__":
    main()
