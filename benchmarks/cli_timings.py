"""Issue 17 timings: whole CLI commands, start-up included, on real data.

- `cbm` (Imagenette, 500 train / 500 val) and `diagnose` (PACS photo vs sketch, 500 each) with a warm image
  cache: first run (text cache empty: concepts and templates are embedded), second run (everything cached).
  Targets: <= 20 s and <= 5 s.
- `decode` with the default caption banks (coco, flickr8k, cc3m): the first run embeds the banks once per text
  tower; a second run with another aligner over the same text tower, and a rerun, must take <= 10 s.

The image features (both aligners' image towers, every set) are embedded first (not timed). A private cache
folder keeps earlier runs out of it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save, shared_dir, table_text

ROOT = Path(__file__).resolve().parents[1]
CL = [sys.executable, "-m", "conceptlens.cli.main"]


def timed(args: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(CL + args, env=env, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])}... failed: {r.stderr.strip()[-500:]}")
    return dt


def main() -> None:
    data = shared_dir() / "data"
    if not (data / "imagenette").exists() or not (data / "pacs").exists():
        print("needs ../shared/data (imagenette, pacs): skipped")
        return
    cache = Path(os.environ.get("CONCEPTLENS_BENCH_CACHE") or tempfile.mkdtemp(prefix="conceptlens-bench-"))
    env = dict(os.environ, CONCEPTLENS_CACHE=str(cache), CONCEPTLENS_QUIET="1")
    tmp = Path(tempfile.mkdtemp(prefix="conceptlens-timings-"))
    inet, pacs = data / "imagenette", data / "pacs"
    mbv2 = tmp / "mbv2.safetensors"
    lite0 = tmp / "lite0.safetensors"
    # warm the image cache and fit two aligners into lite-clip (one text tower): not timed
    timed(["align", "--source", "builtin:mobilenetv2", "--target", "builtin:lite-clip", "--data", str(inet / "train"),
           "--limit", "500", "--out", str(mbv2)], env)
    timed(["align", "--source", "builtin:efficientnet-lite0", "--target", "builtin:lite-clip", "--data",
           str(inet / "train"), "--limit", "500", "--out", str(lite0)], env)
    for split in ("train", "val"):
        timed(["embed", "--model", "builtin:mobilenetv2", "--data", str(inet / split), "--limit", "500"], env)
    timed(["embed", "--model", "builtin:efficientnet-lite0", "--data", str(inet / "val"), "--limit", "500"], env)
    for dom in ("photo", "sketch"):
        timed(["embed", "--model", "builtin:lite-clip", "--data", str(pacs / dom), "--limit", "500"], env)
    cbm = ["cbm", "--model", "builtin:mobilenetv2", "--aligner", str(mbv2), "--train", str(inet / "train"),
           "--test", str(inet / "val"), "--limit", "500"]
    diagnose = ["diagnose", "--model", "builtin:lite-clip", "--data-a", str(pacs / "photo"), "--data-b",
                str(pacs / "sketch"), "--limit", "500"]
    decode = ["decode", "--data", str(inet / "val"), "--limit", "500"]
    rows = [["command", "run", "seconds", "target"]]
    out = {}
    for name, args, target2 in (("cbm", cbm, 5.0), ("diagnose", diagnose, 5.0)):
        shutil.rmtree(cache / "text", ignore_errors=True)
        first = timed(args, env)
        second = timed(args, env)
        out[name] = {"first_s": first, "second_s": second, "target_first_s": 20.0, "target_second_s": target2,
                     "meets": first <= 20.0 and second <= target2}
        rows += [[name, "first (text cache empty)", f"{first:.1f}", "<= 20"], [name, "second", f"{second:.1f}", "<= 5"]]
    shutil.rmtree(cache / "text", ignore_errors=True)
    first = timed(decode + ["--model", "builtin:mobilenetv2", "--aligner", str(mbv2)], env)
    other = timed(decode + ["--model", "builtin:efficientnet-lite0", "--aligner", str(lite0)], env)
    again = timed(decode + ["--model", "builtin:mobilenetv2", "--aligner", str(mbv2)], env)
    out["decode"] = {"first_s": first, "other_aligner_same_text_tower_s": other, "rerun_s": again,
                     "target_later_s": 10.0, "meets": other <= 10.0 and again <= 10.0}
    rows += [["decode (default banks)", "first (banks embedded)", f"{first:.1f}", "once per text tower"],
             ["decode", "another aligner, same text tower", f"{other:.1f}", "<= 10"],
             ["decode", "rerun", f"{again:.1f}", "<= 10"]]
    print(table_text(rows))
    save("cli_timings", {"protocol": __doc__.strip(), "cache": "private, image features warm", **out})
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
