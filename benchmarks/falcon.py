"""FALCON on known directions: builtin:mobilenetv2 linear-probe class directions over Imagenette val and
CIFAR-10 test, explained with builtin:lite-clip and the caption banks (COCO, Flickr8k, CC3M).

A class is a hit when its name, a synonym (WordNet lemma) or a WordNet hypernym is among the top 3 words.
Also: feature groups discovered on Imagenette val, and the time to explain one target over 10,000 images
with cached features and caption-bank embeddings (whole images, i.e. excluding Grad-CAM crop extraction).
Writes benchmarks/results/falcon.json.
"""
from __future__ import annotations

import time

import numpy as np
from sklearn.linear_model import LogisticRegression

from common import save, shared_dir, table_text
from conceptlens.data import load_dataset
from conceptlens.explain import CaptionBankIndex, explain, find_groups, normalised
from conceptlens.features import embed
from conceptlens.models import load_model
from conceptlens.data.wordnet import hypernym_words, index, lemmatize, nouns

D = shared_dir() / "data"
VIEW = "context"  # explain's default, named so the result file records what ran (README: how it was chosen)
SETS = {"imagenette": (D / "imagenette/train", D / "imagenette/val"),
        "cifar10": (str(D / "cifar10/train-00000{0..1}.tar.gz"), D / "cifar10/test-000000.tar.gz")}


def accepted_words(name: str) -> set[str]:
    """The class name's words, its WordNet synonyms and hypernyms (last words too: 'springer spaniel' -> spaniel)."""
    out = {name.lower(), name.split()[-1].lower()}
    base = lemmatize(name, "n")
    if base:
        for off in index("n").get(base.replace(" ", "_"), [])[:1]:
            out |= {lm.lower() for lm in nouns()["n" + off].lemmas}
    for h in hypernym_words(name, depth=4):
        out |= {h.lower(), h.split()[-1].lower()}
    return out


def main() -> None:
    model, vl = load_model("builtin:mobilenetv2"), load_model("builtin:lite-clip")
    bank = CaptionBankIndex.build(vl)
    out = {"bank_size": len(bank.captions), "view": VIEW}
    rows, hits_all = [["dataset", "class", "top-3 words", "hit"]], []
    for name, (tr_p, te_p) in SETS.items():
        tr, te_ds = embed(model, load_dataset(tr_p)), load_dataset(te_p)
        te = embed(model, te_ds)
        probe = LogisticRegression(C=1.0, max_iter=3000).fit(normalised(tr.X), tr.labels)
        per = {}
        for c, cname in enumerate(te.classnames):
            r = explain(np.asarray(te.X), te_ds, te.keys, model, vl, bank, direction=probe.coef_[c], top_n=20, view=VIEW)
            r.pop("_crops"), r.pop("_overlays")
            top3 = [w["concept"] for w in r["words"][:3]]
            ok = bool(set(top3) & accepted_words(cname))
            hits_all.append(ok)
            per[cname] = {"top3": top3, "hit": ok, "words": r["words"], "phrases": r["phrases"],
                          "removed_by_contrast": r["removed_by_contrast"], "crop_coherence": r["crop_coherence"]}
            rows.append([name, cname, ", ".join(top3), "yes" if ok else "no"])
        out[name] = {"per_class": per, "hit_rate": float(np.mean([v["hit"] for v in per.values()]))}
    out["known_direction_hit_rate"] = float(np.mean(hits_all))
    # groups on Imagenette val
    te_ds = load_dataset(D / "imagenette/val")
    te = embed(model, te_ds)
    R = normalised(te.X)
    groups = find_groups(R, k=5)
    gres = []
    for g in groups[:3]:
        r = explain(np.asarray(te.X), te_ds, te.keys, model, vl, bank, features=g["features"], max_crops=12, view=VIEW)
        r.pop("_crops"), r.pop("_overlays")
        gres.append({"features": g["features"], "n_images": len(g["images"]), "words": r["words"][:5],
                     "crop_coherence": r["crop_coherence"], "interpretable": r["crop_coherence"] > 0.8})
    out["groups_imagenette"] = {"n_groups": len(groups), "top": gres}
    # speed: one target over 10,000 CIFAR-10 test images, cached features and bank, whole images
    c_ds = load_dataset(SETS["cifar10"][1])
    cf = embed(model, c_ds)
    t0 = time.perf_counter()
    explain(np.asarray(cf.X), c_ds, cf.keys, model, vl, bank, direction=np.ones(cf.X.shape[1]), top_n=20,
            view="whole")
    out["seconds_one_target_10k_images"] = time.perf_counter() - t0
    print(table_text(rows))
    print(f"known-direction hit rate: {out['known_direction_hit_rate']:.3f} (target 0.70); "
          f"one target over 10k images: {out['seconds_one_target_10k_images']:.2f} s (target < 5 s); "
          f"groups on Imagenette val: {len(groups)}")
    save("falcon", out)


if __name__ == "__main__":
    main()
