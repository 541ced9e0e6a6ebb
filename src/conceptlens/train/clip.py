"""`conceptlens train clip`: CLIP-type training on this CPU, LiT-style: frozen registered towers (features
cached), trainable projection heads, learnable temperature clamped at 100, AdamW with warmup + cosine,
gradient accumulation, exact resume, metrics in CSV/JSON. The result is a vision-language model
(`clip:PATH`) that every other verb accepts.
"""
from __future__ import annotations

import csv
import json
import tomllib
from pathlib import Path

import numpy as np
import torch

from ..errors import ConceptlensError
from ..models.base import Encoder
from ..utils import atomic_write_json
from .checkpoint import META_KEY, read_meta
from .contrastive import HeadTrainer, margin

DEFAULTS = {"image_tower": "builtin:efficientnet-lite0", "text_tower": "builtin:minilm", "embed_dim": 256,
            "head": "linear", "epochs": 10, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.1, "warmup": 50,
            "loss": "infonce", "reg": "none", "reg_weight": 0.0, "accum_steps": 1, "seed": 0,
            "init_temperature": 0.07, "learn_temperature": True, "ckpt_every": 100}


def make_head(kind: str, d_in: int, d_out: int) -> torch.nn.Module:
    if kind == "linear":
        return torch.nn.Linear(d_in, d_out)
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(d_in, 2 * d_out), torch.nn.GELU(), torch.nn.Linear(2 * d_out, d_out))
    raise ConceptlensError(f"unknown head {kind!r}: linear or mlp")


def load_config(path: str | Path) -> dict:
    """A TOML or YAML file; unknown keys are an error (typos should not pass silently)."""
    path = Path(path)
    if not path.exists():
        raise ConceptlensError(f"config not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            cfg = yaml.safe_load(text) or {}
        else:
            cfg = tomllib.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is one line
        raise ConceptlensError(f"cannot parse {path}: {exc}") from None
    unknown = set(cfg) - set(DEFAULTS) - {"data", "out"}
    if unknown:
        raise ConceptlensError(f"unknown config keys in {path}: {', '.join(sorted(unknown))}")
    if "data" not in cfg:
        raise ConceptlensError(f"{path} needs `data` (a CSV/JSONL of path,caption pairs)")
    return DEFAULTS | cfg


def fit_heads(image_feats: list[torch.Tensor], text_feats: torch.Tensor, owner: np.ndarray, cfg: dict,
              checkpoint: Path | None = None, stop_after: int | None = None) -> dict:
    """Train image/text heads on cached features; returns heads, temperature and the trainer history."""
    cfg = DEFAULTS | cfg
    torch.manual_seed(cfg["seed"])
    ih = make_head(cfg["head"], image_feats[0].shape[1], cfg["embed_dim"])
    th = make_head(cfg["head"], text_feats.shape[1], cfg["embed_dim"])
    tr = HeadTrainer(epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                     weight_decay=cfg["weight_decay"], warmup=cfg["warmup"],
                     init_logit_scale=float(np.log(1 / cfg["init_temperature"])),
                     learn_temperature=cfg["learn_temperature"], loss=cfg["loss"], reg=cfg["reg"],
                     reg_weight=cfg["reg_weight"], accum_steps=cfg["accum_steps"], seed=cfg["seed"],
                     checkpoint=checkpoint, ckpt_every=cfg["ckpt_every"], stop_after=stop_after)
    temp = tr.fit(ih, th, image_feats, text_feats, owner)
    return {"image_head": ih.eval(), "text_head": th.eval(), "temperature": temp, "history": tr.history_}


def train_clip(config: dict | str | Path, out: Path | None = None) -> Path:
    """Train from a config (dict or TOML/YAML file); writes OUT/model.safetensors, metrics.csv, history.json."""
    from safetensors.torch import save_file

    from ..data import read_pairs
    from ..features import embed, embed_texts
    from ..models import load_model
    cfg = load_config(config) if not isinstance(config, dict) else DEFAULTS | config
    out = Path(out or cfg.get("out") or "runs/clip")
    out.mkdir(parents=True, exist_ok=True)
    ds, captions, owner = read_pairs(cfg["data"])
    itower, ttower = load_model(cfg["image_tower"]), load_model(cfg["text_tower"])
    if not itower.has_image or not ttower.has_text:
        raise ConceptlensError(f"{cfg['image_tower']} must have an image tower and {cfg['text_tower']} a text tower")
    f = embed(itower, ds)
    if len(f.keys) != len(ds):
        raise ConceptlensError(f"{len(ds) - len(f.keys)} images could not be read: {f.skipped[:1]}")
    X = torch.from_numpy(np.array(f.X))
    T = embed_texts(ttower, captions)
    res = fit_heads([X], T, owner, cfg, checkpoint=out / "checkpoint.safetensors")
    with torch.no_grad():
        g, h = res["image_head"](X[owner]), res["text_head"](T)
    meta = {"kind": "clip", "config": {k: v for k, v in cfg.items() if k != "out"}, "image_tower": itower.name,
            "text_tower": ttower.name, "image_fingerprint": itower.image_fingerprint,
            "data_fingerprint": ds.identity, "n_pairs": len(captions), "train_margin": margin(g, h),
            "logit_scale": res["temperature"]().item()}
    tensors = {f"image_head.{k}": v.contiguous() for k, v in res["image_head"].state_dict().items()}
    tensors |= {f"text_head.{k}": v.contiguous() for k, v in res["text_head"].state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={META_KEY: json.dumps(meta)})
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["step", "loss", "logit_scale"])
        w.writeheader()
        w.writerows(res["history"])
    atomic_write_json(out / "history.json", {"meta": meta, "history": res["history"]})
    return out / "model.safetensors"


class TrainedCLIP(Encoder):
    """A model trained by `train_clip`: frozen towers + the learned heads (URI `clip:PATH`)."""

    kind = "vision-language"

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file

        from ..models import load_model
        path = Path(path)
        if not path.exists():
            raise ConceptlensError(f"trained model not found: {path}")
        meta = read_meta(path)
        if meta.get("kind") != "clip":
            raise ConceptlensError(f"{path} is not a model written by `conceptlens train clip`")
        cfg = DEFAULTS | meta["config"]
        self.name, self.meta = f"clip:{path}", meta
        self.image_tower, self.text_tower = load_model(meta["image_tower"]), load_model(meta["text_tower"])
        t = load_file(str(path))
        self.image_head = make_head(cfg["head"], self.image_tower.embed_dim, cfg["embed_dim"])
        self.text_head = make_head(cfg["head"], self.text_tower.embed_dim, cfg["embed_dim"])
        self.image_head.load_state_dict({k[11:]: v for k, v in t.items() if k.startswith("image_head.")})
        self.text_head.load_state_dict({k[10:]: v for k, v in t.items() if k.startswith("text_head.")})
        self.image_head.eval()
        self.text_head.eval()
        self.embed_dim, self.preprocess, self.layer = cfg["embed_dim"], self.image_tower.preprocess, None
        self.base = self.image_tower

    def modules(self):
        return [self.image_head, self.text_head] + self.image_tower.modules()

    @property
    def aligner(self):
        return _HeadMap(self.image_head)  # features.embed: cache the tower's features, map rows on the way out

    def encode_image(self, images) -> torch.Tensor:
        with torch.no_grad():
            return self.image_head(self.image_tower.encode_image(images).float())

    def encode_text(self, texts) -> torch.Tensor:
        with torch.no_grad():
            return self.text_head(self.text_tower.encode_text(texts).float())


class _HeadMap:
    def __init__(self, head: torch.nn.Module):
        self.head = head

    def transform(self, X) -> np.ndarray:
        with torch.no_grad():
            return self.head(torch.from_numpy(np.asarray(X, np.float32))).numpy()
