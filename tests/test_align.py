"""Alignment: recovery of a known map by every method, ridge = least squares, streaming = in-memory, files; the
algebra on raw rows (normalize=False), and what unit rows change."""
import numpy as np
import pytest
import torch

from conceptlens.concepts import align
from conceptlens.concepts.align import Aligner
from conceptlens.cli import main
from conceptlens.errors import ConceptlensError


def synthetic(n=4000, ds=24, dt=16, noise=0.01, orthogonal=False, seed=0, centered=False):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, ds)) if centered else rng.normal(size=(n, ds)) * rng.uniform(0.5, 2, ds) + rng.normal(size=ds)
    if orthogonal:
        q, _ = np.linalg.qr(rng.normal(size=(ds, ds)))
        W = 1.7 * q[:dt]
    else:
        W = rng.normal(size=(dt, ds)) / np.sqrt(ds)
    b = rng.normal(size=dt)
    Y = X @ W.T + b + noise * rng.normal(size=(n, dt))
    return X.astype(np.float32), Y.astype(np.float32), W, b


@pytest.mark.parametrize("method,orth", [("ridge", False), ("procrustes", True), ("sgd", False)])
def test_every_method_recovers_a_known_map(method, orth):
    ds = 16 if orth else 24
    # The published SGD recipe (5 epochs) converges on centred, isotropic features; on offset, anisotropic
    # ones it stops short (max |ΔW| 0.12 at 50k rows): the closed forms have no such limit.
    sgd = method == "sgd"
    X, Y, W, b = synthetic(n=20000 if sgd else 4000, ds=ds, orthogonal=orth, noise=0.01, centered=sgd)
    al = Aligner(method, normalize=False).fit(X, Y)
    assert np.abs(al.W_ - W).max() < 0.01, np.abs(al.W_ - W).max()
    assert np.abs(al.b_ - b).max() < 0.02
    assert al.metrics_["r2"] > 0.999 and al.metrics_["cosine"] > 0.999


def test_ridge_equals_numpy_least_squares_and_streaming_equals_in_memory(monkeypatch, tmp_path):
    X, Y, _, _ = synthetic(n=3000, noise=0.3)
    al = Aligner("ridge", alphas=[0.0], normalize=False).fit(X, Y)
    tr = al.train_rows_
    A = np.c_[X[tr].astype(np.float64), np.ones(len(tr))]
    sol = np.linalg.lstsq(A, Y[tr].astype(np.float64), rcond=None)[0]
    assert np.abs(al.W_ - sol[:-1].T).max() < 1e-4 and np.abs(al.b_ - sol[-1]).max() < 1e-4
    monkeypatch.setattr(align, "CHUNK", 97)  # many small chunks: the same statistics
    al2 = Aligner("ridge", alphas=[0.0], normalize=False).fit(X, Y)
    assert np.abs(al.W_ - al2.W_).max() < 1e-5
    assert abs(al.metrics_["r2"] - al2.metrics_["r2"]) < 1e-6  # chunk products are float32 BLAS
    np.save(tmp_path / "x.npy", X), np.save(tmp_path / "y.npy", Y)  # rows gathered from memmaps: the same fit
    Xm, Ym = (np.load(tmp_path / f, mmap_mode="r") for f in ("x.npy", "y.npy"))
    al3 = Aligner("ridge", alphas=[0.0], normalize=False).fit(Xm, Ym)
    assert np.array_equal(al2.W_, al3.W_) and np.array_equal(al2.b_, al3.b_)
    for dt in (np.float64, np.float16):  # other dtypes are gathered as float32: the fit of the float32 copy
        a, b = (Aligner("ridge", alphas=[0.0], normalize=False).fit(Z.astype(dt), Y)
                for Z in (X, X.astype(dt).astype(np.float32)))
        assert np.array_equal(a.W_, b.W_)
    # held-out R² from statistics equals R² computed from predictions
    ho = al.heldout_rows_
    pred = al.transform(X[ho])
    r2 = 1 - ((Y[ho] - pred) ** 2).sum() / ((Y[ho] - Y[ho].mean(0)) ** 2).sum()
    assert abs(r2 - al.metrics_["r2"]) < 1e-5 and abs(al.score(X[ho], Y[ho]) - r2) < 1e-5


def test_ridge_equals_scikit_learn_ridge_at_the_chosen_penalty():
    """Parity: the eigendecomposition search + Cholesky solve give scikit-learn's Ridge at the chosen alpha."""
    from sklearn.linear_model import Ridge
    X, Y, _, _ = synthetic(n=3000, noise=0.5)
    al = Aligner("ridge", alphas=[1e-2, 1.0, 30.0], normalize=False).fit(X, Y)
    ref = Ridge(alpha=al.alpha_).fit(X[al.train_rows_].astype(np.float64), Y[al.train_rows_].astype(np.float64))
    assert np.abs(al.W_ - ref.coef_).max() < 1e-4 and np.abs(al.b_ - ref.intercept_).max() < 1e-4
    Xr = np.concatenate([X, X[:, :3]], axis=1)  # rank-deficient and no penalty: still the least-squares map
    assert np.isfinite(Aligner("ridge", alphas=[0.0], normalize=False).fit(Xr, Y).W_).all()


def test_ridge_penalty_is_chosen_on_held_out_rows():
    X, Y, _, _ = synthetic(n=120, ds=60, noise=2.0)  # few rows, many dims: some shrinkage must win
    al = Aligner("ridge").fit(X, Y)
    assert al.alpha_ > 0



def test_penalty_search_ranks_like_dense_solves_on_the_validation_split():
    """The eigenbasis search scores each penalty as scikit-learn's Ridge fitted on the inner rows and scored on
    the validation rows would (R² per candidate within float32 noise; the same choice)."""
    from sklearn.linear_model import Ridge
    X, Y, _, _ = synthetic(n=400, ds=80, noise=3.0)
    alphas = [1e-3, 1e-1, 1.0, 10.0, 100.0]
    al = Aligner("ridge", alphas=alphas, normalize=False).fit(X, Y)
    tr = al.train_rows_
    inner, val = al.split(len(tr))
    Xi, Yi, Xv, Yv = (np.asarray(a, np.float64) for a in (X[tr[inner]], Y[tr[inner]], X[tr[val]], Y[tr[val]]))
    scale = np.trace(np.cov(Xi.T, bias=True) * len(Xi)) / X.shape[1]
    r2s = [1 - ((Yv - Ridge(alpha=a * scale).fit(Xi, Yi).predict(Xv)) ** 2).sum() / ((Yv - Yv.mean(0)) ** 2).sum()
           for a in alphas]
    assert len(set(np.round(r2s, 3))) > 1  # the candidates differ, so the choice means something
    assert al.alpha_ == pytest.approx(alphas[int(np.argmax(r2s))] * scale)
    assert np.allclose([al.search_r2_[a] for a in alphas], r2s, atol=1e-4), (al.search_r2_, r2s)


@pytest.mark.parametrize("method", ["ridge", "procrustes", "sgd"])
def test_normalize_fits_unit_rows_and_maps_a_row_as_its_rescaling(method, tmp_path):
    """normalize=True (the default) is the raw fit of unit rows; a source row and any positive multiple of it map
    to the same point, through transform and the saved file; files keep the flag (the tensor path: next test)."""
    from conceptlens.models.mapped import LinearMap
    X, Y, _, _ = synthetic(n=1000, ds=16, dt=16, noise=0.3, orthogonal=method == "procrustes")
    unit = [A / np.linalg.norm(A, axis=1, keepdims=True) for A in (X, Y)]
    al, raw = Aligner(method, alphas=[1e-2, 1.0]).fit(X, Y), Aligner(method, alphas=[1e-2, 1.0], normalize=False).fit(*unit)
    assert np.allclose(al.W_, raw.W_, atol=1e-5) and np.allclose(al.b_, raw.b_, atol=1e-5)
    assert al.metrics_["r2"] == pytest.approx(raw.metrics_["r2"], abs=1e-5)
    scaled = X[:5] * np.array([[0.1], [1.0], [3.0], [7.0], [50.0]], np.float32)
    assert np.allclose(al.transform(scaled), al.transform(X[:5]), atol=1e-5)
    assert not np.allclose(raw.transform(scaled), raw.transform(X[:5]), atol=1e-3)
    path = al.save(tmp_path / "n.safetensors", {"source": "s", "target": "t", "layer": None})
    lm = LinearMap.load(path)
    assert lm.normalize and Aligner.load(path).normalize and np.allclose(lm.transform(scaled), al.transform(X[:5]), atol=1e-5)
    old = LinearMap(lm.W, lm.b, {k: v for k, v in lm.meta.items() if k != "normalize"})  # a file from before the flag
    assert not old.normalize and np.allclose(old.transform(X[:5]), X[:5] @ lm.W.T + lm.b, atol=1e-5)


def test_bad_input_is_a_clear_error():
    X, Y, _, _ = synthetic(n=100)
    with pytest.raises(ConceptlensError, match="do not pair up"):
        Aligner().fit(X, Y[:50])
    Xn = X.copy()
    Xn[3, 2] = np.nan
    with pytest.raises(ConceptlensError, match="NaN or inf"):
        Aligner().fit(Xn, Y)
    al = Aligner().fit(X, Y)
    with pytest.raises(ConceptlensError, match="expects 24-d"):
        al.transform(np.zeros((2, 7)))
    with pytest.raises(ConceptlensError, match="unknown alignment method"):
        Aligner("magic").fit(X, Y)


def test_aligner_file_round_trip_and_model_mismatch(tmp_path):
    from conceptlens.models import load_model
    X, Y, _, _ = synthetic(n=200, ds=24, dt=16)
    al = Aligner().fit(X, Y)
    path = al.save(tmp_path / "a.safetensors", {"source": "builtin:mobilenetv2", "target": "builtin:lite-clip",
                                                 "layer": None})
    back = Aligner.load(path)
    assert np.array_equal(back.W_, al.W_) and back.meta_["metrics"]["r2"] == pytest.approx(al.metrics_["r2"])
    with pytest.raises(ConceptlensError, match="maps builtin:mobilenetv2"):
        load_model("builtin:efficientnet-lite0/random", aligner=str(path))
    assert main(["zeroshot", "--model", "builtin:efficientnet-lite0", "--aligner", str(path), "--data", "samples"]) == 2


def test_aligned_model_through_the_cli(tmp_path, image_folder):
    out = tmp_path / "a.safetensors"
    rc = main(["align", "--source", "builtin:mobilenetv2/random", "--target", "builtin:efficientnet-lite0/random",
               "--data", str(image_folder), "--out", str(out), "--method", "ridge"])
    assert rc == 0 and out.exists()
    from conceptlens.models import load_model
    m = load_model("builtin:mobilenetv2/random", aligner=str(out))
    x = torch.rand(2, 3, 224, 224)
    assert m.encode_image(x).shape == (2, 1280)
    assert m.map.normalize  # the default; the tensor path (encode_image) and the array path (cache) agree
    f = np.random.default_rng(0).normal(size=(3, m.base.embed_dim)).astype(np.float32)
    assert np.allclose(m.map_tensor(torch.from_numpy(4 * f)).numpy(), m.map_features(f), atol=1e-4)


def test_align_also_fits_on_further_label_free_sets(tmp_path, image_folder, capsys):
    from PIL import Image

    from conceptlens.data import load_dataset
    extra = tmp_path / "drawings"
    extra.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 40), (255, 255 - 40 * i, 255)).save(extra / f"d{i}.png")
    out = tmp_path / "b.safetensors"
    assert main(["align", "--source", "builtin:mobilenetv2/random", "--target", "builtin:lite-clip", "--data",
                 str(image_folder), "--also", str(extra), "--out", str(out)]) == 0
    meta = Aligner.load(out).meta_
    assert meta["also"] == [str(extra)] and meta["n_images"] == len(load_dataset(image_folder)) + 6
    assert "zeroshot_top1_agreement" in meta["metrics"]  # on the labelled set's held-out rows only
    assert main(["align", "--source", "builtin:mobilenetv2/random", "--target", "builtin:lite-clip", "--data",
                 str(image_folder), "--also", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "data not found" in capsys.readouterr().err
