"""PEP 562-style lazy packages: `from conceptlens.concepts import run_diagnose` imports the one submodule that
defines it, not every sibling, so each CLI call pays only for the libraries its command uses (scikit-learn's
import alone is ~2.5 s here)."""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class LazyPackage(types.ModuleType):
    """A package whose public names ({name: submodule}) load with their submodule on first use. A submodule
    import never rebinds an exported name of the same spelling (`concepts.decode` stays the function)."""

    _exports: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        sub = self.__dict__.get("_exports", {}).get(name)
        if sub is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{sub}", self.__name__), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_exports", {}):
            return  # the import system binding submodule `name`: the exported function of that name wins
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._exports))


def lazy_package(name: str, exports: dict[str, str]) -> None:
    """Make the package `name` (call from its __init__ with __name__) a LazyPackage over `exports`."""
    module = sys.modules[name]
    module.__class__ = LazyPackage
    module._exports = exports
