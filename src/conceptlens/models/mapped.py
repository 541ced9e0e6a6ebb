"""Mapped encoders: an image tower seen through a fixed map into a vision-language space.

- `AlignedModel`: any vision model + an aligner file (Moayeri et al., Text-to-Concept, ICML 2023): f ↦ W f + b,
  fitted by `conceptlens.concepts.align.Aligner`; text goes through the target model's text tower.
- `TrainedCLIP`: frozen towers + the projection heads trained by `conceptlens train clip` (URI `clip:PATH`).
Both are `MappedEncoder`s, so the feature cache stores the tower's features once and maps them on the way out.
"""
from __future__ import annotations

import hashlib

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import ConceptlensError
from ..io import file_sha256, read_safetensors_meta, save_safetensors
from .base import Encoder, MappedEncoder


def affine(X, W: np.ndarray, b: np.ndarray, normalize: bool = False) -> np.ndarray:
    """Rows X [n, d_s] -> X Wᵀ + b [n, d_t] in float32 (the one place an aligner is applied); with `normalize`, X's
    rows are first scaled to unit length (a map fitted on unit rows, `Aligner(normalize=True)`)."""
    X = np.asarray(X, dtype=np.float32)
    if X.shape[-1] != W.shape[1]:
        raise ConceptlensError(f"aligner expects {W.shape[1]}-d source features, got {X.shape[-1]}-d")
    if normalize:
        X = X / (np.linalg.norm(X, axis=-1, keepdims=True) + 1e-12)
    out = X @ W.T
    out += b  # in place: no second [n, d_t] array
    return out


class LinearMap:
    """An aligner file: W [d_target, d_source], b [d_target] in safetensors + JSON metadata (never unpickled).
    `normalize` (metadata; absent in files before it existed: False): source rows go in at unit length."""

    def __init__(self, W: np.ndarray, b: np.ndarray, meta: dict):
        self.W, self.b, self.meta = W, b, meta
        self.normalize = bool(meta.get("normalize", False))

    @classmethod
    def load(cls, path: Path | str) -> "LinearMap":
        path = Path(path)
        if not path.exists():
            raise ConceptlensError(f"aligner file not found: {path}")
        meta = read_safetensors_meta(path)
        try:
            t = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise ConceptlensError(f"cannot read aligner {path}: {exc}") from None
        if "W" not in t or "b" not in t:
            raise ConceptlensError(f"{path} is not an aligner file (no W, b)")
        W, b = t["W"].float().numpy(), t["b"].float().numpy()
        if W.ndim != 2 or b.shape != (W.shape[0],):
            raise ConceptlensError(f"{path}: W {tuple(W.shape)} and b {tuple(b.shape)} do not make a linear map")
        if not (np.isfinite(W).all() and np.isfinite(b).all()):
            raise ConceptlensError(f"{path}: the map contains NaN or inf values")
        if not isinstance(meta.get("source"), str) or not isinstance(meta.get("target"), str):
            raise ConceptlensError(f"{path}: aligner metadata lacks its source and target models")
        return cls(W, b, meta | {"path": str(path), "sha": file_sha256(path)[:16]})

    def save(self, path: Path | str) -> Path:
        return save_safetensors(path, {"W": torch.from_numpy(self.W), "b": torch.from_numpy(self.b)}, self.meta)

    def transform(self, X) -> np.ndarray:
        return affine(X, self.W, self.b, self.normalize)


class AlignedModel(MappedEncoder):
    """A vision model seen through an aligner: it behaves as the image tower of the target space."""

    def __init__(self, base: Encoder, linear_map: LinearMap, target: Encoder):
        meta = linear_map.meta
        if meta.get("source") != base.name or meta.get("layer") != base.layer:
            raise ConceptlensError(f"aligner {meta.get('path')} maps {meta.get('source')} (layer {meta.get('layer')}), "
                                   f"not {base.name} (layer {base.layer})")
        if linear_map.W.shape[1] != base.embed_dim:
            raise ConceptlensError(f"aligner {meta.get('path')} expects {linear_map.W.shape[1]}-d features; "
                                   f"{base.name} gives {base.embed_dim}")
        self.base, self.map, self.target = base, linear_map, target
        self.name = f"{base.name}@{Path(meta.get('path', 'aligner')).stem}"
        self.preprocess, self.layer = base.preprocess, base.layer
        self.embed_dim = int(linear_map.W.shape[0])
        self._W, self._b = torch.from_numpy(linear_map.W), torch.from_numpy(linear_map.b)

    def modules(self):
        return self.base.modules()

    def encoders(self):
        return [self, self.base, self.target]

    def own_modules(self):
        return []

    def to(self, device) -> "AlignedModel":
        super().to(device)
        self._W, self._b = self._W.to(self.device), self._b.to(self.device)
        return self

    @property
    def fingerprint(self) -> str:
        return f"{self.base.fingerprint}-{self.map.meta.get('sha', '')}"

    def map_tensor(self, feats: torch.Tensor) -> torch.Tensor:
        if self.map.normalize:
            feats = torch.nn.functional.normalize(feats, dim=-1, eps=1e-12)
        return feats @ self._W.T + self._b

    def map_features(self, X) -> np.ndarray:
        return self.map.transform(X)

    def map_direction(self, V: np.ndarray) -> np.ndarray:
        return np.asarray(V, np.float32) @ self.map.W.T

    @property
    def text_model(self) -> str:
        return self.target.text_model

    @property
    def text_fingerprint(self) -> str:
        return self.target.text_fingerprint

    def encode_text(self, texts) -> torch.Tensor:
        return self.target.encode_text(texts)


def make_head(kind: str, d_in: int, d_out: int) -> torch.nn.Module:
    """A projection head of `conceptlens train clip`: linear, or a two-layer GELU MLP."""
    if kind == "linear":
        return torch.nn.Linear(d_in, d_out)
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(d_in, 2 * d_out), torch.nn.GELU(), torch.nn.Linear(2 * d_out, d_out))
    raise ConceptlensError(f"unknown head {kind!r}: linear or mlp")


def read_trained_clip(path: Path | str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a `conceptlens train clip` model file."""
    path = Path(path)
    if not path.exists():
        raise ConceptlensError(f"trained model not found: {path}")
    meta = read_safetensors_meta(path)
    if meta.get("kind") != "clip":
        raise ConceptlensError(f"{path} is not a model written by `conceptlens train clip`")
    return meta, load_file(str(path))


class TrainedCLIP(MappedEncoder):
    """A model trained by `conceptlens train clip`: frozen towers + the learned heads (URI `clip:PATH`)."""

    def __init__(self, path: Path | str, meta: dict, tensors: dict[str, torch.Tensor], image_tower: Encoder,
                 text_tower: Encoder):
        cfg = meta["config"]
        self.name, self.meta = f"clip:{path}", meta
        self.base, self.text_tower = image_tower, text_tower
        self.image_head = make_head(cfg["head"], image_tower.embed_dim, cfg["embed_dim"])
        self.text_head = make_head(cfg["head"], text_tower.embed_dim, cfg["embed_dim"])
        self.image_head.load_state_dict({k[11:]: v for k, v in tensors.items() if k.startswith("image_head.")})
        self.text_head.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("text_head.")})
        self.image_head.eval()
        self.text_head.eval()
        self.embed_dim, self.preprocess, self.layer = cfg["embed_dim"], image_tower.preprocess, None

    def modules(self):
        return [self.image_head, self.text_head] + self.base.modules()

    def encoders(self):
        return [self, self.base, self.text_tower]

    def own_modules(self):
        return [self.image_head, self.text_head]

    @property
    def text_fingerprint(self) -> str:
        if not hasattr(self, "_text_fingerprint"):
            h = hashlib.blake2b(self.text_tower.text_fingerprint.encode(), digest_size=16)
            for k, v in self.text_head.state_dict().items():
                h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._text_fingerprint = h.hexdigest()
        return self._text_fingerprint

    def map_tensor(self, feats: torch.Tensor) -> torch.Tensor:
        return self.image_head(feats)

    def map_direction(self, V: np.ndarray) -> np.ndarray:
        if not isinstance(self.image_head, torch.nn.Linear):
            raise ConceptlensError(f"{self.name} has an MLP image head: a direction has no image in its space "
                                   "(only linear heads map directions)")
        return np.asarray(V, np.float32) @ self.image_head.weight.detach().cpu().numpy().T

    def encode_text(self, texts) -> torch.Tensor:
        with torch.no_grad():
            return self.text_head(self.text_tower.encode_text(texts).float())
