"""Adapters for models from other libraries: open_clip, Hugging Face (CLIP/SigLIP), timm, torchvision.

All of them load offline only (HF_HUB_OFFLINE): a model whose weights are not already on disk fails
with a one-line "no network / not cached" error instead of a download attempt.
"""
from __future__ import annotations

import os

import torch

from ..errors import ConceptlensError, did_you_mean
from .base import Encoder, VisionTower
from .vision import IMAGENET_MEAN, IMAGENET_STD, imagenet_eval_transform

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def not_cached(name: str, exc: Exception) -> ConceptlensError:
    return ConceptlensError(f"{name}: weights are not on this machine and conceptlens never downloads "
                            f"(no network / not cached: {type(exc).__name__}); use TAG 'random' for a random model "
                            "or a built-in model (conceptlens models)")


class OpenCLIPModel(Encoder):
    """`open_clip:ARCH/TAG` through open_clip.create_model_and_transforms (TAG `random`: random init)."""

    kind = "vision-language"

    def __init__(self, arch: str, tag: str | None):
        """`arch` an open_clip architecture with a pretrained `tag`, or `hf-hub:ORG/REPO` (tag None), as open_clip
        names them; the weights must already be on disk."""
        import open_clip
        hub = arch.startswith("hf-hub:")
        self.name = arch if hub else f"open_clip:{arch}/{tag}"
        if not hub and arch not in open_clip.list_models():
            raise ConceptlensError(f"unknown open_clip architecture {arch!r}{did_you_mean(arch, open_clip.list_models())}")
        torch.manual_seed(0)  # "random" weights are the same on every load (and so is the cache key)
        cfg = open_clip.get_pretrained_cfg(arch, tag) if tag not in ("random", None) else {}
        if cfg and not cfg.get("hf_hub") and cfg.get("url"):  # URL-only weights: open_clip would fetch them itself
            if not os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))):
                raise not_cached(self.name, FileNotFoundError(cfg["url"]))
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=None if tag in ("random", None) else tag)
        except RuntimeError as exc:
            if "Unknown pretrained" in str(exc) or "not found" in str(exc).lower():
                raise ConceptlensError(f"open_clip has no weights {tag!r} for {arch}: {exc}") from None
            raise not_cached(self.name, exc) from None
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types
            raise not_cached(self.name, exc) from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.embed_dim = self.model.text_projection.shape[1] if hasattr(self.model, "text_projection") and \
            self.model.text_projection is not None else self.encode_text(["x"]).shape[-1]

    def modules(self):
        return [self.model]

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        return self.model.encode_image(self._as_batch(images)).float()

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()


class HFModel(Encoder):
    """`hf:REPO_OR_DIR` for Hugging Face CLIPModel / SiglipModel, read from a local dir or the HF cache."""

    kind = "vision-language"

    def __init__(self, repo: str):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
        self.name = f"hf:{repo}"
        try:
            self.model = AutoModel.from_pretrained(repo, local_files_only=True, trust_remote_code=False).eval()
        except OSError as exc:
            raise not_cached(self.name, exc) from None
        self.tokenizer = self.image_processor = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=True, trust_remote_code=False)
            self.image_processor = AutoImageProcessor.from_pretrained(repo, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError):
            pass
        if not hasattr(self.model, "get_image_features"):
            raise ConceptlensError(f"{self.name} is a {type(self.model).__name__}, not a CLIP/SigLIP model")
        self.preprocess = self._transform()
        self.embed_dim = self.model.config.projection_dim if hasattr(self.model.config, "projection_dim") \
            else self.model.config.text_config.hidden_size

    def _transform(self):
        """The image processor's resize / crop / normalise as a torchvision pipeline (bicubic)."""
        from torchvision import transforms as T  # torchvision's import (~2.5 s) only for the models that use it

        vc = self.model.config.vision_config
        ip = self.image_processor
        mean = getattr(ip, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]
        std = getattr(ip, "image_std", None) or [0.26862954, 0.26130258, 0.27577711]
        size = vc.image_size
        return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                          T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])

    def modules(self):
        return [self.model]

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        # transformers 5 may return a model output object instead of a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=self._as_batch(images))).float()

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        if self.tokenizer is None:
            raise ConceptlensError(f"{self.name} has no tokenizer files")
        padding = "max_length" if "siglip" in type(self.model).__name__.lower() else True
        enc = self.tokenizer(list(texts), padding=padding, truncation=True, return_tensors="pt").to(self.device)
        return self._tensor(self.model.get_text_features(**enc)).float()


def timm_model(name: str, tag: str | None, layer: str | None) -> VisionTower:
    import timm
    from timm.data import create_transform, resolve_data_config
    if not timm.is_model(name.partition(".")[0]):  # NAME or NAME.PRETRAINED_TAG, as timm writes them
        raise ConceptlensError(f"unknown timm model {name!r}{did_you_mean(name, timm.list_models())}")
    torch.manual_seed(0)
    try:
        net = timm.create_model(name, pretrained=tag != "random")
    except Exception as exc:  # noqa: BLE001
        raise not_cached(f"timm:{name}", exc) from None
    preprocess = create_transform(**resolve_data_config({}, model=net))
    return VisionTower(f"timm:{name}" + (f"/{tag}" if tag else ""), net, preprocess, layer=layer)


def torchvision_model(name: str, tag: str | None, layer: str | None) -> VisionTower:
    from torchvision import models  # torchvision's import (~2.5 s) only for the models built from it

    if name not in models.list_models():
        raise ConceptlensError(f"unknown torchvision model {name!r}{did_you_mean(name, models.list_models())}")
    torch.manual_seed(0)
    weights = None if tag == "random" else (tag or "DEFAULT")
    if weights is not None:  # torchvision downloads missing weights: only load what is already on disk
        try:
            enum = models.get_model_weights(name)
            w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        except (KeyError, ValueError):
            raise ConceptlensError(f"torchvision:{name} has no weights {weights!r}") from None
        if not os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))):
            raise not_cached(f"torchvision:{name}", FileNotFoundError(w.url))
    try:
        net = models.get_model(name, weights=weights)
    except Exception as exc:  # noqa: BLE001
        raise not_cached(f"torchvision:{name}", exc) from None
    if weights is None:
        preprocess = imagenet_eval_transform(IMAGENET_MEAN, IMAGENET_STD)
    else:
        preprocess = models.get_model_weights(name)[weights].transforms() if weights != "DEFAULT" else \
            models.get_model_weights(name).DEFAULT.transforms()
    return VisionTower(f"torchvision:{name}" + (f"/{tag}" if tag else ""), net, preprocess, layer=layer)
