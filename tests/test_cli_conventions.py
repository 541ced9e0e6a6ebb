"""One output convention, provenance, `table`, naming conventions, options, and validation before any model loads."""
import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from conceptlens.cli import main
from conceptlens.cli.main import build_parser
from conceptlens.errors import ConceptlensError
from conceptlens.models import load_model, split_model_uri

TINY = "torchvision:mobilenet_v3_small/random"
CLI = [sys.executable, "-m", "conceptlens.cli.main"]


def _probe(image_folder, *out):
    return CLI + ["linear-probe", "--model", TINY, "--train", str(image_folder), "--test", str(image_folder),
                  "--precision", "fp32", *out]


def test_output_dash_is_json_on_stdout_and_messages_on_stderr(image_folder):
    r = subprocess.run(_probe(image_folder, "--output", "-"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # stdout is the JSON alone
    assert res["task"] == "linear_probe" and "lp_acc1" in res["stderr" if False else "metrics"]
    assert "lp_acc1" in r.stderr  # the table went to stderr
    prov = res["provenance"]
    assert {"command", "conceptlens", "git", "date", "python", "torch", "datasets", "args", "verb"} <= set(prov)
    assert prov["verb"] == "linear-probe" and prov["args"]["model"] == TINY and prov["args"]["device"] == "cpu"
    assert [d["n_images"] for d in prov["datasets"]] == [12, 12] and all(len(d["identity"]) == 32 for d in prov["datasets"])
    assert not os.path.exists("-")


def test_the_console_exit_keeps_codes_and_output_once_torch_is_loaded(image_folder, tmp_path):
    """`run` leaves by os._exit once torch is imported: the exit code and every line must survive it."""
    from conftest import two_class_folder
    other = two_class_folder(tmp_path / "other", ("green", "grey"), (40, 48))
    r = subprocess.run(CLI + ["linear-probe", "--model", TINY, "--train", str(image_folder), "--test", str(other),
                              "--precision", "fp32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().endswith("a probe scores only the classes it was fit on"), r.stderr
    r = subprocess.run(_probe(image_folder), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.splitlines()[-1].split()[:2] == ["imgs", TINY], r.stdout[-500:]


def test_output_dev_stdout_keeps_the_symlink(image_folder, tmp_path):
    assert os.path.islink("/dev/stdout")
    out = tmp_path / "res.json"
    cmd = " ".join(_probe(image_folder, "--output", "/dev/stdout")) + f" > {out}"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert os.path.islink("/dev/stdout")  # written through, never renamed over
    assert json.loads(out.read_text())["task"] == "linear_probe"


def test_results_are_mode_0644_and_reports_are_not_overwritten_silently(image_folder, tmp_path, capsys):
    out, rep = tmp_path / "p.json", tmp_path / "rep"
    argv = ["linear-probe", "--model", TINY, "--train", str(image_folder), "--test", str(image_folder),
            "--output", str(out), "--report", str(rep)]
    assert main(argv) == 0
    assert oct(out.stat().st_mode & 0o777) == "0o644" and (rep / "index.html").exists()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_packaged_assets_are_replaced_only_with_overwrite(tmp_path, capsys):
    from conceptlens.models.lite_clip import asset_path
    asset = asset_path()
    assert main(["build", "lite-clip", "--out", str(asset)]) == 2
    assert "packaged model file" in capsys.readouterr().err
    p = build_parser()
    assert p.parse_args(["build", "lite-clip"]).out == "runs/lite-clip.safetensors"


def test_table_over_three_result_files(tmp_path, capsys):
    files = []
    for i, (ds, model, task, metrics) in enumerate([
            ("cifar10", "ViT-B-32", "zeroshot_classification", {"acc1": 0.9, "acc5": 0.99}),
            ("cifar10", "RN50", "zeroshot_classification", {"acc1": 0.7, "acc5": 0.95}),
            ("pacs", "builtin:mobilenetv2", "linear_probe", {"lp_acc1": 0.8})]):
        f = tmp_path / f"r{i}.json"
        f.write_text(json.dumps({"dataset": ds, "model": model, "pretrained": "openai", "task": task,
                                 "metrics": metrics}))
        files.append(str(f))
    assert main(["table", *files, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "dataset,model,pretrained,task,acc1,acc5,lp_acc1,file"
    assert lines[1].startswith("cifar10,ViT-B-32,openai,zeroshot_classification,0.9000,0.9900,,")
    assert lines[3].startswith("pacs,builtin:mobilenetv2,openai,linear_probe,,,0.8000,")
    assert main(["table", *files, "--output", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text().startswith("| dataset | model |")
    (tmp_path / "bad.json").write_text("{}")
    assert main(["table", str(tmp_path / "bad.json")]) == 2


@pytest.mark.parametrize("uri,model,pretrained", [
    ("open_clip:ViT-B-32/openai", "ViT-B-32", "openai"),
    ("hf:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf"),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "hf-hub"),
    ("clip:runs/clip/model.safetensors", "clip:runs/clip/model.safetensors", "clip"),
    ("timm:resnet18.a1_in1k", "timm:resnet18", "a1_in1k"),
    ("builtin:efficientnet-lite0/random", "builtin:efficientnet-lite0", "random"),
    ("builtin:lite-clip", "builtin:lite-clip", "builtin"),
    ("builtin:mobilenetv2@mbv2", "builtin:mobilenetv2@mbv2", "aligned"),
])
def test_model_and_pretrained_as_clip_benchmark_records_them(uri, model, pretrained):
    assert split_model_uri(uri) == (model, pretrained)


def test_standard_model_names_are_understood():
    # timm's NAME.TAG is a name, not an unknown model: here only its weights are missing (nothing downloads)
    with pytest.raises(ConceptlensError) as e:
        load_model("timm:resnet18.a1_in1k")
    assert "unknown" not in str(e.value) and "resnet18" in str(e.value)
    # open_clip:ARCH takes ARCH's first pretrained tag; hf-hub: is open_clip's hub name
    with pytest.raises(ConceptlensError, match="openai"):
        load_model("open_clip:RN50")
    with pytest.raises(ConceptlensError) as e:
        load_model("hf-hub:nobody/not-a-cached-model")
    assert "scheme" not in str(e.value)
    assert load_model("open_clip:RN50/random").name == "open_clip:RN50/random"


def test_every_option_has_help_and_version_quiet_work(capsys):
    def walk(p: argparse.ArgumentParser, path: str):
        for act in p._actions:
            if isinstance(act, argparse._SubParsersAction):
                for name, sp in act.choices.items():
                    yield from walk(sp, f"{path} {name}")
            elif act.option_strings and act.dest not in ("help", "version"):
                yield path, act
    missing = [f"{path} {act.option_strings[0]}" for path, act in walk(build_parser(), "conceptlens") if not act.help]
    assert not missing, missing
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("conceptlens 0.")
    names = {a.option_strings[0] for _, a in walk(build_parser(), "conceptlens")}
    assert "--k" not in names and {"--top-k", "--captions-per-vector", "--threshold-std", "--seed", "--num-workers",
                                   "--dataset-name", "--overwrite"} <= names


@pytest.mark.parametrize("argv", [
    ["zeroshot", "--data", "/no/such/folder"],
    ["search", "horse & (grass", "--data", "IMGS"],
    ["search", "horse &", "--data", "IMGS"],
    ["decode", "--vector", "/no/such.npy"],
    ["cbm", "--train", "IMGS", "--test", "IMGS", "--concepts", "/no/such/concepts.txt"],
    ["zeroshot", "--data", "IMGS", "--templates", "/no/such/templates.txt"],
    ["explain", "--data", "IMGS", "--features", "a,b"],
    ["linear-probe", "--train", "IMGS", "--test", "/no/such/test"],
])
def test_inputs_are_validated_before_any_model_loads(argv, image_folder, monkeypatch, capsys):
    import conceptlens.concepts  # noqa: F401 - imported first, so none binds the stand-in below for good
    import conceptlens.diffusion  # noqa: F401
    import conceptlens.explain  # noqa: F401
    import conceptlens.models as models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")
    monkeypatch.setattr(models, "load_model", no_load)
    argv = [str(image_folder) if x == "IMGS" else x for x in argv] + ["--model", "builtin:lite-clip"]
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("conceptlens: error:") and "None" not in err[0]


def test_search_says_why_it_returns_fewer_results(image_folder, capsys):
    rc = main(["search", "red", "--model", "builtin:lite-clip", "--data", str(image_folder), "--top-k", "50",
               "--output", "-"])
    assert rc == 0
    out = capsys.readouterr()
    assert "not 50: the set has 12 images" in out.err


def test_text_embeddings_are_cached_by_text_tower(tmp_path, image_folder):
    from conceptlens.concepts import fit
    from conceptlens.data import load_dataset
    from conceptlens.features import embed_texts
    from conceptlens.io import cache_dir
    al, meta = fit(load_model("builtin:mobilenetv2"), "builtin:lite-clip", load_dataset(image_folder), holdout=0.25)
    al.save(tmp_path / "al.safetensors", meta)
    aligned = load_model("builtin:mobilenetv2", aligner=str(tmp_path / "al.safetensors"))
    vl = load_model("builtin:lite-clip")
    assert aligned.text_model == vl.text_model and aligned.text_fingerprint == vl.text_fingerprint
    texts = [f"a photo of thing number {i}" for i in range(3)]
    before = set(cache_dir("text").glob("*.npy"))
    a = embed_texts(vl, texts)
    new = set(cache_dir("text").glob("*.npy")) - before
    b = embed_texts(aligned, texts)  # the same entry: no second embedding
    assert len(new) == 1 and set(cache_dir("text").glob("*.npy")) - before == new
    assert (a == b).all()


def test_demo_without_shared_data_runs_on_the_bundled_photos(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONCEPTLENS_SHARED", str(tmp_path / "none"))
    rep = tmp_path / "demo"
    assert main(["demo", "--report", str(rep)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("demo: 1 sets, about") and "bundled sample photos only" in out
    res = json.loads((rep / "results.json").read_text())
    assert set(res) == {"samples", "provenance"} and res["samples"]["n_images"] == 16
    assert main(["demo", "--report", str(rep)]) == 2  # an existing report needs --overwrite
