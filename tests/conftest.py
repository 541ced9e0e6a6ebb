import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CONCEPTLENS_QUIET", "1")
SHARED = Path(os.environ.get("CONCEPTLENS_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CONCEPTLENS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"needs ../shared/{rel} (real data; absent here)")
    return p


def two_class_folder(root: Path, classes: tuple[str, str], shape: tuple[int, int]) -> Path:
    """Two classes of 6 synthetic RGB images (red-ish / blue-ish) in class subfolders."""
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 60, (*shape, 3), dtype=np.uint8)
            arr[..., 0 if ci == 0 else 2] += 180
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of small synthetic RGB images in class subfolders."""
    return two_class_folder(tmp_path / "imgs", ("red", "blue"), (40, 48))


@pytest.fixture
def cifar_like(tmp_path):
    """Two CIFAR-10 class names, 32x32 images (the embedded denoiser's size)."""
    return two_class_folder(tmp_path / "cifar", ("cat", "ship"), (32, 32))
