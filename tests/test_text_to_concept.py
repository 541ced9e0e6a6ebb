"""Text-to-concept on real models and data (floors on subsets; the full figures are in benchmarks/results)."""
import numpy as np
import pytest

from conceptlens.eval import zeroshot
from conceptlens.concepts.align import Aligner
from conceptlens.concepts import concept_matrix, activations, diagnose
from conceptlens.data import load_dataset
from conceptlens.features import Features, embed
from conceptlens.models import load_model
from conceptlens.concepts.search import search
from conftest import shared


@pytest.fixture(scope="module")
def models():
    return load_model("builtin:mobilenetv2"), load_model("builtin:lite-clip")


@pytest.mark.slow
def test_aligned_mobilenet_zero_shot_is_close_to_lite_clip(models):
    src, tgt = models
    fit_ds = load_dataset(shared("data/imagenette/train"), limit=600)
    al = Aligner("ridge").fit(embed(src, fit_ds).X, embed(tgt, fit_ds).X)
    assert al.metrics_["r2"] > 0.3 and al.metrics_["cosine"] > 0.7
    ev = load_dataset(shared("data/imagenette/val"), limit=300)
    fs, ft = embed(src, ev), embed(tgt, ev)
    aligned = al.to_model(src, tgt)
    fa = Features(al.transform(fs.X), fs.labels, fs.keys, fs.classnames, [], aligned.name, "imagenette")
    own = zeroshot.evaluate(tgt, ft)["metrics"]["acc1"]
    acc = zeroshot.evaluate(aligned, fa)["metrics"]["acc1"]
    assert acc >= own - 0.10, (acc, own)


@pytest.mark.slow
def test_photo_vs_sketch_shift_and_search(models):
    _, m = models
    photo = embed(m, load_dataset(shared("data/pacs/photo"), limit=210))
    sketch = embed(m, load_dataset(shared("data/pacs/sketch"), limit=210))
    concepts = ["sketch", "drawing", "line art", "pencil drawing", "dog", "grass", "sky", "person", "car", "water",
                "house", "tree", "photo", "color", "painting"]
    C = concept_matrix(m, concepts)
    rows = diagnose(activations(photo.X, C), activations(sketch.X, C), concepts)
    assert {"sketch", "drawing", "line art", "pencil drawing"} & {r["concept"] for r in rows[:5]}
    both = Features(np.concatenate([photo.X, sketch.X]), np.r_[photo.labels, sketch.labels],
                    [f"p/{k}" for k in photo.keys] + [f"s/{k}" for k in sketch.keys], photo.classnames, [],
                    m.name, "pacs")
    res = search(m, both, "sketch & horse", k=10)  # sketches of horses among photos and sketches: 0.8 measured
    hits = [k.startswith("s/") and photo.classnames[lab] == "horse" for k, lab in zip(res["keys"], res["labels"])]
    assert len(hits) == 10 and np.mean(hits) >= 0.6, res["keys"]
    res = search(m, both, "horse", k=10)
    hits = [photo.classnames[lab] == "horse" for lab in res["labels"]]
    assert len(hits) == 10 and np.mean(hits) >= 0.8, res["keys"]
    res = search(m, both, "animal & !dog", k=10)
    assert len(res["keys"]) >= 5 and not any(photo.classnames[lab] == "dog" for lab in res["labels"])


@pytest.mark.slow
def test_drawings_in_the_fit_set_carry_sketch_through_the_aligner(models):
    """An aligner fitted on photos alone never sees the photo -> drawing direction; OpenMoji's line art and cartoons
    in the fit set carry it (benchmarks: "sketch & horse" P@20 0.25 -> 0.60 through mobilenetv2; 0 -> 0.6 here)."""
    from conceptlens.data.styles import openmoji_images
    src, tgt = models
    photos = [load_dataset(shared("data/imagenette/train"), limit=600),
              load_dataset(shared("data/flickr8k/images"), limit=1000)]
    drawings = [load_dataset(p, limit=400) for p in openmoji_images(show_progress=False).values()]
    photo = embed(src, load_dataset(shared("data/pacs/photo"), limit=210))
    sketch = embed(src, load_dataset(shared("data/pacs/sketch"), limit=210))
    precision = {}
    for name, sets in (("photos", photos), ("photos+drawings", photos + drawings)):
        al = Aligner("ridge").fit(np.concatenate([embed(src, d).X for d in sets]),
                                  np.concatenate([embed(tgt, d).X for d in sets]))
        aligned = al.to_model(src, tgt)
        both = Features(al.transform(np.concatenate([photo.X, sketch.X])), np.r_[photo.labels, sketch.labels],
                        [f"p/{k}" for k in photo.keys] + [f"s/{k}" for k in sketch.keys], photo.classnames, [],
                        aligned.name, "pacs")
        res = search(aligned, both, "sketch & horse", k=10)
        precision[name] = sum(k.startswith("s/") and photo.classnames[lab] == "horse"
                              for k, lab in zip(res["keys"], res["labels"])) / 10
    assert precision["photos+drawings"] >= 0.4 and precision["photos+drawings"] > precision["photos"], precision


@pytest.mark.slow
def test_negation_keeps_what_was_asked_for_on_cifar10_train(models):
    """Partial negation on lite-clip, 2,000 CIFAR-10 train images (a choice set, not an evaluation one): measured
    20 / 7 / 10 / 8 of 20 for the four queries, against 2 / 1 / 3 / 5 with the reference's global threshold."""
    _, m = models
    f = embed(m, load_dataset(shared("data/cifar10/train-000002.tar.gz"), limit=2000))
    found = {}
    for query in ("automobile & !road", "truck & !road", "airplane & !sky", "ship & !water"):
        cls = query.split(" & ")[0]
        for partial in (0.0, 0.5):
            r = search(m, f, query, k=20, partial=partial)
            found[query, partial] = sum(f.classnames[lab] == cls for lab in r["labels"])
    ours, ref = (sum(v for (q, p), v in found.items() if p == rho) for rho in (0.5, 0.0))
    assert ours >= 35 and ours >= ref + 20, found


@pytest.mark.slow
def test_cbm_stays_close_to_the_linear_probe_on_cifar10_train(models):
    """The CBM's CIFAR-10 gap to a linear probe (issue: <= 4 points; benchmark 2.7 on the test set), on train splits
    (choice data): aligner label-free on 3,000 of train-000002, CBM and probe fit on 2,000 of train-000000, scored on 2,000
    of train-000001. Measured on the CuPL-anchored lite-clip: CBM 0.720 with 228 concepts over 10 classes, probe 0.741 (gap
    2.1 points) through a map fitted on raw rows (4f3045b); 0.7175 with 164 concepts (gap 2.35) through the unit-row map
    (`Aligner(normalize=True)`, the default since). The held-out choice of C, not the budget, sets how many concepts are
    kept, so the floor on concepts used only rules out a degenerate, near-empty bottleneck (at least 12 a class on
    average)."""
    from conceptlens.concepts import ConceptBottleneck, default_concepts
    from conceptlens.eval.probe import LinearProbe
    src, tgt = models
    fit = load_dataset(shared("data/cifar10/train-000002.tar.gz"), limit=3000)
    al = Aligner("ridge").fit(embed(src, fit).X, embed(tgt, fit).X)
    aligned = al.to_model(src, tgt)
    tr, te = (load_dataset(shared(f"data/cifar10/train-00000{i}.tar.gz"), limit=2000) for i in (0, 1))
    raw_tr, raw_te = embed(src, tr), embed(src, te)
    C = concept_matrix(aligned, default_concepts(raw_tr.classnames))
    a_tr, a_te = (activations(al.transform(f.X), C) for f in (raw_tr, raw_te))
    cbm = ConceptBottleneck(max_concepts=30).fit(a_tr, raw_tr.labels)
    probe = LinearProbe().fit(np.asarray(raw_tr.X), raw_tr.labels).score(np.asarray(raw_te.X), raw_te.labels)
    acc = cbm.score(a_te, raw_te.labels)
    used = cbm.nonzero_per_class()
    assert max(used) <= 30 and sum(used) >= 120 and acc >= probe - 0.035, (acc, probe, used)
