"""Diffusion classifier: parity with Li et al.'s loop on a tiny random pipeline, strategies, bad input; training resume."""
import json

import numpy as np
import pytest
import torch

from conceptlens.diffusion import DiffusionClassifier, lowdisc_timesteps
from conceptlens.runtime import bf16_supported
from conceptlens.models import load_model
from conceptlens.models.denoisers import DiffusersModel
from conceptlens.errors import ConceptlensError
from conftest import tiny_sd_pipeline
from li_reference import eval_prob_adaptive


def tiny_pipeline(tmp_path):
    return DiffusersModel(tiny_sd_pipeline(tmp_path), "tiny-random")


CLASSES = ["cat", "dog", "car", "ship", "frog", "horse"]


def test_adaptive_matches_li_et_al_transcription(tmp_path):
    model = tiny_pipeline(tmp_path)
    # fp32 as the reference loop: on a CPU with native bf16, "auto" autocasts (errors then differ by ~1e-3)
    clf = DiffusionClassifier(model, strategy="adaptive", to_keep=[3, 1], stage_samples=[4, 12], loss="l1",
                              batch_size=7, seed=3, precision="fp32")
    image = torch.rand(3, 16, 16) * 2 - 1
    cond = clf.prompt_embeddings(CLASSES, ["a photo of a {}"])
    ours = clf.classify_one(image, cond, image_seed=5)
    z0 = model.to_model_space(image[None])
    g = torch.Generator().manual_seed(3 * 1_000_003 + 5)
    noise = torch.randn((12, *z0.shape[1:]), generator=g)
    pred, data, stages = eval_prob_adaptive(model.unet, z0, cond, model.scheduler, [4, 12], [3, 1], noise, loss="l1",
                                            batch_size=5)
    assert ours["stages"] == stages and ours["pred"] == pred
    for c, d in data.items():
        assert np.abs(np.asarray(ours["raw"][c]) - d["pred_errors"].numpy()).max() <= 1e-6
    assert ours["evals"] == sum(len(d["pred_errors"]) for d in data.values())


def test_strategies_agree_with_fixed_on_an_easy_case_and_count_evaluations(tmp_path):
    model = tiny_pipeline(tmp_path)
    image = torch.rand(3, 16, 16) * 2 - 1
    fixed = DiffusionClassifier(model, strategy="fixed", n_samples=8).predict(image[None], CLASSES, ["{}"], False)[0]
    assert fixed["evals"] == 8 * len(CLASSES)
    halving = DiffusionClassifier(model, strategy="halving", budget=24).predict(image[None], CLASSES, ["{}"], False)[0]
    assert halving["evals"] <= 24
    tt = DiffusionClassifier(model, strategy="ttest", max_scores=30).predict(image[None], CLASSES, ["{}"], False)[0]
    assert 20 * len(CLASSES) <= tt["evals"] <= 30 * len(CLASSES)  # every class scored min_scores times, at most 30
    assert np.isfinite(tt["errors"][tt["pred"]]) and fixed["pred"] == int(np.argmin(fixed["errors"]))
    assert len(CLASSES) <= halving["evals"] and np.isfinite(halving["errors"]).all()  # every class seen at least once
    assert sorted(lowdisc_timesteps(8, 1000)) == sorted(set(lowdisc_timesteps(8, 1000)))


def test_ttest_in_blocks_decides_as_testing_after_every_sample():
    """Blocked ttest prunes exactly where Clark & Jaini's one-sample-at-a-time loop does, in few denoiser calls."""
    from types import SimpleNamespace
    from scipy import stats
    from conceptlens.diffusion.strategies import ttest
    rng = np.random.default_rng(0)
    C, S = 10, 400
    E = rng.normal(1.0, 0.05, (1, S)) + rng.normal(0, 0.02, (C, S)) + np.linspace(0, 0.03, C)[:, None][rng.permutation(C)]
    calls = []

    def evaluate_pairs(z0, cond, ts, noise, pairs):
        calls.append(len(pairs))
        return torch.tensor([E[c, j] for c, j in pairs])
    clf = SimpleNamespace(max_scores=S, min_scores=20, p_value=2e-3, evaluate_pairs=evaluate_pairs,
                          noise=lambda z0, n, seed: (None, None))
    out = ttest(clf, None, None, C, 0)
    alive, pruned_at = list(range(C)), {}  # the reference: a test after every sample
    for s in range(1, S + 1):
        if s >= 20 and len(alive) > 1:
            best = min(alive, key=lambda c: E[c, :s].mean())
            for c in list(alive):
                d = E[c, :s] - E[best, :s]
                if c != best and stats.ttest_1samp(d, 0.0, alternative="greater").pvalue < 2e-3:
                    alive.remove(c)
                    pruned_at[c] = s
    assert len(pruned_at) >= C // 2 and out["pred"] == min(alive, key=lambda c: E[c, :S].mean())
    assert all(out["errors"][c] == pytest.approx(E[c, :s].mean()) for c, s in pruned_at.items())
    assert len(calls) < out["evals"] / 40 and calls[0] == 20 * C  # batched, not one sample per call
    assert out["evals"] >= sum(pruned_at.values()) and out["evals"] == sum(calls)


def test_bad_input(tmp_path):
    model = tiny_pipeline(tmp_path)
    with pytest.raises(ConceptlensError, match="budget 3 is smaller"):
        DiffusionClassifier(model, strategy="halving", budget=3).predict(torch.zeros(1, 3, 16, 16), CLASSES, ["{}"])
    with pytest.raises(ConceptlensError, match="takes 16x16"):
        DiffusionClassifier(model).predict(torch.zeros(1, 3, 32, 32), CLASSES, ["{}"])

    class NoText:
        unet = model.unet
        scheduler = model.scheduler
        text_encoder = None
        tokenizer = None
    with pytest.raises(ConceptlensError, match="no text"):
        DiffusersModel(NoText(), "x")
    with pytest.raises(ConceptlensError, match="not available offline"):
        load_model("diffusers:someone/not-here")
    with pytest.raises(ConceptlensError, match="is not a denoiser"):
        DiffusionClassifier("builtin:tiny-diffusion-cifar10")
    model.denoise = lambda z, t, c: torch.full_like(z, float("nan"))  # an overflowing half-precision denoiser
    with pytest.raises(ConceptlensError, match="non-finite denoiser output under bf16"):
        DiffusionClassifier(model, precision="bf16").predict(torch.zeros(1, 3, 16, 16), CLASSES, ["{}"], False)


def test_training_resumes_exactly(tmp_path, cifar_like):
    """Two steps, stop, two more == four straight (every step's batch/noise/captions depend on (seed, step) only)."""
    from safetensors.torch import load_file

    from conceptlens.models.denoisers import load_tiny_diffusion
    from conceptlens.train.diffusion import train_diffusion
    kw = dict(batch_size=4, ckpt_every=1, threads=1)
    threads = torch.get_num_threads()
    train_diffusion(str(cifar_like), tmp_path / "a", steps=2, export=tmp_path / "a.safetensors", **kw)
    res = train_diffusion(str(cifar_like), tmp_path / "a", steps=4, export=tmp_path / "a.safetensors", **kw)
    train_diffusion(str(cifar_like), tmp_path / "b", steps=4, export=tmp_path / "b.safetensors", **kw)
    assert res["step"] == 4 and torch.get_num_threads() == threads
    a, b = (load_file(str(tmp_path / p / "checkpoint.safetensors")) for p in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = load_tiny_diffusion(str(tmp_path / "a.safetensors"))
    assert model.meta["step"] == 4 and model.meta["train_config"]["data_provenance"]["n_images"] == 12
    with pytest.raises(ConceptlensError, match="another run"):
        train_diffusion(str(cifar_like), tmp_path / "a", steps=5, lr=1e-3, **kw)
    (cifar_like / "cat" / "0.png").write_bytes((cifar_like / "ship" / "0.png").read_bytes())  # other data: another run
    with pytest.raises(ConceptlensError, match="--overwrite"):
        train_diffusion(str(cifar_like), tmp_path / "a", steps=5, **kw)
    res = train_diffusion(str(cifar_like), tmp_path / "a", steps=1, overwrite=True, export=tmp_path / "c.safetensors", **kw)
    assert res["step"] == 1


def test_min_snr_weighting():
    """Hang et al.'s weight min(SNR, γ)/SNR: 1 at high noise (SNR ≤ γ), γ/SNR at low noise; a huge γ is the plain MSE."""
    import torch.nn.functional as F

    from conceptlens.train.diffusion import epsilon_loss
    pred, noise = torch.randn(3, 12, 4, 4), torch.randn(3, 12, 4, 4)
    alpha_bar = torch.tensor([0.5, 0.99, 1e-9])  # SNR 1, 99, ~0
    per = (pred - noise).pow(2).flatten(1).mean(1)
    assert torch.allclose(epsilon_loss(pred, noise, alpha_bar, 5.0), (per * torch.tensor([1, 5 / 99, 1])).mean())
    assert torch.allclose(epsilon_loss(pred, noise, alpha_bar, 1e9), F.mse_loss(pred, noise))
    assert torch.equal(epsilon_loss(pred, noise, alpha_bar, None), F.mse_loss(pred, noise))


def test_train_diffusion_further(tmp_path, cifar_like):
    """--init: a run that starts from exported weights begins at them (step 0's EMA is those weights) and counts
    their steps in its export; resuming it with other init weights is refused."""
    from safetensors.torch import load_file

    from conceptlens.models.denoisers import load_tiny_diffusion
    from conceptlens.train.diffusion import train_diffusion
    kw = dict(batch_size=4, ckpt_every=1, threads=1)
    train_diffusion(str(cifar_like), tmp_path / "a", steps=3, export=tmp_path / "a.safetensors", **kw)
    first = load_file(str(tmp_path / "a.safetensors"))
    train_diffusion(str(cifar_like), tmp_path / "b", steps=2, init=str(tmp_path / "a.safetensors"),
                    export=tmp_path / "b.safetensors", ema_decay=1.0, **kw)
    ema = load_file(str(tmp_path / "b.safetensors"))  # decay 1: the EMA never moves from where it started
    assert all(torch.equal(ema[k], first[k]) for k in first)
    meta = load_tiny_diffusion(str(tmp_path / "b.safetensors")).meta
    assert meta["step"] == 2 and meta["total_step"] == 5 and meta["train_config"]["init"]["step"] == 3
    unet = {k[5:]: v for k, v in load_file(str(tmp_path / "b" / "checkpoint.safetensors")).items()
            if k.startswith("unet.")}
    assert any(not torch.equal(unet[k].half(), first[k]) for k in first)  # and the weights it trains did move
    train_diffusion(str(cifar_like), tmp_path / "c", steps=1, export=tmp_path / "c.safetensors", **kw)
    with pytest.raises(ConceptlensError, match="another run"):
        train_diffusion(str(cifar_like), tmp_path / "b", steps=3, init=str(tmp_path / "c.safetensors"),
                        ema_decay=1.0, **kw)
    with pytest.raises(ConceptlensError, match="another run"):  # the loss weighting is part of the run too
        train_diffusion(str(cifar_like), tmp_path / "b", steps=3, init=str(tmp_path / "a.safetensors"),
                        ema_decay=1.0, min_snr=5.0, **kw)
    with pytest.raises(ConceptlensError, match="γ must be positive"):
        train_diffusion(str(cifar_like), tmp_path / "d", steps=1, min_snr=0.0, **kw)


def test_embedded_model_cli_bad_input(tmp_path, image_folder, cifar_like, capsys):
    from conceptlens.cli import main
    assert main(["diffusion-classify", "--data", str(image_folder)]) == 2  # 40x48 images
    assert "classifies 32x32 images" in capsys.readouterr().err
    assert main(["diffusion-classify", "--data", str(cifar_like), "--budget", "1"]) == 2
    assert "budget 1 is smaller than the number of classes (2)" in capsys.readouterr().err
    out = tmp_path / "res.json"
    assert main(["diffusion-classify", "--data", str(cifar_like), "--strategy", "fixed", "--n-samples", "2",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["metrics"]["evals_per_image"] == 4 and res["n_images"] == 12 and res["task"] == "zeroshot_classification"
    assert res["precision"] == ("bf16" if bf16_supported() else "fp32")  # auto: bf16 only where it is native


@pytest.mark.slow
def test_embedded_model_accuracy_floor(monkeypatch):
    """The shipped denoiser on the first 100 of benchmarks/diffusion.py's CIFAR-10 test images (every 20th), with its
    unseen prompt templates and noise, by successive halving at a tenth of adaptive's evaluations (275 per image):
    at least the issue's 0.62. Measured 0.70 (bf16, AVX-512 BF16 EPYC); the previous 6,000-step denoiser: 0.53."""
    from conceptlens import data
    from conceptlens.diffusion.classifier import default_templates, image_tensors
    from conftest import shared
    monkeypatch.setenv("CONCEPTLENS_TEXT_BACKEND", "torch")  # the text embeddings the denoiser was trained on
    ds = data.load_dataset(shared("data/cifar10/test-000000.tar.gz"), limit=500)
    model = load_model("builtin:tiny-diffusion-cifar10")
    clf = DiffusionClassifier(model, "halving", loss="l1", budget=275)
    x, y, _ = image_tensors(ds, model.image_size)
    cond = clf.prompt_embeddings(ds.classnames, default_templates(model))
    preds = [clf.classify_one(x[i], cond, image_seed=i) for i in range(100)]
    assert all(p["evals"] <= 275 for p in preds)
    assert np.mean([p["pred"] == int(y[i]) for i, p in enumerate(preds)]) >= 0.62


def test_t_range_draws_timesteps_only_inside_it_and_the_default_is_unchanged(tmp_path):
    model = tiny_pipeline(tmp_path)
    T = model.scheduler.config.num_train_timesteps
    z0 = torch.zeros(1, 4, 8, 8)
    full, _ = DiffusionClassifier(model, strategy="halving").noise(z0, 64, 3)
    assert full.tolist() == lowdisc_timesteps(64, T)  # the default range draws exactly what it drew before
    ts, noise = DiffusionClassifier(model, strategy="halving", t_range=(0.5, 0.875)).noise(z0, 64, 3)
    lo, hi = round(0.5 * T), round(0.875 * T)
    assert lo <= int(ts.min()) and int(ts.max()) < hi and len(set(ts.tolist())) > 32  # spread over the window
    assert torch.equal(noise, DiffusionClassifier(model, strategy="halving").noise(z0, 64, 3)[1])  # same noise draws
    assert sorted(lowdisc_timesteps(8, 1000, 500, 900)) == [525, 575, 625, 675, 725, 775, 825, 875]
    for bad in [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.2)]:
        with pytest.raises(ConceptlensError, match="t_range"):
            DiffusionClassifier(model, strategy="halving", t_range=bad)
    with pytest.raises(ConceptlensError, match="adaptive keeps"):
        DiffusionClassifier(model, strategy="adaptive", t_range=(0.5, 1.0))
