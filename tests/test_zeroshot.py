"""Parity with open_clip, Hugging Face and scikit-learn; registry errors; the CLI's JSON layout."""
import json

import numpy as np
import pytest
import torch

from conceptlens.eval import zeroshot
from conceptlens.eval import LinearProbe
from conceptlens.models import list_models, load_model
from conceptlens.cli import main
from conceptlens.errors import ConceptlensError
from conftest import tiny_hf_clip


@pytest.fixture(scope="module")
def vit():
    return load_model("open_clip:ViT-B-32/random")


def test_build_classifier_matches_open_clip(vit):
    import open_clip
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    classes = ["dog", "cat", "school bus"]
    ours = zeroshot.build_classifier(vit, classes, zeroshot.openai_templates()[::4])  # every 4th: 20 of the 80
    ref = open_clip.build_zero_shot_classifier(vit.model, vit.tokenizer, classes, OPENAI_IMAGENET_TEMPLATES[::4],
                                               num_classes_per_batch=2, device="cpu", use_tqdm=False)
    assert ours.shape == (3, vit.embed_dim)
    assert (ours - ref.T).abs().max().item() <= 1e-5


def test_open_clip_image_matches_library(vit):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(vit.encode_image(x), vit.model.encode_image(x), atol=1e-6)


def test_hf_adapter_matches_clipmodel(tmp_path):
    ref, tok = tiny_hf_clip(tmp_path)
    ours = load_model(f"hf:{tmp_path}")
    px = torch.randn(3, 3, 32, 32)
    texts = ["a photo of a dog", "a cat"]
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=px)
        ref_txt = ref.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    ref_img = ref_img if isinstance(ref_img, torch.Tensor) else ref_img.pooler_output
    ref_txt = ref_txt if isinstance(ref_txt, torch.Tensor) else ref_txt.pooler_output
    assert (ours.encode_image(px) - ref_img).abs().max() <= 1e-5
    assert (ours.encode_text(texts) - ref_txt).abs().max() <= 1e-5
    assert ours.embed_dim == 16


def test_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, top_k_accuracy_score
    rng = np.random.default_rng(0)
    scores = torch.tensor(rng.normal(size=(300, 7)))
    labels = rng.integers(0, 7, 300)
    labels[:40] = scores[:40].argmax(1).numpy()
    m = zeroshot.metrics(scores, labels)
    pred = scores.argmax(1).numpy()
    assert m["acc1"] == pytest.approx(accuracy_score(labels, pred), abs=1e-9)
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-9)
    assert m["acc5"] == pytest.approx(top_k_accuracy_score(labels, scores.numpy(), k=5), abs=1e-9)
    assert np.isnan(zeroshot.metrics(scores[:, :3], labels % 3)["acc5"])


def test_templates():
    assert len(zeroshot.load_templates("openai")) == 80
    assert all("{c}" in t for t in zeroshot.load_templates("simple"))
    with pytest.raises(ConceptlensError):
        zeroshot.load_templates(["no placeholder"])


def test_unknown_and_uncached_models_fail_clearly():
    with pytest.raises(ConceptlensError, match="did you mean"):
        load_model("builtin:mobilenetv3")
    with pytest.raises(ConceptlensError, match="unknown model scheme"):
        load_model("opn_clip:ViT-B-32/random")
    with pytest.raises(ConceptlensError, match="no network / not cached"):
        load_model("hf:openai/clip-vit-base-patch32")
    with pytest.raises(ConceptlensError, match="no network / not cached|never downloads"):
        load_model("open_clip:ViT-B-32/laion2b_s34b_b79k")


def test_timm_torchvision_random_and_layers():
    m = load_model("timm:resnet18/random")
    assert m.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    m = load_model("torchvision:resnet18/random", layer="layer3")
    assert m.embed_dim == 256
    with pytest.raises(ConceptlensError, match="no layer"):
        load_model("torchvision:resnet18/random", layer="layer9")


def test_list_models(capsys):
    names = [i.name for i in list_models()]
    assert {"builtin:lite-clip", "builtin:efficientnet-lite0", "builtin:mobilenetv2", "builtin:minilm",
            "builtin:tiny-diffusion-cifar10"} <= set(names)
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names) + 2  # header, rule, one row per model
    row = next(ln for ln in lines if ln.startswith("builtin:efficientnet-lite0"))
    assert " vision " in row and " 1280 " in row and " random " in row


def test_zeroshot_cli_json_layout(image_folder, tmp_path):
    out = tmp_path / "res.json"
    assert main(["zeroshot", "--model", "open_clip:RN50/random", "--data", str(image_folder), "--templates", "simple",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(res)
    assert res["task"] == "zeroshot_classification" and res["pretrained"] == "random"
    assert set(res["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert res["classnames"] == ["blue", "red"]


def test_linear_probe_separates_and_follows_recipe():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (100, 8)) + 3 * np.eye(8)[0], rng.normal(0, 1, (100, 8)) - 3 * np.eye(8)[0]])
    y = np.repeat([0, 1], 100)
    probe = LinearProbe().fit(X, y)
    assert probe.score(X, y) > 0.95 and probe.weight_decay_ in np.logspace(-6, 2, 97)
    fixed = LinearProbe(weight_decay=1e-4).fit(X, y)
    assert fixed.weight_decay_ == 1e-4


@pytest.mark.parametrize("wd", [0.0, 1e-4, 3.0])
def test_probe_adamw_is_bit_identical_to_torch_adamw(wd):
    """The probe's own AdamW (it spares importing torch._dynamo) must train exactly what torch.optim.AdamW trains."""
    import math

    import torch.nn.functional as F

    from conceptlens.eval.probe import cosine_lr
    rng = np.random.default_rng(1)
    X = F.normalize(torch.as_tensor(rng.normal(0, 1, (150, 12)), dtype=torch.float32), dim=-1)
    y = torch.as_tensor(rng.integers(0, 3, 150))
    ours = LinearProbe(epochs=3, weight_decay=wd)._train(X, y, 3, wd)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = torch.nn.Linear(12, 3)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=wd)
    total, step = 3 * math.ceil(150 / 64), 0
    for _ in range(3):
        perm = torch.randperm(150, generator=g)
        for i in range(0, 150, 64):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, 0.1, warmup=0)
            idx = perm[i:i + 64]
            loss = F.cross_entropy(ref(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    assert torch.equal(ours.weight, ref.weight) and torch.equal(ours.bias, ref.bias)
