"""`conceptlens embed` against the machine's roofline, side by side in one run on the same 640 Imagenette images.

- Roofline: measured fp32 (and bf16) GEMM peak of this CPU, all threads: the best of torch.mm and numpy at 2048^2
  and 4096^2. `embed` rows: best of three interleaved runs.
- FLOPs per image of the model (torch.utils.flop_counter, one forward pass; a multiply-add = 2 FLOPs).
- img/s and fraction of the fp32 roofline for: the naive loop (PIL + eager torch NCHW, batch 64), `embed` with
  `--backend torch`, `embed` default (auto: ONNX Runtime fp32 on the CPU, also where bf16 is native), torch bf16
  autocast and OpenVINO fp32 / bf16 (`--backend openvino`; bf16 only on a CPU with native bf16), and each runtime
  alone on one preprocessed batch (no decoding), with each path's feature cosine against torch fp32 and its
  zero-shot top-1 (builtin:lite-clip's head on the same images) and its change from torch fp32's.
- int8: ONNX Runtime static quantisation of the exported tower (QDQ, per-channel int8 weights, uint8 activations,
  MinMax calibration on 64 Imagenette *train* images): the runtime alone, its feature cosine and zero-shot top-1.
  A path tried, not a default (it changes the features).
"""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile
import time
from unittest import mock

import numpy as np
import torch
from PIL import Image

from common import save, shared_dir, table_text
from conceptlens.data import load_dataset
from conceptlens.eval import zeroshot
from conceptlens.features import compute_mode, embed
from conceptlens.models import load_model, onnx
from conceptlens.runtime import bf16_supported, resolve_precision

N = 640
MODEL = "builtin:efficientnet-lite0"


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def gemm_gflops(dtype: torch.dtype, reps: int = 5) -> float:
    """The machine's GEMM peak: the best of torch (MKL) and, in fp32, numpy (OpenBLAS) at 2048² and 4096²
    (the faster library and size set the roofline, not the one our code happens to use)."""
    if dtype == torch.bfloat16 and not bf16_supported():
        a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)  # emulated: ~0.3 GFLOP/s
        torch.mm(a, b)
        return 2 * 512 ** 3 / min(timed(torch.mm, a, b)[1] for _ in range(2)) / 1e9
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        pairs = [(torch.mm, a, b)] + ([(np.matmul, a.numpy(), b.numpy())] if dtype == torch.float32 else [])
        for mm, x, y in pairs:
            mm(x, y)
            best = max(best, 2 * n ** 3 / min(timed(mm, x, y)[1] for _ in range(reps)) / 1e9)
    return best


def flops_per_image(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.zeros(1, *onnx.input_shape(model))
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.encode_image(x)
    return float(fc.get_total_flops())


def naive(files) -> np.ndarray:
    out = []
    net = load_model(MODEL)  # fresh NCHW copy
    for i in range(0, len(files), 64):
        x = torch.stack([net.preprocess(Image.open(f).convert("RGB")) for f in files[i:i + 64]])
        with torch.no_grad():
            out.append(net.encode_image(x).numpy())
    return np.concatenate(out)


def model_only(model, files, backend: str) -> float:
    """img/s of the runtime alone on one preprocessed batch of 64 (best of 3)."""
    x = torch.stack([model.preprocess(Image.open(f).convert("RGB")) for f in files[:64]])
    if backend == "onnxruntime":
        path = onnx.export(model, tuple(x.shape[1:]))
        run = lambda: onnx.run(path, x)  # noqa: E731
    elif backend.startswith("openvino"):
        path = onnx.export(model, tuple(x.shape[1:]))
        run = lambda: onnx.run_openvino(path, x, backend.split()[1])  # noqa: E731
    else:
        from conceptlens.features import prepare_for_inference
        prepare_for_inference(model)
        xc = x.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                return model.encode_image(xc)
    run()
    return 64 / min(timed(run)[1] for _ in range(3))


def int8_path(model, files, calib_files) -> tuple[np.ndarray, float]:
    """Features of `files` through the statically quantised tower, and its img/s alone on a batch of 64."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    def batch(fs):
        return torch.stack([model.preprocess(Image.open(f).convert("RGB")) for f in fs]).numpy()

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": batch(calib_files[i:i + 16])} for i in range(0, len(calib_files), 16)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        q = f"{tmp}/int8.onnx"
        quantize_static(onnx.export(model, onnx.input_shape(model)), q, Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(q, so, providers=["CPUExecutionProvider"])
    X = np.concatenate([sess.run(None, {"x": batch(files[i:i + 64])})[0] for i in range(0, len(files), 64)])
    x = batch(files[:64])
    sess.run(None, {"x": x})
    return X, 64 / min(timed(sess.run, None, {"x": x})[1] for _ in range(3))


def main() -> dict:
    root = shared_dir() / "data/imagenette/val"
    if not root.exists():
        print("needs ../shared/data/imagenette/val")
        return {}
    ds = load_dataset(root, limit=N)
    files = [str(root / k) for k in ds.keys]
    model = load_model(MODEL)
    roof32, roof16 = gemm_gflops(torch.float32), gemm_gflops(torch.bfloat16)
    fpi = flops_per_image(model)
    ceiling = roof32 * 1e9 / fpi  # img/s at the fp32 GEMM roofline
    ref, t_naive = timed(naive, files)
    onnx.export(model, onnx.input_shape(model))  # the one-off export, not timed
    native_bf16 = bf16_supported()
    has_ov = importlib.util.find_spec("openvino") is not None
    extra = {name: kw for name, kw, ok in (
        ("embed --backend torch --precision bf16 (autocast)", {"backend": "torch", "precision": "bf16"}, native_bf16),
        ("embed --backend openvino (fp32)", {"backend": "openvino", "precision": "fp32"}, has_ov),
        ("embed --backend openvino --precision bf16", {"backend": "openvino", "precision": "bf16"}, has_ov and native_bf16),
    ) if ok}
    t_torch = t_auto = math.inf
    t_extra, f_extra = {n: math.inf for n in extra}, {}
    for _ in range(3):  # interleaved, best of three (the machine is shared and noisy: ±15 % run to run)
        torch_f, t = timed(embed, model, ds, use_cache=False, show_progress=False, precision="fp32", backend="torch")
        t_torch = min(t_torch, t)
        auto_f, t = timed(embed, model, ds, use_cache=False, show_progress=False)
        t_auto = min(t_auto, t)
        for name, kw in extra.items():
            f_extra[name], t = timed(embed, model, ds, use_cache=False, show_progress=False, **kw)
            t_extra[name] = min(t_extra[name], t)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"CONCEPTLENS_CACHE": tmp}):
        onnx.export(model, onnx.input_shape(model))  # in the empty cache too, not timed
        _, t_cold = timed(embed, model, ds, show_progress=False)  # an empty feature cache: computed and stored
        hit, t_hit = timed(embed, model, ds, show_progress=False)
    assert hit.cache_hit
    lite = load_model("builtin:lite-clip")
    clf = zeroshot.build_classifier(lite, ds.classnames, zeroshot.openai_templates())
    T = torch.from_numpy(np.asarray(torch_f.X))

    def row(name, X, seconds):
        X = torch.from_numpy(np.asarray(X, np.float32))
        cos = torch.nn.functional.cosine_similarity(X, T)
        ips = N / seconds
        acc = zeroshot.metrics(zeroshot.logits(X, clf), ds.labels)["acc1"]
        return {"path": name, "img_per_s": ips, "roofline_fraction": ips / ceiling, "cosine_min_vs_torch_fp32":
                cos.min().item(), "zeroshot_acc1": acc, "zeroshot_minus_fp32_pt": 100 * (acc - acc_fp32)}

    auto_mode = compute_mode(model, model.device, resolve_precision("auto"), "auto", requested="auto")
    acc_fp32 = zeroshot.metrics(zeroshot.logits(T, clf), ds.labels)["acc1"]
    rows = [row("naive loop (PIL + eager NCHW)", ref, t_naive), row("embed --backend torch (fp32)", torch_f.X, t_torch),
            row(f"embed default (auto = {auto_mode})", auto_f.X, t_auto)]
    rows += [row(name, f_extra[name].X, t_extra[name]) for name in extra]
    alone = {b: model_only(model, files, b) for b in ("torch", "onnxruntime", "openvino fp32", "openvino bf16")
             if not b.startswith("openvino") or has_ov and (b.endswith("fp32") or native_bf16)}
    train = shared_dir() / "data/imagenette/train"
    calib = [str(train / k) for k in load_dataset(train, limit=64).keys]
    X8, alone["onnxruntime int8 (static)"] = int8_path(model, files, calib)
    rows.append(row("onnxruntime int8 static (alone, tried; not a default)", X8, N / alone["onnxruntime int8 (static)"]))
    res = {"images": N, "model": MODEL, "gemm_gflops_fp32": roof32, "gemm_gflops_bf16": roof16,
           "flops_per_image": fpi, "roofline_img_per_s_fp32": ceiling, "paths": rows,
           "model_only_img_per_s": alone, "model_only_roofline_fraction": {b: v / ceiling for b, v in alone.items()},
           "auto_speedup_vs_torch": t_torch / t_auto, "speedup_vs_naive": t_naive / t_auto,
           "cold_cached_s": t_cold, "hit_s": t_hit, "cache_speedup": t_cold / t_hit}
    print(f"GEMM fp32 {roof32:.0f} GFLOP/s, bf16 {roof16:.2f}; {fpi / 1e9:.2f} GFLOP/image -> "
          f"roofline {ceiling:.0f} img/s")
    print(table_text([["path", "img/s", "of roofline", "cosine min", "zero-shot acc1", "vs fp32 (pt)"]] +
                     [[r["path"], f"{r['img_per_s']:.1f}", f"{r['roofline_fraction']:.0%}",
                       f"{r['cosine_min_vs_torch_fp32']:.5f}", f"{r['zeroshot_acc1']:.4f}",
                       f"{r['zeroshot_minus_fp32_pt']:+.2f}"] for r in rows] +
                     [[f"model alone: {b}", f"{v:.1f}", f"{v / ceiling:.0%}", "", "", ""] for b, v in alone.items()]))
    save("embed_speed", res)
    return res


if __name__ == "__main__":
    main()
