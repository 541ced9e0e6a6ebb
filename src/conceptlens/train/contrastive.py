"""The contrastive (CLIP) objective, the margin regularizers of CLIP theory, and one trainer for heads on
cached frozen-tower features (LiT-style), shared by the embedded lite-clip and `conceptlens train clip`.

`clip_loss` is the symmetric InfoNCE of Radford et al. 2021 (parity-tested against open_clip's ClipLoss).
Regularizers on L2-normalised embeddings g (image), h (text), added as λ·R (Chen, Deng, Li, Gu, ICLR 2024,
"regularize only positive pairs to enlarge the margin"; the paper's exact form could not be checked offline,
so we adopt the simplest form with that property and say so):
- `one-sided`:  R = mean_i (1 − ⟨g_i, h_i⟩)  (= ½‖g_i − h_i‖², positives only)
- `two-sided`:  one-sided + mean_{i≠j} ⟨g_i, h_j⟩  (also pushes negatives apart)
- `negatives`:  mean_{i≠j} ⟨g_i, h_j⟩  (negatives only, the ablation)
`square` replaces InfoNCE by the square (spectral contrastive) loss −2·mean_i⟨g_i,h_i⟩ + mean_{i≠j}⟨g_i,h_j⟩²
(HaoChen et al. 2021), the loss the paper shows failing at zero-shot transfer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConceptlensError
from ..eval.probe import cosine_lr
from ..io import progress
from ..runtime import resolve_device, to_device
from .checkpoint import load_checkpoint, save_checkpoint

REGULARIZERS = ("none", "one-sided", "two-sided", "negatives")
LOSSES = ("infonce", "square")


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched, L2-normalised (image, text) pairs."""
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def square_loss(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Spectral contrastive (square) loss on normalised embeddings."""
    sim = image @ text.T
    off = ~torch.eye(len(image), dtype=torch.bool, device=image.device)
    return -2 * sim.diagonal().mean() + sim[off].pow(2).mean()


def regularizer(image: torch.Tensor, text: torch.Tensor, kind: str) -> torch.Tensor:
    """Margin regularizers on normalised embeddings (module docstring)."""
    if kind == "none":
        return image.new_zeros(())
    sim = image @ text.T
    pos = (1 - sim.diagonal()).mean()
    neg = sim[~torch.eye(len(image), dtype=torch.bool, device=image.device)].mean()
    return {"one-sided": pos, "two-sided": pos + neg, "negatives": neg}[kind]


def margin(image: torch.Tensor, text: torch.Tensor) -> float:
    """Mean over pairs of (positive similarity − hardest negative similarity), image→text and text→image."""
    with torch.no_grad():
        sim = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
        pos = sim.diagonal()
        neg = sim.masked_fill(torch.eye(len(sim), dtype=torch.bool, device=sim.device), -2.0)
        return float(((pos - neg.max(1).values).mean() + (pos - neg.max(0).values).mean()) / 2)


class Temperature(torch.nn.Module):
    """The learnable log logit scale (CLIP's 1/τ), clamped at `max_scale` when used."""

    def __init__(self, init: float, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(float(init)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


@dataclass
class HeadTrainer:
    """Train image/text heads on cached features with InfoNCE (or the square loss) + a margin regularizer.

    Each epoch visits every image once in a seeded order with one of its captions and one of its cached views
    (e.g. full and low resolution) drawn at random, open_clip's practice for multi-caption data; a batch never
    holds one image twice. Every step's randomness is a function of (seed, step), and the state (heads,
    temperature, AdamW moments, step) is checkpointed in safetensors, so resuming is exact. Gradient
    accumulation follows open_clip: embeddings of the whole batch first, then each chunk's gradient against
    all of them, so the result equals one full batch.
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    learn_temperature: bool = True
    loss: str = "infonce"
    reg: str = "none"
    reg_weight: float = 0.0
    accum_steps: int = 1
    seed: int = 0
    checkpoint: Path | None = None
    fingerprint: str = ""  # of the run (config + data): a checkpoint is resumed only when it matches
    ckpt_every: int = 0
    stop_after: int | None = None  # stop (checkpointed) after this many steps: for resume tests and time limits
    device: str = "cpu"  # where the steps run; the heads come back on the CPU
    history_: list[dict] = field(default_factory=list)

    def fit(self, image_head: torch.nn.Module, text_head: torch.nn.Module, image_views: list[torch.Tensor],
            text_feats: torch.Tensor, text_owner: np.ndarray,
            extra_loss: Callable[[int], torch.Tensor] | None = None) -> "HeadTrainer":
        """Train the heads in place; the learned temperature is `temperature_`. `extra_loss(step)` adds terms."""
        if self.loss not in LOSSES or self.reg not in REGULARIZERS:
            raise ConceptlensError(f"loss must be one of {LOSSES} and reg one of {REGULARIZERS}")
        if self.batch_size < 2:
            raise ConceptlensError("contrastive training needs batches of at least 2 pairs")
        dev = resolve_device(self.device)
        torch.manual_seed(self.seed)
        image_head.to(dev)
        text_head.to(dev)
        temp = Temperature(self.init_logit_scale, self.max_logit_scale).to(dev)
        temp.log_scale.requires_grad_(self.learn_temperature)
        params = [p for m in (image_head, text_head) for p in m.parameters() if p.requires_grad]
        groups = [{"params": params}] + ([{"params": [temp.log_scale], "weight_decay": 0.0}] if self.learn_temperature else [])
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        n = len(image_views[0])
        caps: list[list[int]] = [[] for _ in range(n)]
        for t, i in enumerate(text_owner):
            caps[i].append(t)
        has = np.asarray([i for i in range(n) if caps[i]])
        if len(has) < 2:
            raise ConceptlensError("contrastive training needs at least 2 images with captions")
        bs = min(self.batch_size, len(has))
        per_epoch = max(1, len(has) // bs)
        total = self.epochs * per_epoch
        modules = {"image_head": image_head, "text_head": text_head, "temperature": temp}
        start = 0
        if self.checkpoint is not None and Path(self.checkpoint).exists():
            meta = load_checkpoint(Path(self.checkpoint), modules, opt)
            if meta.get("fingerprint", "") != self.fingerprint:
                raise ConceptlensError(f"{self.checkpoint} belongs to another run (its config or data differ): "
                                       "use --overwrite to start again, or another --out")
            start, self.history_ = meta["step"], meta.get("history", [])
        views, text_feats = to_device(torch.stack(image_views), dev), to_device(text_feats, dev)
        bar = progress(total=total, initial=start, desc="contrastive training", unit="step", leave=False)
        end = total if self.stop_after is None else min(total, self.stop_after)
        for step in range(start, end):
            epoch, pos = divmod(step, per_epoch)
            b = np.random.default_rng([self.seed, epoch]).permutation(has)[pos * bs:(pos + 1) * bs]
            r = np.random.default_rng([self.seed, epoch, pos, 1])
            t = to_device(torch.from_numpy(np.asarray([caps[i][r.integers(len(caps[i]))] for i in b])), dev)
            v = to_device(torch.from_numpy(r.integers(len(image_views), size=len(b))), dev)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, self.lr, self.warmup)
            x_img, x_txt = views[v, to_device(torch.from_numpy(b), dev)], text_feats[t]
            opt.zero_grad(set_to_none=True)
            loss = self._step(image_head, text_head, temp, x_img, x_txt)
            if extra_loss is not None:
                extra = extra_loss(step)
                extra.backward()
                loss = loss + extra.item()
            opt.step()
            bar.update(1)
            if step % 50 == 0 or step == total - 1:
                self.history_.append({"step": step, "loss": loss, "logit_scale": temp().item()})
                bar.set_postfix(loss=f"{loss:.3f}")
            if self.checkpoint is not None and (self.ckpt_every and (step + 1) % self.ckpt_every == 0 or step + 1 == end):
                save_checkpoint(Path(self.checkpoint), modules, opt, {"step": step + 1, "history": self.history_,
                                                                     "fingerprint": self.fingerprint})
        bar.close()
        image_head.cpu()
        text_head.cpu()
        self.temperature_ = temp.cpu()
        return self

    def _objective(self, img: torch.Tensor, txt: torch.Tensor, temp: Temperature) -> torch.Tensor:
        base = clip_loss(img, txt, temp()) if self.loss == "infonce" else square_loss(img, txt)
        return base + self.reg_weight * regularizer(img, txt, self.reg) if self.reg != "none" else base

    def _step(self, image_head, text_head, temp, x_img, x_txt) -> float:
        """One optimisation step's gradients (accumulated over chunks when accum_steps > 1); returns the loss."""
        if self.accum_steps <= 1:
            loss = self._objective(F.normalize(image_head(x_img), dim=-1), F.normalize(text_head(x_txt), dim=-1), temp)
            loss.backward()
            return loss.item()
        with torch.no_grad():
            img_all = F.normalize(image_head(x_img), dim=-1)
            txt_all = F.normalize(text_head(x_txt), dim=-1)
        loss_val = 0.0
        for idx in torch.arange(len(x_img), device=x_img.device).chunk(self.accum_steps):
            img, txt = img_all.clone(), txt_all.clone()
            img[idx] = F.normalize(image_head(x_img[idx]), dim=-1)
            txt[idx] = F.normalize(text_head(x_txt[idx]), dim=-1)
            loss = self._objective(img, txt, temp)
            # each chunk carries its rows' share of the full-batch gradient; temperature's once
            loss.backward()
            loss_val = loss.item()
        if temp.log_scale.grad is not None:
            temp.log_scale.grad /= self.accum_steps
        return loss_val
