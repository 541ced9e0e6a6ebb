"""Where work runs: torch devices, autocast precision, and host<->device copies.

`--device auto|cpu|cuda|cuda:N|mps`: `auto` is CUDA when available, else the CPU (silently); an explicit
device that is not there is a one-line error. `--precision auto` is bf16 autocast on CPUs with native bf16
kernels (AVX512-BF16 / AMX), bf16 on CUDA GPUs that support it (fp16 on older ones), fp32 elsewhere.

`--backend auto|torch|onnxruntime|openvino` (image embedding): `auto` is ONNX Runtime for fp32 on the CPU when
the package is installed and the model exports (conceptlens.models.onnx), torch elsewhere; with `--precision auto`
it comes first on CPUs with native bf16 too (fp32's features, and faster there than bf16 autocast). `openvino` runs the
same exported tower through OpenVINO on the CPU, in fp32 or, with `--precision bf16`, in bf16 (~1.7x ONNX Runtime's
speed on a CPU with native bf16; features change, cosine ~0.99: benchmarks/results/embed_speed.json), never
chosen by `auto`. The backend is part of the feature-cache key and of every result's precision field
("fp32/onnxruntime", "bf16/openvino"); torch entries keep their keys.

Cache policy: features are keyed by device *type* as well as precision, because a GPU agrees with the CPU
to tolerance (cosine > 0.999), not bit for bit. All CPU paths (local and every Ray CPU worker) share one
entry: they are bit-identical in fp32 (tested).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import torch

from .errors import ConceptlensError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device | None = "cpu") -> torch.device:
    """A torch device from `auto`, `cpu`, `cuda`, `cuda:N` or `mps`; an absent explicit device is an error."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "cpu").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dev = parse_device(spec)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConceptlensError(f"--device {spec}: CUDA is not available here "
                                   f"(torch {torch.__version__}, {torch.cuda.device_count()} GPUs); use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConceptlensError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConceptlensError(f"--device {spec}: Apple MPS is not available here; use --device cpu or auto")
        return dev
    raise ConceptlensError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


def parse_device(spec: str) -> torch.device:
    """A device spec as a torch device, without checking that it exists here (Ray workers check their own)."""
    try:
        return torch.device(spec.strip().lower())
    except (RuntimeError, ValueError):
        raise ConceptlensError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep freed activation buffers in the heap instead of unmapping them (glibc `mallopt`): every batch would
    otherwise page-fault fresh mmap'ed memory, a measured 13 % of embedding time here. Once per process; False
    where the C library is not glibc. CONCEPTLENS_MALLOC=default leaves the allocator alone."""
    if os.environ.get("CONCEPTLENS_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 would be slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """fp32 | bf16 | fp16 for `precision` on `device` (see the module docstring for what `auto` means)."""
    if precision not in PRECISIONS:
        raise ConceptlensError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    if precision == "auto":
        if dev.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if dev.type == "cpu" and bf16_supported() else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise ConceptlensError("fp16 autocast is for GPUs; on a CPU use --precision bf16 or fp32")
    return precision


def resolve_backend(backend: str, device: torch.device | str | None, precision: str) -> str:
    """torch | onnxruntime | openvino for image embedding at a resolved `precision` on `device` (see the module
    docstring; whether the model exports is checked where it is exported)."""
    import importlib.util
    if backend not in BACKENDS:
        raise ConceptlensError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    cpu_fp32 = resolve_device(device).type == "cpu" and precision == "fp32"
    have = importlib.util.find_spec("onnxruntime") is not None
    if backend == "auto":
        return "onnxruntime" if cpu_fp32 and have else "torch"
    if backend == "onnxruntime" and not cpu_fp32:
        raise ConceptlensError("--backend onnxruntime runs fp32 on the CPU: use --precision fp32 --device cpu, "
                               "or --backend torch")
    if backend == "onnxruntime" and not have:
        raise ConceptlensError("--backend onnxruntime needs the PyPI package 'onnxruntime': pip install onnxruntime")
    if backend == "openvino":
        if resolve_device(device).type != "cpu" or precision not in ("fp32", "bf16"):
            raise ConceptlensError("--backend openvino runs on the CPU in fp32 or bf16: use --device cpu and "
                                   "--precision fp32|bf16, or another backend")
        if importlib.util.find_spec("openvino") is None:
            raise ConceptlensError("--backend openvino needs the PyPI package 'openvino': pip install openvino")
        if precision == "bf16" and not bf16_supported():  # OpenVINO would run f32 and the label would lie
            raise ConceptlensError("--backend openvino --precision bf16 needs a CPU with native bf16 (AVX512-BF16 / "
                                   "AMX); this one has none: use --precision fp32")
    return backend


def autocast(device: torch.device, precision: str):
    """Autocast to the resolved precision on `device` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device through pinned memory with a non-blocking copy (no copy on the CPU)."""
    if device.type == "cpu" or x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def default_batch_size(device: torch.device, cpu: int) -> int:
    """A batch size for the device: the CPU default, 4x that on an accelerator (overridable everywhere)."""
    return cpu if device.type == "cpu" else 4 * cpu


def decode_workers(device: torch.device) -> int:
    """Decoder threads: CONCEPTLENS_NUM_WORKERS (`--num-workers`) if set, else 2 on the CPU (the model needs the
    cores), enough to keep an accelerator busy elsewhere."""
    if (env := os.environ.get("CONCEPTLENS_NUM_WORKERS", "")).isdigit() and int(env) > 0:
        return int(env)
    return 2 if device.type == "cpu" else max(2, min(16, (os.cpu_count() or 2)))


def cache_tag(device: torch.device) -> list[str]:
    """The cache-key part for a device: nothing on the CPU (so existing entries stay valid), else its type."""
    return [] if device.type == "cpu" else [device.type]
