"""The common interface of every model conceptlens loads: encode_image / encode_text / preprocess."""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from PIL import Image

from ..errors import ConceptlensError


class Encoder:
    """A frozen encoder. Vision models have `encode_image`, text models `encode_text`, VL models both.

    `preprocess` maps one PIL image to a CHW float tensor; `encode_image` takes a batch of those
    (or a list of PIL images) and returns unnormalised [B, D] embeddings, like open_clip.
    """

    name: str
    kind: str  # "vision" | "text" | "vision-language"
    embed_dim: int
    preprocess: Callable[[Image.Image], torch.Tensor] | None = None
    layer: str | None = None

    def encode_image(self, images) -> torch.Tensor:
        raise ConceptlensError(f"{self.name} is a {self.kind} model: it has no image tower")

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        raise ConceptlensError(
            f"{self.name} is a {self.kind} model: it has no text tower "
            "(align it to a vision-language model with --aligner to use text)")

    @property
    def has_text(self) -> bool:
        return self.kind in ("text", "vision-language")

    @property
    def has_image(self) -> bool:
        return self.kind in ("vision", "vision-language")

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules whose weights define this model (for the fingerprint)."""
        return []

    @property
    def fingerprint(self) -> str:
        """Hash of all weights: part of every cache key, so changed weights never hit a stale cache."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.blake2b(digest_size=16)
            for mod in self.modules():
                for k, v in mod.state_dict().items():
                    h.update(k.encode())
                    h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def image_fingerprint(self) -> str:
        """Hash of what image features depend on (the feature-cache key); models with text heads narrow it."""
        return self.fingerprint

    @property
    def image_model(self) -> str:
        """Name of the model that computes the image features (shared caches for models with one image tower)."""
        return self.name

    def preprocess_id(self) -> str:
        return repr(self.preprocess)

    def _as_batch(self, images) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return images if images.ndim == 4 else images.unsqueeze(0)
        if isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} kind={self.kind} dim={self.embed_dim}>"


class VisionTower(Encoder):
    """Any torch vision network read at its penultimate layer (input of the last Linear) or a named layer.

    Spatial outputs of a named layer are global-average-pooled. One mechanism for timm, torchvision
    and the built-in CNNs.
    """

    kind = "vision"

    def __init__(self, name: str, module: torch.nn.Module, preprocess, embed_dim: int | None = None,
                 layer: str | None = None):
        self.name = name
        self.module = module.eval()
        self.preprocess = preprocess
        self.layer = layer
        self._captured: torch.Tensor | None = None
        mods = dict(module.named_modules())
        if layer is not None:
            if layer not in mods:
                from difflib import get_close_matches
                close = get_close_matches(layer, list(mods), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConceptlensError(f"{name} has no layer {layer!r}{hint}")
            mods[layer].register_forward_hook(self._capture_output)
            self._needs_full_forward = True
        else:
            linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
            if linears:
                linears[-1].register_forward_pre_hook(self._capture_input)
            self._needs_full_forward = bool(linears)
        self.embed_dim = embed_dim or self._probe_dim()

    def _capture_input(self, mod, inputs):
        self._captured = inputs[0]

    def _capture_output(self, mod, inputs, output):
        self._captured = output[0] if isinstance(output, (tuple, list)) else output

    def _probe_dim(self) -> int:
        size = getattr(self, "image_size", 224)
        with torch.inference_mode():
            return self.encode_image(torch.zeros(1, 3, size, size)).shape[-1]

    def modules(self) -> list[torch.nn.Module]:
        return [self.module]

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Run the network on a preprocessed batch and return the captured representation."""
        self._captured = None
        out = self.module(batch)
        feats = self._captured if self._needs_full_forward else out
        if feats.ndim == 4:
            feats = feats.mean(dim=(2, 3))
        elif feats.ndim == 3:  # token sequences (ViTs): mean over tokens
            feats = feats.mean(dim=1)
        return feats.flatten(1)

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        return self.features(self._as_batch(images)).float()
