"""The contrastive (CLIP) objective and a trainer for heads on cached frozen-tower features (LiT-style).

`clip_loss` is the symmetric InfoNCE of Radford et al. 2021 (parity-tested against open_clip's ClipLoss);
`fit_heads` is the one training loop the embedded lite-clip and `conceptlens train clip` share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import progress


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched, L2-normalised (image, text) pairs."""
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 0 (open_clip's `cosine_lr`)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * base


@dataclass
class HeadTrainer:
    """Train image/text heads on cached features with InfoNCE (+ extra loss terms), deterministically.

    Each epoch visits every image once in a seeded order, with one of its captions and one of its cached
    views (e.g. full resolution and a low-resolution copy) drawn at random: open_clip's practice for
    multi-caption data, and batches never hold one image twice (that would be a false negative).
    """

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    seed: int = 0
    history_: list[dict] = field(default_factory=list)

    def fit(self, image_head: torch.nn.Module, text_head: torch.nn.Module, image_views: list[torch.Tensor],
            text_feats: torch.Tensor, text_owner: np.ndarray,
            extra_loss: Callable[[int], torch.Tensor] | None = None) -> torch.nn.Parameter:
        """Train in place; returns the learned log logit scale. `extra_loss(step)` adds auxiliary terms."""
        torch.manual_seed(self.seed)
        logit_scale = torch.nn.Parameter(torch.tensor(self.init_logit_scale))
        params = [p for m in (image_head, text_head) for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": params}, {"params": [logit_scale], "weight_decay": 0.0}],
                                lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)
        n = len(image_views[0])
        caps = [[] for _ in range(n)]
        for t, i in enumerate(text_owner):
            caps[i].append(t)
        has = np.asarray([i for i in range(n) if caps[i]])
        per_epoch = max(1, len(has) // self.batch_size)
        total = self.epochs * per_epoch
        bar = progress(total=total, desc="contrastive training", unit="step", leave=False)
        views = torch.stack(image_views)
        for step in range(total):
            if step % per_epoch == 0:
                order = rng.permutation(has)
            b = order[(step % per_epoch) * self.batch_size:(step % per_epoch + 1) * self.batch_size]
            t = np.asarray([caps[i][rng.integers(len(caps[i]))] for i in b])
            v = rng.integers(len(image_views), size=len(b))
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, total, self.lr, self.warmup)
            img = F.normalize(image_head(views[v, b]), dim=-1)
            txt = F.normalize(text_head(text_feats[t]), dim=-1)
            loss = clip_loss(img, txt, logit_scale.exp().clamp(max=self.max_logit_scale))
            if extra_loss is not None:
                loss = loss + extra_loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            if step % 50 == 0:
                self.history_.append({"step": step, "loss": loss.item()})
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        return logit_scale
