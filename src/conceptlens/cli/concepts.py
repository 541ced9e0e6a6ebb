"""`align`, `cbm`, `diagnose`, `search`, `decode`: Text-to-Concept (Moayeri et al., ICML 2023); `decompose`: SpLiCE
(Bhalla et al., NeurIPS 2024)."""
from __future__ import annotations

from pathlib import Path

from ._options import (add_outputs, add_seed, command, command_line, dataset_of, embed_kwargs, load_on_device,
                       fraction, load_vectors, model_of, nonnegative, positive, table, write_json, write_report)


def register(sub) -> None:
    p = command(sub, "align", "fit a linear map from one model's features into another's (text-to-concept)", align,
                model=False)
    p.add_argument("--source", required=True, help="model to align, e.g. builtin:mobilenetv2")
    p.add_argument("--target", required=True, help="space to align into, e.g. builtin:lite-clip")
    p.add_argument("--layer", help="named layer of the source model")
    p.add_argument("--method", default="ridge", choices=["ridge", "procrustes", "sgd"],
                   help="closed-form ridge, orthogonal Procrustes, or the paper's SGD recipe")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction for the reported metrics")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="fit on the raw feature rows, as the reference does (default: rows at unit length, the cosine "
                        "geometry zero-shot and search read)")
    p.add_argument("--also", action="append", default=[], metavar="DATA",
                   help="another image set for the fit, label-free (repeatable); e.g. --also openmoji:black --also "
                        "openmoji:color: drawings teach the map the photo -> drawing direction photos never show")
    add_seed(p)
    p.add_argument("--out", required=True, help="aligner file (.safetensors)")
    p = command(sub, "cbm", "label-free concept bottleneck model (sparse head on concept activations)", cbm,
                "train-test")
    p.add_argument("--concepts", default="default", help="default (class names, WordNet, caption words) or a file")
    p.add_argument("--max-concepts", type=positive, default=30, help="most non-zero concepts per class")
    add_outputs(p)
    p = command(sub, "diagnose", "which concepts shift between two datasets (Welch t, Cohen's d, BH q)", diagnose,
                "a-b")
    p.add_argument("--concepts", default="default", help="default (class names, WordNet, caption words) or a file")
    p.add_argument("--top", type=positive, default=20, help="concepts to show")
    p.add_argument("--scores", default="cosine", choices=["cosine", "splice"],
                   help="per-image concept scores: cosines, or SpLiCE decomposition weights")
    p.add_argument("--l1-penalty", type=nonnegative, default=0.25, help="SpLiCE's L1 penalty with --scores splice")
    add_outputs(p)
    p = command(sub, "search", 'concept-logic image search: "horse & sketch & !grass"', search)
    p.add_argument("query", help='concepts joined by & (and), | (or), ! (not) and parentheses')
    p.add_argument("--top-k", type=positive, default=20, help="results to return")
    p.add_argument("--partial", type=fraction, default=0.5,  # = concepts.search.PARTIAL; the CLI parses before numpy
                   help="how far a negated concept is taken relative to the asked-for ones (0 = the reference)")
    add_outputs(p)
    p = command(sub, "decode", "turn vectors (image features, class means, a direction) into captions", decode,
                "optional-data")
    p.add_argument("--per-image", action="store_true", help="decode each image, not the class means")
    p.add_argument("--vector", help=".npy file with one vector [D] or several [N, D] of the source space")
    p.add_argument("--direction", action="store_true", help="the vectors are directions (probe weights): no bias")
    p.add_argument("--captions", default="coco,flickr8k,cc3m", help="caption banks (names or files)")
    p.add_argument("--captions-per-vector", type=positive, default=5, help="nearest captions to show per vector")
    p.add_argument("--generate", action="store_true", help="also write a sentence per vector (DeCap text decoder)")
    p.add_argument("--beams", type=positive, default=5,
                   help="beam width for --generate (1: greedy; 5 chosen on Imagenette train class means)")
    p.add_argument("--decoder", help="text decoder file (default: the one shipped for the model's text tower; "
                                     "see `conceptlens train decoder`)")
    add_outputs(p)
    p = command(sub, "decompose", "write vectors as sparse non-negative mixes of concepts (SpLiCE)", decompose,
                "optional-data")
    p.add_argument("--vector", help=".npy file with one vector [D] or several [N, D] of the source space")
    p.add_argument("--direction", action="store_true", help="the vectors are directions: no bias, no image mean")
    p.add_argument("--class-means", action="store_true", help="decompose each class's mean, not each image")
    p.add_argument("--reference", help="images whose mean embedding centres the rest (default: --data)")
    p.add_argument("--concepts", default="default", help="default (class names, WordNet, caption words) or a file")
    sparsity = p.add_mutually_exclusive_group()
    sparsity.add_argument("--l1-penalty", type=nonnegative, default=0.25, help="SpLiCE's L1 penalty (larger: sparser)")
    sparsity.add_argument("--n-concepts", type=positive, help="at most this many concepts per vector instead")
    p.add_argument("--top", type=positive, default=10, help="concepts to list per vector")
    add_outputs(p)


def align(a) -> None:
    from ..concepts import fit
    al, meta = fit(load_on_device(a, a.source, layer=a.layer), a.target, dataset_of(a, a.data), method=a.method,
                   holdout=a.holdout, seed=a.seed, also=[dataset_of(a, d, extra=True) for d in a.also],
                   normalize=a.normalize, **embed_kwargs(a))
    al.save(Path(a.out), meta | {"command": command_line()})
    m = al.metrics_
    table([["source", "target", "method", "held-out R2", "cosine", "zero-shot agreement", "aligned acc1", "target acc1"],
           [meta["source"], meta["target"], a.method, f"{m['r2']:.4f}", f"{m['cosine']:.4f}",
            *(f"{m[k]:.4f}" if k in m else "-" for k in ("zeroshot_top1_agreement", "aligned_zeroshot_acc1",
                                                         "target_zeroshot_acc1"))]])
    print(f"wrote {a.out}")


def cbm(a) -> None:
    from ..concepts import load_concepts, run_cbm
    train, test = dataset_of(a, a.train), dataset_of(a, a.test)
    concepts = load_concepts(a.concepts, train.classnames)
    model = model_of(a, need_text=True)
    res = run_cbm(model, train, test, concepts, a.max_concepts, **embed_kwargs(a))
    table([["model", "concepts", "CBM acc1", "linear probe acc1", "max non-zero/class"],
           [model.name, res["n_concepts"], f"{res['cbm_acc1']:.4f}", f"{res['linear_probe_acc1']:.4f}",
            max(res["nonzero_per_class"].values())]])
    for c, ws in res["top_concepts"].items():
        print(f"  {c}: " + ", ".join(f"{w['concept']} ({w['weight']:.2f})" for w in ws[:6]))
    write_json(a.output, res)
    write_report(a, "cbm_report", res)


def diagnose(a) -> None:
    from ..concepts import load_concepts, run_diagnose
    da, db = dataset_of(a, a.data_a), dataset_of(a, a.data_b)
    concepts = load_concepts(a.concepts, da.classnames)
    model = model_of(a, need_text=True)
    res = run_diagnose(model, da, db, concepts, scores=a.scores, l1_penalty=a.l1_penalty, **embed_kwargs(a))
    table([["concept", "diff", "Welch t", "Cohen's d", "q"]] +
          [[r["concept"], f"{r['diff']:+.3f}", f"{r['t']:.1f}", f"{r['cohens_d']:+.2f}", f"{r['q']:.1e}"]
           for r in res["concepts"][:a.top]])
    write_json(a.output, res)
    write_report(a, "diagnose_report", res, da, db, top=a.top)


def search(a) -> None:
    from ..concepts import parse
    from ..concepts import search as run
    parse(a.query)  # a malformed query fails before the model loads
    ds = dataset_of(a, a.data)
    model = model_of(a, need_text=True)
    res = run(model, ds, a.query, k=a.top_k, partial=a.partial, **embed_kwargs(a))
    table([["rank", "image", "score"]] + [[i + 1, k, f"{s:.2f}"] for i, (k, s) in
                                          enumerate(zip(res["keys"], res["scores"]))])
    if res.get("note"):
        print(res["note"])
    write_json(a.output, res)
    write_report(a, "search_report", res, ds)


def decode(a) -> None:
    from ..concepts import decode as run
    vectors = load_vectors(a.vector) if a.vector else None
    data = dataset_of(a, a.data) if a.data else None
    model = model_of(a, need_text=True)
    res = run(model, vectors=vectors, data=data, per_image=a.per_image, direction=a.direction,
              banks=a.captions.split(","), k=a.captions_per_vector, generate=a.generate, beams=a.beams,
              decoder=a.decoder, **embed_kwargs(a))
    for o in res["decoded"]:
        print(f"{o['name']}: {', '.join(o['shared_words'][:6])}")
        if "generated" in o:
            print(f"    generated: {o['generated']}")
        for c in o["captions"][:3]:
            print(f"    {c['score']:.3f}  {c['caption']}")
    write_json(a.output, res)
    write_report(a, "decode_report", res)


def decompose(a) -> None:
    from ..concepts import decompose as run
    from ..concepts import load_concepts
    vectors = load_vectors(a.vector) if a.vector else None
    data = dataset_of(a, a.data) if a.data else None
    ref = dataset_of(a, a.reference) if a.reference else None
    concepts = load_concepts(a.concepts, data.classnames if data else None)
    model = model_of(a, need_text=True)
    res = run(model, concepts, vectors=vectors, data=data, per_image=not a.class_means, direction=a.direction,
              reference=ref, l1_penalty=a.l1_penalty, n_concepts=a.n_concepts, top=a.top, **embed_kwargs(a))
    table([["vector", "concepts", "cosine", "top concepts (weight)"]] +
          [[o["name"], o["n_concepts"], f"{o['cosine']:.3f}",
            ", ".join(f"{c['concept']} ({c['weight']:.2f})" for c in o["concepts"][:6])] for o in res["decomposed"][:40]])
    print(f"{len(res['decomposed'])} vectors: {res['mean_concepts']:.1f} concepts, reconstruction cosine "
          f"{res['mean_cosine']:.3f} on average")
    write_json(a.output, res)
    write_report(a, "decompose_report", res)
