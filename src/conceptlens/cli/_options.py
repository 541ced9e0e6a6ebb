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
    add_identity(p)


def add_identity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", default="content", choices=["content", "stat"],
                   help="feature cache key: hash of the files' bytes, or path+size+times+inode for very large sets")


def add_train_test(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="labelled training images")
    p.add_argument("--test", required=True, help="labelled test images")
    p.add_argument("--classes", help="class names file (classes.txt or classes.tsv)")
    p.add_argument("--limit", type=positive, help="evenly spaced subset of N images of each")
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
                   help="auto = bf16 autocast on CPUs with native bf16 kernels and on CUDA (fp16 on older GPUs), else fp32")


def add_embed_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive, help="images per batch (default: 64 on the CPU, 256 on a GPU)")
    add_precision(p)
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--strict", action="store_true", help="unreadable images are an error instead of skipped")


def command(sub, name: str, help: str, func, inputs: str | None = "data", model: bool = True,
            embed: bool = True) -> argparse.ArgumentParser:
    """A subcommand with the usual groups: --model/--layer/--aligner, its inputs ("data", "optional-data",
    "train-test", "a-b" or None) and the embedding options; `func(args)` runs it."""
    p = sub.add_parser(name, help=help)
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


def positive(text: str) -> int:
    """argparse type: a positive integer (argparse prints the one-line error and exits 2)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def embed_kwargs(a: argparse.Namespace) -> dict:
    return {"batch_size": a.batch_size, "precision": a.precision, "use_cache": not a.no_cache, "strict": a.strict,
            "device": a.device}


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


def dataset_of(a: argparse.Namespace, spec: str):
    from ..data import load_dataset
    return load_dataset(spec, classes=a.classes, limit=a.limit, identity=getattr(a, "identity", "content"))


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
    """An output file path: not a directory, not a device or pipe, its folder creatable (checked before work)."""
    p = Path(path)
    if p.is_dir():
        raise ConceptlensError(f"{path} is a directory: give a file name")
    if p.exists() and not p.is_file():
        raise ConceptlensError(f"{path} is not a regular file: conceptlens writes files atomically (temp + rename)")
    return p


def check_outputs(a: argparse.Namespace) -> None:
    """--output / --report checked before any work, so a bad path never costs the compute."""
    if getattr(a, "output", None):
        output_path(a.output)
    report = getattr(a, "report", None)
    if report:
        r = Path(report)
        if r.exists() and not r.is_dir():
            raise ConceptlensError(f"--report {report} is a file: give a folder")
        parent = next((p for p in [r, *r.parents] if p.exists()), Path("."))
        if not os.access(parent, os.W_OK):
            raise ConceptlensError(f"--report {report}: {parent} is not writable")


def write_json(path: str | None, obj: dict) -> None:
    if path:
        output_path(path)
        from ..io import atomic_write_json
        try:
            atomic_write_json(Path(path), obj)
        except OSError as exc:
            raise ConceptlensError(f"cannot write {path}: {exc.strerror}") from None
        print(f"wrote {path}")


def command_line() -> str:
    return "conceptlens " + " ".join(sys.argv[1:])


def table(rows: list[list]) -> None:
    from ..report import table_text
    print(table_text(rows))
