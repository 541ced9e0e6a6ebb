"""Diffusion models as zero-shot classifiers.

Score of class c for image x: a weighted mean over (t, ε) of the denoising error given c's prompt
embedding (Li et al., ICCV 2023: ε-error, L1/L2; Clark & Jaini, NeurIPS 2023: x₀-error weighted by
w_t = exp(−7 t/T)). All classes of one image share the same timesteps and noise; prompt embeddings are
computed once; several (class, sample) pairs go through the denoiser in one batch.

Strategies decide which (class, sample) pairs to evaluate:
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
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConceptlensError

PRESETS = {"cifar10": {"to_keep": [5, 1], "n_samples": [50, 500], "loss": "l1"},
           "li-pets": {"to_keep": [5, 1], "n_samples": [25, 250], "loss": "l2"}}
STRATEGIES = ("fixed", "adaptive", "ttest", "halving")


def load_diffusion(name: str):
    """`builtin:tiny-diffusion-cifar10` or `diffusers:REPO_OR_DIR` (local files only)."""
    if name in ("builtin:tiny-diffusion-cifar10", "tiny-diffusion-cifar10"):
        from .model import load_tiny_diffusion
        return load_tiny_diffusion()
    if name.startswith("diffusers:"):
        return DiffusersModel.from_pretrained(name.split(":", 1)[1])
    raise ConceptlensError(f"unknown diffusion model {name!r}: use builtin:tiny-diffusion-cifar10 or diffusers:REPO")


class DiffusersModel:
    """Any diffusers text-to-image pipeline (UNet2DConditionModel + scheduler + CLIP text encoder + optional VAE)."""

    def __init__(self, pipe, name: str = "diffusers"):
        unet = getattr(pipe, "unet", None)
        if unet is None or getattr(unet.config, "cross_attention_dim", None) is None:
            raise ConceptlensError(f"{name}: not a text-conditioned diffusion model (no UNet with cross-attention)")
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ConceptlensError(f"{name}: the pipeline has no text encoder/tokenizer: no text conditioning")
        self.pipe, self.unet, self.scheduler, self.name = pipe, unet.eval(), pipe.scheduler, name
        self.vae = getattr(pipe, "vae", None)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_size = unet.config.sample_size * factor

    @classmethod
    def from_pretrained(cls, repo: str) -> "DiffusersModel":
        from diffusers import DiffusionPipeline
        try:
            pipe = DiffusionPipeline.from_pretrained(repo, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many types for "not here"
            raise ConceptlensError(f"diffusers:{repo} is not available offline ({type(exc).__name__}); nothing is "
                                   "downloaded at run time: give a local pipeline folder") from None
        return cls(pipe, f"diffusers:{repo}")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids)[0]

    @torch.no_grad()
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ConceptlensError(f"{self.name} takes {self.image_size}x{self.image_size} images, "
                                   f"got {tuple(images.shape[-2:])}")
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, encoder_hidden_states=cond).sample


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
def pair_errors(model, z0: torch.Tensor, cond: torch.Tensor, ts: torch.Tensor, noise: torch.Tensor,
                cls_idx: Sequence[int], sample_idx: Sequence[int], batch_size: int = 128, loss: str = "l2",
                target: str = "eps", precision: str = "fp32") -> torch.Tensor:
    """Errors of the given (class, sample) pairs for one image latent z0 [1, ...]: a pure function."""
    alphas = model.scheduler.alphas_cumprod.float()
    T = model.scheduler.config.num_train_timesteps
    ci, si = torch.as_tensor(list(cls_idx)), torch.as_tensor(list(sample_idx))
    out = torch.zeros(len(ci))
    for s in range(0, len(ci), batch_size):
        c, k = ci[s:s + batch_size], si[s:s + batch_size]
        t, eps = ts[k], noise[k]
        a = alphas[t].view(-1, *([1] * (z0.ndim - 1)))
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = model.denoise(z_t, t, cond[c])
        e = error_fn(eps, pred, alphas, t, T, loss, target)
        if not torch.isfinite(e).all():
            raise ConceptlensError(f"non-finite denoiser output under {precision}; use --precision fp32")
        out[s:s + len(c)] = e
    return out


def lowdisc_timesteps(n: int, T: int) -> list[int]:
    """Stratified timesteps in van der Corput order: every prefix is spread evenly over [0, T)."""
    def vdc(i: int) -> float:
        x, denom = 0.0, 1.0
        while i:
            denom *= 2
            i, r = divmod(i, 2)
            x += r / denom
        return x
    return [min(T - 1, int((vdc(i) + 0.5 / max(n, 1)) * T) % T) for i in range(n)]


@dataclass
class DiffusionClassifier:
    """Zero-shot classifier from a text-conditioned denoiser (`fit`-free: call `predict` / `classify`)."""

    model: object
    strategy: str = "halving"
    loss: str = "l2"
    target: str = "eps"
    n_samples: int = 30  # fixed
    to_keep: list[int] = field(default_factory=lambda: [5, 1])  # adaptive
    stage_samples: list[int] = field(default_factory=lambda: [50, 500])  # adaptive
    budget: int | None = None  # halving: denoiser evaluations per image
    p_value: float = 2e-3  # ttest
    min_scores: int = 20  # ttest
    max_scores: int = 2000  # ttest
    batch_size: int = 128
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.model, str):
            self.model = load_diffusion(self.model)
        if self.strategy not in STRATEGIES:
            raise ConceptlensError(f"unknown strategy {self.strategy!r}: use {', '.join(STRATEGIES)}")
        if self.loss not in ("l1", "l2") or self.target not in ("eps", "x0"):
            raise ConceptlensError("loss is l1|l2 and target eps|x0")

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

    def _noise(self, z0: torch.Tensor, n: int, image_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + image_seed)
        T = self.model.scheduler.config.num_train_timesteps
        return torch.tensor(lowdisc_timesteps(n, T)), torch.randn((n, *z0.shape[1:]), generator=g)

    def classify_one(self, image: torch.Tensor, cond: torch.Tensor, image_seed: int = 0) -> dict:
        """Predict one image [3,H,W] in [-1,1]; returns prediction, per-class mean errors, and evaluations."""
        C = len(cond)
        z0 = self.model.to_model_space(image[None].float())
        run = getattr(self, f"_{self.strategy}")
        return run(z0, cond, C, image_seed)

    def _eval(self, z0, cond, ts, noise, pairs):
        ci = [c for c, _ in pairs]
        si = [s for _, s in pairs]
        return pair_errors(self.model, z0, cond, ts, noise, ci, si, self.batch_size, self.loss, self.target,
                           self.precision)

    def _fixed(self, z0, cond, C, seed):
        ts, noise = self._noise(z0, self.n_samples, seed)
        e = self._eval(z0, cond, ts, noise, [(c, s) for c in range(C) for s in range(self.n_samples)])
        means = e.view(C, self.n_samples).mean(1)
        return {"pred": int(means.argmin()), "errors": means.tolist(), "evals": C * self.n_samples}

    def _adaptive(self, z0, cond, C, seed):
        # transcription of Li et al.'s eval_prob_adaptive (n_trials = 1)
        if self.to_keep[-1] != 1 or len(self.to_keep) != len(self.stage_samples):
            raise ConceptlensError("adaptive: to_keep must end with 1 and match n_samples in length")
        T = self.model.scheduler.config.num_train_timesteps
        max_n = max(self.stage_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + seed)
        noise = torch.randn((max_n, *z0.shape[1:]), generator=g)
        start = T // max_n // 2
        t_to_eval = list(range(start, T, T // max_n))[:max_n]
        remaining, evaluated, data, evals, stages = list(range(C)), [], {}, 0, []
        for n_s, keep in zip(self.stage_samples, self.to_keep):
            cur = t_to_eval[len(t_to_eval) // n_s // 2::len(t_to_eval) // n_s][:n_s]
            cur = [t for t in cur if t not in evaluated]
            base = len(evaluated)
            evaluated += cur
            ts = torch.tensor(evaluated)
            pairs = [(c, base + j) for c in remaining for j in range(len(cur))]
            e = self._eval(z0, cond, ts, noise, pairs)
            evals += len(pairs)
            for i, (c, _) in enumerate(pairs):
                data.setdefault(c, []).append(float(e[i]))
            means = torch.tensor([np.mean(data[c]) for c in remaining])
            best = torch.topk(-means, k=min(keep, len(remaining))).indices.tolist()
            remaining = [remaining[i] for i in best]
            stages.append(list(remaining))
        errors = [float(np.mean(data[c])) if c in data else float("nan") for c in range(C)]
        return {"pred": remaining[0], "errors": errors, "evals": evals, "stages": stages, "raw": data}

    def _ttest(self, z0, cond, C, seed):
        from scipy import stats
        ts, noise = self._noise(z0, self.max_scores, seed)
        alive, errs, evals = list(range(C)), {c: [] for c in range(C)}, 0
        for s in range(self.max_scores):
            e = self._eval(z0, cond, ts, noise, [(c, s) for c in alive])
            evals += len(alive)
            for i, c in enumerate(alive):
                errs[c].append(float(e[i]))
            if len(alive) == 1:
                break
            if s + 1 >= self.min_scores:
                means = {c: np.mean(errs[c]) for c in alive}
                best = min(alive, key=means.get)
                keep = [best]
                for c in alive:
                    if c == best:
                        continue
                    d = np.asarray(errs[c][-(s + 1):]) - np.asarray(errs[best][-(s + 1):])
                    p = stats.ttest_1samp(d, 0.0, alternative="greater").pvalue if d.std() > 0 else 0.0
                    if not p < self.p_value:
                        keep.append(c)
                alive = sorted(keep)
        means = [float(np.mean(errs[c])) if errs[c] else float("nan") for c in range(C)]
        best = min((c for c in range(C) if errs[c]), key=lambda c: (len(errs[c]) < max(map(len, errs.values())), means[c]))
        return {"pred": best, "errors": means, "evals": evals}

    def _halving(self, z0, cond, C, seed):
        budget = self.budget or 8 * C
        if budget < C:
            raise ConceptlensError(f"budget {budget} is smaller than the number of classes ({C})")
        rounds = max(1, math.ceil(math.log2(C)))
        per_round = budget / rounds
        ts, noise = self._noise(z0, budget, seed)
        alive, errs, used, done = list(range(C)), {c: [] for c in range(C)}, 0, 0
        for r in range(rounds):
            n_new = max(1, int(per_round // len(alive)))
            if r == rounds - 1:
                n_new = max(1, (budget - used) // len(alive))
            pairs = [(c, done + j) for c in alive for j in range(n_new)]
            e = self._eval(z0, cond, ts, noise, pairs)
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

    def predict(self, images: torch.Tensor, classnames: Sequence[str], templates: Sequence[str],
                show_progress: bool = True, seeds: Sequence[int] | None = None) -> list[dict]:
        """Classify a batch of images [B,3,H,W] in [-1,1]."""
        from ..utils import progress
        cond = self.prompt_embeddings(classnames, templates)
        seeds = list(seeds) if seeds is not None else list(range(len(images)))
        return [self.classify_one(images[i], cond, seeds[i])
                for i in progress(range(len(images)), desc=f"diffusion classify [{self.strategy}]", unit="img",
                                  disable=not show_progress or None)]


def image_tensors(dataset, size: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode a dataset into [-1,1] tensors [N,3,size,size]; other sizes are an error, not a silent resize."""
    from ..data import iter_shard
    xs, keys, labels, pos = [], [], [], 0
    for shard in dataset.shards:
        for i, im, err in iter_shard(shard):
            key = dataset.keys[pos + i]
            if im is None:
                raise ConceptlensError(f"unreadable image {key}: {err}")
            if im.size != (size, size):
                raise ConceptlensError(f"{key} is {im.size[0]}x{im.size[1]}; this model classifies {size}x{size} images")
            xs.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
            keys.append(key)
            labels.append(int(dataset.labels[pos + i]))
        pos += len(shard.items)
    return torch.stack(xs), np.asarray(labels), keys


def default_templates(model) -> list[str]:
    """Prompts the model did not see in training when it says so (the embedded model), else Li et al.'s."""
    from .model import EVAL_TEMPLATES, TinyDiffusion
    return EVAL_TEMPLATES if isinstance(model, TinyDiffusion) else ["a photo of a {}."]


def evaluate(clf: DiffusionClassifier, dataset, templates: Sequence[str] | None = None,
             show_progress: bool = True) -> dict:
    """Zero-shot evaluation in CLIP_benchmark's layout plus denoiser evaluations per image."""
    import time

    from ..zeroshot import metrics, result_json
    if not dataset.labelled:
        raise ConceptlensError(f"{dataset.name} is unlabelled: accuracy needs labels")
    x, y, keys = image_tensors(dataset, clf.model.image_size)
    tmpl = list(templates or default_templates(clf.model))
    t0 = time.perf_counter()
    out = clf.predict(x, dataset.classnames, tmpl, show_progress=show_progress)
    secs = time.perf_counter() - t0
    scores = -torch.tensor([o["errors"] for o in out]).nan_to_num(nan=float("inf"))
    scores[torch.arange(len(out)), torch.tensor([o["pred"] for o in out])] = float("inf")  # the strategy's pick
    m = metrics(scores.nan_to_num(posinf=1e9, neginf=-1e9), y)
    m["evals_per_image"] = float(np.mean([o["evals"] for o in out]))
    m["seconds_per_image"] = secs / len(out)
    res = result_json(dataset.name, clf.model.name, "zeroshot_classification", m)
    res.update({"strategy": clf.strategy, "loss": clf.loss, "target": clf.target, "templates": tmpl,
                "n_images": len(out), "classnames": list(dataset.classnames),
                "predictions": [{"key": k, "pred": o["pred"], "evals": o["evals"]} for k, o in zip(keys, out)]})
    res["_scores"] = scores  # for reports; dropped when written
    return res
