"""A catalogue of bad inputs across every verb: each must end with one line on stderr and exit code 2 — no
traceback, no output file half-written, nothing written outside the output paths.

`benchmarks/reliability.py` runs this module (and the fault tests) with CONCEPTLENS_RELIABILITY_OUT set: the
tests count what they tried into that file.
"""
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from conceptlens.cli import main
from conftest import two_class_folder, write_reliability

RECORD: dict = {"cases": 0, "clean_errors": 0, "defects": []}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    write_reliability("bad_input", RECORD)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs, good and bad, built once for the module."""
    t = tmp_path_factory.mktemp("inputs")
    f = {"IMGS": two_class_folder(t / "imgs", ("red", "blue"), (40, 48)),
         "CIFAR": two_class_folder(t / "cifar", ("cat", "ship"), (32, 32))}
    (t / "empty").mkdir()
    f["EMPTY"] = t / "empty"
    (t / "noimg").mkdir()
    (t / "noimg" / "a.txt").write_text("x")
    f["NOIMG"] = t / "noimg"
    ec = two_class_folder(t / "emptyclass", ("a", "b"), (20, 20))
    (ec / "c").mkdir()
    f["EMPTYCLASS"] = ec

    def text(name, content, binary=False):
        p = t / name
        p.write_bytes(content) if binary else p.write_text(content)
        f[name.upper().replace(".", "_")] = p
        return p

    text("empty.txt", "")
    text("dup.txt", "red\nred\n")
    text("other.txt", "cat\ndog\n")
    text("latin1.txt", "caf\xe9\nred\n".encode("latin-1"), binary=True)
    text("nopath.csv", "file_name,label\na.png,x\n")
    text("latin1.csv", "path,label\ncaf\xe9.png,x\n".encode("latin-1"), binary=True)
    text("bad.jsonl", '{"path": "a.png"}\n{not json\n')
    text("header.csv", "path,label\n")
    text("garbage.tar", b"this is not a tar archive at all" * 10, binary=True)
    text("tmpl_noc.txt", "a photo\n")
    text("tmpl_extra.txt", "a {c} in {place}\n")
    text("tmpl_brace.txt", "a {c} {\n")
    text("bad.toml", "epochs = = 3\n")
    text("unknown.toml", 'data = "x.csv"\nepochz = 3\n')
    text("type.toml", 'data = "x.csv"\nepochs = "ten"\n')
    text("zero.toml", 'data = "x.csv"\nepochs = 0\n')
    text("reg.toml", 'data = "x.csv"\nreg = "one-sided"\n')
    text("nodata.toml", "epochs = 3\n")
    text("garbage.safetensors", b"\x00" * 64, binary=True)
    text("string.npy", b"", binary=True)
    np.save(f["STRING_NPY"], np.array(["a", "b"]))
    np.save(t / "nan.npy", np.full(1280, np.nan, np.float32))
    f["NAN_NPY"] = t / "nan.npy"
    np.savez(t / "arr.npz", a=np.zeros(3))
    f["ARR_NPZ"] = t / "arr.npz"
    np.save(t / "wrongdim.npy", np.zeros((2, 7), np.float32))
    f["WRONGDIM_NPY"] = t / "wrongdim.npy"
    np.save(t / "cube.npy", np.zeros((2, 2, 2), np.float32))
    f["CUBE_NPY"] = t / "cube.npy"
    import torch
    save_file({"W": torch.full((384, 1280), float("nan")), "b": torch.zeros(384)}, str(t / "nan_aligner.safetensors"),
              metadata={"conceptlens": json.dumps({"source": "builtin:efficientnet-lite0", "layer": None,
                                                   "target": "builtin:minilm"})})
    f["NAN_ALIGNER"] = t / "nan_aligner.safetensors"
    save_file({"W": torch.zeros((384, 1280)), "b": torch.zeros(384)}, str(t / "mbv2_aligner.safetensors"),
              metadata={"conceptlens": json.dumps({"source": "builtin:mobilenetv2", "layer": None,
                                                   "target": "builtin:minilm"})})
    f["OTHER_ALIGNER"] = t / "mbv2_aligner.safetensors"
    save_file({"x": torch.zeros(3)}, str(t / "noW.safetensors"), metadata={"conceptlens": "{}"})
    f["NOW_ALIGNER"] = t / "noW.safetensors"
    with tarfile.open(t / "big-member.tar.gz", "w:gz") as tf:  # a 64 MiB label member: never read into memory
        data = b"0" * (64 << 20)
        info = tarfile.TarInfo("x.cls")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    f["BIGMEMBER"] = t / "big-member.tar.gz"
    (t / "afile").write_text("x")
    f["AFILE"] = t / "afile"
    f["OUTDIR"] = t / "outdir"
    f["OUTDIR"].mkdir()
    with gzip.open(t / "caps.txt.gz", "wt") as g:
        g.write("a dog\n")
    f["TMP"] = t
    return f


M, VL, D = ["--model", "builtin:efficientnet-lite0"], ["--model", "builtin:lite-clip"], "--data"
CASES = {
    # data
    "missing data path": ["embed", *M, D, "/nonexistent/imgs"],
    "empty folder": ["embed", *M, D, "EMPTY"],
    "folder without images": ["embed", *M, D, "NOIMG"],
    "empty class folder": ["embed", *M, D, "EMPTYCLASS"],
    "unknown named set": ["embed", *M, D, "fashion-mnist:bogus"],
    "tar pattern matching nothing": ["embed", *M, D, "/nonexistent/train-{000..003}.tar"],
    "not a tar archive": ["embed", *M, D, "GARBAGE_TAR"],
    "tar with a 64 MiB label member": ["embed", *M, D, "BIGMEMBER"],
    "CSV without a path column": ["embed", *M, D, "NOPATH_CSV"],
    "CSV not UTF-8": ["embed", *M, D, "LATIN1_CSV"],
    "JSONL with a bad line": ["embed", *M, D, "BAD_JSONL"],
    "CSV with a header only": ["embed", *M, D, "HEADER_CSV"],
    "--limit 0": ["embed", *M, D, "IMGS", "--limit", "0"],
    "--limit -1": ["embed", *M, D, "IMGS", "--limit", "-1"],
    "--limit abc": ["embed", *M, D, "IMGS", "--limit", "abc"],
    "--identity bogus": ["embed", *M, D, "IMGS", "--identity", "mtime"],
    "--batch-size 0": ["embed", *M, D, "IMGS", "--batch-size", "0"],
    # class files
    "class file missing": ["embed", *M, D, "IMGS", "--classes", "/nonexistent/classes.txt"],
    "class file empty": ["embed", *M, D, "IMGS", "--classes", "EMPTY_TXT"],
    "class file with duplicates": ["embed", *M, D, "IMGS", "--classes", "DUP_TXT"],
    "class file not naming the folders": ["embed", *M, D, "IMGS", "--classes", "OTHER_TXT"],
    "class file not UTF-8": ["embed", *M, D, "IMGS", "--classes", "LATIN1_TXT"],
    # models
    "unknown model": ["embed", "--model", "builtin:nope", D, "IMGS"],
    "unknown tag": ["embed", "--model", "builtin:lite-clip/random", D, "IMGS"],
    "unknown scheme": ["embed", "--model", "nope:thing", D, "IMGS"],
    "unknown torchvision model": ["embed", "--model", "torchvision:resnet9000", D, "IMGS"],
    "torchvision weights not on disk": ["embed", "--model", "torchvision:resnet18", D, "IMGS"],
    "open_clip without a tag": ["embed", "--model", "open_clip:RN50", D, "IMGS"],
    "open_clip weights not on disk": ["embed", "--model", "open_clip:RN50/openai", D, "IMGS"],
    "hf folder that does not exist": ["embed", "--model", "hf:/nonexistent/clip", D, "IMGS"],
    "unknown layer": ["embed", *M, "--layer", "nope", D, "IMGS"],
    "--layer on a text model": ["embed", "--model", "builtin:minilm", "--layer", "x", D, "IMGS"],
    "aligner missing": ["zeroshot", *M, "--aligner", "/nonexistent.safetensors", D, "IMGS"],
    "aligner garbage": ["zeroshot", *M, "--aligner", "GARBAGE_SAFETENSORS", D, "IMGS"],
    "aligner with NaN": ["zeroshot", *M, "--aligner", "NAN_ALIGNER", D, "IMGS"],
    "aligner of another model": ["zeroshot", *M, "--aligner", "OTHER_ALIGNER", D, "IMGS"],
    "aligner without W": ["zeroshot", *M, "--aligner", "NOW_ALIGNER", D, "IMGS"],
    # devices and engines
    "unknown device": ["embed", *M, D, "IMGS", "--device", "tpu"],
    "fp16 on a CPU": ["embed", *M, D, "IMGS", "--precision", "fp16"],
    "unreachable Ray cluster": ["embed", *M, D, "IMGS", "--engine", "ray", "--ray-address", "127.0.0.1:9"],
    "malformed Ray address": ["embed", *M, D, "IMGS", "--engine", "ray", "--ray-address", "nonsense"],
    "--ray-address without --engine ray": ["embed", *M, D, "IMGS", "--ray-address", "127.0.0.1:6379"],
    # zero-shot and templates
    "zero-shot with a vision-only model": ["zeroshot", *M, D, "IMGS"],
    "templates file missing": ["zeroshot", *VL, D, "IMGS", "--templates", "/nonexistent.txt"],
    "templates without {c}": ["zeroshot", *VL, D, "IMGS", "--templates", "TMPL_NOC_TXT"],
    "templates with another field": ["zeroshot", *VL, D, "IMGS", "--templates", "TMPL_EXTRA_TXT"],
    "templates with a lone brace": ["zeroshot", *VL, D, "IMGS", "--templates", "TMPL_BRACE_TXT"],
    # probes
    "probe: train and test classes differ": ["linear-probe", *M, "--train", "IMGS", "--test", "CIFAR"],
    # search
    "empty query": ["search", "", *VL, D, "IMGS"],
    "unbalanced query": ["search", "(dog & cat", *VL, D, "IMGS"],
    "query ending in an operator": ["search", "dog &", *VL, D, "IMGS"],
    "query nested too deep": ["search", "(" * 200 + "dog" + ")" * 200, *VL, D, "IMGS"],
    "query with too many concepts": ["search", " | ".join(["dog"] * 100), *VL, D, "IMGS"],
    "search --top-k 0": ["search", "dog", *VL, D, "IMGS", "--top-k", "0"],
    # decode / explain vectors
    "vector file missing": ["decode", *VL, "--vector", "/nonexistent.npy"],
    "vector file is .npz": ["decode", *VL, "--vector", "ARR_NPZ"],
    "vector file of strings": ["decode", *VL, "--vector", "STRING_NPY"],
    "vector with NaN": ["decode", *VL, "--vector", "NAN_NPY"],
    "vector of the wrong width": ["decode", *VL, "--vector", "WRONGDIM_NPY"],
    "vector of 3 dimensions": ["decode", *VL, "--vector", "CUBE_NPY"],
    "explain a NaN direction": ["explain", *M, D, "IMGS", "--direction", "NAN_NPY"],
    "explain features not integers": ["explain", *M, D, "IMGS", "--features", "1,x"],
    "explain a feature out of range": ["explain", *M, D, "IMGS", "--features", "99999"],
    "explain two targets at once": ["explain", *M, D, "IMGS", "--features", "1", "--top-groups", "2"],
    # diffusion
    "diffusion on the wrong image size": ["diffusion-classify", D, "IMGS"],
    "diffusion strategy unknown": ["diffusion-classify", D, "CIFAR", "--strategy", "magic"],
    "diffusion --n-samples 0": ["diffusion-classify", D, "CIFAR", "--n-samples", "0"],
    "diffusion budget below the classes": ["diffusion-classify", D, "CIFAR", "--budget", "1"],
    "diffusion --t-range reversed": ["diffusion-classify", D, "CIFAR", "--t-range", "0.9,0.5"],
    "diffusion --t-range one number": ["diffusion-classify", D, "CIFAR", "--t-range", "0.5"],
    "diffusion --t-range with adaptive": ["diffusion-classify", D, "CIFAR", "--strategy", "adaptive", "--t-range", "0.5,1"],
    # training configs
    "train clip: config missing": ["train", "clip", "--config", "/nonexistent.toml"],
    "train clip: unparsable TOML": ["train", "clip", "--config", "BAD_TOML"],
    "train clip: unknown key": ["train", "clip", "--config", "UNKNOWN_TOML"],
    "train clip: wrong type": ["train", "clip", "--config", "TYPE_TOML"],
    "train clip: epochs = 0": ["train", "clip", "--config", "ZERO_TOML"],
    "train clip: reg without weight": ["train", "clip", "--config", "REG_TOML"],
    "train clip: no data": ["train", "clip", "--config", "NODATA_TOML"],
    "train diffusion: unlabelled data": ["train", "diffusion", D, "EMPTY"],
    # alignment
    "align holdout out of range": ["align", "--source", "builtin:mobilenetv2", "--target", "builtin:lite-clip", D, "IMGS",
                                   "--holdout", "1.5", "--out", "OUTDIR/a.safetensors"],
    "align method unknown": ["align", "--source", "builtin:mobilenetv2", "--target", "builtin:lite-clip", D, "IMGS",
                             "--method", "magic", "--out", "OUTDIR/a.safetensors"],
    "cbm concepts file missing": ["cbm", *VL, "--train", "IMGS", "--test", "IMGS", "--concepts", "/nonexistent.txt"],
    "diagnose B missing": ["diagnose", *VL, "--data-a", "IMGS", "--data-b", "/nonexistent"],
    # outputs
    "--output is a directory": ["embed", *M, D, "IMGS", "--output", "OUTDIR"],
    "--output under a file": ["zeroshot", *VL, D, "IMGS", "--output", "AFILE/res.json"],
    "--report under a file": ["search", "dog", *VL, D, "IMGS", "--report", "AFILE/rep"],
    "--report holds files": ["search", "dog", *VL, D, "IMGS", "--report", "IMGS"],
    "--report is a file": ["search", "dog", *VL, D, "IMGS", "--report", "AFILE"],
    "unknown verb": ["embedd"],
    "unknown option": ["embed", *M, D, "IMGS", "--frobnicate"],
}


def resolve(argv: list[str], files: dict) -> list[str]:
    out = []
    for a in argv:
        head, sep, tail = a.partition("/")
        out.append(str(files[head]) + (sep + tail if sep else "") if head in files else a)
    return out


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_2(name, files, capsys, monkeypatch):
    monkeypatch.chdir(files["TMP"])
    before = tree(files["TMP"])
    RECORD["cases"] += 1
    try:
        rc = main(resolve(CASES[name], files))
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if not ln.startswith("warning:")]
    clean = rc == 2 and len(err) == 1 and err[0].startswith("conceptlens: error:") and "Traceback" not in err[0]
    written = tree(files["TMP"]) - before
    if clean and not written:
        RECORD["clean_errors"] += 1
    else:
        RECORD["defects"].append({"case": name, "rc": rc, "stderr": err[-3:], "written": sorted(written)})
    assert rc == 2, (name, err)
    assert len(err) == 1 and err[0].startswith("conceptlens: error:"), (name, err)
    assert not written, (name, written)


def test_good_inputs_that_look_odd_still_work(files, tmp_path, capsys):
    """Not errors: a names-only class file that names the folders (in another order, with an extra class)."""
    cls = tmp_path / "classes.txt"
    cls.write_text("blue\ngreen\nred\n")
    out = tmp_path / "z.json"
    assert main(["zeroshot", *VL, D, str(files["IMGS"]), "--classes", str(cls), "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["classnames"] == ["blue", "green", "red"] if "classnames" in res else True
    assert "NaN" not in out.read_text()  # strict JSON: acc5 under 5 classes is null
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_an_image_with_exif_or_odd_modes_is_read(tmp_path):
    from conceptlens.data import decode_image
    for mode in ("L", "P", "RGBA", "CMYK", "I;16", "F"):
        im = Image.new(mode, (8, 8))
        p = tmp_path / f"x{mode.replace(';', '')}.tiff"
        im.save(p)
        assert decode_image(p).mode == "RGB"
