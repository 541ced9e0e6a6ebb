"""The torchvision-free built-in preprocessing equals torchvision's pixel for pixel, and the lazy packages keep
each command's imports to what it uses (torchvision ~2.5 s, scikit-learn ~2.5 s of every CLI call here)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from conceptlens.models.vision import (IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, LITE_THUMBNAIL, center_crop,
                                      imagenet_eval_transform)

SIZES = [(500, 375), (375, 500), (256, 256), (300, 256), (256, 300), (224, 224), (64, 64), (63, 100), (100, 63),
         (32, 32), (257, 1000), (1000, 257), (225, 300), (301, 299), (64, 5000)]


def torchvision_reference(mean, std, inner=None):
    """The pipeline as it was built on torchvision before (ResizeCrop's standard branch = Resize + CenterCrop);
    with `inner`, thumbnails resized to `inner` and padded to 224 with the mean colour (torchvision's Pad)."""
    standard = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(224)])
    fill = tuple(round(m * 255) for m in mean)

    def resize_crop(im):
        if min(im.size) >= 64:
            return standard(im)
        if inner is None:
            return im.resize((224, 224), resample=2)
        a = (224 - inner) // 2
        return T.Pad([a, a, 224 - inner - a, 224 - inner - a], fill=fill)(im.resize((inner, inner), resample=2))
    return T.Compose([resize_crop, T.ToTensor(), T.Normalize(mean, std)])


@pytest.mark.parametrize("mean,std,inner", [(LITE_MEAN, LITE_STD, None), (IMAGENET_MEAN, IMAGENET_STD, None),
                                            (LITE_MEAN, LITE_STD, LITE_THUMBNAIL), (IMAGENET_MEAN, IMAGENET_STD, 208)])
def test_builtin_preprocessing_is_bit_identical_to_torchvision(mean, std, inner):
    ours, ref = imagenet_eval_transform(mean, std, inner=inner), torchvision_reference(mean, std, inner)
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        a, b = ours(im), ref(im)
        assert a.dtype == b.dtype and a.shape == b.shape == (3, 224, 224), (w, h)
        assert torch.equal(a, b), (w, h)


def test_center_crop_pads_like_torchvision_where_the_image_is_smaller():
    rng = np.random.default_rng(1)
    for w, h, s in [(100, 50, 224), (50, 300, 224), (301, 201, 200), (10, 10, 11)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert np.array_equal(np.asarray(center_crop(im, s)), np.asarray(T.functional.center_crop(im, [s, s]))), (w, h, s)


def test_grey_images_convert_like_torchvision():
    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 30), dtype=np.uint8), mode="L")
    from conceptlens.models.vision import ToTensor
    assert torch.equal(ToTensor()(im), T.ToTensor()(im))


def test_builtin_mobilenetv2_is_torchvisions_architecture():
    from torchvision.models import mobilenet_v2

    from conceptlens.models.vision import MobileNetV2, mobilenetv2_module
    torch.manual_seed(3)
    ref = mobilenet_v2(weights=None)
    ref.classifier = torch.nn.Identity()
    torch.manual_seed(3)
    ours = MobileNetV2()  # seeded random weights: the same initialisation and random-number use
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in ours.named_modules()]  # --layer names
    real = mobilenetv2_module()
    ref.load_state_dict(real.state_dict())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref.eval()(x), real(x))


def test_mobilenetv2_loads_without_torchvision():
    code = ("import sys; from conceptlens.models import load_model; load_model('builtin:mobilenetv2'); "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False"


def test_lite_clip_commands_import_neither_torchvision_nor_scikit_learn():
    code = ("import sys; from conceptlens.models import load_model; from conceptlens.features import embed; "
            "from conceptlens.concepts import run_diagnose, concept_matrix; load_model('builtin:lite-clip'); "
            "print(sorted(m for m in ('torchvision', 'sklearn', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_fitting_a_concept_bottleneck_and_its_probe_baseline_imports_no_scikit_learn():
    code = ("import sys, numpy as np; from conceptlens.concepts import ConceptBottleneck, run_cbm; "
            "from conceptlens.eval import LinearProbe; rng = np.random.default_rng(0); "
            "X, y = rng.normal(size=(60, 6)), np.repeat([0, 1, 2], 20); X[np.arange(60), y] += 3; "
            "print(ConceptBottleneck(max_concepts=3).fit(X, y).score(X, y), LinearProbe(epochs=2).fit(X, y).score(X, y)); "
            "print(sorted(m for m in ('torchvision', 'sklearn', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[-1] == "[]" and min(float(v) for v in out[0].split()) > 0.8


def test_lazy_packages_keep_exported_functions_over_same_named_submodules():
    import conceptlens.concepts.decode  # noqa: F401  (binds the submodule on the package, as the import system does)
    import conceptlens.eval.metrics  # noqa: F401
    from conceptlens.concepts import decode, decompose, search
    from conceptlens.eval import metrics, zeroshot
    assert all(callable(f) and f.__name__ == n for f, n in ((decode, "decode"), (decompose, "decompose"),
                                                             (search, "search"), (metrics, "metrics")))
    assert zeroshot.__name__ == "conceptlens.eval.zeroshot"  # a submodule that is not an export stays a module
    with pytest.raises(AttributeError):
        import conceptlens.concepts as c
        c.no_such_name  # noqa: B018


def test_caption_words_are_kept_so_a_rerun_loads_no_spacy_pipeline(tmp_path):
    code = ("import sys; from conceptlens.concepts.words import caption_concepts; "
            "w, p = caption_concepts('two brown dogs are running across the green grass'); "
            "print(sorted(w), sorted(p), 'spacy' in sys.modules)")
    env = {**__import__("os").environ, "CONCEPTLENS_CACHE": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert first.strip().endswith("True") and "dog" in first and "green grass" in first
    assert second.strip().endswith("False") and second.rsplit("]", 1)[0] == first.rsplit("]", 1)[0]
