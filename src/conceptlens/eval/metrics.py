"""Metrics and result files in CLIP_benchmark's layout (LAION-AI/CLIP_benchmark, clip_benchmark/metrics/)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models import split_model_uri


def metrics(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict[str, float]:
    """acc1, acc5 (NaN under 5 classes) and mean_per_class_recall, as CLIP_benchmark computes them: top-k by
    torch.topk as its `accuracy` does (ties break alike), the recall by scikit-learn's balanced_accuracy_score."""
    from sklearn.metrics import balanced_accuracy_score
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels).long()
    n_cls = scores.shape[1]
    top = scores.topk(min(5, n_cls), dim=1).indices
    acc1 = (top[:, 0] == labels).double().mean().item()
    acc5 = (top == labels[:, None]).any(1).double().mean().item() if n_cls >= 5 else float("nan")
    recall = balanced_accuracy_score(labels.numpy(), top[:, 0].numpy())
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": float(recall)}


def result_json(dataset: str, model: str, task: str, metric: dict) -> dict:
    """CLIP_benchmark's result layout (model / pretrained split as `models.split_model_uri` says)."""
    arch, pretrained = split_model_uri(model)
    return {"dataset": dataset, "model": arch, "pretrained": pretrained, "task": task, "metrics": metric,
            "language": "en", "model_uri": model}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_owner: Sequence[int],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-text retrieval recall@k with CLIP_benchmark's names (zeroshot_retrieval.py):
    image_retrieval = text query -> its image among all images; text_retrieval = image query -> any of its texts."""
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    owner = torch.as_tensor(np.asarray(text_owner), dtype=torch.long)
    sim = txt @ img.T  # [texts, images]
    positive = torch.zeros_like(sim, dtype=torch.bool)
    positive[torch.arange(len(owner)), owner] = True
    out = {}
    for k in ks:
        top_i = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"image_retrieval_recall@{k}"] = float(positive.gather(1, top_i).any(1).float().mean())
        top_t = sim.T.topk(min(k, sim.shape[0]), dim=1).indices
        out[f"text_retrieval_recall@{k}"] = float(positive.T.gather(1, top_t).any(1).float().mean())
    return out


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = True) -> dict:
    """BLEU-1..4, CIDEr-D and METEOR of one candidate caption per item against its references, with the COCO
    caption evaluation code (pycocoevalcap; its PTB tokenizer and METEOR run on Java, which is then required)."""
    import shutil

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from ..errors import ConceptlensError
    if len(candidates) != len(references) or not candidates:
        raise ConceptlensError(f"{len(candidates)} candidates for {len(references)} reference sets: give one per item")
    if any(not refs for refs in references):
        raise ConceptlensError("every item needs at least one reference caption")
    if shutil.which("java") is None:
        raise ConceptlensError("the COCO caption metrics need Java (`make setup` installs openjdk-17-jre-headless)")
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(candidates)})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)} | {"cider": float(Cider().compute_score(gts, res)[0])}
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor
        out["meteor"] = float(Meteor().compute_score(gts, res)[0])
    return out | {"n": len(candidates), "scorer": "pycocoevalcap (PTB tokenizer)"}
