"""Options shared by several commands, and the helpers every command uses to load inputs and write outputs.

Nothing here imports torch at module level: `conceptlens --help` must print without loading the library.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ConceptlensError


def add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="model URI, e.g. builtin:lite-clip (see `conceptlens models`)")
    p.add_argument("--layer", help="named layer of a vision model (global-average-pooled)")
    p.add_argument("--aligner", help="aligner file mapping the model into a vision-language space")


def add_data(p: argparse.ArgumentParser, flag: str = "--data", required: bool = True) -> None:
    p.add_argument(flag, required=required, help="folder, tar shards (brace/glob), CSV/JSONL, or a named set")
    p.add_argument("--classes", help="class names file (classes.txt or classes.tsv)")
    p.add_argument("--limit", type=positive, help="evenly spaced subset of N images")
    p.add_argument("--dataset-name", help="the dataset's name in results (default: the folder or file name)")
    add_identity(p)


def add_outputs(p: argparse.ArgumentParser, report: bool = True, output: str = "results JSON") -> None:
    """The one output convention: --output FILE|- (JSON; - = standard output), --report DIR (HTML + JSON),
    --overwrite (an existing report folder is otherwise an error before any work)."""
    p.add_argument("--output", metavar="FILE|-", help=f"write the {output} here (- = standard output)")
    if report:
        p.add_argument("--report", metavar="DIR", help="write an HTML report (index.html + its JSON) into this folder")
        p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def add_identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", default="content", choices=["content", "stat"],
                   help="feature cache key: hash of the files' bytes, or path+size+times+inode for very large sets")


def add_train_test(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="labelled training images")
    p.add_argument("--test", required=True, help="labelled test images")
    p.add_argument("--classes", help="class names file (classes.txt or classes.tsv)")
    p.add_argument("--limit", type=positive, help="evenly spaced subset of N images of each")
    p.add_argument("--dataset-name", help="the dataset's name in results (default: the folder or file name)")
    add_identity(p)


def add_device(p: argparse.ArgumentParser, engine: bool = True) -> None:
    """--device, and (for verbs with per-shard work) --engine / --ray-address / --ray-workers."""
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps (auto = CUDA when available)")
    if engine:
        p.add_argument("--engine", default="local", choices=["local", "ray"],
                       help="run the heavy per-shard work here or on a Ray cluster")
        p.add_argument("--ray-address", help="HOST:PORT of a running cluster (`ray start --head`); default: start one here")
        p.add_argument("--ray-workers", type=positive, help="concurrent Ray workers (default: one per CPU, or per GPU)")


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast on CPUs with native bf16 kernels and on CUDA (fp16 on older GPUs), else fp32; "
                        "image towers that export run fp32 on ONNX Runtime on every CPU (faster than bf16 there)")


def add_embed_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive, help="images per batch (default: 64 on the CPU, 256 on a GPU)")
    p.add_argument("--num-workers", type=positive, help="image decoding threads (default: 2 on the CPU, up to 16 on a GPU)")
    add_precision(p)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "openvino"],
                   help="image-embedding runtime: auto = ONNX Runtime for fp32 on the CPU where the model exports "
                        "(same features, 2-4x faster), else torch; openvino: fp32, or bf16 with --precision bf16 "
                        "(faster on CPUs with native bf16; features change slightly)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")


def command(sub, name: str, help: str, func, inputs: str | None = "data", model: bool = True,
            embed: bool = True) -> argparse.ArgumentParser:
    """A subcommand with the usual groups: --model/--layer/--aligner, its inputs ("data", "optional-data",
    "train-test", "a-b" or None) and the embedding options; `func(args)` runs it."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if model:
        add_model(p)
    if inputs in ("data", "optional-data"):
        add_data(p, required=inputs == "data")
    elif inputs == "train-test":
        add_train_test(p)
    elif inputs == "a-b":
        p.add_argument("--data-a", required=True, help="images A (the reference)")
        p.add_argument("--data-b", required=True, help="images B (shifted)")
        p.add_argument("--classes", help="class names file (classes.txt or classes.tsv)")
        p.add_argument("--limit", type=positive, help="evenly spaced subset of N images of each")
        add_identity(p)
    if embed:
        add_embed_opts(p)
    if model or embed:
        add_device(p)
    p.set_defaults(func=func)
    return p


def _typed(text: str, cast, noun: str, ok, need: str):
    """An argparse type's check: `text` cast, or the one-line error argparse prints before exiting 2."""
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"{need}, got {text}")
    return v


def positive(text: str) -> int:
    """argparse type: a positive integer."""
    return _typed(text, int, "an integer", lambda v: v >= 1, "must be positive")


def nonnegative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _typed(text, float, "a number", lambda v: 0 <= v < float("inf"), "must be a finite number >= 0")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _typed(text, float, "a number", lambda v: 0 <= v <= 1, "must lie in [0, 1]")


def fraction_range(text: str) -> tuple[float, float]:
    """argparse type: LOW,HIGH with 0 <= LOW < HIGH <= 1."""
    return _typed(text, lambda t: tuple(float(v) for v in t.split(",")), "two numbers LOW,HIGH",
                  lambda v: len(v) == 2 and 0 <= v[0] < v[1] <= 1, "need 0 <= LOW < HIGH <= 1")


def embed_kwargs(a: argparse.Namespace) -> dict:
    return {"batch_size": a.batch_size, "precision": a.precision, "use_cache": not a.no_cache, "strict": a.strict,
            "device": a.device, "backend": a.backend}


def engine_of(a: argparse.Namespace):
    """The engine the command's options ask for (local unless --engine ray)."""
    from ..engine import Engine
    return Engine(getattr(a, "engine", "local"), getattr(a, "ray_address", None), getattr(a, "ray_workers", None))


def load_on_device(a: argparse.Namespace, name: str, **kw):
    """A model on --device (on Ray, the driver keeps it on the CPU and every worker moves its copy)."""
    from ..models import load_model
    return load_model(name, device=None if getattr(a, "engine", "local") == "ray" else a.device, **kw)


def model_of(a: argparse.Namespace, need_text: bool = False):
    model = load_on_device(a, a.model, layer=a.layer, aligner=a.aligner)
    if need_text and not model.has_text:
        raise ConceptlensError(f"{model.name} has no text tower: give --aligner FILE (see `conceptlens align`)")
    return model


RUN: dict = {"datasets": []}  # what this command read, for its provenance


def dataset_of(a: argparse.Namespace, spec: str, extra: bool = False):
    """Load a --data/--train/--test argument (named by --dataset-name if given) and note it for the provenance.
    `extra`: a further, label-free set (align --also): --classes and --dataset-name do not apply to it."""
    from ..data import load_dataset
    classes = None if extra else a.classes
    ds = load_dataset(spec, classes=classes, limit=a.limit, identity=getattr(a, "identity", "content"))
    if getattr(a, "dataset_name", None) and not extra:
        ds.name = a.dataset_name
    RUN["datasets"].append({"spec": str(spec), "name": ds.name, "root": ds.root, "n_images": len(ds),
                            "n_classes": len(ds.classnames or []), "identity": ds.identity,
                            "limit": a.limit, "classes": str(classes) if classes else None})
    return ds


_PROVENANCE_ARGS = ("model", "layer", "aligner", "source", "target", "vl_model", "captions", "concepts", "templates",
                    "strategy", "budget", "n_samples", "seed", "device", "precision", "backend", "engine", "batch_size",
                    "limit", "identity", "config", "query", "partial", "view")


def provenance() -> dict:
    """The provenance block of this command's results (see `conceptlens.io.provenance`); built once, after the
    inputs are loaded, so the JSON and the report of one run carry the same block."""
    if "provenance" not in RUN:
        from ..io import provenance as base
        a = RUN.get("args")
        args = {k: getattr(a, k) for k in _PROVENANCE_ARGS if a is not None and getattr(a, k, None) is not None}
        RUN["provenance"] = base(verb=getattr(a, "cmd", None), args=args, datasets=RUN["datasets"])
    return RUN["provenance"]


def write_report(a: argparse.Namespace, page: str, res: dict, *inputs, **kw) -> None:
    """If --report was given: `conceptlens.report.<page>(res + provenance, *inputs, report_dir, **kw)`, printed."""
    if a.report:
        from .. import report
        print(f"report: {getattr(report, page)(res | {'provenance': provenance()}, *inputs, Path(a.report), **kw)}")


def load_vectors(path: str):
    """A float .npy of one vector [D] or several [N, D], finite: anything else is one line."""
    import numpy as np
    try:
        V = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConceptlensError(f"cannot read {path}: {exc}") from None
    if not isinstance(V, np.ndarray) or V.dtype.kind not in "fiu" or V.ndim not in (1, 2) or V.size == 0:
        raise ConceptlensError(f"{path}: expected a numeric .npy of shape [D] or [N, D]")
    if not np.isfinite(V).all():
        raise ConceptlensError(f"{path} contains NaN or inf values")
    return V.astype(np.float32)


def output_path(path: str) -> Path:
    """An output file path (`-` = standard output): not a directory, its folder writable (checked before work)."""
    from ..io import is_stdout
    p = Path(path)
    if is_stdout(path):
        return p
    if p.is_dir():
        raise ConceptlensError(f"{path} is a directory: give a file name")
    _writable_parent(p, path)
    return p


def _writable_parent(p: Path, what: str) -> None:
    parent = next((q for q in p.absolute().parents if q.exists()), Path("/"))
    if not parent.is_dir():
        raise ConceptlensError(f"cannot write {what}: {parent} is a file, not a folder")
    if not p.exists() and not os.access(parent, os.W_OK):
        raise ConceptlensError(f"cannot write {what}: {parent} is not writable")


def check_outputs(a: argparse.Namespace) -> None:
    """--output / --report checked before any work, so a bad path never costs the compute."""
    if getattr(a, "output", None):
        output_path(a.output)
    report = getattr(a, "report", None)
    if report:
        r = Path(report)
        if r.exists() and not r.is_dir():
            raise ConceptlensError(f"--report {report} is a file: give a folder")
        if r.is_dir() and any(r.iterdir()) and not getattr(a, "overwrite", False):
            raise ConceptlensError(f"--report {report} already holds files: pass --overwrite to replace that report, "
                                   "or give another folder")
        _writable_parent(r, f"--report {report}")


def write_json(path: str | None, obj: dict) -> None:
    """The results JSON, with the run's provenance, to `path` (`-` or /dev/stdout: standard output)."""
    if path:
        output_path(path)
        from ..io import atomic_write_json, is_stdout
        try:
            atomic_write_json(Path(path), {**obj, "provenance": provenance()})
        except OSError as exc:
            raise ConceptlensError(f"cannot write {path}: {exc.strerror}") from None
        if not is_stdout(path):
            print(f"wrote {path}")


def command_line() -> str:
    return "conceptlens " + " ".join(sys.argv[1:])


def table(rows: list[list]) -> None:
    from ..report import table_text
    print(table_text(rows))
