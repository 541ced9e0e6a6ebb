"""Diffusion models as zero-shot classifiers (Clark & Jaini 2023; Li et al. 2023): the classifier (its settings and
the per-image loop) and dataset evaluation in CLIP_benchmark's layout. The scoring and the strategies are in
`strategies`; the denoisers in `conceptlens.models.denoisers`."""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import ImageDataset, to_arrays
from ..engine import Engine, current
from ..errors import ConceptlensError, did_you_mean
from ..eval.metrics import metrics, result_json
from ..io import digest, progress
from ..models import Denoiser
from ..models.denoisers import EVAL_TEMPLATES, TinyDiffusion
from ..runtime import resolve_device, resolve_precision
from .strategies import STRATEGIES, lowdisc_timesteps, pair_errors

PRESETS = {"cifar10": {"to_keep": [5, 1], "n_samples": [50, 500], "loss": "l1"},
           "li-pets": {"to_keep": [5, 1], "n_samples": [25, 250], "loss": "l2"}}


@dataclass
class DiffusionClassifier:
    """Zero-shot classifier from a text-conditioned denoiser (`fit`-free: call `predict` / `classify_one`).

    Parameters are checked here and never rewritten; the model must already be built (`load_model`)."""

    model: Denoiser
    strategy: str = "halving"
    loss: str = "l2"
    target: str = "eps"
    n_samples: int = 30  # fixed
    to_keep: list[int] = field(default_factory=lambda: [5, 1])  # adaptive
    stage_samples: list[int] = field(default_factory=lambda: [50, 500])  # adaptive
    budget: int | None = None  # halving: denoiser evaluations per image
    t_range: tuple[float, float] = (0.0, 1.0)  # fixed / ttest / halving: the fraction of [0, T) timesteps come from
    p_value: float = 2e-3  # ttest
    min_scores: int = 20  # ttest
    max_scores: int = 2000  # ttest
    batch_size: int = 128
    precision: str = "auto"  # bf16 autocast where the CPU has native bf16 kernels or on CUDA, else fp32
    seed: int = 0
    device: str | None = None  # None = where the model is; else the model is moved there

    def __post_init__(self):
        if not isinstance(self.model, Denoiser):
            raise ConceptlensError(f"{self.model!r} is not a denoiser: build one with "
                                   "load_model('builtin:tiny-diffusion-cifar10') or load_model('diffusers:DIR')")
        if self.strategy not in STRATEGIES:
            raise ConceptlensError(f"unknown strategy {self.strategy!r}{did_you_mean(self.strategy, STRATEGIES, fallback=True)}")
        if self.loss not in ("l1", "l2") or self.target not in ("eps", "x0"):
            raise ConceptlensError("loss is l1|l2 and target eps|x0")
        if self.budget is not None and self.budget < 1 or self.n_samples < 1:
            raise ConceptlensError("budget and n_samples must be positive")
        lo, hi = self.t_range
        if not 0 <= lo < hi <= 1:
            raise ConceptlensError(f"t_range {self.t_range}: need 0 <= low < high <= 1 (fractions of the timesteps)")
        if self.strategy == "adaptive" and (lo, hi) != (0, 1):
            raise ConceptlensError("t_range applies to fixed / ttest / halving: adaptive keeps Li et al.'s timesteps")
        if self.device is not None:
            self.model.to(self.device)
        resolve_precision(self.precision, self.model.device)

    def to(self, device: str | torch.device) -> "DiffusionClassifier":
        """Move the denoiser to `device` (what a Ray worker does with its copy); returns self."""
        self.model.to(resolve_device(device))
        return self

    @classmethod
    def from_preset(cls, model: Denoiser, strategy: str = "halving", preset: str = "cifar10", loss: str | None = None,
                    **kw) -> "DiffusionClassifier":
        """Li et al.'s adaptive schedule from a preset; loss defaults to the preset's for `adaptive`, else L2."""
        if preset not in PRESETS:
            raise ConceptlensError(f"unknown preset {preset!r}{did_you_mean(preset, PRESETS, fallback=True)}")
        pre = PRESETS[preset]
        return cls(model, strategy=strategy, loss=loss or (pre["loss"] if strategy == "adaptive" else "l2"),
                   to_keep=pre["to_keep"], stage_samples=pre["n_samples"], **kw)

    def prompt_embeddings(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """One conditioning per class: prompts for every template, embedded once. Pooled (vector) conditionings
        are averaged over templates and renormalised; token-sequence conditionings use the first template."""
        if not classnames:
            raise ConceptlensError("no class names")
        embs = []
        for c in classnames:
            e = self.model.encode_prompts([t.format(c) for t in templates])
            embs.append(F.normalize(e.mean(0), dim=-1) if e.ndim == 2 else e[0])
        return torch.stack(embs)

    def noise(self, z0: torch.Tensor, n: int, image_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n low-discrepancy timesteps in `t_range` and n noise draws, a function of (seed, image_seed)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + image_seed)
        T = self.model.scheduler.config.num_train_timesteps
        lo = round(self.t_range[0] * T)
        hi = max(lo + 1, round(self.t_range[1] * T))
        return torch.tensor(lowdisc_timesteps(n, T, lo, hi)), torch.randn((n, *z0.shape[1:]), generator=g)

    def evaluate_pairs(self, z0, cond, ts, noise, pairs) -> torch.Tensor:
        """Errors of (class, sample) pairs for one image: what every strategy calls."""
        return pair_errors(self.model, z0, cond, ts, noise, [c for c, _ in pairs], [s for _, s in pairs],
                           self.batch_size, self.loss, self.target, resolve_precision(self.precision, self.model.device))

    def classify_one(self, image: torch.Tensor, cond: torch.Tensor, image_seed: int = 0) -> dict:
        """Predict one image [3,H,W] in [-1,1]; returns prediction, per-class mean errors, and evaluations."""
        z0 = self.model.to_model_space(image[None].float())
        return STRATEGIES[self.strategy](self, z0, cond, len(cond), image_seed)

    def predict(self, images: torch.Tensor, classnames: Sequence[str], templates: Sequence[str],
                show_progress: bool = True, seeds: Sequence[int] | None = None, engine: Engine | None = None,
                unit_size: int | None = None, device: str | None = None) -> list[dict]:
        """Classify a batch of images [B,3,H,W] in [-1,1]: here, or on Ray in units of `unit_size` images (default:
        about three units per worker; results do not depend on where: every image has its own seed). `device`:
        where the units run (on Ray, the workers' device; default: where the model is)."""
        engine = engine or current()
        dev = engine.resolve_device(device) if device is not None else self.model.device
        if not engine.is_ray:
            self.model.to(dev)
        cond = self.prompt_embeddings(classnames, templates).cpu()
        seeds = list(seeds) if seeds is not None else list(range(len(images)))
        size = (unit_size or max(1, math.ceil(len(images) / (3 * engine.worker_count(dev))))) if engine.is_ray else 1
        units = [(images[i:i + size], cond, seeds[i:i + size]) for i in range(0, len(images), size)]
        # this driver's classifier object: a warm worker reuses its copy only for the same object
        key = digest([self.model.name, os.getpid(), id(self), str(dev),
                      {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}])
        out: list[list[dict]] = [[] for _ in units]
        with progress(total=len(images), desc=f"diffusion classify [{self.strategy}]", unit="img",
                      disable=not show_progress or None) as bar:
            for i, res in engine.map(classify_unit, self, key, units, dev):
                out[i] = res
                bar.update(len(res))
        return [r for rs in out for r in rs]


def classify_unit(clf: DiffusionClassifier, unit: tuple[torch.Tensor, torch.Tensor, list[int]]) -> list[dict]:
    """The pure per-unit function (local and Ray): classify some images with their own seeds."""
    images, cond, seeds = unit
    cond = cond.to(clf.model.device)
    return [clf.classify_one(im, cond, s) for im, s in zip(images, seeds)]


def image_tensors(dataset: ImageDataset, size: int, skipped: list[str] | None = None
                  ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """A dataset as [-1,1] tensors [N,3,size,size]; other sizes are an error, not a silent resize; unreadable
    images are left out into `skipped` when it is given."""
    arr, labels, keys = to_arrays(dataset, size, skipped=skipped)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1, labels, keys  # NCHW, as the UNet expects


def default_templates(model: Denoiser) -> list[str]:
    """Prompts the model did not see in training when it says so (the embedded model), else Li et al.'s."""
    return EVAL_TEMPLATES if isinstance(model, TinyDiffusion) else ["a photo of a {}."]


def evaluate(clf: DiffusionClassifier, dataset: ImageDataset, templates: Sequence[str] | None = None,
             show_progress: bool = True, engine: Engine | None = None, device: str | None = None) -> dict:
    """Zero-shot evaluation in CLIP_benchmark's layout plus denoiser evaluations per image."""
    if not dataset.labelled:
        raise ConceptlensError(f"{dataset.name} is unlabelled: accuracy needs labels")
    skipped: list[str] = []
    x, y, keys = image_tensors(dataset, clf.model.image_size, skipped)
    for msg in skipped:
        warnings.warn(f"skipped {msg}", stacklevel=2)
    if not len(keys):
        raise ConceptlensError(f"no readable images in {dataset.name}")
    tmpl = list(templates or default_templates(clf.model))
    t0 = time.perf_counter()
    out = clf.predict(x, dataset.classnames, tmpl, show_progress=show_progress, engine=engine, device=device)
    dev = (engine or current()).resolve_device(device) if device is not None else clf.model.device
    secs = time.perf_counter() - t0
    scores = -torch.tensor([o["errors"] for o in out]).nan_to_num(nan=float("inf"))
    scores[torch.arange(len(out)), torch.tensor([o["pred"] for o in out])] = float("inf")  # the strategy's pick
    m = metrics(scores.nan_to_num(posinf=1e9, neginf=-1e9), y)
    m["evals_per_image"] = float(np.mean([o["evals"] for o in out]))
    m["seconds_per_image"] = secs / len(out)
    res = result_json(dataset.name, clf.model.name, "zeroshot_classification", m)
    res.update({"strategy": clf.strategy, "loss": clf.loss, "target": clf.target, "t_range": list(clf.t_range),
                "templates": tmpl,
                "precision": resolve_precision(clf.precision, dev), "device": str(dev),
                "n_images": len(out), "n_skipped": len(skipped), "skipped": skipped, "classnames": list(dataset.classnames),
                "predictions": [{"key": k, "pred": o["pred"], "evals": o["evals"]} for k, o in zip(keys, out)]})
    res["_scores"] = scores  # for reports; dropped when written
    return res
