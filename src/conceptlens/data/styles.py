"""Style sets: the same objects drawn in several styles, for style supervision without touching any evaluation set.

OpenMoji (npm `openmoji`, CC BY-SA 4.0): every emoji as a colour cartoon and as black line art, with one
annotation ("horse", "house with garden"). `make setup` unpacks the npm package under `.venv/share/openmoji`
(or set `CONCEPTLENS_OPENMOJI`); the SVGs are rasterised once (cairosvg, on white) into the cache folder.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path

from ..errors import ConceptlensError
from ..io import atomic_write_bytes, cache_dir, digest, progress

OPENMOJI_VERSION = "17.0.0"
# Objects, animals, people, faces, places, food, activities and OpenMoji's own extras; flags, symbols, keycaps and
# skin-tone variants carry no drawable object a caption could name (or repeat one).
OPENMOJI_GROUPS = ("activities", "animals-nature", "extras-openmoji", "food-drink", "objects", "people-body",
                   "smileys-emotion", "travel-places")
STYLES = ("black", "color")
STYLE_SETS = tuple(f"openmoji:{s}" for s in STYLES)  # --data names: the drawings of one style, unlabelled


def openmoji_root() -> Path:
    """The unpacked npm package (its package.json, data/openmoji.csv, black/svg, color/svg)."""
    env = os.environ.get("CONCEPTLENS_OPENMOJI")
    root = Path(env) if env else Path(sys.prefix) / "share" / "openmoji"
    meta = root / "package.json"
    if not meta.exists():
        raise ConceptlensError(f"OpenMoji not found at {root}: run `make setup` (it unpacks npm openmoji@"
                               f"{OPENMOJI_VERSION}) or set CONCEPTLENS_OPENMOJI to the unpacked package")
    version = json.loads(meta.read_text()).get("version")
    if version != OPENMOJI_VERSION:
        raise ConceptlensError(f"OpenMoji {version} at {root}; conceptlens is built on {OPENMOJI_VERSION}")
    return root


def openmoji_annotations(root: Path | None = None) -> dict[str, str]:
    """hexcode -> annotation for the drawable emoji (OPENMOJI_GROUPS, no skin-tone variants), in file order."""
    root = root or openmoji_root()
    with open(root / "data" / "openmoji.csv", encoding="utf-8", newline="") as f:
        return {r["hexcode"]: r["annotation"] for r in csv.DictReader(f)
                if not r["skintone"] and r["group"] in OPENMOJI_GROUPS and r["annotation"]}


def openmoji_images(size: int = 160, root: Path | None = None, show_progress: bool = True) -> dict[str, Path]:
    """Rasterise both styles once into cache_dir("styles"): style -> folder of HEXCODE.png (size x size, RGB on
    white). The folder is keyed by the package version and size; an interrupted run resumes (files are atomic)."""
    import cairosvg
    from PIL import Image

    root = root or openmoji_root()
    names = openmoji_annotations(root)
    base = cache_dir("styles") / f"openmoji-{OPENMOJI_VERSION}-{size}px-{digest([cairosvg.__version__])[:8]}"
    out = {}
    for style in STYLES:
        folder = base / style
        folder.mkdir(parents=True, exist_ok=True)
        todo = [h for h in names if not (folder / f"{h}.png").exists() and (root / style / "svg" / f"{h}.svg").exists()]
        for h in progress(todo, desc=f"rasterise OpenMoji {style}", **({} if show_progress and todo else {"disable": True})):
            png = cairosvg.svg2png(url=str(root / style / "svg" / f"{h}.svg"), output_width=size, output_height=size)
            im = Image.open(io.BytesIO(png)).convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            buf = io.BytesIO()
            Image.alpha_composite(white, im).convert("RGB").save(buf, format="PNG")
            atomic_write_bytes(folder / f"{h}.png", buf.getvalue())
        out[style] = folder
    return out
