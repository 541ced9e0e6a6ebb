"""The text-to-concept verbs end to end on a tiny folder with the embedded model: reports, JSON, exit codes."""
import json

import numpy as np

from conceptlens.cli import main


def test_search_diagnose_cbm_decode_verbs(tmp_path, image_folder, capsys):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red\nblue\nsky\nfire\ngrass\n")
    rep = tmp_path / "rep"
    assert main(["search", "--model", "builtin:lite-clip", "--data", str(image_folder), "red | blue:0",
                 "--top-k", "5", "--report", str(rep / "s")]) == 0
    res = json.loads((rep / "s" / "search.json").read_text())
    assert (rep / "s" / "index.html").exists() and len(res["keys"]) == 5
    assert res["scores"] == sorted(res["scores"], reverse=True) and len(set(res["keys"])) == 5
    assert main(["diagnose", "--model", "builtin:lite-clip", "--data-a", str(image_folder / "red"),
                 "--data-b", str(image_folder / "blue"), "--concepts", str(concepts), "--report", str(rep / "d")]) == 0
    d = json.loads((rep / "d" / "diagnose.json").read_text())
    assert {r["concept"] for r in d["concepts"]} == {"red", "blue", "sky", "fire", "grass"}
    assert main(["diagnose", "--model", "builtin:lite-clip", "--data-a", str(image_folder / "red"), "--scores", "splice",
                 "--data-b", str(image_folder / "blue"), "--concepts", str(concepts), "--output", str(rep / "ds.json")]) == 0
    ds = json.loads((rep / "ds.json").read_text())
    assert ds["scores"] == "splice" and ds["concepts"][0]["concept"] == "red" and ds["concepts"][0]["diff"] < 0
    assert all(r["mean_a"] >= 0 and r["mean_b"] >= 0 for r in ds["concepts"])  # non-negative weights
    assert main(["cbm", "--model", "builtin:lite-clip", "--train", str(image_folder), "--test", str(image_folder),
                 "--concepts", str(concepts), "--max-concepts", "5", "--report", str(rep / "c")]) == 0
    c = json.loads((rep / "c" / "cbm.json").read_text())
    assert max(c["nonzero_per_class"].values()) <= 5 and c["cbm_acc1"] >= 0.9  # red vs blue, concepts red, blue
    bank = tmp_path / "bank.txt"
    bank.write_text("a red apple on a table\na blue car on the road\na bright red fire truck\nthe blue sea\n")
    out = tmp_path / "dec.json"
    assert main(["decode", "--model", "builtin:lite-clip", "--data", str(image_folder), "--captions", str(bank),
                 "--captions-per-vector", "2", "--output", str(out)]) == 0
    dec = json.loads(out.read_text())["decoded"]
    assert [x["name"] for x in dec] == ["blue", "red"] and len(dec[0]["captions"]) == 2
    capsys.readouterr()


def test_bad_inputs_exit_2(tmp_path, image_folder, capsys):
    bad = tmp_path / "v.npy"
    np.save(bad, np.full(7, np.nan, np.float32))
    assert main(["decode", "--model", "builtin:lite-clip", "--vector", str(bad), "--captions", str(bad)]) == 2
    assert main(["search", "--model", "builtin:mobilenetv2/random", "--data", str(image_folder), "x"]) == 2
    assert main(["align", "--source", "builtin:mobilenetv2/random", "--target", "builtin:lite-clip",
                 "--data", str(image_folder), "--out", str(tmp_path / "a.st"), "--holdout", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("conceptlens: error:") == 3 and "Traceback" not in err
