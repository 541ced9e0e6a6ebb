"""Faults: a damaged cache is recomputed (never returned), concurrent runs share one computation, a killed
caption-bank embedding resumes to identical rows, a full disk is one line with nothing marked complete."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptlens.cli import main
from conceptlens.data import load_dataset
from conceptlens.features import cache_key, compute_mode, embed, embed_texts, text_cache_key
from conceptlens.io import cache_dir
from conceptlens.models import load_model
from conftest import two_class_folder, write_reliability

RECORD = {"cache_faults": 0, "cache_faults_recovered": 0, "kills": 0, "kills_survived": 0, "concurrency_runs": 0,
          "concurrency_ok": 0}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    write_reliability("faults", RECORD)


@pytest.fixture(scope="module")
def model():
    return load_model("builtin:efficientnet-lite0")


def _with_bad_image(root: Path) -> Path:
    two_class_folder(root, ("red", "blue"), (36, 36))
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _damage(kind: str, entry: Path) -> None:
    if kind == "flipped bytes in a row":
        with open(entry / "features.npy", "r+b") as f:
            f.seek(-4 * 700, os.SEEK_END)
            f.write(b"\xff\xff\xff\x7f" * 4)
    elif kind == "truncated features":
        with open(entry / "features.npy", "r+b") as f:
            f.truncate(200)
    elif kind == "garbled state":
        st = np.load(entry / "state.npy")
        st[:3] = 7
        np.save(entry / "state.npy", st)
    elif kind == "garbled meta.json":
        (entry / "meta.json").write_text("{not json")
    elif kind == "torn errors line":
        with open(entry / "errors.jsonl", "a") as f:
            f.write('{"row": 3, "err')
    elif kind == "checksums deleted":
        (entry / "crc.npy").unlink()
    elif kind == "complete but a row pending":
        st = np.load(entry / "state.npy")
        st[1] = 0
        np.save(entry / "state.npy", st)
    elif kind == "meta of another format":
        meta = json.loads((entry / "meta.json").read_text())
        (entry / "meta.json").write_text(json.dumps(meta | {"format": 1}))


KINDS = ["flipped bytes in a row", "truncated features", "garbled state", "garbled meta.json", "torn errors line",
         "checksums deleted", "complete but a row pending", "meta of another format"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_cache_entry_is_recomputed_and_correct(kind, tmp_path, model):
    ds = load_dataset(_with_bad_image(tmp_path / "imgs"))
    ref = embed(model, ds, precision="fp32", show_progress=False)
    X_ref, skipped_ref = np.array(ref.X), list(ref.skipped)
    assert len(skipped_ref) == 1
    entry = cache_dir("features") / cache_key(model, ds, compute_mode(model, model.device, "fp32"))
    _damage(kind, entry)
    RECORD["cache_faults"] += 1
    with pytest.warns(UserWarning):
        again = embed(model, ds, precision="fp32", show_progress=False)
    if kind == "torn errors line":  # not damage to the features: same rows, skip count unchanged
        assert again.cache_hit
    assert np.array_equal(np.asarray(again.X), X_ref) and again.skipped == skipped_ref
    assert embed(model, ds, precision="fp32", show_progress=False).cache_hit  # and now intact
    RECORD["cache_faults_recovered"] += 1


def test_two_concurrent_processes_compute_once_and_agree(tmp_path, model):
    data = _with_bad_image(tmp_path / "imgs")
    for i in range(20):
        Image.new("RGB", (36, 36), (i * 10, 0, 0)).save(data / "blue" / f"x{i}.png")
    out = [tmp_path / f"f{i}.npy" for i in range(2)]
    env = dict(os.environ, CONCEPTLENS_QUIET="1")
    cmd = [sys.executable, "-m", "conceptlens.cli.main", "embed", "--model", "builtin:efficientnet-lite0", "--data",
           str(data), "--precision", "fp32", "--batch-size", "4"]
    procs = [subprocess.Popen(cmd + ["--output", str(o)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for o in out]
    res = [p.communicate(timeout=300) for p in procs]
    RECORD["concurrency_runs"] += 1
    assert all(p.returncode == 0 for p in procs), res
    assert np.array_equal(np.load(out[0]), np.load(out[1]))
    hits = sum("cache hit" in o for o, _ in res)
    assert hits == 1, res  # one computed, the other waited and read it
    f = embed(model, load_dataset(data), precision="fp32", show_progress=False)
    assert f.cache_hit and len(f.skipped) == 1  # counted once
    RECORD["concurrency_ok"] += 1


def test_two_no_cache_runs_do_not_share_a_temp_dir(tmp_path, model):
    ds = load_dataset(_with_bad_image(tmp_path / "imgs"))
    a = embed(model, ds, precision="fp32", use_cache=False, show_progress=False)
    b = embed(model, ds, precision="fp32", use_cache=False, show_progress=False)
    assert np.array_equal(a.X, b.X) and a.path is None
    key = cache_key(model, ds, compute_mode(model, model.device, "fp32"))
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"conceptlens-{key[:12]}-*"))


CHILD = """
import sys
from conceptlens.features import embed_texts
from conceptlens.models import load_model
texts = [f"caption number {i} about a {w}" for i in range(400) for w in ("dog", "boat")]
embed_texts(load_model("builtin:minilm"), texts, batch_size=8, batches_per_chunk=2, show_progress=False)
"""


def test_a_killed_caption_bank_embedding_resumes_to_identical_rows(tmp_path):
    texts = [f"caption number {i} about a {w}" for i in range(400) for w in ("dog", "boat")]
    enc = load_model("builtin:minilm")
    key = text_cache_key(enc, texts)
    partial = cache_dir("text") / f"{key}.partial"
    proc = subprocess.Popen([sys.executable, "-c", CHILD], env=dict(os.environ, CONCEPTLENS_QUIET="1"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (partial / "state.npy").exists() and (np.load(partial / "state.npy") == 1).sum() >= 64:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    RECORD["kills"] += 1
    done = int((np.load(partial / "state.npy") == 1).sum())
    assert 64 <= done < len(texts), done
    resumed = embed_texts(enc, texts, batch_size=8, batches_per_chunk=2, show_progress=False)
    fresh = embed_texts(enc, texts, batch_size=8, batches_per_chunk=2, use_cache=False, show_progress=False)
    assert torch.equal(resumed, fresh)
    RECORD["kills_survived"] += 1


def test_a_full_disk_is_one_line_and_nothing_is_marked_complete(tmp_path, capsys, image_folder, monkeypatch):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()[:80]})")
    try:
        monkeypatch.setenv("CONCEPTLENS_CACHE", str(mnt / "cache"))
        rc = main(["embed", "--model", "builtin:efficientnet-lite0", "--data", str(image_folder)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "disk" in err[0], err
        assert not list(mnt.rglob("meta.json"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def _kill_when(cmd: list[str], ready, timeout: float = 180) -> None:
    """Run `cmd`, SIGKILL it once `ready()` holds (or it ends)."""
    proc = subprocess.Popen(cmd, env=dict(os.environ, CONCEPTLENS_QUIET="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    proc.kill()
    proc.wait()


def _ckpt_step(path: Path) -> int:
    from conceptlens.io import read_safetensors_meta
    try:
        return int(read_safetensors_meta(path)["step"]) if path.exists() else 0
    except Exception:  # noqa: BLE001 - being written
        return 0


def test_a_killed_train_diffusion_resumes_to_identical_weights(tmp_path, cifar_like):
    from safetensors.torch import load_file
    base = [sys.executable, "-m", "conceptlens.cli.main", "train", "diffusion", "--data", str(cifar_like), "--batch-size",
            "4", "--ckpt-every", "1", "--threads", "1", "--precision", "fp32"]
    a, b = tmp_path / "a", tmp_path / "b"
    at = random.randint(1, 4)  # a random point of the run: after checkpoint `at` of 6
    _kill_when(base + ["--steps", "6", "--out", str(a), "--export", str(tmp_path / "a.st")],
               lambda: _ckpt_step(a / "checkpoint.safetensors") >= at)
    RECORD["kills"] += 1
    assert at <= _ckpt_step(a / "checkpoint.safetensors") < 6, at
    for out, exp in ((a, "a.st"), (b, "b.st")):
        assert main(base[3:] + ["--steps", "6", "--out", str(out), "--export", str(tmp_path / exp)]) == 0
    wa, wb = load_file(str(tmp_path / "a.st")), load_file(str(tmp_path / "b.st"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    RECORD["kills_survived"] += 1


def test_a_killed_train_clip_resumes_to_identical_heads(tmp_path, image_folder):
    from safetensors.torch import load_file
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("path,caption\n" + "".join(f"{p},a {p.parent.name} square number {i}\n"
                                                for i, p in enumerate(sorted(image_folder.rglob("*.png")))))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{pairs}"\nepochs = 60\nbatch_size = 4\nckpt_every = 1\nembed_dim = 16\n')
    base = [sys.executable, "-m", "conceptlens.cli.main", "train", "clip", "--config", str(cfg)]
    a = tmp_path / "a"
    at = random.randint(5, 120)  # a random step of 180
    _kill_when(base + ["--out", str(a)], lambda: _ckpt_step(a / "checkpoint.safetensors") >= at)
    RECORD["kills"] += 1
    done = _ckpt_step(a / "checkpoint.safetensors")
    assert at <= done < 180 and not (a / "model.safetensors").exists(), (at, done)
    assert main(base[3:] + ["--out", str(a)]) == 0
    assert main(base[3:] + ["--out", str(tmp_path / "b")]) == 0
    ha, hb = load_file(str(a / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(ha[k], hb[k]) for k in ha)
    RECORD["kills_survived"] += 1
