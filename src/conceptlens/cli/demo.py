"""`demo`: zero-shot with the embedded model on bundled photos and ../shared data, HTML report."""
from __future__ import annotations

from pathlib import Path

from ._options import add_device


def register(sub) -> None:
    p = sub.add_parser("demo", help="zero-shot demo with the embedded model, HTML report")
    p.add_argument("--model", default="builtin:lite-clip")
    p.add_argument("--templates", default="openai")
    p.add_argument("--report", default="out/demo")
    add_device(p, engine=False)
    p.set_defaults(func=demo)


def demo(a) -> None:
    from ..demo import run
    run(Path(a.report), a.model, a.templates, a.device)
