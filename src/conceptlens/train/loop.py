"""The resumable step loop every trainer here shares: log.csv, a progress bar with the running loss, a checkpoint
every N steps and on Ctrl-C / SIGTERM (rerun the same command to continue)."""
from __future__ import annotations

import csv
import math
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConceptlensError
from ..io import progress


def run_steps(out: Path, start: int, steps: int, step: Callable[[int], tuple[float, float]],
              save: Callable[[int, float], None], ckpt_every: int, desc: str,
              stop_after: int | None = None) -> tuple[int, bool]:
    """Call `step(i)` (one optimiser step; returns (loss, lr)) for i = start .. steps-1, appending to OUT/log.csv;
    `save(i, running_loss)` every `ckpt_every` steps and when the loop ends or is stopped (Ctrl-C, SIGTERM, or
    `stop_after` steps done in all: a time-boxed run). Returns (steps done, whether it was stopped early)."""
    log = Path(out) / "log.csv"
    new_log = not log.exists()
    stop = {"flag": False}
    old = signal.signal(signal.SIGTERM, lambda *a: stop.update(flag=True))
    losses: list[float] = []
    bar = progress(total=steps, initial=start, desc=desc, unit="step")
    t0, i, saved = time.time(), start, start
    running = lambda: float(np.mean(losses[-50:])) if losses else float("nan")  # noqa: E731
    try:
        with open(log, "a", newline="") as lf:
            w = csv.writer(lf)
            if new_log:
                w.writerow(["step", "loss", "lr", "seconds"])
            while i < steps and not stop["flag"]:
                loss, lr = step(i)
                i += 1
                losses.append(loss)
                w.writerow([i, f"{loss:.5f}", f"{lr:.2e}", f"{time.time() - t0:.1f}"])
                bar.update(1)
                bar.set_postfix(loss=f"{running():.4f}")
                if i % ckpt_every == 0:
                    lf.flush()
                    save(i, running())
                    saved = i
                if stop_after is not None and i >= stop_after and i < steps:
                    stop["flag"] = True
    except KeyboardInterrupt:
        stop["flag"] = True
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, old)
    if i > saved:  # not after an error: the last periodic checkpoint stays the one to resume from
        save(i, running())
    if stop["flag"]:
        print(f"stopped at step {i}; checkpoint in {out} (rerun the same command to resume)", file=sys.stderr)
    return i, stop["flag"]


def finite(loss: float, step: int) -> float:
    """`loss`, or one clear error before a non-finite loss reaches the optimiser."""
    if not math.isfinite(loss):
        raise ConceptlensError(f"loss became {loss} at step {step}; lower --lr")
    return loss
