"""The command line: `main` parses and dispatches to one module per command group."""
from .main import build_parser, main, run

__all__ = ["build_parser", "main", "run"]
