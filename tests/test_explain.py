"""FALCON: concepts from captions, the contrastive step, thresholds and groups, bad input, the CLI."""
import json

import numpy as np
import pytest
import torch

from conceptlens.cli import main
from conceptlens.errors import ConceptlensError
from conceptlens.explain import (CaptionBankIndex, caption_concepts, concept_scores, contrast, find_groups,
                                 high_images, ranked, run_falcon, target_values)


def test_caption_concepts_are_lemmatised_content_words_and_phrases():
    words, phrases = caption_concepts("Two dogs are running through the tall green grass.")
    assert {"dog", "run", "tall", "green", "grass"} <= words and "two" not in words
    assert "tall green grass" in phrases


@pytest.mark.parametrize("scoring", ["share", "reference"])
def test_contrastive_step_removes_a_spurious_shared_concept(scoring):
    caps = ["a dog sitting on the grass", "a brown dog on grass", "a cat sitting on the grass", "a red car"]
    bank = CaptionBankIndex(caps, torch.eye(4))
    high = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0]])  # dog crops, on grass
    low = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # a counterfactual: grass without a dog
    w, p, _ = concept_scores(bank, high, k=2, scoring=scoring)
    lw, lp, _ = concept_scores(bank, low, k=1, scoring=scoring)
    assert "grass" in w and "dog" in w  # without the contrastive step the spurious concept stays
    w2, p2, removed = contrast(w, p, lw, lp, drop=0.1, scoring=scoring)
    assert "grass" not in w2 and "dog" in w2 and "grass" in removed


def test_share_scores_count_captions_and_subtract_the_counterfactuals_share():
    caps = ["a dog sitting on the grass", "a brown dog on grass", "a cat sitting on the grass", "a red car"]
    bank = CaptionBankIndex(caps, torch.eye(4))
    high = torch.tensor([[1.0, 0.9, 0.0, 0.0], [0.9, 1.0, 0.0, 0.0]])
    w, _, _ = concept_scores(bank, high, k=2)
    assert w["dog"] == pytest.approx(1.0) and w["brown"] == pytest.approx(0.5) and w["sit"] == pytest.approx(0.5)
    ref, _, _ = concept_scores(bank, high, k=2, scoring="reference")  # the best caption probability instead
    assert ref["dog"] == pytest.approx(1.0, abs=0.01) and ref["brown"] < 0.6
    w2, _, removed = contrast({"dog": 1.0, "sit": 0.5, "grass": 1.0}, {}, {"sit": 0.5, "grass": 0.25}, {})
    assert w2 == pytest.approx({"dog": 1.0, "grass": 0.75}) and removed == ["sit"]
    with pytest.raises(ConceptlensError, match="unknown scoring 'best'"):
        concept_scores(bank, high, scoring="best")


def test_equal_scores_rank_alphabetically_and_removals_are_sorted():
    # one caption carries several concepts, so ties are common; their order must not follow string hashing
    assert ranked({"state": 0.6, "carp": 0.6, "pond": 0.1, "common": 0.6}, 3) == [("carp", 0.6), ("common", 0.6),
                                                                                 ("state", 0.6)]
    for scoring in ("share", "reference"):
        _, _, removed = contrast({"zebra": 1.0, "ant": 1.0}, {}, {"zebra": 1.0, "ant": 1.0}, {}, scoring=scoring)
        assert removed == ["ant", "zebra"]


def test_thresholds_groups_and_bad_input():
    rng = np.random.default_rng(0)
    R = np.abs(rng.normal(size=(200, 16))) * 0.1
    R[:30, 3] = 5.0  # a feature strongly on for 30 images
    R[:30, 7] = 5.0
    R /= np.linalg.norm(R, axis=1, keepdims=True)
    rows = high_images(R, target_values(R, [3]), k=3)
    assert set(rows) == set(range(30))
    groups = find_groups(R, k=3)
    assert groups and groups[0]["features"] == [3, 7] and len(groups[0]["images"]) == 30
    with pytest.raises(ConceptlensError, match="out of range"):
        target_values(R, [99])
    with pytest.raises(ConceptlensError, match="has 5 dims"):
        target_values(R, direction=np.ones(5))
    with pytest.raises(ConceptlensError, match="no image activates"):
        high_images(R, target_values(R, [0]), k=50)
    with pytest.raises(ConceptlensError, match="empty"):
        CaptionBankIndex([], torch.zeros(0, 4)).top_captions(torch.ones(1, 4))
    with pytest.raises(ConceptlensError, match="unknown view 'zoom'"):
        run_falcon(None, None, None, features=[3], view="zoom")
    with pytest.raises(ConceptlensError, match="unknown scoring 'max'"):
        run_falcon(None, None, None, features=[3], scoring="max")


def test_explain_cli(tmp_path, image_folder, capsys):
    bank = tmp_path / "bank.txt"  # more captions than the 5 kept per crop, so the share of them can differ
    bank.write_text("a red square on a table\na blue square in the sky\na bright red wall\nthe deep blue sea\n"
                    "a green tree in a field\na yellow taxi on the street\na white cat asleep\nan old brick house\n")
    rc = main(["explain", "--model", "builtin:mobilenetv2", "--data", str(image_folder), "--features", "3,5",
               "--top-n", "4", "--captions", str(bank), "--generate", "--report", str(tmp_path / "rep")])
    assert rc == 0 and (tmp_path / "rep" / "index.html").exists()
    html = (tmp_path / "rep" / "index.html").read_text()
    assert "generated description" in html and "(each Grad-CAM crop with its whole image as context)" in html
    res = json.loads((tmp_path / "rep" / "explanations.json").read_text())["explanations"]
    assert len(res) == 1 and res[0]["features"] == [3, 5] and res[0]["n_high"] == 4 and res[0]["view"] == "context"
    assert res[0]["scoring"] == "share"
    assert res[0]["generated"] and "generated: " in capsys.readouterr().out  # the shipped lite-clip decoder wrote it
    bank_words = {"red", "square", "table", "blue", "sky", "bright", "wall", "deep", "sea", "green", "tree", "field",
                  "yellow", "taxi", "street", "white", "cat", "asleep", "old", "brick", "house"}
    assert res[0]["words"] and {w["concept"] for w in res[0]["words"]} <= bank_words
    assert main(["explain", "--model", "builtin:mobilenetv2", "--data", str(image_folder), "--features", "5000",
                 "--captions", str(bank)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_transfer_explains_another_space_through_an_aligner(tmp_path, image_folder, capsys):
    bank = tmp_path / "bank.txt"
    bank.write_text("a red square on a table\na blue square in the sky\na bright red wall\nthe deep blue sea\n")
    al = tmp_path / "b_to_a.safetensors"
    assert main(["align", "--source", "builtin:efficientnet-lite0", "--target", "builtin:mobilenetv2",
                 "--data", str(image_folder), "--out", str(al)]) == 0
    rc = main(["explain", "--model", "builtin:mobilenetv2", "--data", str(image_folder), "--features", "7",
               "--transfer", str(al), "--top-n", "3", "--view", "crop", "--scoring", "reference", "--captions", str(bank),
               "--report", str(tmp_path / "r")])
    assert rc == 0 and "via b_to_a.safetensors (held-out R2" in capsys.readouterr().out
    assert main(["explain", "--model", "builtin:efficientnet-lite0", "--data", str(image_folder), "--features", "7",
                 "--transfer", str(al), "--captions", str(bank)]) == 2


@pytest.mark.slow
def test_known_directions_floor_on_a_cifar10_subset():
    """Floor for benchmarks/falcon.py (CIFAR-10 test: 6 of 10 with the default context view and share scoring): probe
    directions of mobilenetv2 (3,000 train images) explained over 2,000 test images, a class word in the top 3 (7
    measured; 6 with the reference's scoring)."""
    import sys
    from pathlib import Path

    from sklearn.linear_model import LogisticRegression

    from conftest import shared
    from conceptlens.data import load_dataset
    from conceptlens.explain import explain, normalised
    from conceptlens.features import embed
    from conceptlens.models import load_model
    shared("data/cifar10")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from falcon import D, accepted_words
    model, vl = load_model("builtin:mobilenetv2"), load_model("builtin:lite-clip")
    bank = CaptionBankIndex.build(vl)
    tr = embed(model, load_dataset(D / "cifar10/train-000000.tar.gz", limit=3000), show_progress=False)
    te_ds = load_dataset(D / "cifar10/test-000000.tar.gz", limit=2000)
    te = embed(model, te_ds, show_progress=False)
    probe = LogisticRegression(C=1.0, max_iter=3000).fit(normalised(tr.X), tr.labels)
    top3 = {name: [w["concept"] for w in explain(np.asarray(te.X), te_ds, te.keys, model, vl, bank,
                                                   direction=probe.coef_[c], top_n=20)["words"][:3]]
            for c, name in enumerate(te.classnames)}
    assert sum(bool(set(w) & accepted_words(n)) for n, w in top3.items()) >= 5, top3
