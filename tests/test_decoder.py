"""DeCap text decoder: a tiny one trained here memorises its captions, resumes bit-exactly, decodes through the CLI;
the shipped one loads and writes; bad input is one line, exit 2."""
import json

import numpy as np
import pytest
import torch

from conceptlens.errors import ConceptlensError

CAPTIONS = [
    "a dog runs on the grass.", "two men ride bikes down a hill.", "a cat sleeps on a red sofa.",
    "a child flies a kite in the sky.", "the woman is cooking dinner.", "a boat sails on a calm lake.",
    "three birds sit on a wire.", "a man surfs a large wave.", "a girl reads a book in the park.",
    "a black horse stands in a field.", "people walk along a busy street.", "a bus drives past a tall building.",
]
TINY = dict(held_out=(), batch_size=4, lr=1e-2, n_embd=64, n_layer=1, n_head=2, min_count=1, ckpt_every=5, threads=1)


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    path = tmp_path_factory.mktemp("bank") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bank):
    from conceptlens.train.decoder import train_decoder
    out = tmp_path_factory.mktemp("decoder")
    stopped = train_decoder(out / "a", banks=[str(bank)], epochs=60, stop_after=7, **TINY)
    resumed = train_decoder(out / "a", banks=[str(bank)], epochs=60, **TINY)
    straight = train_decoder(out / "b", banks=[str(bank)], epochs=60, **TINY)
    return out, stopped, resumed, straight


def test_decoder_resume_is_bit_exact(trained):
    from safetensors.torch import load_file
    out, stopped, resumed, straight = trained
    assert stopped["step"] == 7 and "exported" not in stopped
    assert resumed["step"] == straight["step"] == 180
    a, b = (load_file(str(out / p / "checkpoint.safetensors")) for p in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = (out / "a" / "log.csv").read_text().splitlines()
    assert len(log) == 181  # header + one row per step, none lost or repeated across the stop


def test_greedy_decode_of_a_training_caption_reproduces_it(trained, bank):
    from conceptlens.concepts import CaptionMemory
    from conceptlens.models import load_model
    from conceptlens.models.captioner import TextDecoder
    out, _, resumed, _ = trained
    dec = TextDecoder.load(resumed["exported"])
    assert dec.meta["text_model"] == "builtin:lite-clip" and dec.meta["train_config"]["data_provenance"]["n_captions"] == 12
    mem = CaptionMemory.build(load_model("builtin:lite-clip"), [str(bank)])
    assert dec.generate(mem.emb) == CAPTIONS
    assert dec.generate(mem.emb[:3], beams=3) == CAPTIONS[:3]
    assert dec.generate(mem.project(mem.emb[:4])) == CAPTIONS[:4]  # DeCap's projection keeps a caption's own embedding


def test_decode_generate_through_the_cli(trained, bank, tmp_path, capsys):
    from conceptlens.cli import main
    from conceptlens.concepts import CaptionMemory
    from conceptlens.models import load_model
    _, _, resumed, _ = trained
    mem = CaptionMemory.build(load_model("builtin:lite-clip"), [str(bank)])
    np.save(tmp_path / "v.npy", mem.emb[[0, 9]].numpy())
    out = tmp_path / "res.json"
    assert main(["decode", "--model", "builtin:lite-clip", "--vector", str(tmp_path / "v.npy"), "--captions", str(bank),
                 "--generate", "--decoder", resumed["exported"], "--beams", "1", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [o["generated"] for o in res["decoded"]] == [CAPTIONS[0], CAPTIONS[9]]
    assert res["decoder"]["beams"] == 1 and "generated: a dog runs on the grass." in capsys.readouterr().out


def test_decoder_bad_input_is_one_line_exit_2(trained, bank, tmp_path, capsys):
    from conceptlens.cli import main
    from conceptlens.models.captioner import TextDecoder, load_decoder
    _, _, resumed, _ = trained
    np.save(tmp_path / "v.npy", np.zeros(7, np.float32))
    base = ["decode", "--model", "builtin:lite-clip", "--captions", str(bank), "--generate"]
    cases = [(["--vector", str(tmp_path / "v.npy"), "--decoder", str(tmp_path / "none.safetensors")], "not found"),
             (["--vector", str(tmp_path / "v.npy"), "--decoder", resumed["exported"]], "takes [1280]"),
             (["--vector", str(tmp_path / "v.npy"), "--decoder", str(bank)], "cannot read")]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ConceptlensError, match="trained for builtin:lite-clip's text space"):
        load_decoder("open_clip:RN50", resumed["exported"])
    with pytest.raises(ConceptlensError, match="no text decoder ships for open_clip:RN50"):
        load_decoder("open_clip:RN50")
    dec = TextDecoder.load(resumed["exported"])
    with pytest.raises(ConceptlensError, match="NaN"):
        dec.generate(np.full((1, 1280), np.nan, np.float32))
    with pytest.raises(ConceptlensError, match="beams must be positive"):
        dec.generate(np.ones((1, 1280), np.float32), beams=0)
    from conceptlens.train.decoder import train_decoder
    with pytest.raises(ConceptlensError, match="fewer than one batch"):
        train_decoder(tmp_path / "c", banks=[str(bank)], **(TINY | {"batch_size": 64}))
    with pytest.raises(ConceptlensError, match="another run"):
        train_decoder(resumed["checkpoint"].rsplit("/", 1)[0], banks=[str(bank)], epochs=61, **TINY)


def test_shipped_decoder_writes_about_a_caption():
    from conceptlens.models import load_model
    from conceptlens.models.captioner import load_decoder
    from conceptlens.features import embed_texts
    dec = load_decoder("builtin:lite-clip")
    assert dec.meta["train_config"]["data_provenance"]["held_out"]["flickr8k_splits"] == ["dev", "test"]
    emb = embed_texts(load_model("builtin:lite-clip"), ["a dog running on the beach", "a man riding a bicycle"])
    dog, bike = dec.generate(emb, beams=3)
    assert "dog" in dog and ("bike" in bike or "bicycle" in bike), (dog, bike)


@pytest.mark.skipif(__import__("shutil").which("java") is None, reason="the COCO caption metrics run on Java")
def test_caption_metrics_score_exact_and_wrong_captions_apart():
    from conceptlens.eval import caption_metrics
    refs = [["a dog runs on the grass", "a brown dog running on a lawn"], ["two men ride bikes down a hill"],
            ["a cat sleeps on a red sofa", "a cat lying on a couch"]]
    exact = caption_metrics([r[0] for r in refs], refs, meteor=False)
    wrong = caption_metrics(["a plate of food", "a red bus", "snow on a mountain"], refs, meteor=False)
    assert exact["bleu4"] > 0.99 and exact["cider"] > 1.0 and wrong["bleu4"] < 0.01 and wrong["cider"] < 0.1
    with pytest.raises(ConceptlensError, match="one per item"):
        caption_metrics(["a dog"], refs)


def test_train_decoder_cli_leaves_a_report(bank, tmp_path, capsys):
    from conceptlens.cli import main
    out = tmp_path / "run"
    assert main(["train", "decoder", "--captions", str(bank), "--hold-out", "", "--out", str(out), "--epochs", "2",
                 "--batch-size", "4", "--width", "32", "--layers", "1", "--heads", "2", "--min-count", "1"]) == 0
    assert (out / "decoder.safetensors").exists() and (out / "report" / "index.html").exists()
    assert main(["train", "decoder", "--captions", str(bank), "--out", str(tmp_path / "x"), "--width", "30",
                 "--heads", "4"]) == 2
    assert "multiple of n_head" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_decoder_names_imagenette_class_means():
    """Floor for benchmarks/decode.py (8/10 at beam 5): class means of every 4th Imagenette val image."""
    import sys
    from pathlib import Path

    from conftest import shared
    shared("data/imagenette/val")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from decode import D, class_terms, names_class

    from conceptlens.concepts import CaptionMemory
    from conceptlens.data import dataset_rows, load_dataset
    from conceptlens.features import embed
    from conceptlens.models import load_model
    from conceptlens.models.captioner import load_decoder
    model = load_model("builtin:lite-clip")
    ds = load_dataset(str(D / "imagenette" / "val"))
    f = embed(model, dataset_rows(ds, list(range(0, len(ds), 4))), show_progress=False)
    X = np.asarray(f.X, np.float32)
    means = torch.from_numpy(np.stack([X[f.labels == c].mean(0) for c in range(10)]))
    wnids = dict(line.split("\t")[::-1] for line in (D / "imagenette" / "classes.tsv").read_text().split("\n") if line)
    gen = load_decoder(model.text_model).generate(CaptionMemory.build(model).project(means), beams=5)
    named = [names_class(g, class_terms(wnids[n], n)) for n, g in zip(f.classnames, gen)]
    assert sum(x is not None for x in named) >= 6, list(zip(f.classnames, gen))
