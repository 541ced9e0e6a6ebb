"""One table of models, like timm's `@register_model` and open_clip's pretrained-tags table.

An entry is either a built-in model (`builtin:NAME`, with the tags it accepts) or a scheme (`open_clip:`,
`hf:`, ...) whose factory parses the rest of the URI. `conceptlens.models.load_model` reads this table
and nothing else; `list_models` lists it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ConceptlensError


@dataclass(frozen=True)
class ModelInfo:
    """What `conceptlens models` shows: URI (or URI pattern), kind, width, tags, a buildable example."""

    name: str
    kind: str  # "vision" | "text" | "vision-language" | "diffusion"
    embed_dim: int | None
    description: str
    tags: tuple[str | None, ...] = (None,)  # built-ins: accepted tags (None = no tag)
    example: str | None = None  # schemes: a URI that builds offline with no files (None: needs local files)

    @property
    def is_scheme(self) -> bool:
        return not self.name.startswith("builtin:")


@dataclass(frozen=True)
class Entry:
    info: ModelInfo
    factory: Callable  # built-ins: (tag, layer) -> model; schemes: (rest, layer) -> model


BUILTINS: dict[str, Entry] = {}
SCHEMES: dict[str, Entry] = {}


def register_model(name: str, kind: str, description: str, embed_dim: int | None = None,
                   tags: tuple[str | None, ...] = (None,), example: str | None = None):
    """Decorator: register a built-in (`builtin:NAME`) or a scheme (`SCHEME:PATTERN`) factory."""
    scheme, _, rest = name.partition(":")

    def deco(fn: Callable) -> Callable:
        info = ModelInfo(name, kind, embed_dim, description, tags, example)
        table, key = (BUILTINS, rest) if scheme == "builtin" else (SCHEMES, scheme)
        if key in table:
            raise ConceptlensError(f"model {name!r} is registered twice")
        table[key] = Entry(info, fn)
        return fn
    return deco
