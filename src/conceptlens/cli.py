"""The `conceptlens` command: a thin layer over the Python API. Bad input: one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import ConceptlensError


def _add_model(p, required=True):
    p.add_argument("--model", required=required, help="model URI, e.g. builtin:lite-clip (see `conceptlens models`)")
    p.add_argument("--layer", help="named layer of a vision model (global-average-pooled)")
    p.add_argument("--aligner", help="aligner file mapping the model into a vision-language space")


def _add_data(p, flag="--data"):
    p.add_argument(flag, required=True, help="folder, tar shards (brace/glob), CSV/JSONL, or a named set")
    p.add_argument("--classes", help="class names file (classes.txt or classes.tsv)")
    p.add_argument("--limit", type=int, help="evenly spaced subset of N images")


def _add_train_test(p):
    p.add_argument("--train", required=True, help="labelled training images")
    p.add_argument("--test", required=True, help="labelled test images")
    p.add_argument("--classes", help="class names file (classes.txt or classes.tsv)")
    p.add_argument("--limit", type=int, help="evenly spaced subset of N images of each")


def _add_embed_opts(p):
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 where the CPU has native bf16 kernels")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="conceptlens", description="Talk to image representations in words.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("models", help="list models, kinds, sizes and whether they load offline here")
    p.add_argument("--check", action="store_true", help="try loading each built-in model")
    p = sub.add_parser("embed", help="extract and cache features")
    _add_model(p)
    _add_data(p)
    _add_embed_opts(p)
    p.add_argument("--output", help="also write the features to this .npy file")
    p = sub.add_parser("zeroshot", help="zero-shot classification (CLIP_benchmark JSON)")
    _add_model(p)
    _add_data(p)
    _add_embed_opts(p)
    p.add_argument("--templates", default="openai", help="openai (80), simple, or a file")
    p.add_argument("--output", help="results JSON path")
    p = sub.add_parser("linear-probe", help="logistic-regression probe on cached features")
    _add_model(p)
    _add_train_test(p)
    _add_embed_opts(p)
    p.add_argument("--output")
    p = sub.add_parser("align", help="fit a linear map from one model's features into another's (text-to-concept)")
    p.add_argument("--source", required=True, help="model to align, e.g. builtin:mobilenetv2")
    p.add_argument("--target", required=True, help="space to align into, e.g. builtin:lite-clip")
    p.add_argument("--layer", help="named layer of the source model")
    _add_data(p)
    _add_embed_opts(p)
    p.add_argument("--method", default="ridge", choices=["ridge", "procrustes", "sgd"])
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction for the reported metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="aligner file (.safetensors)")
    p = sub.add_parser("cbm", help="label-free concept bottleneck model (sparse head on concept activations)")
    _add_model(p)
    _add_train_test(p)
    p.add_argument("--concepts", default="default", help="default (class names, WordNet, caption words) or a file")
    p.add_argument("--max-concepts", type=int, default=30, help="most non-zero concepts per class")
    p.add_argument("--report", default="out/cbm")
    _add_embed_opts(p)
    p = sub.add_parser("diagnose", help="which concepts shift between two datasets (Welch t, Cohen's d, BH q)")
    _add_model(p)
    p.add_argument("--data-a", required=True)
    p.add_argument("--data-b", required=True)
    p.add_argument("--classes")
    p.add_argument("--limit", type=int)
    p.add_argument("--concepts", default="default")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--report", default="out/diagnose")
    _add_embed_opts(p)
    p = sub.add_parser("search", help='concept-logic image search: "horse & sketch & !grass"')
    _add_model(p)
    _add_data(p)
    p.add_argument("query")
    p.add_argument("--k", type=int, default=20, help="results to return")
    p.add_argument("--report", default="out/search")
    _add_embed_opts(p)
    p = sub.add_parser("decode", help="turn vectors (image features, class means, a direction) into captions")
    _add_model(p)
    p.add_argument("--data", help="decode the class means of this dataset (or each image with --per-image)")
    p.add_argument("--classes")
    p.add_argument("--limit", type=int)
    p.add_argument("--per-image", action="store_true")
    p.add_argument("--vector", help=".npy file with one vector [D] or several [N, D] of the source space")
    p.add_argument("--direction", action="store_true", help="the vectors are directions (probe weights): no bias")
    p.add_argument("--captions", default="coco,flickr8k,cc3m", help="caption banks (names or files)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--output")
    _add_embed_opts(p)
    p = sub.add_parser("diffusion-classify", help="zero-shot classification with a text-conditioned diffusion model")
    p.add_argument("--model", default="builtin:tiny-diffusion-cifar10", help="builtin:tiny-diffusion-cifar10 or diffusers:REPO")
    _add_data(p)
    p.add_argument("--strategy", default="halving", choices=["fixed", "adaptive", "ttest", "halving"])
    p.add_argument("--budget", type=int, help="denoiser evaluations per image (halving)")
    p.add_argument("--n-samples", type=int, default=30, help="samples per class (fixed)")
    p.add_argument("--preset", default="cifar10", help="adaptive schedule preset: cifar10 (keep 5,1; 50,500; L1)")
    p.add_argument("--loss", choices=["l1", "l2"])
    p.add_argument("--target", default="eps", choices=["eps", "x0"])
    p.add_argument("--templates", help="file of prompt templates ({} marks the class); default: unseen ones")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output")
    p = sub.add_parser("explain", help="FALCON: explain features, feature groups or directions with words")
    _add_model(p)
    _add_data(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--features", help="comma-separated feature indices (one group)")
    g.add_argument("--direction", help=".npy vector [D] or several [N, D] (probe weights, PCA components...)")
    g.add_argument("--top-groups", type=int, help="discover groups and explain the N largest")
    p.add_argument("--vl-model", default="builtin:lite-clip", help="vision-language model for crops and captions")
    p.add_argument("--captions", default="coco,flickr8k,cc3m", help="caption banks (names or files)")
    p.add_argument("--k", type=float, default=5.0, help="high activation: mean + k*std")
    p.add_argument("--top-n", type=int, help="use the top-n images instead of the threshold")
    p.add_argument("--no-gradcam", action="store_true", help="whole images instead of Grad-CAM crops")
    p.add_argument("--transfer", help="aligner B->M: explain --features of space B through its map into --model's space")
    p.add_argument("--report", default="out/explain")
    _add_embed_opts(p)
    p = sub.add_parser("demo", help="zero-shot demo with the embedded model, HTML report")
    p.add_argument("--model", default="builtin:lite-clip")
    p.add_argument("--templates", default="openai")
    p.add_argument("--report", default="out/demo")
    p = sub.add_parser("build", help="rebuild an embedded model from registry packages")
    p.add_argument("what", choices=["lite-clip"])
    p.add_argument("--out", help="output file (default: the packaged asset)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("train", help="train a model (resumable: rerun the same command to continue)")
    tsub = p.add_subparsers(dest="what", required=True)
    p = tsub.add_parser("diffusion", help="the embedded text-conditioned denoiser on 32x32 labelled images")
    p.add_argument("--data", required=True, help="labelled 32x32 images, e.g. ../shared/data/cifar10/train-*.tar.gz")
    p.add_argument("--out", default="runs/tiny-diffusion", help="checkpoint + log folder")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all)")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--export", help="where the finished weights go (default: the packaged asset)")
    p = tsub.add_parser("clip", help="CLIP-type training (frozen towers + heads, LiT-style) from a TOML/YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--out", help="output folder (default: the config's `out` or runs/clip)")
    return ap


def _embed_kwargs(a) -> dict:
    return {"batch_size": a.batch_size, "precision": a.precision, "use_cache": not a.no_cache, "strict": a.strict}


def _features(a, spec):
    from .data import load_dataset
    from .features import embed
    from .models import load_model
    model = load_model(a.model, layer=a.layer, aligner=getattr(a, "aligner", None))
    ds = load_dataset(spec, classes=a.classes, limit=a.limit)
    return model, embed(model, ds, **_embed_kwargs(a))


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        from .utils import atomic_write_json
        try:
            atomic_write_json(Path(path), obj)
        except OSError as exc:
            raise ConceptlensError(f"cannot write {path}: {exc.strerror}") from None
        print(f"wrote {path}")


def run(a) -> int:
    from .report import table_text
    if a.cmd == "models":
        from .models.registry import check_offline, list_models
        rows = [["name", "kind", "dim", "offline here", "description"]]
        for info in list_models():
            status = check_offline(info) if a.check or "ARCH" in info.name or "NAME" in info.name \
                or "REPO" in info.name else "yes (registry package)"
            rows.append([info.name, info.kind, info.embed_dim or "-", status, info.description])
        print(table_text(rows))
    elif a.cmd == "embed":
        model, f = _features(a, a.data)
        print(f"{len(f.labels)} images x {f.X.shape[1]} dims from {model.name}; cache {'hit' if f.cache_hit else 'written'}"
              f" at {f.path}; skipped {len(f.skipped)}")
        if a.output:
            import numpy as np
            np.save(a.output, np.asarray(f.X))
    elif a.cmd == "zeroshot":
        from . import zeroshot
        model, f = _features(a, a.data)
        res = zeroshot.evaluate(model, f, classnames=None, templates=a.templates)
        res.pop("_scores")
        m = res["metrics"]
        print(table_text([["dataset", "model", "images", "skipped", "acc1", "acc5", "mean_per_class_recall"],
                          [res["dataset"], model.name, res["n_images"], res["n_skipped"], f"{m['acc1']:.4f}",
                           f"{m['acc5']:.4f}", f"{m['mean_per_class_recall']:.4f}"]]))
        _write_json(a.output, res)
    elif a.cmd == "linear-probe":
        from .zeroshot import LinearProbe, metrics, result_json
        model, ftr = _features(a, a.train)
        from .data import load_dataset
        from .features import embed
        fte = embed(model, load_dataset(a.test, classes=a.classes, limit=a.limit), **_embed_kwargs(a))
        if (ftr.labels < 0).any() or (fte.labels < 0).any():
            raise ConceptlensError("linear probe needs labelled train and test data")
        probe = LinearProbe().fit(ftr.X, ftr.labels)
        m = metrics(probe.decision_function(fte.X), fte.labels)
        res = result_json(fte.dataset, model.name, "linear_probe",
                          {f"lp_{k}": v for k, v in m.items()} | {"weight_decay": probe.weight_decay_})
        print(table_text([["dataset", "model", "lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"],
                          [fte.dataset, model.name, f"{m['acc1']:.4f}", f"{m['acc5']:.4f}",
                           f"{m['mean_per_class_recall']:.4f}", f"{probe.weight_decay_:.2e}"]]))
        _write_json(a.output, res)
    elif a.cmd == "align":
        from .align import fit
        from .data import load_dataset
        from .models import load_model
        ds = load_dataset(a.data, classes=a.classes, limit=a.limit)
        al, meta = fit(load_model(a.source, layer=a.layer), a.target, ds, method=a.method, holdout=a.holdout,
                       seed=a.seed, **_embed_kwargs(a))
        try:
            al.save(Path(a.out), meta | {"command": "conceptlens " + " ".join(sys.argv[1:])})
        except OSError as exc:
            raise ConceptlensError(f"cannot write {a.out}: {exc.strerror}") from None
        m = al.metrics_
        rows = [["source", "target", "method", "held-out R2", "cosine", "zero-shot agreement", "aligned acc1", "target acc1"],
                [meta["source"], meta["target"], a.method, f"{m['r2']:.4f}", f"{m['cosine']:.4f}",
                 *(f"{m[k]:.4f}" if k in m else "-" for k in ("zeroshot_top1_agreement", "aligned_zeroshot_acc1",
                                                              "target_zeroshot_acc1"))]]
        print(table_text(rows))
        print(f"wrote {a.out}")
    elif a.cmd == "train" and a.what == "clip":
        from .train.clip import train_clip
        path = train_clip(a.config, Path(a.out) if a.out else None)
        print(f"wrote {path}  (use it as --model clip:{path})")
    elif a.cmd == "diffusion-classify":
        from .data import load_dataset
        from .diffusion.classifier import PRESETS, DiffusionClassifier, evaluate
        from .zeroshot import load_templates
        if a.preset not in PRESETS:
            raise ConceptlensError(f"unknown preset {a.preset!r}: {', '.join(PRESETS)}")
        pre = PRESETS[a.preset]
        clf = DiffusionClassifier(a.model, strategy=a.strategy, loss=a.loss or (pre["loss"] if a.strategy == "adaptive" else "l2"),
                                  target=a.target, n_samples=a.n_samples, to_keep=pre["to_keep"],
                                  stage_samples=pre["n_samples"], budget=a.budget, precision=a.precision, seed=a.seed)
        ds = load_dataset(a.data, classes=a.classes, limit=a.limit)
        if a.budget is not None and ds.classnames and a.budget < len(ds.classnames):
            raise ConceptlensError(f"budget {a.budget} is smaller than the number of classes ({len(ds.classnames)})")
        tmpl = [t.replace("{c}", "{}") for t in load_templates(a.templates)] if a.templates else None
        res = evaluate(clf, ds, tmpl)
        res.pop("_scores")
        m = res["metrics"]
        print(table_text([["dataset", "model", "strategy", "images", "acc1", "evals/image", "s/image"],
                          [res["dataset"], clf.model.name, a.strategy, res["n_images"], f"{m['acc1']:.4f}",
                           f"{m['evals_per_image']:.0f}", f"{m['seconds_per_image']:.2f}"]]))
        _write_json(a.output, res)
    elif a.cmd == "explain":
        return _explain(a)
    elif a.cmd in ("cbm", "diagnose", "search", "decode"):
        return _text_to_concept(a)
    elif a.cmd == "demo":
        from .demo import run as demo
        demo(Path(a.report), a.model, a.templates)
    elif a.cmd == "build":
        from .train.lite_clip import build
        meta = build(Path(a.out) if a.out else None, seed=a.seed)["meta"]
        print(json.dumps({k: meta[k] for k in ("command", "dev_metrics", "seconds", "sha")}, indent=2))
    elif a.cmd == "train" and a.what == "diffusion":
        from .train.diffusion import train_diffusion
        if a.steps < 1 or a.batch_size < 1:
            raise ConceptlensError("--steps and --batch-size must be positive")
        res = train_diffusion(a.data, Path(a.out), steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                              threads=a.threads, ckpt_every=a.ckpt_every,
                              export=Path(a.export) if a.export else None,
                              command="conceptlens " + " ".join(sys.argv[1:]))
        print(json.dumps(res, indent=2))
    return 0


def _explain(a) -> int:
    import numpy as np

    from .data import load_dataset
    from .explain import CaptionBankIndex, find_groups, normalised, run_explain
    from .features import embed
    from .models import load_model
    model = load_model(a.model, layer=a.layer, aligner=a.aligner)
    vl = load_model(a.vl_model)
    if not vl.has_text or not vl.has_image:
        raise ConceptlensError(f"--vl-model {a.vl_model} must be a vision-language model")
    ds = load_dataset(a.data, classes=a.classes, limit=a.limit)
    feats = embed(model, ds, **_embed_kwargs(a))
    if a.features:
        try:
            idx = [int(x) for x in a.features.split(",") if x.strip()]
        except ValueError:
            raise ConceptlensError(f"--features takes integers, got {a.features!r}") from None
        targets = [{"features": idx}]
        if a.transfer:  # FALCON step 9: B's feature group = the image of its coordinates under the map B -> M
            from .align import Aligner
            al = Aligner.load(Path(a.transfer))
            if al.meta_.get("target") != model.name:
                raise ConceptlensError(f"{a.transfer} maps into {al.meta_.get('target')}, not {model.name}")
            bad = [i for i in idx if not 0 <= i < al.W_.shape[1]]
            if bad:
                raise ConceptlensError(f"feature {bad[0]} out of range 0..{al.W_.shape[1] - 1} of {al.meta_.get('source')}")
            targets = [{"direction": al.W_[:, idx].sum(1), "name": f"{al.meta_.get('source')} features "
                        f"{a.features} via {Path(a.transfer).name} (held-out R2 {al.metrics_.get('r2', float('nan')):.3f})"}]
    elif a.direction:
        try:
            V = np.load(a.direction, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConceptlensError(f"cannot read {a.direction}: {exc}") from None
        targets = [{"direction": v, "name": f"direction {i}"} for i, v in enumerate(V[None] if V.ndim == 1 else V)]
    else:
        groups = find_groups(normalised(feats.X), a.k)[:a.top_groups]
        if not groups:
            raise ConceptlensError(f"no feature group has more than 10 images at k={a.k}; lower --k")
        targets = [{"features": g["features"]} for g in groups]
    bank = CaptionBankIndex.build(vl, a.captions.split(","))
    res = run_explain(model, feats, ds, vl, bank, targets, Path(a.report), k=a.k, top_n=a.top_n,
                      use_gradcam=not a.no_gradcam)
    for r in res:
        print(f"{r['name']} ({r['n_high']} images): words: {', '.join(w['concept'] for w in r['words'])}")
        print(f"    phrases: {', '.join(p['concept'] for p in r['phrases'])}")
    print(f"report: {Path(a.report) / 'index.html'}")
    return 0


def _vl_model(a):
    from .models import load_model
    model = load_model(a.model, layer=a.layer, aligner=a.aligner)
    if not model.has_text:
        raise ConceptlensError(f"{model.name} has no text tower: give --aligner FILE (see `conceptlens align`)")
    return model


def _text_to_concept(a) -> int:
    from .data import load_dataset
    from .features import embed
    from .report import table_text
    model = _vl_model(a)
    kw = _embed_kwargs(a)
    if a.cmd == "cbm":
        from .concepts import load_concepts, run_cbm
        tr = embed(model, load_dataset(a.train, classes=a.classes, limit=a.limit), **kw)
        te = embed(model, load_dataset(a.test, classes=a.classes, limit=a.limit), **kw)
        if tr.classnames != te.classnames:
            raise ConceptlensError("train and test data have different class names")
        probe = None
        if getattr(model, "base", None) is not None:  # the probe sees the raw (unaligned) features
            probe = (embed(model.base, load_dataset(a.train, classes=a.classes, limit=a.limit), **kw),
                     embed(model.base, load_dataset(a.test, classes=a.classes, limit=a.limit), **kw))
        res = run_cbm(model, tr, te, load_concepts(a.concepts, tr.classnames), Path(a.report), a.max_concepts, probe)
        print(table_text([["model", "concepts", "CBM acc1", "linear probe acc1", "max non-zero/class"],
                          [model.name, res["n_concepts"], f"{res['cbm_acc1']:.4f}", f"{res['linear_probe_acc1']:.4f}",
                           max(res["nonzero_per_class"].values())]]))
        for c, ws in list(res["top_concepts"].items()):
            print(f"  {c}: " + ", ".join(f"{w['concept']} ({w['weight']:.2f})" for w in ws[:6]))
        print(f"report: {Path(a.report) / 'index.html'}")
    elif a.cmd == "diagnose":
        from .concepts import load_concepts, run_diagnose
        da = load_dataset(a.data_a, classes=a.classes, limit=a.limit)
        db = load_dataset(a.data_b, classes=a.classes, limit=a.limit)
        fa, fb = embed(model, da, **kw), embed(model, db, **kw)
        res = run_diagnose(model, fa, fb, load_concepts(a.concepts, da.classnames), da, db, Path(a.report), a.top)
        print(table_text([["concept", "diff", "Welch t", "Cohen's d", "q"]] +
                         [[r["concept"], f"{r['diff']:+.3f}", f"{r['t']:.1f}", f"{r['cohens_d']:+.2f}", f"{r['q']:.1e}"]
                          for r in res["concepts"][:a.top]]))
        print(f"report: {Path(a.report) / 'index.html'}")
    elif a.cmd == "search":
        from .data import images_at
        from .report import image_cards, write_html
        from .search import search
        if a.k < 1:
            raise ConceptlensError("--k must be positive")
        ds = load_dataset(a.data, classes=a.classes, limit=a.limit)
        res = search(model, embed(model, ds, **kw), a.query, k=a.k)
        print(table_text([["rank", "image", "score"]] + [[i + 1, k, f"{s:.2f}"] for i, (k, s) in
                                                        enumerate(zip(res["keys"], res["scores"]))]))
        if not res["keys"]:
            print("no image passes every constraint")
        write_html(Path(a.report) / "index.html", f"search: {a.query}",
                   [{"title": f"{len(res['keys'])} results for {a.query!r} ({model.name})",
                     "cards": image_cards(images_at(ds, res["keys"]), res["keys"])}])
        _write_json(str(Path(a.report) / "search.json"), res)
    else:
        import numpy as np

        from .decode import CaptionMemory
        if bool(a.data) == bool(a.vector):
            raise ConceptlensError("give exactly one of --data or --vector")
        if a.vector:
            try:
                V = np.load(a.vector, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ConceptlensError(f"cannot read {a.vector}: {exc}") from None
            V = V[None] if V.ndim == 1 else V
            aligner = getattr(model, "aligner", None)
            if aligner is not None:
                V = aligner.transform(V) - (aligner.b_ if a.direction else 0)
            names = [f"vector {i}" for i in range(len(V))]
        else:
            f = embed(model, load_dataset(a.data, classes=a.classes, limit=a.limit), **kw)
            X = np.asarray(f.X, np.float32)
            if a.per_image or not f.labelled_ok:
                V, names = X, list(f.keys)
            else:
                names = list(f.classnames)
                V = np.stack([X[f.labels == c].mean(0) for c in range(len(names))])
        mem = CaptionMemory.build(model, a.captions.split(","))
        out = [{"name": n} | d for n, d in zip(names, mem.decode(V, k=a.k))]
        for o in out:
            print(f"{o['name']}: {', '.join(o['shared_words'][:6])}")
            for c in o["captions"][:3]:
                print(f"    {c['score']:.3f}  {c['caption']}")
        _write_json(a.output, {"model": model.name, "decoded": out})
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ConceptlensError as exc:
        print(f"conceptlens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptlens: interrupted (finished work is cached; rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
