"""Feature extraction with a content-keyed, resumable, memory-mapped cache.

The cache key is model id + weights hash + preprocessing + layer + precision + the data files' identity.
Rows are written batch by batch into a memory-mapped array with a per-row done flag; a killed run
resumes at the first unfinished batch. Batches have fixed boundaries inside each shard, so a resumed
run computes exactly what an uninterrupted one would. `meta.json` is written last, atomically: its
presence marks a complete entry.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision import transforms as T

from .data import ImageDataset, Shard, iter_shard
from .errors import ConceptlensError
from .io import atomic_save_npy, atomic_write_json, cache_dir, digest, progress
from .models import Encoder, MappedEncoder

PENDING, DONE, SKIPPED = 0, 1, 2


@dataclass
class Features:
    """Embeddings of the readable images of a dataset, with their labels and the files that were skipped."""

    X: np.ndarray
    labels: np.ndarray
    keys: list[str]
    classnames: list[str] | None
    skipped: list[str]
    model: str
    dataset: str
    path: Path | None = None
    cache_hit: bool = False

    @property
    def labelled_ok(self) -> bool:
        return self.classnames is not None and len(self.labels) > 0 and bool((self.labels >= 0).all())

    def tensor(self, normalize: bool = False) -> torch.Tensor:
        t = torch.from_numpy(np.array(self.X, dtype=np.float32))
        return torch.nn.functional.normalize(t, dim=-1) if normalize else t


@functools.lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512-BF16 or AMX); elsewhere bf16 would be slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    if precision not in ("auto", "fp32", "bf16"):
        raise ConceptlensError(f"unknown precision {precision!r}: use auto, fp32 or bf16")
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    return precision


def split_preprocess(preprocess) -> tuple[Callable, Callable | None]:
    """Split a torchvision Compose at ToTensor: PIL work per image, tensor work once per batch.

    Returns (per_image, per_batch). per_image gives uint8 HWC arrays when the split applies, so the
    batch is converted to float and normalised in one vectorised step (same arithmetic as per image).
    """
    if isinstance(preprocess, T.Compose):
        steps = list(preprocess.transforms)
        cut = next((i for i, s in enumerate(steps) if isinstance(s, T.ToTensor)), None)
        if cut is not None and all(isinstance(s, T.Normalize) for s in steps[cut + 1:]):
            pil_steps, tensor_steps = T.Compose(steps[:cut]), steps[cut + 1:]

            def per_image(im):
                return np.asarray(pil_steps(im), dtype=np.uint8)

            def per_batch(arrs: list[np.ndarray]) -> torch.Tensor:
                x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)
                for s in tensor_steps:
                    x = s(x)
                return x

            return per_image, per_batch
    return preprocess, None


class ImageBatcher:
    """Decode + preprocess images of one shard in a thread pool, yielding fixed-boundary batches."""

    def __init__(self, preprocess, batch_size: int, workers: int = 2, ahead: int = 2):
        self.per_image, self.per_batch = split_preprocess(preprocess)
        self.batch_size, self.ahead = batch_size, ahead
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def _load(self, shard: Shard):
        out = []
        for pos, im, err in iter_shard(shard):
            out.append((pos, None if im is None else self.per_image(im), err))
        return out

    def batches(self, shard: Shard, todo: list[int]) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
        """Yield (shard positions, batch tensor, [(position, error)]) for each batch containing work."""
        chunks = {}
        for pos in todo:
            chunks.setdefault(pos // self.batch_size, []).append(pos)
        # Sub-shards of one batch each, prepared `ahead` batches early in threads (PIL releases the GIL
        # while decoding); the window bounds memory to a few decoded batches.
        order, futures = sorted(chunks), {}

        def submit(c: int) -> None:
            futures[c] = self.pool.submit(self._load, Shard(shard.kind, shard.source,
                                                            tuple(shard.items[p] for p in chunks[c])))

        for c in order[:self.ahead]:
            submit(c)
        for i, c in enumerate(order):
            if i + self.ahead < len(order):
                submit(order[i + self.ahead])
            positions = chunks[c]
            loaded = sorted(futures.pop(c).result(), key=lambda r: r[0])
            ok = [(positions[i], arr) for i, arr, err in loaded if arr is not None]
            errs = [(positions[i], err) for i, arr, err in loaded if arr is None]
            if ok:
                arrs = [a for _, a in ok]
                x = self.per_batch(arrs) if self.per_batch else torch.stack(arrs)
            else:
                x = None
            yield [p for p, _ in ok], x, errs

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def cache_key(model: Encoder, dataset: ImageDataset, precision: str) -> str:
    return digest([model.image_model, model.image_fingerprint, model.preprocess_id(), model.layer, precision, dataset.identity,
                   dataset.keys[:1], len(dataset)])


def encode_batch(model: Encoder, x: torch.Tensor, precision: str) -> torch.Tensor:
    """One forward pass of the image tower, channels-last, in the requested precision."""
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return model.encode_image(x).float()


def prepare_for_inference(model: Encoder) -> None:
    """Channels-last weights: oneDNN's fast path for convolutions (about 1.8x for EfficientNet-Lite0)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.Module) and not getattr(mod, "_cl_ready", False):
            mod.to(memory_format=torch.channels_last)
            mod._cl_ready = True


def embed(model: Encoder, dataset: ImageDataset, batch_size: int = 64, precision: str = "auto",
          use_cache: bool = True, strict: bool = False, show_progress: bool = True) -> Features:
    """Embed every image of `dataset` with `model`'s image tower, through the cache."""
    if not model.has_image:
        raise ConceptlensError(f"{model.name} has no image tower")
    if isinstance(model, MappedEncoder):  # reuse the base tower's cache and map rows on the way out
        base = embed(model.base, dataset, batch_size, precision, use_cache, strict, show_progress)
        return dataclasses.replace(base, X=model.map_features(base.X), model=model.name)
    precision = resolve_precision(precision)
    key = cache_key(model, dataset, precision)
    root = cache_dir("features") / key if use_cache else Path(os.environ.get("TMPDIR", "/tmp")) / f"conceptlens-{key}"
    meta_path = root / "meta.json"
    if use_cache and meta_path.exists():
        return _load(root, json.loads(meta_path.read_text()), dataset, model, hit=True)
    root.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    feats_path, state_path = root / "features.npy", root / "state.npy"
    dim = model.embed_dim
    if feats_path.exists() and state_path.exists():
        feats = np.lib.format.open_memmap(feats_path, mode="r+")
        state = np.lib.format.open_memmap(state_path, mode="r+")
        if feats.shape != (n, dim) or state.shape != (n,):
            feats = state = None
    else:
        feats = state = None
    if feats is None:
        feats = np.lib.format.open_memmap(feats_path, mode="w+", dtype=np.float32, shape=(n, dim))
        state = np.lib.format.open_memmap(state_path, mode="w+", dtype=np.uint8, shape=(n,))
    errors_path = root / "errors.jsonl"
    prepare_for_inference(model)
    batcher = ImageBatcher(model.preprocess, batch_size)
    offset = 0
    bar = progress(total=n, desc=f"embed {dataset.name} [{model.name}]", unit="img", disable=not show_progress or None)
    bar.update(int((state != PENDING).sum()))
    try:
        for shard in dataset.shards:
            rows = np.arange(offset, offset + len(shard.items))
            todo = [int(i) for i in np.nonzero(state[rows] == PENDING)[0]]
            for positions, x, errs in (batcher.batches(shard, todo) if todo else ()):
                if errs:
                    if strict:
                        raise ConceptlensError(f"unreadable image: {errs[0][1]} (drop --strict to skip it)")
                    with open(errors_path, "a", encoding="utf-8") as f:
                        for p, e in errs:
                            warnings.warn(f"skipped {e}", stacklevel=2)
                            f.write(json.dumps({"row": int(offset + p), "error": e}) + "\n")
                if x is not None:
                    feats[offset + np.asarray(positions)] = encode_batch(model, x, precision).numpy()
                    feats.flush()
                # Flags after data: a kill between the two only redoes this batch.
                state[offset + np.asarray(positions, dtype=np.int64)] = DONE
                state[offset + np.asarray([p for p, _ in errs], dtype=np.int64)] = SKIPPED
                state.flush()
                bar.update(len(positions) + len(errs))
            offset += len(shard.items)
    finally:
        bar.close()
        batcher.close()
    meta = {"model": model.name, "fingerprint": model.fingerprint, "layer": model.layer, "precision": precision,
            "preprocess": model.preprocess_id(), "dataset": dataset.name, "root": dataset.root,
            "identity": dataset.identity, "n": n, "dim": dim}
    atomic_write_json(meta_path, meta)
    out = _load(root, meta, dataset, model, hit=False)
    if not use_cache:
        out.X = np.array(out.X)
        shutil.rmtree(root, ignore_errors=True)
        out.path = None
    return out


def as_features(model: Encoder, data: ImageDataset | Features, **embed_kw) -> Features:
    """`data` itself when already embedded, else its (cached) embedding by `model`."""
    return data if isinstance(data, Features) else embed(model, data, **embed_kw)


def _load(root: Path, meta: dict, dataset: ImageDataset, model: Encoder, hit: bool) -> Features:
    feats = np.load(root / "features.npy", mmap_mode="r")
    state = np.load(root / "state.npy")
    skipped = []
    if (root / "errors.jsonl").exists():
        skipped = [json.loads(ln)["error"] for ln in (root / "errors.jsonl").read_text().splitlines() if ln.strip()]
    ok = state == DONE
    if ok.all():
        X, labels, keys = feats, dataset.labels, dataset.keys
    else:
        idx = np.nonzero(ok)[0]
        X, labels, keys = feats[idx], dataset.labels[idx], [dataset.keys[i] for i in idx]
    if hit and skipped:
        warnings.warn(f"{len(skipped)} unreadable images were skipped in {dataset.name} (see the JSON report)",
                      stacklevel=3)
    return Features(X, labels, keys, dataset.classnames, skipped, model.name, dataset.name, root, hit)


def embed_texts(model: Encoder, texts: Sequence[str], batch_size: int = 512, use_cache: bool = True) -> torch.Tensor:
    """Text embeddings [N, D] through the cache (caption banks are embedded once per model)."""
    texts = list(texts)
    path = cache_dir("text") / f"{digest([model.name, model.fingerprint, texts])}.npy"
    if use_cache and path.exists():
        return torch.from_numpy(np.load(path))
    out = torch.cat([model.encode_text(texts[i:i + batch_size]).float()
                     for i in progress(range(0, len(texts), batch_size), desc=f"embed texts [{model.name}]",
                                       unit="batch", leave=False)]) if texts else torch.zeros(0, model.embed_dim)
    if use_cache:
        atomic_save_npy(path, out.numpy())
    return out
