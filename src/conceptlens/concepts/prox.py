"""Proximal gradient (FISTA with gradient restart; Beck & Teboulle 2009, O'Donoghue & Candes 2015), shared by the
concept bottleneck's L1 logistic regression and the sparse concept decomposition. Own code: both problems are a
few dense GEMMs per step over every row at once, where scikit-learn's per-sample / per-row solvers are 20x slower."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

Blocks = list[np.ndarray]


def fista(grad: Callable[[Blocks], Blocks], prox: Callable[[Blocks, float], Blocks], x: Blocks, step: float,
          tol: float, max_iter: int) -> tuple[Blocks, int]:
    """Minimise f + g over parameter blocks `x` (e.g. [weights, intercept]): `grad` gives f's gradient per block,
    `prox(blocks, step)` g's proximal map, `step` = 1 / Lipschitz(grad f). Stops when no parameter moves by more
    than tol relative to the largest entry of the first block. Returns (blocks, iterations)."""
    v, t, step = [a.copy() for a in x], 1.0, float(step)  # Python floats keep float32 blocks float32
    for it in range(1, max_iter + 1):
        xn = prox([vi - step * gi for vi, gi in zip(v, grad(v))], step)
        d = [a - b for a, b in zip(xn, x)]
        if sum(np.vdot(vi - ai, di) for vi, ai, di in zip(v, xn, d)) > 0:  # momentum points uphill: restart it
            t = 1.0
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        v = [a + ((t - 1) / t_next) * di for a, di in zip(xn, d)]
        x, t = xn, t_next
        if max(np.abs(di).max() for di in d) <= tol * max(1.0, np.abs(x[0]).max()):
            return x, it
    return x, max_iter
