"""Train a DeCap-style text decoder (Li et al., ICLR 2023) for a vision-language model's text space, on text only.

Each caption of the banks is embedded once (cached) with the model's text tower; the decoder learns to write the
caption back from its own embedding. Flickr8k's dev and test captions are held out by default, so that decoding
is scored on images whose references it never saw. The whole state is (weights, AdamW moments, step): batches
are functions of (seed, step) (length-bucketed for less padding), so resuming is bit-exact.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..concepts.decode import DEFAULT_BANKS, CaptionMemory
from ..concepts.vocab import bank_path
from ..data import flickr8k_captions
from ..errors import ConceptlensError
from ..io import file_sha256, provenance, read_safetensors_meta, shared_dir
from ..models import Encoder, load_model
from ..runtime import tune_allocator
from ..models.captioner import DEFAULTS, TextDecoder, build_vocabulary
from .checkpoint import load_checkpoint, save_checkpoint
from .loop import finite, run_steps

HELD_OUT = ("dev", "test")
BUCKET = 32  # batches per length bucket: sorting 32 batches' captions by length cuts padding from ~50 % to ~5 %


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """This epoch's batches (row indices): a seeded permutation, sorted by length within buckets of BUCKET
    batches, batches shuffled again; the last partial batch dropped."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    span = batch_size * BUCKET
    batches = []
    for s in range(0, len(perm) - batch_size + 1, span):
        chunk = perm[s:s + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    order = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return [batches[i] for i in order]


def decoder_data(model, banks: Sequence[str], held_out: Sequence[str]) -> tuple[CaptionMemory, CaptionMemory, dict]:
    """(training memory, Flickr8k dev memory, provenance): the banks embedded by the model's text tower, minus the
    captions of Flickr8k's `held_out` splits (when ../shared/data/flickr8k is here)."""
    full = CaptionMemory.build(model, banks)
    root = shared_dir() / "data" / "flickr8k"
    held = flickr8k_captions(root, tuple(held_out)) if held_out and (root / "captions.tsv").exists() else []
    train = full.without(held)
    dev = full.within(flickr8k_captions(root, ("dev",)) if "dev" in held_out and held else [])
    files = {p.name: file_sha256(p) for p in map(bank_path, banks)}
    prov = {"banks": list(banks), "bank_sha256": files, "n_captions": len(train.captions),
            "held_out": {"flickr8k_splits": list(held_out) if held else [],
                         "n_captions": len(full.captions) - len(train.captions)}}
    return train, dev, prov


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_decoder(out: Path, model: str = "builtin:lite-clip", banks: Sequence[str] = DEFAULT_BANKS,
                  held_out: Sequence[str] = HELD_OUT, epochs: int = 3, batch_size: int = 128, lr: float = 1e-3,
                  seed: int = 0, noise: float = 0.0, n_embd: int = DEFAULTS["n_embd"], n_layer: int = DEFAULTS["n_layer"],
                  n_head: int = DEFAULTS["n_head"], min_count: int = DEFAULTS["min_count"], ckpt_every: int = 100,
                  threads: int | None = None, export: Path | None = None, command: str = "",
                  device: str | torch.device = "cpu", overwrite: bool = False, limit: int | None = None,
                  stop_after: int | None = None) -> dict:
    """Train (or resume) the decoder; checkpoint every `ckpt_every` steps and on Ctrl-C/SIGTERM; export the weights
    with provenance to `export` (default OUT/decoder.safetensors). `noise`: CapDec-style Gaussian noise on the
    training embeddings (0 = DeCap's recipe). `limit`: the first N training captions only (tests, smoke runs);
    `stop_after`: stop, resumably, once this many steps are done (a time-boxed run)."""
    if min(epochs, batch_size, ckpt_every) < 1 or lr <= 0 or noise < 0:
        raise ConceptlensError("epochs, batch size, checkpoint interval and lr must be positive, noise non-negative")
    if n_embd % n_head:
        raise ConceptlensError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
    out = Path(out)
    enc = load_model(model, device=device)
    if not isinstance(enc, Encoder) or not enc.has_text:
        raise ConceptlensError(f"{model} has no text tower: a decoder is trained for a vision-language text space")
    train, dev, prov = decoder_data(enc, banks, held_out)
    if limit:
        train = CaptionMemory(train.captions[:limit], train.emb[:limit])
        prov["n_captions"] = len(train.captions)
    if len(train.captions) < batch_size:
        raise ConceptlensError(f"{len(train.captions)} training captions: fewer than one batch of {batch_size}")
    if overwrite:
        for f in ("checkpoint.safetensors", "log.csv"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tune_allocator()  # fresh activation buffers every step: page faults were a third of the time
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        dec = TextDecoder(build_vocabulary(train.captions, min_count), enc.embed_dim, n_embd=n_embd, n_layer=n_layer,
                          n_head=n_head, min_count=min_count).to(enc.device).train()
        ids = dec.encode(train.captions)
        lengths = (ids != dec.pad).sum(1).numpy()
        opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.01)
        per_epoch = len(train.captions) // batch_size
        steps = epochs * per_epoch
        config = {"model": model, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "noise": noise,
                  "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head, "min_count": min_count, "limit": limit,
                  "data_provenance": prov, "device": enc.device.type}
        ckpt = out / "checkpoint.safetensors"
        start = 0
        if ckpt.exists():
            meta = load_checkpoint(ckpt, {"decoder": dec}, opt)
            if {k: v for k, v in meta["config"].items() if k != "device"} != {k: v for k, v in config.items() if k != "device"}:
                raise ConceptlensError(f"{ckpt} belongs to another run (settings or data differ): use --overwrite to "
                                       "start again, or another --out")
            start = meta["step"]
        cache: dict[int, list[np.ndarray]] = {}

        def one_step(step: int) -> tuple[float, float]:
            epoch, pos = divmod(step, per_epoch)
            if epoch not in cache:
                cache.clear()
                cache[epoch] = epoch_batches(lengths, batch_size, seed, epoch)
            rows = torch.from_numpy(np.sort(cache[epoch][pos]))
            emb = train.emb[rows]
            if noise:
                g = torch.Generator().manual_seed(seed * 1_000_003 + step)
                emb = torch.nn.functional.normalize(emb, dim=-1) + noise * torch.randn(emb.shape, generator=g)
            batch = ids[rows][:, :int(lengths[rows.numpy()].max())]
            rate = lr_at(step, lr, min(200, steps // 10 + 1), steps)
            for group in opt.param_groups:
                group["lr"] = rate
            loss = dec.loss(emb, batch)
            value = finite(loss.item(), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
            opt.step()
            return value, rate

        def save(step: int, loss: float) -> None:
            save_checkpoint(ckpt, {"decoder": dec}, opt, {"step": step, "loss": loss, "config": config,
                                                          "command": command})

        step, _ = run_steps(out, start, steps, one_step, save, ckpt_every, "training decoder", stop_after)
        result = {"step": step, "steps": steps, "checkpoint": str(ckpt), "data": prov}
        if step >= steps:
            dev_loss = held_out_loss(dec, dev) if dev.captions else None
            meta = read_safetensors_meta(ckpt)
            path = dec.save(export or out / "decoder.safetensors", {
                "name": f"text decoder for {enc.text_model}", "text_model": enc.text_model,
                "model_fingerprint": enc.fingerprint, "step": step, "final_loss": meta["loss"], "dev_loss": dev_loss,
                "train_config": config, "command": command, "provenance": provenance()})
            result |= {"exported": str(path), "dev_loss": dev_loss}
        return result
    finally:
        torch.set_num_threads(prev_threads)  # a notebook's thread setting survives the call


@torch.no_grad()
def held_out_loss(dec: TextDecoder, mem: CaptionMemory, batch_size: int = 256) -> float:
    """Mean token cross-entropy on captions the decoder never trained on (Flickr8k dev)."""
    was = dec.training
    dec.eval()
    total, n = 0.0, 0
    for s in range(0, len(mem.captions), batch_size):
        ids = dec.encode(mem.captions[s:s + batch_size])
        k = int((ids != dec.pad).sum())
        total += dec.loss(mem.emb[s:s + batch_size], ids).item() * k
        n += k
    dec.train(was)
    return total / max(n, 1)
