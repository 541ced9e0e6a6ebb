"""`conceptlens train clip`: CLIP-type training on this CPU, LiT-style: frozen registered towers (features
cached), trainable projection heads, learnable temperature clamped at 100, AdamW with warmup + cosine,
gradient accumulation, exact resume, metrics in CSV/JSON. The result is a vision-language model
(`clip:PATH`) that every other verb accepts.
"""
from __future__ import annotations

import csv
import io
import tomllib
from pathlib import Path

import numpy as np
import torch
import yaml

from ..data import read_pairs
from ..errors import ConceptlensError
from ..features import embed, embed_texts
from ..io import atomic_write_bytes, atomic_write_json, digest, read_text, save_safetensors
from ..models import load_model
from ..models.mapped import make_head
from .contrastive import LOSSES, REGULARIZERS, HeadTrainer, margin

DEFAULTS = {"image_tower": "builtin:efficientnet-lite0", "text_tower": "builtin:minilm", "embed_dim": 256,
            "head": "linear", "epochs": 10, "batch_size": 256, "lr": 1e-3, "weight_decay": 0.1, "warmup": 50,
            "loss": "infonce", "reg": "none", "reg_weight": 0.0, "accum_steps": 1, "seed": 0,
            "init_temperature": 0.07, "learn_temperature": True, "ckpt_every": 100}


def load_config(path: str | Path) -> dict:
    """A TOML or YAML file; unknown keys are an error (typos should not pass silently)."""
    path = Path(path)
    if not path.exists():
        raise ConceptlensError(f"config not found: {path}")
    text = read_text(path)
    try:
        if path.suffix in (".yaml", ".yml"):
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
    return check_config(DEFAULTS | cfg, str(path))


RANGES = {"embed_dim": 1, "epochs": 1, "batch_size": 2, "weight_decay": 0, "warmup": 0, "reg_weight": 0, "accum_steps": 1,
          "ckpt_every": 0}  # minimum values; lr and init_temperature must be > 0
CHOICES = {"head": ("linear", "mlp"), "loss": LOSSES, "reg": REGULARIZERS}


def check_config(cfg: dict, where: str = "config") -> dict:
    """Types (those of the defaults), ranges and choices, each failure one line naming the key."""
    for k, default in DEFAULTS.items():
        v = cfg[k]
        want = (int, float) if isinstance(default, float) else type(default)
        if isinstance(v, bool) != isinstance(default, bool) or not isinstance(v, want):
            raise ConceptlensError(f"{where}: {k} must be {type(default).__name__}, got {v!r}")
        if k in RANGES and v < RANGES[k]:
            raise ConceptlensError(f"{where}: {k} must be >= {RANGES[k]}, got {v}")
        if k in ("lr", "init_temperature") and not v > 0:
            raise ConceptlensError(f"{where}: {k} must be > 0, got {v}")
        if k in CHOICES and v not in CHOICES[k]:
            raise ConceptlensError(f"{where}: {k} must be one of {', '.join(CHOICES[k])}, got {v!r}")
    if cfg["reg"] != "none" and cfg["reg_weight"] == 0:
        raise ConceptlensError(f"{where}: reg = {cfg['reg']!r} with reg_weight 0 does nothing: set reg_weight > 0")
    if not isinstance(cfg.get("data"), str):
        raise ConceptlensError(f"{where}: data must be a path string")
    return cfg


def fit_heads(image_feats: list[torch.Tensor], text_feats: torch.Tensor, owner: np.ndarray, cfg: dict,
              checkpoint: Path | None = None, stop_after: int | None = None, device: str = "cpu",
              fingerprint: str = "") -> dict:
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
                     checkpoint=checkpoint, ckpt_every=cfg["ckpt_every"], stop_after=stop_after, device=device,
                     fingerprint=fingerprint)
    tr.fit(ih, th, image_feats, text_feats, owner)
    return {"image_head": ih.eval(), "text_head": th.eval(), "temperature": tr.temperature_, "history": tr.history_}


def train_clip(config: dict | str | Path, out: Path | None = None, device: str = "cpu", overwrite: bool = False) -> Path:
    """Train from a config (dict or TOML/YAML file) on `device` (towers embed there, heads train there);
    writes OUT/model.safetensors, metrics.csv, history.json. A checkpoint in OUT is resumed only when it
    comes from the same config and data (else a one-line error); `overwrite` starts again."""
    cfg = load_config(config) if not isinstance(config, dict) else check_config(DEFAULTS | config)
    out = Path(out or cfg.get("out") or "runs/clip")
    out.mkdir(parents=True, exist_ok=True)
    ds, captions, owner = read_pairs(cfg["data"])
    itower, ttower = load_model(cfg["image_tower"], device=device), load_model(cfg["text_tower"], device=device)
    if not itower.has_image or not ttower.has_text:
        raise ConceptlensError(f"{cfg['image_tower']} must have an image tower and {cfg['text_tower']} a text tower")
    f = embed(itower, ds)
    if len(f.keys) != len(ds):
        raise ConceptlensError(f"{len(ds) - len(f.keys)} images could not be read: {f.skipped[:1]}")
    X = torch.from_numpy(np.array(f.X))
    T = embed_texts(ttower, captions)
    ckpt = out / "checkpoint.safetensors"
    if overwrite:
        ckpt.unlink(missing_ok=True)
    run_id = digest([{k: v for k, v in cfg.items() if k not in ("out", "ckpt_every")}, ds.identity, captions,
                     owner.tolist(), itower.image_fingerprint, ttower.fingerprint])
    res = fit_heads([X], T, owner, cfg, checkpoint=ckpt, device=device, fingerprint=run_id)
    with torch.no_grad():
        g, h = res["image_head"](X[owner]), res["text_head"](T)
    meta = {"kind": "clip", "config": {k: v for k, v in cfg.items() if k != "out"}, "image_tower": itower.name,
            "text_tower": ttower.name, "image_fingerprint": itower.image_fingerprint,
            "data_fingerprint": ds.identity, "n_images": len(ds), "n_pairs": len(captions), "train_margin": margin(g, h),
            "logit_scale": res["temperature"]().item()}
    tensors = {f"image_head.{k}": v.contiguous() for k, v in res["image_head"].state_dict().items()}
    tensors |= {f"text_head.{k}": v.contiguous() for k, v in res["text_head"].state_dict().items()}
    save_safetensors(out / "model.safetensors", tensors, meta)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", "loss", "logit_scale"])
    w.writeheader()
    w.writerows(res["history"])
    atomic_write_bytes(out / "metrics.csv", buf.getvalue().encode())
    atomic_write_json(out / "history.json", {"meta": meta, "history": res["history"]})
    return out / "model.safetensors"
