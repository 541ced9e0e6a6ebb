"""Devices and the Ray engine: same results as the local path, retries, resume, one-line errors."""
import os
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
from conceptlens.engine import Engine, using
from conceptlens.errors import ConceptlensError
from conceptlens.features import cache_key, compute_mode, embed, embed_texts
from conceptlens.models import load_model
from conceptlens.runtime import resolve_device, resolve_precision

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]


def many_images(root: Path, n: int = 48) -> Path:
    rng = np.random.default_rng(1)
    for c in ("red", "blue"):
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            arr = rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for this module (2 CPUs), shut down after it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_ray_embed_equals_local_bit_for_bit_and_shares_the_cache(tmp_path, cluster):
    ds = load_dataset(many_images(tmp_path / "imgs"))
    m = load_model("builtin:efficientnet-lite0")
    local = embed(m, ds, batch_size=4, precision="fp32", use_cache=False, show_progress=False)
    far = embed(m, ds, batch_size=4, precision="fp32", engine=Engine("ray", workers=2), show_progress=False)
    assert not far.cache_hit and far.keys == local.keys
    assert np.array_equal(np.asarray(far.X), local.X)
    again = embed(m, ds, batch_size=4, precision="fp32", show_progress=False)  # local run: hits Ray's entry
    assert again.cache_hit and np.array_equal(np.asarray(again.X), local.X)


def test_ray_text_bank_and_diffusion_equal_local(tmp_path, cluster, cifar_like):
    enc = load_model("builtin:minilm")
    texts = [f"a photo of {i} small {w}" for i in range(70) for w in ("dogs", "cats", "boats")]
    local = embed_texts(enc, texts, batch_size=16, use_cache=False, batches_per_chunk=2)
    with using(Engine("ray", workers=2)):
        far = embed_texts(enc, texts, batch_size=16, batches_per_chunk=2)
    assert torch.equal(far, local)
    assert torch.equal(embed_texts(enc, texts, batch_size=16, batches_per_chunk=2), local)  # cache hit, same rows

    from conceptlens.diffusion import DiffusionClassifier, evaluate
    ds = load_dataset(cifar_like)
    clf = DiffusionClassifier(load_model("builtin:tiny-diffusion-cifar10/random"), "fixed", n_samples=3, precision="fp32")
    a = evaluate(clf, ds, ["a photo of a {}."], show_progress=False)
    b = evaluate(clf, ds, ["a photo of a {}."], show_progress=False, engine=Engine("ray", workers=2))
    assert a["predictions"] == b["predictions"]
    assert torch.allclose(a["_scores"], b["_scores"], atol=0, rtol=0)


def _die_once(marker: str, unit: int) -> int:
    """A task that kills its own worker process the first time it sees unit 2 (a crashed worker)."""
    if unit == 2 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    return unit * unit


def _square(payload, unit):
    return _die_once(payload.marker, unit)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def to(self, device):
        return self


def test_a_killed_worker_is_retried_and_the_result_is_unchanged(tmp_path, cluster):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    marker = str(tmp_path / "died")
    out = dict(Engine("ray", workers=2).map(_square, Payload(marker), "p", list(range(6))))
    assert os.path.exists(marker)  # a worker really died
    assert out == {i: i * i for i in range(6)}


def test_a_killed_driver_resumes_only_unfinished_units(tmp_path):
    """SIGKILL the driver (and its local cluster) mid-job; the rerun finishes and equals the local result."""
    data = many_images(tmp_path / "imgs", 96)
    env = dict(os.environ, CONCEPTLENS_QUIET="1")
    cmd = [sys.executable, "-m", "conceptlens.cli.main", "embed", "--model", "builtin:efficientnet-lite0", "--data",
           str(data), "--batch-size", "4", "--precision", "fp32", "--engine", "ray", "--ray-workers", "1"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    m = load_model("builtin:efficientnet-lite0")
    ds = load_dataset(data)
    root = Path(env["CONCEPTLENS_CACHE"]) / "features" / cache_key(m, ds, compute_mode(m, m.device, "fp32"))
    deadline, done = time.time() + 240, 0
    while time.time() < deadline and proc.poll() is None:
        if (root / "state.npy").exists():
            done = int((np.load(root / "state.npy") != 0).sum())
            if done >= 16:
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = np.load(root / "state.npy")
    assert 16 <= (state != 0).sum() < len(ds), "the driver was to be killed mid-job"
    assert not (root / "meta.json").exists()
    far = embed(m, ds, batch_size=4, precision="fp32", engine=Engine("ray", workers=2), show_progress=False)
    local = embed(m, ds, batch_size=4, precision="fp32", use_cache=False, show_progress=False)
    assert np.array_equal(np.asarray(far.X), local.X)
    ray.shutdown()


def test_bad_devices_and_addresses_are_one_line_errors(tmp_path, capsys, image_folder):
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with pytest.raises(ConceptlensError, match="unknown device"):
        resolve_device("gpu9")
    with pytest.raises(ConceptlensError, match="fp16 autocast is for GPUs"):
        resolve_precision("fp16", "cpu")
    base = ["embed", "--model", "builtin:efficientnet-lite0", "--data", str(image_folder)]
    bad = [["--device", "tpu"], ["--engine", "ray", "--ray-address", "127.0.0.1:9"],
           ["--engine", "ray", "--ray-address", "nonsense"], ["--ray-address", "127.0.0.1:9"]]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for extra in bad:
        t0 = time.time()
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("conceptlens: error:") and len(err.splitlines()) == 1, err
        assert time.time() - t0 < 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this machine has none)")
def test_cuda_features_match_cpu(tmp_path):
    ds = load_dataset(many_images(tmp_path / "imgs", 32))
    cpu = embed(load_model("builtin:efficientnet-lite0"), ds, precision="fp32", use_cache=False, show_progress=False)
    gpu = embed(load_model("builtin:efficientnet-lite0", device="cuda"), ds, precision="fp32", use_cache=False,
                show_progress=False)
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(cpu.X), torch.from_numpy(np.asarray(gpu.X)))
    assert cos.min() > 0.999


def test_export_is_read_by_embedding_reader_and_by_data(tmp_path, capsys, image_folder):
    out = tmp_path / "emb"
    assert main(["embed", "--model", "builtin:efficientnet-lite0", "--data", str(image_folder), "--precision", "fp32"]) == 0
    assert main(["export", "--model", "builtin:efficientnet-lite0", "--data", str(image_folder), "--precision", "fp32",
                 "--out", str(out), "--rows-per-file", "5"]) == 0
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    m = load_model("builtin:efficientnet-lite0")
    ref = embed(m, load_dataset(image_folder), precision="fp32", show_progress=False)
    from embedding_reader import EmbeddingReader
    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy", metadata_folder=str(out / "metadata"),
                             meta_columns=["key", "path", "label"])
    rows = [(emb, meta) for emb, meta in reader(batch_size=100, show_progress=False)]
    emb = np.concatenate([e for e, _ in rows])
    meta = [m_ for _, m in rows for m_ in m.to_dict("records")]
    assert np.array_equal(emb, np.asarray(ref.X)) and [r["key"] for r in meta] == ref.keys
    assert {r["label"] for r in meta} == {"red", "blue"} and all(Path(r["path"]).exists() for r in meta)
    back = load_dataset(out)
    f = embed(m, back, precision="fp32", show_progress=False)
    assert f.cache_hit and f.path == out and np.array_equal(f.X, np.asarray(ref.X))
    other = embed(load_model("builtin:mobilenetv2"), back, show_progress=False)  # another model: from the images
    assert other.path != out and len(other.keys) == len(ref.keys)
    assert main(["export", "--model", "builtin:efficientnet-lite0", "--data", str(image_folder), "--out", str(out)]) == 2
    assert "already holds an export" in capsys.readouterr().err
