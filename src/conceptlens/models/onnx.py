"""ONNX Runtime as an embedding backend for image towers and MiniLM (issue "Speed to the roofline").

The image tower is exported once per (model, weights, layer, input size, torch and onnxruntime versions) with
torch's TorchScript-based exporter into the cache (`cache_dir("onnx")`), then run by ONNX Runtime's CPU provider,
whose fused fp32 kernels run EfficientNet-Lite0 2-4x faster than eager torch here at the same features (cosine
1.0000; benchmarks/results/embed_speed.json). OpenVINO reads the same file (`--backend openvino`): fp32, or bf16
where the CPU has native bf16 kernels. A model that does not export is remembered (`.unsupported`) and
embedded by torch. Sessions live in this process (never pickled): Ray workers open the exported file themselves.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch

from ..errors import ConceptlensError
from ..io import atomic_write_bytes, cache_dir, digest
from .base import Encoder

OPSET = 17
_SESSIONS: dict[tuple, object] = {}


def _stem(model: Encoder, shape: tuple[int, ...]) -> str:
    import onnxruntime
    return digest([model.image_model, model.image_fingerprint, model.layer, list(shape), torch.__version__,
                   onnxruntime.__version__, OPSET])


class _Tower(torch.nn.Module):
    """The image tower as one module (its weights registered, so the exporter stores them as initialisers)."""

    def __init__(self, model: Encoder):
        super().__init__()
        self.model = model
        self.parts = torch.nn.ModuleList(model.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x).float()


def export(model: Encoder, shape: tuple[int, ...]) -> str | None:
    """Path of the exported image tower for inputs [B, *shape] (exported now if not yet); None if the model does
    not export (remembered, so the next run does not try again)."""
    if model.device.type != "cpu":
        raise ConceptlensError("the onnxruntime backend runs on the CPU: use --backend torch on an accelerator")
    return export_module(_stem(model, shape), lambda: _Tower(model).eval(), (torch.zeros(2, *shape),), ["x"],
                         ["features"], {"x": {0: "batch"}, "features": {0: "batch"}})


def export_module(stem: str, build, args: tuple, inputs: list[str], outputs: list[str], axes: dict) -> str | None:
    """Export `build()` (a module, built only when needed) on `args` into the cache as `stem`.onnx; None (and a
    `stem`.unsupported marker) when the exporter fails."""
    stem = cache_dir("onnx") / stem
    path, bad = stem.with_suffix(".onnx"), stem.with_suffix(".unsupported")
    if path.exists():
        return str(path)
    if bad.exists():
        return None
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(build(), args, buf, dynamo=False, opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes)
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: this model runs on torch
        with contextlib.suppress(OSError):  # remembered if it can be; else tried again next run
            atomic_write_bytes(bad, f"{type(exc).__name__}: {exc}".encode())
        return None
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise ConceptlensError(f"cannot store the exported model in {path.parent} (disk full?): {exc.strerror}") from None
    return str(path)


def unsupported(stem: str) -> bool:
    """Whether an earlier export of `stem` failed (so the model runs on torch)."""
    return (cache_dir("onnx") / stem).with_suffix(".unsupported").exists()


def session(path: str, threads: int | None = None):
    """An ONNX Runtime CPU session for an exported tower, one per (file, threads) in this process."""
    import onnxruntime as ort
    threads = threads or torch.get_num_threads()
    key = (path, threads)
    if key not in _SESSIONS:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        _SESSIONS[key] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def _as_input(x: torch.Tensor) -> np.ndarray:
    """A preprocessed batch as the exported graph's input: contiguous float32 NCHW, whatever x's memory format."""
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def run(path: str, x: torch.Tensor) -> torch.Tensor:
    """Features [B, D] of a preprocessed batch through the exported tower at `path`."""
    return torch.from_numpy(run_inputs(path, {"x": _as_input(x)}))


def openvino_request(path: str, precision: str, threads: int | None = None):
    """An OpenVINO CPU infer request for an exported tower at `precision` (fp32 | bf16), one per (file, precision,
    threads) in this process."""
    import openvino as ov
    threads = threads or torch.get_num_threads()
    key = (path, precision, threads)
    if key not in _SESSIONS:
        hint = {"fp32": "f32", "bf16": "bf16"}[precision]
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        _SESSIONS[key] = compiled.create_infer_request()
    return _SESSIONS[key]


def run_openvino(path: str, x: torch.Tensor, precision: str) -> torch.Tensor:
    """Features [B, D] of a preprocessed batch through the exported tower at `path`, run by OpenVINO."""
    return torch.from_numpy(openvino_request(path, precision).infer({0: _as_input(x)})[0].copy())


def run_inputs(path: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of the exported module at `path` on named inputs."""
    return session(path).run(None, feeds)[0]


def input_shape(model: Encoder) -> tuple[int, ...]:
    """[C, H, W] of one preprocessed image (what the model's preprocess makes of a blank picture)."""
    from PIL import Image
    return tuple(model.preprocess(Image.new("RGB", (256, 256))).shape)

