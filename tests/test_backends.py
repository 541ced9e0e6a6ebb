"""Image-embedding backends: ONNX Runtime gives torch's features (fp32), keeps its own cache entries, falls back
to torch for a model that does not export, and refuses what it cannot run."""
import numpy as np
import pytest

from conceptlens.cli import main
from conceptlens.data import load_dataset
from conceptlens.errors import ConceptlensError
from conceptlens.features import cache_key, compute_mode, embed
from conceptlens.models import load_model, onnx
from conceptlens.runtime import resolve_backend

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model():
    return load_model("builtin:efficientnet-lite0")


def test_onnxruntime_features_equal_torch_and_are_cached_apart(model, image_folder):
    ds = load_dataset(image_folder)
    t = embed(model, ds, backend="torch", precision="fp32", show_progress=False)
    o = embed(model, ds, backend="onnxruntime", precision="fp32", show_progress=False)
    A, B = np.asarray(t.X), np.asarray(o.X)
    cos = (A * B).sum(1) / np.linalg.norm(A, axis=1) / np.linalg.norm(B, axis=1)
    assert cos.min() > 0.99999 and np.abs(A - B).max() < 1e-3 * np.abs(A).max()
    assert not o.cache_hit and t.path != o.path  # one entry per backend
    assert compute_mode(model, model.device, "fp32", "auto") == "fp32/onnxruntime"  # auto = ORT for fp32 on the CPU
    assert embed(model, ds, precision="fp32", show_progress=False).cache_hit  # auto hits the ORT entry
    assert cache_key(model, ds, "fp32") != cache_key(model, ds, "fp32/onnxruntime")


def test_a_model_that_does_not_export_runs_on_torch_under_auto_and_is_an_error_when_asked(model, image_folder,
                                                                                            monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("unsupported operator")
    monkeypatch.setattr(onnx.torch.onnx, "export", fail)
    other = load_model("builtin:mobilenetv2", layer="features.10")  # never exported before in this session
    assert compute_mode(other, other.device, "fp32", "auto") == "fp32"
    assert list(onnx.cache_dir("onnx").glob("*.unsupported"))  # remembered: not tried again next run
    with pytest.raises(ConceptlensError, match="does not export"):
        compute_mode(other, other.device, "fp32", "onnxruntime")


def test_backend_choices_are_checked(capsys, image_folder):
    assert resolve_backend("auto", "cpu", "bf16") == "torch"
    with pytest.raises(ConceptlensError, match="fp32 on the CPU"):
        resolve_backend("onnxruntime", "cpu", "bf16")
    with pytest.raises(ConceptlensError, match="unknown backend"):
        resolve_backend("tensorrt", "cpu", "fp32")
    assert main(["embed", "--model", "builtin:efficientnet-lite0", "--data", str(image_folder), "--backend", "torch",
                 "--precision", "fp32"]) == 0
    with pytest.raises(SystemExit):
        main(["embed", "--model", "builtin:efficientnet-lite0", "--data", str(image_folder), "--backend", "tvm"])


def test_minilm_on_onnxruntime_matches_sentence_transformers_and_is_cached_apart(monkeypatch):
    from conceptlens.features import text_cache_key
    from conceptlens.models import text
    texts = ["a photo of a dog.", "  an image of a red car  ", "x", "a sketch of a horse standing in tall grass " * 8]
    enc = text.minilm()
    monkeypatch.setenv("CONCEPTLENS_TEXT_BACKEND", "torch")
    ref, key_torch = enc.encode_text(texts), text_cache_key(enc, texts)
    monkeypatch.delenv("CONCEPTLENS_TEXT_BACKEND")
    assert text.runtime() == "onnxruntime"
    out = enc.encode_text(texts)
    assert out.shape == ref.shape and (out * ref).sum(1).min().item() > 0.99999
    assert text_cache_key(enc, texts) != key_torch
    lite = load_model("builtin:lite-clip")
    assert lite.text_fingerprint.endswith("-onnxruntime")


def test_auto_precision_embeds_with_onnxruntime_fp32_before_bf16_autocast(model):
    cpu = model.device
    assert compute_mode(model, cpu, "bf16", "auto", requested="auto") == "fp32/onnxruntime"  # a native-bf16 CPU
    assert compute_mode(model, cpu, "bf16", "auto", requested="bf16") == "bf16"  # asked for bf16: torch autocast
    assert compute_mode(model, cpu, "bf16", "torch", requested="auto") == "bf16"


def test_openvino_runs_the_exported_tower_in_fp32_and_bf16_and_is_cached_apart(model, image_folder):
    pytest.importorskip("openvino")
    from conceptlens.runtime import bf16_supported
    ds = load_dataset(image_folder)
    t = embed(model, ds, backend="torch", precision="fp32", show_progress=False)
    o = embed(model, ds, backend="openvino", precision="fp32", show_progress=False)
    A, B = np.asarray(t.X), np.asarray(o.X)
    cos = (A * B).sum(1) / np.linalg.norm(A, axis=1) / np.linalg.norm(B, axis=1)
    assert cos.min() > 0.99999 and not o.cache_hit and o.path != t.path
    assert compute_mode(model, model.device, "fp32", "openvino") == "fp32/openvino"
    if bf16_supported():  # elsewhere OpenVINO would quietly run f32: bf16 is measured only where it is native
        b = np.asarray(embed(model, ds, backend="openvino", precision="bf16", show_progress=False).X)
        cos = (A * b).sum(1) / np.linalg.norm(A, axis=1) / np.linalg.norm(b, axis=1)
        assert 0.97 < cos.min() and cos.min() < 0.99999  # bf16 arithmetic: close, not equal
    with pytest.raises(ConceptlensError, match="openvino runs on the CPU in fp32 or bf16"):
        resolve_backend("openvino", "cpu", "fp16")


def test_openvino_bf16_is_refused_where_the_cpu_has_no_native_bf16(monkeypatch):
    pytest.importorskip("openvino")
    from conceptlens import runtime
    monkeypatch.setattr(runtime, "bf16_supported", lambda: False)
    with pytest.raises(ConceptlensError, match="needs a CPU with native bf16"):
        resolve_backend("openvino", "cpu", "bf16")
    assert resolve_backend("openvino", "cpu", "fp32") == "openvino"
