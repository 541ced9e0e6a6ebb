"""Every registered model builds (timm-style), with its tags honoured or refused; estimators clone like scikit-learn's."""
import numpy as np
import pytest
from sklearn.base import clone

from conceptlens.concepts import Aligner, ConceptBottleneck
from conceptlens.errors import ConceptlensError
from conceptlens.eval import LinearProbe
from conceptlens.models import Denoiser, Encoder, list_models, load_model
from conftest import open_clip_hub_repo, tiny_hf_clip, tiny_sd_pipeline, trained_clip_file


def _diffusers_dir(tmp_path):
    (tmp_path / "tok").mkdir()
    tiny_sd_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "sd")
    return str(tmp_path / "sd")


def _hf_dir(tmp_path):
    tiny_hf_clip(tmp_path / "hf")
    return str(tmp_path / "hf")


def _hub_cache(tmp_path):
    import huggingface_hub.constants as hub
    hub.HF_HUB_CACHE = str(tmp_path / "hub")  # restored by the test (monkeypatch)
    return open_clip_hub_repo(tmp_path / "hub")


# schemes whose models need local files: how this test makes them (a new such scheme must be added here)
LOCAL = {"hf": _hf_dir, "clip": trained_clip_file, "diffusers": _diffusers_dir, "hf-hub": _hub_cache}


def _uris(info, tmp_path):
    if not info.is_scheme:
        return [info.name if tag is None else f"{info.name}/{tag}" for tag in info.tags]
    scheme = info.name.split(":")[0]
    if info.example:
        return [info.example]
    assert scheme in LOCAL, f"{info.name} has no example and no local builder in this test"
    return [f"{scheme}:{LOCAL[scheme](tmp_path)}"]


@pytest.mark.parametrize("info", list_models(), ids=lambda i: i.name)
def test_every_registered_model_builds(info, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_CACHE", hub.HF_HUB_CACHE)
    for uri in _uris(info, tmp_path):
        model = load_model(uri)
        if info.kind == "diffusion":
            assert isinstance(model, Denoiser) and not isinstance(model, Encoder)
        else:
            assert isinstance(model, Encoder) and model.kind == info.kind, (uri, model)
            if info.embed_dim:
                assert model.embed_dim == info.embed_dim
        assert uri.split(":", 1)[1].split("/")[0] in model.name


@pytest.mark.parametrize("info", [i for i in list_models() if not i.is_scheme], ids=lambda i: i.name)
def test_unknown_tags_are_refused(info):
    with pytest.raises(ConceptlensError, match="has no tag 'bogus'"):
        load_model(f"{info.name}/bogus")


def test_random_tag_is_refused_where_it_means_nothing_and_never_renames_the_shared_instance():
    with pytest.raises(ConceptlensError, match="builtin:lite-clip has no tag 'random'"):
        load_model("builtin:lite-clip/random")
    assert load_model("builtin:lite-clip").name == "builtin:lite-clip"
    assert load_model("builtin:efficientnet-lite0/random").name == "builtin:efficientnet-lite0/random"
    assert load_model("builtin:tiny-diffusion-cifar10/random").name.endswith("/random")


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ConceptlensError, match="did you mean builtin:lite-clip"):
        load_model("builtin:lite-clp")
    with pytest.raises(ConceptlensError, match="did you mean timm"):
        load_model("tim:resnet18")
    with pytest.raises(ConceptlensError, match="--layer applies to vision models"):
        load_model("builtin:minilm", layer="encoder")


@pytest.mark.parametrize("est", [Aligner(method="procrustes", alphas=[1.0, 2.0], seed=3),
                                 ConceptBottleneck(max_concepts=7, Cs=[0.1, 1.0], seed=2),
                                 LinearProbe(lr=0.05, epochs=3, weight_decay=1e-3)], ids=lambda e: type(e).__name__)
def test_estimators_clone_and_keep_parameters_unchanged(est):
    twin = clone(est)
    assert type(twin) is type(est) and twin.get_params() == est.get_params()
    assert twin is not est


def test_our_estimator_base_behaves_as_scikit_learns():
    """conceptlens.estimator stands in for sklearn.base (whose import is ~1 s of every cbm call): same parameter
    names, repr, set_params errors, tags, and scikit-learn's own tools (clone, is_classifier, GridSearchCV) take it."""
    import sklearn.base as skb
    from sklearn.model_selection import GridSearchCV
    from sklearn.utils import get_tags
    from conceptlens.concepts import ConceptDecomposer
    for ours in (Aligner(method="procrustes", seed=3), ConceptBottleneck(max_concepts=7, Cs=[0.1, 1.0]),
                 LinearProbe(lr=0.05), ConceptDecomposer([[1.0, 0.0], [0.0, 1.0]], n_concepts=1)):
        ref = type("Ref", (skb.BaseEstimator,), {"__init__": type(ours).__init__})(**ours.get_params(deep=False))
        assert repr(ours).replace(type(ours).__name__, "Ref") == repr(ref)
        assert ours._get_param_names() == ref._get_param_names()
        with pytest.raises(ValueError, match="invalid parameter 'bogus'"):
            ours.set_params(bogus=1)
    assert skb.is_classifier(ConceptBottleneck()) and skb.is_classifier(LinearProbe()) and not skb.is_classifier(Aligner())
    assert get_tags(ConceptDecomposer(np.eye(2))).transformer_tags is not None and get_tags(Aligner()).transformer_tags is None
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 6)).astype(np.float32), np.repeat([0, 1, 2], 20)
    X[np.arange(60), y] += 3
    grid = GridSearchCV(LinearProbe(epochs=2), {"weight_decay": [1e-4, 1e-2]}, cv=2).fit(X, y)
    assert grid.best_params_["weight_decay"] in (1e-4, 1e-2) and grid.best_score_ > 0.6


def test_cbm_standardises_as_scikit_learns_standard_scaler():
    from sklearn.preprocessing import StandardScaler
    from conceptlens.concepts.cbm import standardizer
    A = np.random.default_rng(0).normal(size=(50, 4)) * [1, 10, 0, 1e-3] + [0, 5, 2, 0]  # a constant column
    mean, scale = standardizer(A)
    ref = StandardScaler().fit(A)
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(scale, ref.scale_, rtol=1e-12)


def test_estimators_validate_in_fit_and_return_numpy():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 6)).astype(np.float32), np.repeat([0, 1, 2], 20)
    bad = Aligner(method="magic")  # constructing never fails: parameters are checked by fit
    with pytest.raises(ConceptlensError, match="unknown alignment method"):
        bad.fit(X, X)
    probe = LinearProbe(epochs=2, weight_decay=1e-4)
    assert probe.fit(X, y) is probe
    assert isinstance(probe.decision_function(X), np.ndarray) and probe.predict(X).dtype.kind == "i"
    cbm = ConceptBottleneck(max_concepts=6).fit(X + 3 * np.eye(6)[y % 6], y)
    assert isinstance(cbm.decision_function(X), np.ndarray)
    al = Aligner().fit(X, X @ rng.normal(size=(6, 4)))
    assert isinstance(al.transform(X), np.ndarray) and al.alphas is None and al.alpha_ > 0


def test_the_suite_runs_with_the_network_blocked():
    import socket
    with pytest.raises(OSError, match="network blocked"):
        socket.create_connection(("203.0.113.7", 443), timeout=1)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:resnet18/IMAGENET1K_V1", "open_clip:RN50/openai",
                                  "timm:resnet18"])
def test_pretrained_weights_not_on_disk_are_an_error_not_a_download(name):
    with pytest.raises(ConceptlensError, match="never downloads|not on this machine|no weights"):
        load_model(name)
