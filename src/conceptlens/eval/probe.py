"""Linear probes (Radford et al. 2021 §3.2) with CLIP_benchmark's recipe, as a scikit-learn estimator."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageDataset
from ..errors import ConceptlensError
from ..estimator import BaseEstimator, ClassifierMixin
from ..features import Features, as_features
from ..models import Encoder
from .metrics import metrics, result_json


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 0 (open_clip's `cosine_lr`; CLIP_benchmark's probe uses warmup 0)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base


class AdamW:
    """torch.optim.AdamW's update for CPU tensors (its single-tensor path, amsgrad off), operation for operation, so
    the weights are bit-identical (tests/test_eval.py). Own class: constructing any torch optimizer imports
    torch._dynamo, ~2 s of every CLI call that fits a probe."""

    def __init__(self, params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params, self.lr, self.weight_decay, self.betas, self.eps = list(params), lr, weight_decay, betas, eps
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        """One update from the parameters' gradients, which it then clears (torch's zero_grad(set_to_none=True))."""
        self.steps += 1
        (b1, b2), lr = self.betas, self.lr
        bias_correction1, bias_correction2 = 1 - b1 ** float(self.steps), 1 - b2 ** float(self.steps)
        for p, (exp_avg, exp_avg_sq) in zip(self.params, self.state):
            g = p.grad
            if self.weight_decay != 0:
                p.mul_(1 - lr * self.weight_decay)
            exp_avg.lerp_(g, 1 - b1)
            exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
            p.grad = None


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Logistic regression on L2-normalised cached features, CLIP_benchmark's recipe (metrics/linear_probe.py).

    nn.Linear + AdamW + cross-entropy, cosine LR without warmup, lr 0.1, 10 epochs, batch 64, seed 0;
    weight decay searched on a validation split over logspace(-6, 2, 97): 7 coarse points, then
    refinement with spans 8, 4, 2, 1; the final model is refit on train+val. A scikit-learn estimator:
    parameters stored unchanged, learned state with a trailing underscore, numpy out (`clone` works).
    """

    def __init__(self, lr: float = 0.1, epochs: int = 10, batch_size: int = 64, weight_decay: float | None = None,
                 val_proportion: float = 0.2, seed: int = 0):
        self.lr, self.epochs, self.batch_size = lr, epochs, batch_size
        self.weight_decay, self.val_proportion, self.seed = weight_decay, val_proportion, seed

    def _train(self, X: torch.Tensor, y: torch.Tensor, n_classes: int, wd: float) -> torch.nn.Linear:
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        lin = torch.nn.Linear(X.shape[1], n_classes)
        opt = AdamW(lin.parameters(), lr=self.lr, weight_decay=wd)
        steps_per_epoch = math.ceil(len(X) / self.batch_size)
        total, step = self.epochs * steps_per_epoch, 0
        for _ in range(self.epochs):
            perm = torch.randperm(len(X), generator=g)
            for i in range(0, len(X), self.batch_size):
                opt.lr = cosine_lr(step, total, self.lr, warmup=0)
                idx = perm[i:i + self.batch_size]
                F.cross_entropy(lin(X[idx]), y[idx]).backward()
                opt.step()
                step += 1
        return lin

    def fit(self, X, y) -> "LinearProbe":
        X, y = np.array(X, dtype=np.float32), np.asarray(y)  # a copy: cached features are read-only memory maps
        if X.ndim != 2 or len(X) != len(y) or len(X) < 2:
            raise ConceptlensError(f"a linear probe needs [n, d] features and n labels (got {X.shape}, {y.shape})")
        if (y < 0).any():
            raise ConceptlensError("a linear probe needs every training image labelled")
        X = F.normalize(torch.as_tensor(X, dtype=torch.float32), dim=-1)
        y = torch.as_tensor(y).long()
        self.n_classes_ = int(y.max()) + 1
        self.classes_ = np.arange(self.n_classes_)
        if self.weight_decay is not None:
            self.weight_decay_ = self.weight_decay
        else:
            perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(self.seed))
            n_val = max(1, int(len(X) * self.val_proportion))
            va, tr = perm[:n_val], perm[n_val:]
            wd_list = np.logspace(-6, 2, num=97).tolist()
            cache: dict[int, float] = {}

            def acc(i: int) -> float:
                if i not in cache:
                    lin = self._train(X[tr], y[tr], self.n_classes_, wd_list[i])
                    with torch.no_grad():
                        cache[i] = (lin(X[va]).argmax(1) == y[va]).float().mean().item()
                return cache[i]

            peak = max(range(0, 97, 16), key=acc)
            for span in (8, 4, 2, 1):
                cand = [max(peak - span, 0), peak, min(peak + span, 96)]
                peak = max(cand, key=acc)
            self.weight_decay_ = wd_list[peak]
            self.val_accuracy_ = cache[peak]
        self.linear_ = self._train(X, y, self.n_classes_, self.weight_decay_)
        return self

    @torch.no_grad()
    def decision_function(self, X) -> np.ndarray:
        """Class scores [n, classes]."""
        X = F.normalize(torch.from_numpy(np.array(X, dtype=np.float32)), dim=-1)
        return self.linear_(X).numpy()

    def predict(self, X) -> np.ndarray:
        return self.decision_function(X).argmax(1)


def linear_probe(model: Encoder, train: ImageDataset | Features, test: ImageDataset | Features, **embed_kw) -> dict:
    """Embed (cached) train and test images, fit the probe on train, score test: CLIP_benchmark JSON."""
    ftr, fte = as_features(model, train, **embed_kw), as_features(model, test, **embed_kw)
    if not ftr.labelled_ok or not fte.labelled_ok:
        raise ConceptlensError("a linear probe needs labelled train and test data")
    if list(ftr.classnames) != list(fte.classnames):
        raise ConceptlensError(f"train and test have different classes ({', '.join(ftr.classnames[:5])} ... vs "
                               f"{', '.join(fte.classnames[:5])} ...): a probe scores only the classes it was fit on")
    probe = LinearProbe().fit(ftr.X, ftr.labels)
    scores = probe.decision_function(fte.X)
    m = metrics(scores, fte.labels)
    return result_json(fte.dataset, model.name, "linear_probe",
                       {f"lp_{k}": v for k, v in m.items()} | {"weight_decay": probe.weight_decay_}) | {
        "n_train": int(len(ftr.labels)), "n_test": int(len(fte.labels)), "classnames": list(ftr.classnames),
        "_weights": probe.linear_.weight.detach().numpy(),  # [C, D] class directions (explain --direction)
        "_scores": scores, "_test": fte}  # for reports; dropped when written
