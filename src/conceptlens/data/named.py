"""Named array-backed sets that registry or Debian packages ship: Fashion-MNIST, scikit-learn digits, sample photos."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import ConceptlensError, did_you_mean
from ..io import atomic_output, cache_dir

NAMED_SETS = ("fashion-mnist:train", "fashion-mnist:test", "digits", "samples")
FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


class Arrays:
    """Images in memory-mapped files or small arrays, their labels, class names and row keys."""

    def __init__(self, images, labels: np.ndarray, classnames: list[str], make: Callable[[np.ndarray], Image.Image],
                 keys: list[str] | None = None):
        self.images, self.labels, self.classnames, self._make = images, labels, classnames, make
        self.keys = keys or [f"{i:06d}" for i in range(len(labels))]

    def image(self, idx: int) -> Image.Image:
        return self._make(self.images[idx])


_ARRAYS: dict[str, Arrays] = {}


def _idx_memmap(gz: Path) -> np.ndarray:
    """Decompress an IDX file once into the cache and memory-map it (peak memory stays small)."""
    out = cache_dir("datasets") / (gz.name[:-3] + ".u8")
    with gzip.open(gz, "rb") as f:
        header = f.read(4)
        ndim = header[3]
        shape = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
        if not out.exists() or out.stat().st_size != int(np.prod(shape)):
            with atomic_output(out) as tmp, open(tmp, "wb") as g:
                while block := f.read(1 << 20):
                    g.write(block)
    return np.memmap(out, dtype=np.uint8, mode="r", shape=shape)


def _gray(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(a, dtype=np.uint8), "L").convert("RGB")


def sample_photos() -> list[tuple[str, np.ndarray, str]]:
    """The real photos bundled with scikit-image and scikit-learn: (name, HxWx3 uint8, label)."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images
    chosen = [("astronaut", "astronaut"), ("chelsea", "cat"), ("coffee", "coffee mug"), ("rocket", "rocket"),
              ("camera", "camera"), ("clock", "clock"), ("coins", "coin"), ("moon", "moon"),
              ("hubble_deep_field", "galaxy"), ("horse", "horse"), ("brick", "brick wall"), ("grass", "grass"),
              ("gravel", "gravel"), ("retina", "retina")]
    out = []
    for name, label in chosen:
        arr = getattr(sk, name)()
        if arr.dtype == bool:
            arr = (~arr).astype(np.uint8) * 255  # the horse silhouette: black horse on white
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        out.append((name, arr[..., :3].astype(np.uint8), label))
    sk_images = load_sample_images()
    for fname, img in zip(sk_images.filenames, sk_images.images):
        base = os.path.basename(fname).split(".")[0]
        out.append((base, img, {"china": "temple", "flower": "flower"}.get(base, base)))
    return out


def named_arrays(name: str) -> Arrays:
    """The arrays behind a named set (loaded once per process)."""
    if name in _ARRAYS:
        return _ARRAYS[name]
    if name.startswith("fashion-mnist:"):
        split = name.split(":", 1)[1]
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ConceptlensError(f"unknown split {split!r}: use fashion-mnist:train or fashion-mnist:test")
        img_gz = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
        if not img_gz.exists():
            raise ConceptlensError("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist "
                                   "(make setup does this when run as root)")
        labels = np.asarray(_idx_memmap(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"), dtype=np.int64)
        arr = Arrays(_idx_memmap(img_gz), labels, FASHION_CLASSES, _gray)
    elif name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        arr = Arrays((d.images * (255 / 16)).round().astype(np.uint8), d.target.astype(np.int64),
                     [str(i) for i in range(10)], _gray)
    elif name == "samples":
        photos = sample_photos()
        names = list(dict.fromkeys(p[2] for p in photos))
        arr = Arrays([p[1] for p in photos], np.asarray([names.index(p[2]) for p in photos]), names,
                     lambda a: Image.fromarray(a, "RGB"), keys=[p[0] for p in photos])
    else:
        raise ConceptlensError(f"unknown dataset {name!r}{did_you_mean(name, NAMED_SETS, fallback=True)}")
    _ARRAYS[name] = arr
    return arr
