"""Diffusion zero-shot scoring: the pure per-image error function and the strategies that decide which
(class, sample) pairs to evaluate.

Score of class c for image x: a weighted mean over (t, ε) of the denoising error given c's prompt
embedding (Li et al., ICCV 2023: ε-error, L1/L2; Clark & Jaini, NeurIPS 2023: x₀-error weighted by
w_t = exp(−7 t/T)). All classes of one image share the same timesteps and noise.

A strategy is a function (classifier, z0, cond, n_classes, image_seed) -> {"pred", "errors", "evals"} that
calls `classifier.evaluate_pairs`; add one by writing it here and naming it in STRATEGIES.
- `fixed`: n samples for every class.
- `adaptive`: Li et al.'s staged elimination (`to_keep`, `n_samples`), evenly spaced timesteps, each stage
  adding only new points (diffusion-classifier/eval_prob_adaptive.py).
- `ttest`: Clark & Jaini's pruning: after each new sample, drop a class when a paired t-test against the
  current best gives p < 2e-3 (after at least 20 scores, at most 2000).
- `halving` (ours): successive halving on paired errors. Because every class sees the same (t, ε), the
  between-class differences have far less variance than the errors themselves; halving spends the
  budget where classes are still close. Samples come in a low-discrepancy order over timesteps.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy import stats

from ..errors import ConceptlensError
from ..models import Denoiser
from ..models.denoisers import add_noise
from ..runtime import autocast


def error_fn(noise: torch.Tensor, pred: torch.Tensor, alphas: torch.Tensor, t: torch.Tensor, T: int,
             loss: str, target: str) -> torch.Tensor:
    """Per-sample error: ε-error (Li et al.) or x₀-error weighted by exp(−7t/T) (Clark & Jaini)."""
    diff = pred.float() - noise.float()
    err = diff.abs() if loss == "l1" else diff.pow(2)
    err = err.mean(dim=tuple(range(1, err.ndim)))
    if target == "x0":  # x0 − x̂0 = sqrt((1−ᾱ)/ᾱ)(ε̂ − ε)
        a = alphas[t].float()
        scale = (1 - a) / a if loss == "l2" else ((1 - a) / a).sqrt()
        err = err * scale * torch.exp(-7 * t.float() / T)
    return err


@torch.no_grad()
def pair_errors(model: Denoiser, z0: torch.Tensor, cond: torch.Tensor, ts: torch.Tensor, noise: torch.Tensor,
                cls_idx: Sequence[int], sample_idx: Sequence[int], batch_size: int = 128, loss: str = "l2",
                target: str = "eps", precision: str = "fp32") -> torch.Tensor:
    """Errors of the given (class, sample) pairs for one image latent z0 [1, ...]: a pure function. It runs on
    z0's device (timesteps and noise are drawn on the CPU, so every device sees the same draws) and syncs
    with the host once, at the end."""
    dev = z0.device
    alphas = model.scheduler.alphas_cumprod.float().to(dev)
    T = model.scheduler.config.num_train_timesteps
    ci, si = torch.as_tensor(list(cls_idx), device=dev), torch.as_tensor(list(sample_idx), device=dev)
    ts, noise, cond = ts.to(dev), noise.to(dev), cond.to(dev)
    out = torch.zeros(len(ci), device=dev)
    for s in range(0, len(ci), batch_size):
        c, k = ci[s:s + batch_size], si[s:s + batch_size]
        t, eps = ts[k], noise[k]
        z_t = add_noise(z0, eps, t, alphas)
        with autocast(dev, precision):
            pred = model.denoise(z_t, t, cond[c])
        out[s:s + len(c)] = error_fn(eps, pred, alphas, t, T, loss, target)
    out = out.cpu()
    if not torch.isfinite(out).all():
        raise ConceptlensError(f"non-finite denoiser output under {precision}; use --precision fp32")
    return out


def lowdisc_timesteps(n: int, T: int, lo: int = 0, hi: int | None = None) -> list[int]:
    """Stratified timesteps in van der Corput order: every prefix is spread evenly over [lo, hi) (default [0, T))."""
    def vdc(i: int) -> float:
        x, denom = 0.0, 1.0
        while i:
            denom *= 2
            i, r = divmod(i, 2)
            x += r / denom
        return x
    hi = T if hi is None else hi
    span = hi - lo
    return [lo + min(span - 1, int((vdc(i) + 0.5 / max(n, 1)) * span) % span) for i in range(n)]


def fixed(clf, z0, cond, C, seed):
    """`n_samples` (t, ε) pairs for every class."""
    ts, noise = clf.noise(z0, clf.n_samples, seed)
    e = clf.evaluate_pairs(z0, cond, ts, noise, [(c, s) for c in range(C) for s in range(clf.n_samples)])
    means = e.view(C, clf.n_samples).mean(1)
    return {"pred": int(means.argmin()), "errors": means.tolist(), "evals": C * clf.n_samples}

def adaptive(clf, z0, cond, C, seed):
    """Li et al.'s staged elimination: keep `to_keep[i]` classes after `stage_samples[i]` samples."""
    # transcription of Li et al.'s eval_prob_adaptive (n_trials = 1)
    if clf.to_keep[-1] != 1 or len(clf.to_keep) != len(clf.stage_samples):
        raise ConceptlensError("adaptive: to_keep must end with 1 and match n_samples in length")
    T = clf.model.scheduler.config.num_train_timesteps
    max_n = max(clf.stage_samples)
    g = torch.Generator().manual_seed(clf.seed * 1_000_003 + seed)
    noise = torch.randn((max_n, *z0.shape[1:]), generator=g)
    start = T // max_n // 2
    t_to_eval = list(range(start, T, T // max_n))[:max_n]
    remaining, evaluated, data, evals, stages = list(range(C)), [], {}, 0, []
    for n_s, keep in zip(clf.stage_samples, clf.to_keep):
        cur = t_to_eval[len(t_to_eval) // n_s // 2::len(t_to_eval) // n_s][:n_s]
        cur = [t for t in cur if t not in evaluated]
        base = len(evaluated)
        evaluated += cur
        ts = torch.tensor(evaluated)
        pairs = [(c, base + j) for c in remaining for j in range(len(cur))]
        e = clf.evaluate_pairs(z0, cond, ts, noise, pairs)
        evals += len(pairs)
        for i, (c, _) in enumerate(pairs):
            data.setdefault(c, []).append(float(e[i]))
        means = torch.tensor([np.mean(data[c]) for c in remaining])
        best = torch.topk(-means, k=min(keep, len(remaining))).indices.tolist()
        remaining = [remaining[i] for i in best]
        stages.append(list(remaining))
    errors = [float(np.mean(data[c])) if c in data else float("nan") for c in range(C)]
    return {"pred": remaining[0], "errors": errors, "evals": evals, "stages": stages, "raw": data}

def ttest(clf, z0, cond, C, seed):
    """Clark & Jaini's pruning by paired t-tests against the current best class.

    The decisions are those of testing after every new sample; the denoiser is called on blocks of samples for
    all live classes (the first `min_scores` in one call, then ~TTEST_PAIRS pairs per call), because one sample
    at a time left its batches tiny (18 s an image for 1,349 evaluations). A class pruned inside a block has had
    the rest of the block computed: those evaluations are counted. The prediction is the last class standing,
    else the lowest mean error among the live classes at `max_scores`."""
    ts, noise = clf.noise(z0, clf.max_scores, seed)
    E = np.zeros((C, clf.max_scores))
    alive, evals, s, computed, counted = list(range(C)), 0, 0, 0, {}
    while s < clf.max_scores and len(alive) > 1:
        hi = min(clf.max_scores, max(clf.min_scores, computed + max(1, TTEST_PAIRS // len(alive))))
        pairs = [(c, j) for c in alive for j in range(computed, hi)]
        E[[c for c, _ in pairs], [j for _, j in pairs]] = clf.evaluate_pairs(z0, cond, ts, noise, pairs).numpy()
        evals, computed = evals + len(pairs), hi
        while s < hi and len(alive) > 1:  # replay: the test after each sample, on the scores up to it
            s += 1
            if s >= clf.min_scores:
                kept = _ttest_prune(E[:, :s], alive, clf.p_value)
                counted.update({c: s for c in alive if c not in kept})  # a pruned class's means: its scores so far
                alive = kept
    counted.update({c: s for c in alive})
    means = [float(E[c, :counted[c]].mean()) if counted.get(c) else float("nan") for c in range(C)]
    return {"pred": min(alive, key=lambda c: means[c]), "errors": means, "evals": evals}


TTEST_PAIRS = 64  # (class, sample) pairs per denoiser call once the first min_scores are in


def _ttest_prune(E: np.ndarray, alive: list[int], p_value: float) -> list[int]:
    """The live classes whose paired errors are not significantly above the best's (one-sided t-test)."""
    means = E[alive].mean(1)
    best = alive[int(means.argmin())]
    d = E[alive] - E[best]
    n = d.shape[1]
    sd = d.std(1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(sd > 0, stats.t.sf(d.mean(1) / (sd / math.sqrt(n)), n - 1), 0.0)
    return sorted(c for c, pc in zip(alive, p) if c == best or not pc < p_value)


def halving(clf, z0, cond, C, seed):
    """Ours: successive halving on paired errors within a fixed evaluation budget."""
    budget = clf.budget or 8 * C
    if budget < C:
        raise ConceptlensError(f"budget {budget} is smaller than the number of classes ({C})")
    rounds = max(1, math.ceil(math.log2(C)))
    per_round = budget / rounds
    ts, noise = clf.noise(z0, budget, seed)
    alive, errs, used, done = list(range(C)), {c: [] for c in range(C)}, 0, 0
    for r in range(rounds):
        n_new = max(1, int(per_round // len(alive)))
        if r == rounds - 1:
            n_new = max(1, (budget - used) // len(alive))
        pairs = [(c, done + j) for c in alive for j in range(n_new)]
        e = clf.evaluate_pairs(z0, cond, ts, noise, pairs)
        used += len(pairs)
        for i, (c, _) in enumerate(pairs):
            errs[c].append(float(e[i]))
        done += n_new
        # compare classes on the samples they all share (paired): the mean over the shared prefix
        shared = min(len(errs[c]) for c in alive)
        means = {c: np.mean(errs[c][:shared]) for c in alive}
        alive = sorted(alive, key=means.get)[:max(1, math.ceil(len(alive) / 2))]
        if len(alive) == 1:
            break
    means = [float(np.mean(errs[c])) if errs[c] else float("nan") for c in range(C)]
    return {"pred": alive[0], "errors": means, "evals": used}


STRATEGIES = {"fixed": fixed, "adaptive": adaptive, "ttest": ttest, "halving": halving}
