"""Train the embedded text-conditioned denoiser on 32x32 images (CIFAR-10 shards), resumably, on a CPU.

Captions are made from the label with varied templates and synonyms and embedded once with MiniLM;
each step draws one caption per image. The whole state is (weights, EMA, AdamW moments, step): every
step's batch, noise, timesteps and captions are functions of (seed, step), so resuming is exact.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import load_dataset, to_arrays
from ..errors import ConceptlensError
from ..io import atomic_save_npy, cache_dir, digest, file_sha256, read_safetensors_meta
from ..models.denoisers import SYNONYMS, TRAIN_TEMPLATES, TinyDiffusion, add_noise, export_weights, load_tiny_diffusion
from ..runtime import autocast, resolve_device, resolve_precision, to_device
from .checkpoint import load_checkpoint, save_checkpoint
from .loop import finite, run_steps


def image_array(spec: str) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Decode a labelled 32x32 dataset once into a cached uint8 array [N,32,32,3] (+ labels, classnames, provenance)."""
    ds = load_dataset(spec)
    if not ds.labelled:
        raise ConceptlensError(f"{spec}: training the denoiser needs labelled images (a classes.txt beside the data)")
    path = cache_dir("arrays") / f"{digest([ds.identity])}.npy"
    if not path.exists():
        atomic_save_npy(path, to_arrays(ds, 32, "the embedded denoiser")[0])
    files = sorted({sh.source for sh in ds.shards})
    prov = {"data": spec, "n_images": len(ds), "identity": ds.identity,
            "data_sha256": {Path(f).name: file_sha256(Path(f)) for f in files if Path(f).is_file()}}
    return np.load(path, mmap_mode="r"), ds.labels, list(ds.classnames), prov


def caption_bank(classnames: list[str]) -> tuple[list[str], np.ndarray]:
    """Every training caption (template x synonym) and its class index."""
    texts, owner = [], []
    for c, name in enumerate(classnames):
        for syn in SYNONYMS.get(name, [name]):
            for t in TRAIN_TEMPLATES:
                texts.append(t.format(syn))
                owner.append(c)
    return texts, np.asarray(owner)


def epsilon_loss(pred: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, min_snr: float | None) -> torch.Tensor:
    """ε-prediction MSE; with `min_snr` = γ each image's error is weighted by min(SNR, γ)/SNR, SNR = ᾱ/(1 − ᾱ)."""
    if min_snr is None:
        return F.mse_loss(pred, noise)
    weight = (min_snr * (1 - alpha_bar) / alpha_bar).clamp(max=1.0)  # = min(SNR, γ)/SNR, finite where SNR is 0
    return ((pred - noise).pow(2).flatten(1).mean(1) * weight).mean()


def lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup)


def train_diffusion(data: str, out: Path, steps: int = 6000, batch_size: int = 64, lr: float = 2e-4,
                    seed: int = 0, threads: int | None = None, ckpt_every: int = 100, cond_dropout: float = 0.1,
                    ema_decay: float = 0.9995, export: Path | None = None, command: str = "",
                    device: str | torch.device = "cpu", precision: str = "auto", overwrite: bool = False,
                    init: str | None = None, min_snr: float | None = None) -> dict:
    """Train (or resume) to `steps` on `device`; checkpoint every `ckpt_every` steps and on Ctrl-C/SIGTERM;
    export EMA weights. All randomness is drawn on the CPU from (seed, step), so devices see the same batches.
    `init`: start from exported denoiser weights (a file, or "builtin" for the shipped ones) instead of random ones,
    e.g. to train the shipped denoiser further (a fresh AdamW, warmed up again). `min_snr`: weight each image's
    noise error by min(SNR, γ)/SNR (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting", ICCV 2023),
    which damps the easy low-noise timesteps; None: the plain ε-MSE."""
    if steps < 1 or batch_size < 1 or ckpt_every < 1:
        raise ConceptlensError("steps, batch size and checkpoint interval must be positive")
    if min_snr is not None and not min_snr > 0:
        raise ConceptlensError(f"the min-SNR γ must be positive, got {min_snr}")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    if overwrite:
        for f in ("checkpoint.safetensors", "log.csv"):
            (Path(out) / f).unlink(missing_ok=True)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(data, Path(out), steps, batch_size, lr, seed, ckpt_every, cond_dropout, ema_decay, export, command,
                      dev, precision, init, min_snr)
    finally:
        torch.set_num_threads(prev_threads)  # a notebook's thread setting survives the call


def _train(data: str, out: Path, steps: int, batch_size: int, lr: float, seed: int, ckpt_every: int,
           cond_dropout: float, ema_decay: float, export: Path | None, command: str, dev: torch.device,
           precision: str, init: str | None, min_snr: float | None) -> dict:
    images, labels, classnames, prov = image_array(data)  # bad data fails before anything is written
    start_from = load_tiny_diffusion(None if init == "builtin" else init) if init else None
    out.mkdir(parents=True, exist_ok=True)
    texts, owner = caption_bank(classnames)
    text_emb = TinyDiffusion.encode_prompts(texts).cpu()
    by_class = [np.flatnonzero(owner == c) for c in range(len(classnames))]
    model = TinyDiffusion.from_config(seed)
    if start_from is not None:
        model.unet.load_state_dict(start_from.unet.state_dict())
    model.to(dev)
    unet = model.unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ckpt = out / "checkpoint.safetensors"
    config = {"data": data, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "cond_dropout": cond_dropout, "ema_decay": ema_decay, "data_provenance": prov,
              "device": dev.type, "precision": precision}
    if min_snr is not None:
        config["min_snr"] = min_snr
    if start_from is not None:  # what it continues: that run's own config and step, and the file's digest
        config["init"] = {"sha": start_from.meta["sha"], "train_config": start_from.meta.get("train_config"),
                          "step": start_from.meta.get("total_step", start_from.meta.get("step"))}
    start = 0
    if ckpt.exists():
        meta = load_checkpoint(ckpt, {"unet": unet, "ema": ema}, opt)
        same = ("batch_size", "lr", "seed", "cond_dropout", "ema_decay", "init", "min_snr")
        if {k: meta["config"].get(k) for k in same} != {k: config.get(k) for k in same} or \
                meta["config"].get("data_provenance", {}).get("identity") != prov["identity"]:
            raise ConceptlensError(f"{ckpt} belongs to another run (settings or data differ): use --overwrite to "
                                   "start again, or another --out")
        start = meta["step"]
    sched = model.scheduler
    alphas = sched.alphas_cumprod.float().to(dev)
    n, per_epoch = len(images), len(images) // batch_size

    def save(step: int, loss: float) -> None:
        save_checkpoint(ckpt, {"unet": unet, "ema": ema}, opt,
                        {"step": step, "loss": loss, "config": config, "command": command})

    def one_step(step: int) -> tuple[float, float]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        epoch, pos = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        idx = np.sort(perm[pos * batch_size:(pos + 1) * batch_size])
        x = torch.from_numpy(np.ascontiguousarray(images[idx])).permute(0, 3, 1, 2).float() / 127.5 - 1
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        pick = torch.rand(len(idx), generator=g)
        cap = [by_class[labels[i]][int(p * len(by_class[labels[i]]))] for i, p in zip(idx, pick.tolist())]
        cond = text_emb[cap]
        cond = to_device(torch.where((torch.rand(len(idx), generator=g) < cond_dropout)[:, None], 0.0, cond), dev)
        z0 = model.to_model_space(to_device(x, dev))
        noise = to_device(torch.randn(z0.shape, generator=g), dev)
        t = to_device(torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g), dev)
        zt = add_noise(z0, noise, t, alphas)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, 500)
        with autocast(dev, precision):
            pred = unet(zt, t, cond[:, None, :], class_labels=cond).sample
        loss = epsilon_loss(pred.float(), noise, alphas[t], min_snr)
        value = finite(loss.item(), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        # the warm-up of the EMA forgets a random start; a trained start is kept
        decay = ema_decay if start_from is not None else min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        return value, lr_at(step, lr, 500)

    step, _ = run_steps(out, start, steps, one_step, save, ckpt_every, "training denoiser")
    result = {"step": step, "checkpoint": str(ckpt), "data": prov}
    if step >= steps:
        result["exported"] = str(export_from_checkpoint(ckpt, export or out / "model.safetensors"))  # never the asset
    return result


def export_from_checkpoint(ckpt: Path, path: Path) -> Path:
    """Write the checkpoint's EMA weights as the shipped fp16 safetensors with provenance metadata."""
    meta = read_safetensors_meta(ckpt)
    model = TinyDiffusion.from_config(meta["config"]["seed"])
    load_checkpoint(ckpt, {"ema": model.unet})
    init_steps = (meta["config"].get("init") or {}).get("step") or 0
    export_weights(model, Path(path), {"name": "builtin:tiny-diffusion-cifar10", "step": meta["step"],
                                       "total_step": init_steps + meta["step"],
                                       "final_loss": meta["loss"], "train_config": meta["config"],
                                       "command": meta.get("command", "")})
    return Path(path)
