"""conceptlens: talk to image representations in words, offline, on a laptop CPU.

Layers import downward only (checked by tests/test_architecture.py):
errors/io -> data -> models -> features -> eval -> concepts -> explain | diffusion -> report -> demo -> train -> cli.
Submodules load on first use, so `import conceptlens` (and `conceptlens --help`) stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import ConceptlensError

__version__ = "0.2.0"
_SUBMODULES = ("concepts", "data", "diffusion", "eval", "explain", "features", "io", "models", "report")
_API = {"load_model": "models", "list_models": "models", "embed": "features", "embed_texts": "features"}
__all__ = ["ConceptlensError", *_SUBMODULES, *_API]


def __getattr__(name: str) -> Any:  # PEP 562: import torch and friends only when the API is touched
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'conceptlens' has no attribute {name!r}")
