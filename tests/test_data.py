"""Data readers: every --data form, odd image modes, unreadable files, and one-line errors (exit 2)."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from conceptlens.cli import main
from conceptlens.data import load_dataset, iter_shard, to_rgb
from conceptlens.features import embed
from conceptlens.models import load_model


def _images(ds):
    return [im for sh in ds.shards for _, im, _ in iter_shard(sh)]


def test_folder_with_classes(image_folder):
    ds = load_dataset(image_folder)
    assert ds.classnames == ["blue", "red"] and len(ds) == 12 and set(ds.labels) == {0, 1}


def test_classes_tsv_maps_folder_ids(image_folder):
    (image_folder / "classes.tsv").write_text("red\tcrimson thing\nblue\tazure thing\n")
    assert load_dataset(image_folder).classnames == ["azure thing", "crimson thing"]


def test_flat_folder_unlabelled(tmp_path):
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(tmp_path / f"{i}.jpg")
    ds = load_dataset(tmp_path)
    assert ds.classnames is None and (ds.labels == -1).all() and len(ds) == 3


def test_webdataset_shards_brace_pattern(tmp_path):
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:02d}.tar.gz", "w:gz") as tf:
            for i in range(3):
                for name, data in ((f"k{s}{i}.cls", str(i % 2).encode()),
                                   (f"k{s}{i}.png", _png(Image.new("RGB", (32, 32), (i * 40, 10, 10))))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (tmp_path / "classes.txt").write_text("zero\none\n")
    ds = load_dataset(str(tmp_path / "shard-{00..01}.tar.gz"))
    assert len(ds) == 6 and ds.classnames == ["zero", "one"] and ds.labels.tolist() == [0, 1, 0, 0, 1, 0]
    assert all(im.size == (32, 32) for im in _images(ds))


def test_csv_and_jsonl(image_folder, tmp_path):
    files = sorted(image_folder.rglob("*.png"))
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(f"{f},{f.parent.name}" for f in files))
    ds = load_dataset(tmp_path / "list.csv")
    assert ds.classnames == ["blue", "red"] and len(ds) == 12
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps({"path": str(f)}) for f in files))
    assert len(load_dataset(tmp_path / "list.jsonl")) == 12


def test_named_sets():
    d = load_dataset("digits", limit=50)
    assert len(d) == 50 and d.classnames[3] == "3"
    s = load_dataset("samples")
    assert "astronaut" in s.classnames and all(im.mode == "RGB" for im in _images(s))


def test_fashion_mnist():
    from conceptlens.data.named import FASHION_DIR
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make setup installs it as root)")
    d = load_dataset("fashion-mnist:test", limit=20)
    assert len(d) == 20 and _images(d)[0].size == (28, 28)


def test_limit_is_even_and_deterministic(image_folder):
    a, b = load_dataset(image_folder, limit=4), load_dataset(image_folder, limit=4)
    assert a.keys == b.keys and set(a.labels) == {0, 1} and a.identity != load_dataset(image_folder).identity


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "I;16", "P", "LA"])
def test_image_modes(mode):
    arr = np.linspace(0, 65535 if mode == "I;16" else 255, 16 * 16).reshape(16, 16)
    if mode == "I;16":
        im = Image.fromarray(arr.astype(np.uint16))
    else:
        im = Image.fromarray(arr.astype(np.uint8), "L").convert(mode)
    out = to_rgb(im)
    assert out.mode == "RGB" and out.size == (16, 16)
    a = np.asarray(out)
    assert a.max() > 200 and a.min() < 60  # not clipped to white or black


def test_16bit_png_roundtrip(tmp_path):
    arr = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    im = _images(load_dataset(tmp_path))[0]
    assert im.mode == "RGB" and 100 < np.asarray(im).mean() < 160


def _png(im):
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def broken_folder(image_folder):
    good = (image_folder / "red" / "0.png").read_bytes()
    (image_folder / "red" / "zero.png").write_bytes(b"")
    (image_folder / "red" / "trunc.png").write_bytes(good[: len(good) // 2])
    (image_folder / "blue" / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    return image_folder


def test_unreadable_files_are_skipped_and_counted(broken_folder, tmp_path):
    model = load_model("torchvision:mobilenet_v3_small/random")
    with pytest.warns(UserWarning, match="skipped"):
        f = embed(model, load_dataset(broken_folder), batch_size=4)
    assert len(f.skipped) == 3 and f.X.shape[0] == 12
    assert any("zero.png" in s for s in f.skipped) and any("trunc.png" in s for s in f.skipped)
    out = tmp_path / "r.json"
    assert main(["zeroshot", "--model", "open_clip:RN50/random", "--data", str(broken_folder), "--templates", "simple",
                 "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_skipped"] == 3 and res["n_images"] == 12


def test_strict_makes_unreadable_an_error(broken_folder, capsys):
    assert main(["embed", "--model", "torchvision:mobilenet_v3_small/random", "--data", str(broken_folder),
                 "--strict", "--no-cache"]) == 2
    assert "unreadable image" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--data", "/nonexistent/path"], "data not found"),
    (["--data", "EMPTY"], "no images found"),
    (["--data", "IMGS", "--classes", "EMPTYCLS"], "empty"),
    (["--data", "IMGS", "--classes", "DUPCLS"], "duplicate class names"),
    (["--data", "IMGS", "--model", "builtin:lite-clp"], "did you mean builtin:lite-clip"),
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path, image_folder, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "dup.txt").write_text("red\nRed\n")
    sub = {"EMPTY": str(tmp_path / "empty"), "IMGS": str(image_folder), "EMPTYCLS": str(tmp_path / "empty.txt"),
           "DUPCLS": str(tmp_path / "dup.txt")}
    args = [sub.get(a, a) for a in args]
    if "--model" not in args:
        args += ["--model", "torchvision:mobilenet_v3_small/random"]
    assert main(["embed"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unwritable_cache(image_folder, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a cache path under a regular file is unwritable even for root
    monkeypatch.setenv("CONCEPTLENS_CACHE", str(blocker / "cache"))
    assert main(["embed", "--model", "torchvision:mobilenet_v3_small/random", "--data", str(image_folder)]) == 2
    assert "not writable" in capsys.readouterr().err
