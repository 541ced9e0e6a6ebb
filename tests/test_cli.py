"""The CLI parses and reports: every command's help, one-line errors with exit code 2, no tracebacks."""
import json

import numpy as np
import pytest

from conceptlens.cli import build_parser, main
from conftest import trained_clip_file

COMMANDS = ["models", "embed", "export", "zeroshot", "linear-probe", "align", "cbm", "diagnose", "search", "decode", "decompose",
            "explain", "diffusion-classify", "demo", "build", "train", "table"]
# verbs that run a model: --device on all; --engine where there is per-shard work
DEVICE_VERBS = [[c] for c in COMMANDS if c not in ("models", "train", "table")] + [["train", "clip"], ["train", "diffusion"],
                                                                                    ["train", "decoder"]]
ENGINE_VERBS = ["embed", "export", "zeroshot", "linear-probe", "align", "cbm", "diagnose", "search", "decode", "decompose",
                "explain", "diffusion-classify"]


def test_every_command_is_registered_and_has_help(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert f"usage: conceptlens {cmd}" in capsys.readouterr().out


def test_every_model_verb_takes_a_device_and_the_shard_verbs_an_engine(capsys):
    for argv in DEVICE_VERBS:
        with pytest.raises(SystemExit):
            main(argv + ["--help"])
        out = capsys.readouterr().out
        assert "--device" in out, argv
        assert ("--engine" in out and "--ray-address" in out) == (argv[0] in ENGINE_VERBS), argv


@pytest.mark.parametrize("argv,message", [
    (["search", "--model", "builtin:lite-clip", "--data", "samples", "x", "--top-k", "0"], "must be positive"),
    (["embed", "--model", "builtin:lite-clip", "--data", "samples", "--limit", "many"], "is not an integer"),
    (["zeroshot", "--model", "builtin:lite-clip"], "--data"),
])
def test_bad_arguments_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_library_errors_are_one_line_and_exit_2(capsys):
    assert main(["zeroshot", "--model", "builtin:lite-clp", "--data", "samples"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("conceptlens: error: unknown model") and "did you mean builtin:lite-clip" in err[0]
    assert main(["zeroshot", "--model", "builtin:mobilenetv2/random", "--data", "samples"]) == 2
    assert "has no text tower" in capsys.readouterr().err


def test_decode_a_direction_of_a_trained_clip_model(tmp_path, capsys):
    """A probe direction of a `train clip` model decodes through its linear head (was a traceback: no aligner.b_)."""
    model = trained_clip_file(tmp_path)
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(2, 1280)).astype(np.float32))
    bank = tmp_path / "bank.txt"
    bank.write_text("a dog on the grass\na red car\na bowl of soup\n")
    out = tmp_path / "dec.json"
    assert main(["decode", "--model", f"clip:{model}", "--vector", str(tmp_path / "v.npy"), "--direction",
                 "--captions", str(bank), "--captions-per-vector", "2", "--output", str(out)]) == 0
    dec = json.loads(out.read_text())["decoded"]
    assert [d["name"] for d in dec] == ["vector 0", "vector 1"] and all(len(d["captions"]) == 2 for d in dec)
