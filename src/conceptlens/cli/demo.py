"""`demo`: zero-shot with the embedded model on bundled photos and ../shared data, HTML report."""
from __future__ import annotations

from pathlib import Path

from ._options import add_device, positive, provenance


def register(sub) -> None:
    import argparse
    p = sub.add_parser("demo", help="zero-shot demo with the embedded model, HTML report",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:lite-clip", help="vision-language model")
    p.add_argument("--templates", default="openai", help="openai (80), simple, or a file")
    p.add_argument("--report", default="out/demo", help="report folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--limit", type=positive, help="images per ../shared set (default: 500, 1000, 500)")
    add_device(p, engine=False)
    p.set_defaults(func=demo)


def demo(a) -> None:
    from ..demo import run
    run(Path(a.report), a.model, a.templates, a.device, a.limit, provenance())
