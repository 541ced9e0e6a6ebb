"""Every model verb on a chosen device beside the CPU, on small real data: do they agree, and how fast is each?

    python benchmarks/device_check.py [--device auto|cuda|cuda:N|mps]     (default auto: CUDA when available)

Checks (issue 15): fp32 feature cosine >= 0.999, the same predictions on >= 99 % of images, diffusion errors within
1e-3; rates on each device. Verbs: embed, zeroshot, linear-probe, align, cbm, diagnose, search, decode, explain,
diffusion-classify, train clip, train diffusion (build = embed + head training, demo = zeroshot + diffusion-classify:
covered by those). Writes benchmarks/results/device_check.json with the device's name. On a machine without an
accelerator the "device" is the CPU again, which only shows the harness runs; the file says so.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import save, shared_dir, table_text
from conceptlens.cli import main as cli
from conceptlens.concepts.vocab import caption_bank
from conceptlens.data import load_dataset, read_flickr8k
from conceptlens.diffusion import DiffusionClassifier, evaluate
from conceptlens.features import embed
from conceptlens.models import load_model
from conceptlens.runtime import resolve_device

N_EMBED, N_DIFF = 256, 20


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_cli(args: list[str]) -> tuple[int, float, str]:
    """rc, seconds and the last stderr line of one command run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        t = time.perf_counter()
        try:
            rc = cli(args)
        except SystemExit as exc:
            rc = exc.code
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and "Loading" not in ln]
    return rc, time.perf_counter() - t, lines[-1][:200] if lines else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    dev = resolve_device(ap.parse_args().device)
    os.environ.setdefault("CONCEPTLENS_QUIET", "1")
    data = shared_dir() / "data"
    val, train = data / "imagenette" / "val", data / "imagenette" / "train"
    cifar = data / "cifar10" / "test-000000.tar.gz"
    checks, rows = {}, [["verb", "check", "value", "pass", f"{dev.type} s", "cpu s"]]

    def record(verb, check, value, ok, t_dev, t_cpu):
        ok = bool(ok)
        checks[verb] = {"check": check, "value": value, "pass": ok, "seconds_device": t_dev, "seconds_cpu": t_cpu}
        rows.append([verb, check, f"{value:.6f}" if isinstance(value, float) else value, ok, f"{t_dev:.1f}", f"{t_cpu:.1f}"])

    # embed + zeroshot (API: features and predictions side by side)
    ds = load_dataset(val, limit=N_EMBED)
    cpu_f, t_cpu = timed(lambda: embed(load_model("builtin:lite-clip"), ds, precision="fp32", use_cache=False,
                                       show_progress=False))
    dev_m = load_model("builtin:lite-clip", device=dev)
    dev_f, t_dev = timed(lambda: embed(dev_m, ds, precision="fp32", use_cache=False, show_progress=False))
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(np.asarray(cpu_f.X)), torch.from_numpy(np.asarray(dev_f.X)))
    record("embed", "min fp32 cosine >= 0.999", float(cos.min()), cos.min() >= 0.999, t_dev, t_cpu)
    checks["embed"]["img_per_s"] = {dev.type: N_EMBED / t_dev, "cpu": N_EMBED / t_cpu}
    from conceptlens.eval import zeroshot
    p_cpu = zeroshot.evaluate(load_model("builtin:lite-clip"), cpu_f)["_scores"].argmax(1)
    p_dev = zeroshot.evaluate(dev_m, dev_f)["_scores"].argmax(1)
    agree = float((p_cpu == p_dev).float().mean())
    record("zeroshot", "same predictions >= 0.99", agree, agree >= 0.99, t_dev, t_cpu)

    # diffusion-classify (API): errors within 1e-3, same predictions
    cds = load_dataset(cifar, limit=N_DIFF)
    clf_c = DiffusionClassifier(load_model("builtin:tiny-diffusion-cifar10"), "fixed", n_samples=8, precision="fp32")
    clf_d = DiffusionClassifier(load_model("builtin:tiny-diffusion-cifar10"), "fixed", n_samples=8, precision="fp32",
                                device=str(dev))
    r_cpu, t_cpu = timed(lambda: evaluate(clf_c, cds, show_progress=False))
    r_dev, t_dev = timed(lambda: evaluate(clf_d, cds, show_progress=False))
    preds = [torch.tensor([p["pred"] for p in r["predictions"]]) for r in (r_cpu, r_dev)]
    err = float((preds[0] != preds[1]).float().mean())
    diff = float((r_cpu["_scores"].clamp(-1e8, 1e8) - r_dev["_scores"].clamp(-1e8, 1e8)).abs().max())
    record("diffusion-classify", "max |error diff| <= 1e-3", diff, diff <= 1e-3 and err <= 0.01, t_dev, t_cpu)
    checks["diffusion-classify"]["img_per_s"] = {dev.type: N_DIFF / t_dev, "cpu": N_DIFF / t_cpu}
    load_model("builtin:tiny-diffusion-cifar10", device="cpu")  # the cached instance goes back

    # the other verbs through the CLI, each once per device, outputs compared
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bank = tmp / "bank.txt"
        bank.write_text("\n".join(caption_bank()[:2000]))
        common = ["--limit", "200", "--precision", "fp32", "--no-cache"]
        verbs = {
            "linear-probe": ["linear-probe", "--model", "builtin:efficientnet-lite0", "--train", str(train), "--test", str(val)],
            "align": ["align", "--source", "builtin:mobilenetv2", "--target", "builtin:lite-clip", "--data", str(val)],
            "cbm": ["cbm", "--model", "builtin:lite-clip", "--train", str(train), "--test", str(val)],
            "diagnose": ["diagnose", "--model", "builtin:lite-clip", "--data-a", str(val), "--data-b", str(cifar)],
            "search": ["search", "dog & !grass", "--model", "builtin:lite-clip", "--data", str(val)],
            "decode": ["decode", "--model", "builtin:lite-clip", "--data", str(val), "--captions", str(bank)],
            "explain": ["explain", "--model", "builtin:efficientnet-lite0", "--data", str(val), "--features", "0,1,2",
                        "--top-n", "20", "--captions", str(bank)],
        }
        for verb, args in verbs.items():
            out = {}
            for side, d in (("cpu", "cpu"), ("dev", str(dev))):
                extra = {"align": ["--out", str(tmp / f"al-{side}.safetensors")],
                         "linear-probe": ["--output", str(tmp / f"lp-{side}.json")],
                         "decode": ["--output", str(tmp / f"dec-{side}.json")]}.get(
                    verb, ["--report", str(tmp / f"{verb}-{side}")])
                out[side] = run_cli(args + common + ["--device", d] + extra)
            ok = out["cpu"][0] == 0 and out["dev"][0] == 0
            value = "ran on both" if ok else f"rc {out['cpu'][0]}/{out['dev'][0]}: {out['dev'][2] or out['cpu'][2]}"
            if verb == "linear-probe" and ok:
                a, b = (json.loads((tmp / f"lp-{side}.json").read_text())["metrics"]["lp_acc1"] for side in ("cpu", "dev"))
                value, ok = abs(a - b), abs(a - b) <= 0.01
            record(verb, "runs; probe acc1 within 0.01" if verb == "linear-probe" else "runs on the device", value, ok,
                   out["dev"][1], out["cpu"][1])

        # training: a few steps on each device, the losses compared
        pairs, _ = read_flickr8k(data / "flickr8k")
        (tmp / "pairs.csv").write_text("path,caption\n" + "".join(
            f'{data / "flickr8k" / "images" / i},"{c.replace(chr(34), "")}"\n' for i, c in pairs[:500]))
        cfg = tmp / "clip.toml"
        cfg.write_text(f'data = "{tmp / "pairs.csv"}"\nepochs = 2\nbatch_size = 64\n')
        for verb, base in (("train clip", ["train", "clip", "--config", str(cfg)]),
                           ("train diffusion", ["train", "diffusion", "--data", str(cifar), "--steps", "10",
                                                "--ckpt-every", "10"])):
            res = {}
            for side, d in (("cpu", "cpu"), ("dev", str(dev))):
                o = tmp / f"{verb.replace(' ', '-')}-{side}"
                extra = ["--out", str(o)] + (["--export", str(o / "w.safetensors"), "--precision", "fp32"]
                                              if verb == "train diffusion" else [])
                res[side] = run_cli(base + extra + ["--device", d])
            ok = all(r[0] == 0 for r in res.values())
            record(verb, "runs on the device", "ran on both" if ok else f"failed: {res['dev'][2] or res['cpu'][2]}", ok,
                   res["dev"][1], res["cpu"][1])

    print(table_text(rows))
    save("device_check", {"device": str(dev), "device_name": device_name(dev), "accelerator": dev.type != "cpu",
                          "note": None if dev.type != "cpu" else "no accelerator here: the device is the CPU again; "
                          "this only shows the harness runs. Run on a GPU machine for the real comparison.",
                          "checks": checks, "all_pass": all(c["pass"] for c in checks.values())})


if __name__ == "__main__":
    main()
