"""SpLiCE-style decompositions: a planted sparse mix is recovered, scikit-learn's Lasso parity at SpLiCE's scaling,
the verb end to end with its report, and bad input as one line with exit code 2."""
import json

import numpy as np
import pytest
from sklearn.linear_model import Lasso

from conceptlens.cli import main
from conceptlens.concepts import ConceptDecomposer
from conceptlens.errors import ConceptlensError


def planted(seed: int = 0, K: int = 40, d: int = 64, n: int = 6, k: int = 3):
    rng = np.random.default_rng(seed)
    dec = ConceptDecomposer(rng.normal(size=(K, d)), l1_penalty=1e-5, center=False, tol=1e-7, dtype="float64").fit(
        np.ones((1, d)))
    W0 = np.zeros((n, K))
    for i in range(n):
        W0[i, rng.choice(K, k, replace=False)] = rng.uniform(0.5, 1.5, k)
    X = W0 @ dec.dictionary_
    return dec, W0 / np.linalg.norm(X, axis=1, keepdims=True), X


def test_a_planted_sparse_mix_is_recovered_exactly():
    dec, W0, X = planted()
    W = dec.transform(X)
    assert ((W > 1e-6) == (W0 > 0)).all() and np.abs(W - W0).max() < 1e-3
    assert dec.cosines(X, W).min() > 0.99999
    capped = ConceptDecomposer(dec.dictionary, n_concepts=3, center=False).fit(X)  # float32, default tolerance
    Wc = capped.transform(X)
    assert ((Wc > 0) == (W0 > 0)).all()  # the target number of concepts finds the planted support
    two = ConceptDecomposer(dec.dictionary, n_concepts=2, center=False).fit(X).transform(X)
    assert ((two > 0).sum(1) <= 2).all() and (two > 0).sum() > 0


def test_matches_scikit_learn_positive_lasso_at_splices_scaling():
    rng = np.random.default_rng(1)
    R = rng.normal(size=(30, 48)) + 2.0
    dec = ConceptDecomposer(rng.normal(size=(120, 48)), l1_penalty=0.25, tol=1e-9, max_iter=50000, dtype="float64").fit(R)
    X = rng.normal(size=(4, 48)) + 2.0
    W = dec.transform(X)
    Z = dec._targets(X)
    for w, z in zip(W, Z):  # SpLiCE (splice/model.py): Lasso(alpha=l1_penalty / (2 d), positive=True)
        ref = Lasso(alpha=0.25 / (2 * 48), fit_intercept=False, positive=True, max_iter=100000, tol=1e-10).fit(
            dec.dictionary_.T, z).coef_
        assert np.abs(w - ref).max() < 1e-4 and ((w > 1e-8) == (ref > 1e-8)).all()
    assert 1 <= (W > 0).sum(1).min() and (W > 0).sum(1).max() < 60 and 0.3 < dec.score(X) <= 1.0
    W32 = ConceptDecomposer(dec.dictionary, l1_penalty=0.25).fit(R).transform(X)
    assert W32.dtype == np.float32 and np.abs(W32 - W).max() < 1e-2  # the fast default agrees to its tolerance


def test_bad_input_is_one_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ConceptlensError, match="at least two concepts"):
        ConceptDecomposer(np.zeros((1, 8))).fit(np.ones((2, 8)))
    dec = ConceptDecomposer(rng.normal(size=(5, 8))).fit(np.ones((2, 8)))
    with pytest.raises(ConceptlensError, match="8 dims"):
        dec.transform(np.ones((2, 7)))
    with pytest.raises(ConceptlensError, match="NaN"):
        dec.transform(np.full((1, 8), np.nan))


def test_decompose_verb_end_to_end_and_exit_codes(tmp_path, image_folder, capsys):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red\nblue\nsky\nfire\ngrass\nwater\n")
    rep = tmp_path / "rep"
    assert main(["decompose", "--model", "builtin:lite-clip", "--data", str(image_folder), "--concepts", str(concepts),
                 "--class-means", "--n-concepts", "2", "--report", str(rep)]) == 0
    res = json.loads((rep / "decompose.json").read_text())
    assert [o["name"] for o in res["decomposed"]] == ["blue", "red"] and (rep / "index.html").exists()
    assert all(1 <= o["n_concepts"] <= 2 and 0 < o["cosine"] <= 1 for o in res["decomposed"])
    assert res["provenance"]["datasets"][0]["n_images"] == len(list(image_folder.rglob("*.png")))
    empty, nan, vec = tmp_path / "empty.txt", tmp_path / "nan.npy", tmp_path / "v.npy"
    empty.write_text("# nothing\n")
    np.save(nan, np.full(1280, np.nan, np.float32))
    np.save(vec, np.ones(7, np.float32))
    base = ["decompose", "--model", "builtin:lite-clip"]
    assert main(base + ["--data", str(image_folder), "--concepts", str(empty)]) == 2
    assert main(base + ["--vector", str(nan), "--direction", "--concepts", str(concepts)]) == 2
    assert main(base + ["--vector", str(vec), "--direction", "--concepts", str(concepts)]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse's own one-line error
        main(base + ["--data", str(image_folder), "--l1-penalty", "-1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err
