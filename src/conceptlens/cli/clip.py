"""`models`, `embed`, `zeroshot`, `linear-probe`: CLIP zero-shot and linear probes (CLIP_benchmark's JSON)."""
from __future__ import annotations

from ._options import (add_outputs, command, dataset_of, embed_kwargs, model_of, output_path, positive, table,
                       write_json, write_report)


def register(sub) -> None:
    p = command(sub, "models", "list models, kinds, tags and whether they load offline here", models, None, False, False)
    p.add_argument("--check", action="store_true", help="try loading each built-in model")
    p = command(sub, "embed", "extract and cache features", embed)
    add_outputs(p, report=False, output="features [N, D] as .npy")
    p = command(sub, "table", "one table across result files (like clip_benchmark build)", results_table, None, False,
                False)
    p.add_argument("runs", nargs="+", metavar="RESULT.json", help="results JSON files written by --output")
    p.add_argument("--format", default="markdown", choices=["markdown", "csv", "text"], help="table format")
    add_outputs(p, report=False, output="table")
    p = command(sub, "export", "write features in clip-retrieval's layout (img_emb/*.npy + metadata/*.parquet)", export)
    p.add_argument("--out", required=True, help="a new folder; embedding-reader reads it, autofaiss indexes it, --data takes it")
    p.add_argument("--rows-per-file", type=positive, default=100_000, help="rows per img_emb/metadata part")
    p = command(sub, "zeroshot", "zero-shot classification (CLIP_benchmark JSON)", zeroshot)
    p.add_argument("--templates", default="openai", help="openai (80), simple, or a file")
    add_outputs(p)
    p = command(sub, "linear-probe", "logistic-regression probe on cached features", linear_probe, "train-test")
    p.add_argument("--save-weights", metavar="FILE.npy", help="the probe's class directions [C, D] (for explain --direction)")
    add_outputs(p)


def models(a) -> None:
    from ..models import check_offline, list_models
    rows = [["name", "kind", "dim", "tags", "offline here", "description"]]
    for info in list_models():
        status = check_offline(info) if a.check or info.is_scheme else "yes (registry package)"
        tags = "-" if info.is_scheme else ",".join(t for t in info.tags if t) or "-"
        rows.append([info.name, info.kind, info.embed_dim or "-", tags, status, info.description])
    table(rows)


def embed(a) -> None:
    from ..features import embed as run
    ds = dataset_of(a, a.data)
    model = model_of(a)
    f = run(model, ds, **embed_kwargs(a))
    print(f"{len(f.labels)} images x {f.X.shape[1]} dims from {model.name}; cache {'hit' if f.cache_hit else 'written'}"
          f" at {f.path}; skipped {len(f.skipped)}")
    if a.output:
        import numpy as np

        from ..io import atomic_save_npy
        atomic_save_npy(a.output, np.asarray(f.X))
        print(f"wrote {a.output}")


def results_table(a) -> None:
    from ..io import atomic_write_bytes
    from ..report import format_table, results_table as build
    text = format_table(build(a.runs), a.format)
    if a.output:
        atomic_write_bytes(output_path(a.output), text.encode())
    else:
        print(text, end="")


def export(a) -> None:
    from ..features import embed as run
    from ..features import export as write
    ds = dataset_of(a, a.data)
    model = model_of(a)
    files = write(run(model, ds, **embed_kwargs(a)), ds, model, a.out, a.precision, a.rows_per_file)
    print(f"wrote {len(files)} part(s) to {a.out}/img_emb and {a.out}/metadata")


def zeroshot(a) -> None:
    from ..eval import evaluate, load_templates
    from ..features import embed as run
    load_templates(a.templates)  # a bad template file fails before the model loads
    ds = dataset_of(a, a.data)
    model = model_of(a, need_text=True)
    feats = run(model, ds, **embed_kwargs(a))
    res = evaluate(model, feats, templates=a.templates)
    scores = res.pop("_scores")
    m = res["metrics"]
    table([["dataset", "model", "images", "skipped", "acc1", "acc5", "mean_per_class_recall"],
           [res["dataset"], model.name, res["n_images"], res["n_skipped"], f"{m['acc1']:.4f}", f"{m['acc5']:.4f}",
            f"{m['mean_per_class_recall']:.4f}"]])
    write_json(a.output, res)
    write_report(a, "zeroshot_report", res, ds, feats, scores.numpy())


def linear_probe(a) -> None:
    from ..eval import linear_probe as run
    if a.save_weights:
        output_path(a.save_weights)
    train, test = dataset_of(a, a.train), dataset_of(a, a.test)
    model = model_of(a)
    res = run(model, train, test, **embed_kwargs(a))
    weights, scores, feats = res.pop("_weights"), res.pop("_scores"), res.pop("_test")
    m = res["metrics"]
    table([["dataset", "model", "lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"],
           [res["dataset"], model.name, f"{m['lp_acc1']:.4f}", f"{m['lp_acc5']:.4f}",
            f"{m['lp_mean_per_class_recall']:.4f}", f"{m['weight_decay']:.2e}"]])
    write_json(a.output, res)
    if a.save_weights:
        from ..io import atomic_save_npy
        atomic_save_npy(a.save_weights, weights)
        print(f"wrote {a.save_weights} ({weights.shape[0]} class directions; explain them with --direction)")
    write_report(a, "linear_probe_report", res, test, feats, scores)
