"""The OpenMoji style set: annotations filtered to drawable emoji, rasterised once on white, version-checked."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conceptlens.data import styles
from conceptlens.errors import ConceptlensError

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><rect x="18" y="18" width="36" height="36" '
       'fill="{}"/></svg>')
CSV = ("emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags,openmoji_author,openmoji_date,skintone,"
       "skintone_combination,skintone_base_emoji,skintone_base_hexcode,unicode,order\n"
       "x,1F40E,animals-nature,animal,horse,,,,,,,,,1,1\n"
       "x,1F40E-1F3FB,animals-nature,animal,horse: light skin tone,,,,,1,,,,1,2\n"
       "x,1F1E9-1F1EA,flags,country-flag,flag: Germany,,,,,,,,,1,3\n"
       "x,1F3E0,travel-places,building,house,,,,,,,,,1,4\n")


@pytest.fixture
def fake_openmoji(tmp_path, monkeypatch):
    root = tmp_path / "openmoji"
    (root / "data").mkdir(parents=True)
    (root / "data" / "openmoji.csv").write_text(CSV)
    (root / "package.json").write_text(json.dumps({"version": styles.OPENMOJI_VERSION}))
    for style, colour in (("black", "#000000"), ("color", "#d22f27")):
        (root / style / "svg").mkdir(parents=True)
        for h in ("1F40E", "1F40E-1F3FB", "1F1E9-1F1EA", "1F3E0"):
            (root / style / "svg" / f"{h}.svg").write_text(SVG.format(colour))
    monkeypatch.setenv("CONCEPTLENS_OPENMOJI", str(root))
    monkeypatch.setenv("CONCEPTLENS_CACHE", str(tmp_path / "cache"))
    return root


def test_annotations_keep_drawable_emoji_without_skin_tone_variants(fake_openmoji):
    assert styles.openmoji_annotations() == {"1F40E": "horse", "1F3E0": "house"}


def test_drawings_are_rasterised_on_white_once(fake_openmoji):
    folders = styles.openmoji_images(size=64, show_progress=False)
    assert sorted(p.name for p in folders["black"].iterdir()) == ["1F3E0.png", "1F40E.png"]
    im = np.asarray(Image.open(folders["black"] / "1F40E.png"))
    assert im.shape == (64, 64, 3)
    assert (im[0, 0] == 255).all() and (im[32, 32] == 0).all()  # white outside, the black square inside
    assert tuple(np.asarray(Image.open(folders["color"] / "1F40E.png"))[32, 32]) == (0xd2, 0x2f, 0x27)
    stamp = (folders["black"] / "1F40E.png").stat().st_mtime_ns
    assert styles.openmoji_images(size=64, show_progress=False) == folders
    assert (folders["black"] / "1F40E.png").stat().st_mtime_ns == stamp  # not redrawn


def test_style_sets_load_by_name_as_unlabelled_drawings(fake_openmoji):
    from conceptlens.data import load_dataset
    ds = load_dataset("openmoji:color")
    assert ds.name == "openmoji_color" and sorted(ds.keys) == ["1F3E0.png", "1F40E.png"] and ds.classnames is None
    with pytest.raises(ConceptlensError, match="openmoji:black, openmoji:color"):
        load_dataset("openmoji:grey")


def test_missing_or_other_version_is_a_one_line_error(fake_openmoji, tmp_path, monkeypatch):
    (fake_openmoji / "package.json").write_text(json.dumps({"version": "1.0.0"}))
    with pytest.raises(ConceptlensError, match="OpenMoji 1.0.0"):
        styles.openmoji_root()
    monkeypatch.setenv("CONCEPTLENS_OPENMOJI", str(tmp_path / "nowhere"))
    with pytest.raises(ConceptlensError, match="make setup"):
        styles.openmoji_root()
