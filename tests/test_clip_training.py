"""CLIP training: loss parity with open_clip, exact resume, gradient accumulation, regularizers, bad input, CLI."""
import numpy as np
import pytest
import torch
from PIL import Image

from conceptlens.cli import main
from conceptlens.errors import ConceptlensError
from conceptlens.train.clip import fit_heads
from conceptlens.train.contrastive import clip_loss, margin, regularizer, square_loss


def test_infonce_equals_open_clip_clip_loss():
    from open_clip.loss import ClipLoss
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=-1)
    ref = ClipLoss()(img, txt, torch.tensor(14.3))
    assert abs(clip_loss(img, txt, torch.tensor(14.3)).item() - ref.item()) < 1e-6


def test_regularizers_and_margin():
    x = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    assert regularizer(x, x, "one-sided").abs() < 1e-6  # perfect positives: nothing to pull
    y = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    assert torch.isclose(regularizer(x, y, "one-sided"), ((x - y).pow(2).sum(1) / 2).mean(), atol=1e-6)
    assert torch.isclose(regularizer(x, y, "two-sided"), regularizer(x, y, "one-sided") + regularizer(x, y, "negatives"))
    assert margin(torch.eye(4), torch.eye(4)) == pytest.approx(1.0)
    assert square_loss(torch.eye(4), torch.eye(4)).item() == pytest.approx(-2.0)


def _toy(n=96, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    X = torch.from_numpy((z @ rng.normal(size=(6, 20)) + 0.1 * rng.normal(size=(n, 20))).astype(np.float32))
    T = torch.from_numpy((np.repeat(z, 2, 0) @ rng.normal(size=(6, 12))).astype(np.float32))
    return X, T, np.repeat(np.arange(n), 2)


CFG = {"embed_dim": 8, "epochs": 4, "batch_size": 16, "lr": 1e-2, "warmup": 2, "reg": "one-sided",
       "reg_weight": 0.5, "ckpt_every": 0}


def test_stopping_and_resuming_gives_the_same_weights(tmp_path):
    X, T, owner = _toy()
    full = fit_heads([X], T, owner, CFG)
    ck = tmp_path / "ck.safetensors"
    fit_heads([X], T, owner, CFG, checkpoint=ck, stop_after=7)
    resumed = fit_heads([X], T, owner, CFG, checkpoint=ck)
    for k, v in full["image_head"].state_dict().items():
        assert torch.equal(v, resumed["image_head"].state_dict()[k])
    assert torch.equal(full["temperature"].log_scale, resumed["temperature"].log_scale)


def test_a_checkpoint_of_another_run_is_never_resumed(tmp_path):
    X, T, owner = _toy()
    ck = tmp_path / "ck.safetensors"
    fit_heads([X], T, owner, CFG, checkpoint=ck, stop_after=3, fingerprint="run-a")
    with pytest.raises(ConceptlensError, match="another run.*--overwrite"):
        fit_heads([X], T, owner, CFG, checkpoint=ck, fingerprint="run-b")  # other data or config


def test_gradient_accumulation_equals_one_full_batch():
    X, T, owner = _toy()
    a = fit_heads([X], T, owner, CFG | {"epochs": 1})
    b = fit_heads([X], T, owner, CFG | {"epochs": 1, "accum_steps": 4})
    for k, v in a["text_head"].state_dict().items():
        assert torch.allclose(v, b["text_head"].state_dict()[k], atol=1e-5)


def test_bad_input(tmp_path):
    X, T, owner = _toy(n=1)
    with pytest.raises(ConceptlensError, match="at least 2"):
        fit_heads([X], T, owner, CFG)
    with pytest.raises(ConceptlensError, match="at least 2"):
        X2, T2, o2 = _toy()
        fit_heads([X2], T2, o2, CFG | {"batch_size": 1})


def test_train_clip_cli_and_the_trained_model_works_everywhere(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    for i in range(24):
        red = i % 2 == 0
        arr = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
        arr[..., 0 if red else 2] += 180
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {'red' if red else 'blue'} square")
        rows.append(f"{i}.png,something {'red' if red else 'blue'}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "cfg.toml").write_text(f'data = "{tmp_path / "pairs.csv"}"\nembed_dim = 16\nepochs = 30\n'
                                       'batch_size = 8\nlr = 0.01\nwarmup = 5\n')
    assert main(["train", "clip", "--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "run")]) == 0
    model = tmp_path / "run" / "model.safetensors"
    assert model.exists() and (tmp_path / "run" / "metrics.csv").exists()
    (tmp_path / "cls" / "red").mkdir(parents=True)
    (tmp_path / "cls" / "blue").mkdir(parents=True)
    for i in range(24):
        Image.open(tmp_path / f"{i}.png").save(tmp_path / "cls" / ("red" if i % 2 == 0 else "blue") / f"{i}.png")
    out = tmp_path / "zs.json"
    assert main(["zeroshot", "--model", f"clip:{model}", "--data", str(tmp_path / "cls"), "--templates", "simple",
                 "--output", str(out)]) == 0
    import json
    assert json.loads(out.read_text())["metrics"]["acc1"] >= 0.9
    (tmp_path / "bad.csv").write_text("path,caption\n0.png,\n")
    (tmp_path / "bad.toml").write_text(f'data = "{tmp_path / "bad.csv"}"\n')
    assert main(["train", "clip", "--config", str(tmp_path / "bad.toml")]) == 2
    (tmp_path / "typo.toml").write_text(f'data = "{tmp_path / "pairs.csv"}"\nepoch = 3\n')
    assert main(["train", "clip", "--config", str(tmp_path / "typo.toml")]) == 2
    assert "unknown config keys" in capsys.readouterr().err


def test_pairs_from_webdataset_shards(tmp_path):
    import io
    import tarfile

    from conceptlens.data import read_pairs
    with tarfile.open(tmp_path / "pairs-000000.tar", "w") as tf:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buf, "PNG")
            for name, data in ((f"{i:04d}.png", buf.getvalue()), (f"{i:04d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    ds, caps, owner = read_pairs(tmp_path / "pairs-000000.tar")
    assert len(ds) == 3 and caps == ["caption 0", "caption 1", "caption 2"] and owner.tolist() == [0, 1, 2]
