"""`explain`: FALCON (Kalibhat et al., ICML 2023) explanations of features, groups and directions."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConceptlensError
from ._options import (add_outputs, command, dataset_of, embed_kwargs, load_on_device, load_vectors, model_of, positive,
                       provenance, write_json)


def register(sub) -> None:
    p = command(sub, "explain", "FALCON: explain features, feature groups or directions with words", explain)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--features", help="comma-separated feature indices (one group)")
    g.add_argument("--direction", help=".npy vector [D] or several [N, D] (probe weights, PCA components...)")
    g.add_argument("--top-groups", type=positive, help="discover groups and explain the N largest")
    p.add_argument("--vl-model", default="builtin:lite-clip", help="vision-language model for crops and captions")
    p.add_argument("--captions", default="coco,flickr8k,cc3m", help="caption banks (names or files)")
    p.add_argument("--threshold-std", type=float, default=5.0, help="high activation: above mean + this many std")
    p.add_argument("--top-n", type=positive, help="use the top-n images instead of the threshold")
    p.add_argument("--view", default="context", choices=["context", "crop", "whole"],
                   help="what is captioned: Grad-CAM crop with its whole image as context (default), the crop alone "
                        "(the FALCON reference), or the whole image")
    p.add_argument("--scoring", default="share", choices=["share", "reference"],
                   help="concept score: share of each image's top captions naming it, minus its share on the "
                        "counterfactuals (default), or the FALCON reference's best caption probability with its 0.1 "
                        "contrastive cut")
    p.add_argument("--transfer", help="aligner B->M: explain --features of space B through its map into --model's space")
    p.add_argument("--generate", action="store_true", help="also write a sentence per explanation (DeCap text decoder)")
    p.add_argument("--decoder", help="text decoder file (default: the one shipped for --vl-model's text tower)")
    add_outputs(p)


def _indices(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConceptlensError(f"--features takes integers, got {text!r}") from None


def explain(a) -> None:
    from ..explain import run_falcon
    features = _indices(a.features) if a.features else None
    directions = load_vectors(a.direction) if a.direction else None
    ds = dataset_of(a, a.data)
    model, vl = model_of(a), load_on_device(a, a.vl_model)
    res = run_falcon(model, ds, vl, features=features, directions=directions, top_groups=a.top_groups,
                     transfer=a.transfer, banks=a.captions.split(","), k=a.threshold_std, top_n=a.top_n,
                     view=a.view, embed_kw=embed_kwargs(a), generate=a.generate, decoder=a.decoder,
                     scoring=a.scoring)
    if a.top_groups and len(res) < a.top_groups:
        print(f"{len(res)} groups, not {a.top_groups}: the features form only {len(res)} groups with highly "
              "activating images")
    for r in res:
        words = ", ".join(w["concept"] for w in r["words"]) or "none left by the contrastive step"
        print(f"{r['name']} ({r['n_high']} images): words: {words}")
        print(f"    phrases: {', '.join(p['concept'] for p in r['phrases'])}")
        if r["generated"]:
            print(f"    generated: {r['generated']}")
    images = [(r.pop("_crops", []), r.pop("_overlays", [])) for r in res]
    write_json(a.output, {"model": model.name, "vl_model": vl.name, "explanations": res})
    if a.report:
        from ..report import explain_report
        for r, (c, o) in zip(res, images):
            r["_crops"], r["_overlays"] = c, o
        print(f"report: {explain_report(res, ds, model.name, vl.name, Path(a.report), provenance())}")
