"""The `conceptlens` command: parse, make one library call, print. Bad input: one line on stderr, exit 2.

Each command group lives in its own module with `register(subparsers)`; handlers import the library when
they run, so `conceptlens --help` never loads torch.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
import warnings

from ..errors import ConceptlensError
from . import clip, concepts, demo, diffusion, explain, train

GROUPS = (clip, concepts, explain, diffusion, demo, train)


class Parser(argparse.ArgumentParser):
    """argparse with errors as one line (`conceptlens: error: VERB: message`, exit 2), like every other error."""

    def error(self, message: str):
        verb = self.prog.removeprefix("conceptlens").strip()
        self.exit(2, f"conceptlens: error: {verb + ': ' if verb else ''}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    ap = Parser(prog="conceptlens", description="Talk to image representations in words.")
    ap.add_argument("--version", action="version", version=f"conceptlens {__version__}")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress bars or warnings (errors still print)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    for group in GROUPS:
        group.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # third-party "Loading weights" bars: not ours
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ["CONCEPTLENS_QUIET"] = "1"
        warnings.simplefilter("ignore")
    if getattr(args, "num_workers", None):
        os.environ["CONCEPTLENS_NUM_WORKERS"] = str(args.num_workers)
    try:
        from ..engine import using  # light: no torch work until a model is built
        from ..io import is_stdout
        from ._options import RUN, check_outputs, engine_of
        RUN.clear()
        RUN.update(args=args, datasets=[])
        check_outputs(args)
        # JSON on standard output: every message of ours goes to stderr, so stdout is the JSON alone
        to_stderr = getattr(args, "output", None) and is_stdout(args.output)
        with using(engine_of(args)), contextlib.redirect_stdout(sys.stderr if to_stderr else sys.stdout):
            args.func(args)
        return 0
    except ConceptlensError as exc:
        print(f"conceptlens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptlens: interrupted (finished work is cached; rerun to resume)", file=sys.stderr)
        return 130


def run() -> None:
    """The console script: `main`, then, once torch is loaded, exit without tearing the interpreter down (torch's
    module teardown costs ~0.7 s a call) after running the exit handlers and flushing the streams. A live
    non-daemon thread keeps the normal exit, which waits for it."""
    code = main()
    if "torch" not in sys.modules or any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the normal exit runs first: Ray's shutdown, logging's flush
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
