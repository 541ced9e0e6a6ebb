"""Feature extraction with a content-keyed, resumable, memory-mapped cache.

The cache key is model id + weights hash + preprocessing + layer + precision + device type (none for the
CPU) + the data files' identity. Rows are written batch by batch into a memory-mapped array with a per-row
done flag; a killed run resumes at the first unfinished batch. Batches have fixed boundaries inside each
shard, so a resumed run, and a Ray run (`engine=Engine("ray")`, units of whole batches through the same
`embed_batches`), compute exactly what an uninterrupted local one would. `meta.json` is written last,
atomically: its presence marks a complete entry. Caption banks go through the same kind of store in
chunks of whole batches (`embed_texts`).
"""
from __future__ import annotations

import dataclasses
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
from .data.exported import SIDE, read_embeddings, read_metadata, write_exported
from .engine import Engine, current
from .errors import ConceptlensError
from .io import atomic_save_npy, atomic_write_json, cache_dir, digest, progress
from .models import Encoder, MappedEncoder
from .runtime import autocast, cache_tag, decode_workers, default_batch_size, resolve_precision, to_device

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


def cache_key(model: Encoder, dataset: ImageDataset, precision: str, device: torch.device | None = None) -> str:
    return digest([model.image_model, model.image_fingerprint, model.preprocess_id(), model.layer, precision, dataset.identity,
                   dataset.keys[:1], len(dataset), *cache_tag(device or torch.device("cpu"))])


def encode_batch(model: Encoder, x: torch.Tensor, precision: str) -> torch.Tensor:
    """One forward pass of the image tower on the model's device, channels-last, in the requested precision;
    the result stays on the device."""
    x = to_device(x, model.device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(model.device, precision):
        return model.encode_image(x).float()


def embed_batches(model: Encoder, batcher: "ImageBatcher", shard: Shard, todo: list[int], precision: str
                  ) -> Iterator[tuple[list[int], np.ndarray | None, list[tuple[int, str]]]]:
    """(shard positions, features [k, D] as numpy, [(position, error)]) per batch of `todo`: the per-shard work
    the local path streams and a Ray unit collects. On an accelerator the copy back of batch i overlaps the
    forward pass of batch i+1 (pinned buffer, non-blocking copy, one event wait per batch, no device sync)."""
    prev = None
    for positions, x, errs in batcher.batches(shard, todo):
        if x is None:
            cur = (positions, None, errs, None)
        elif model.device.type == "cuda":
            out = encode_batch(model, x, precision)
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            cur = (positions, host, errs, event)
        else:
            cur = (positions, encode_batch(model, x, precision).cpu(), errs, None)
        if prev is not None:
            yield _finish(prev)
        prev = cur
    if prev is not None:
        yield _finish(prev)


def _finish(item) -> tuple[list[int], np.ndarray | None, list[tuple[int, str]]]:
    positions, host, errs, event = item
    if event is not None:
        event.synchronize()
    return positions, None if host is None else host.numpy(), errs


@dataclass(frozen=True)
class ImageUnit:
    """Work for one Ray task: some whole batches of one shard (rows from `offset`)."""

    offset: int
    shard: Shard
    todo: tuple[int, ...]
    batch_size: int
    precision: str


def embed_unit(model: Encoder, unit: ImageUnit) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """The pure per-unit function a Ray worker runs: dataset rows, their features, and errors by row."""
    prepare_for_inference(model)
    batcher = ImageBatcher(model.preprocess, unit.batch_size, workers=decode_workers(model.device))
    rows, feats, errs = [], [], []
    try:
        for positions, X, e in embed_batches(model, batcher, unit.shard, list(unit.todo), unit.precision):
            rows += [unit.offset + p for p in positions]
            if X is not None:
                feats.append(X)
            errs += [(unit.offset + p, msg) for p, msg in e]
    finally:
        batcher.close()
    X = np.concatenate(feats) if feats else np.zeros((0, model.embed_dim), np.float32)
    return np.asarray(rows, dtype=np.int64), X, errs


def image_units(dataset: ImageDataset, state: np.ndarray, batch_size: int, precision: str,
                batches_per_unit: int = 4) -> list[ImageUnit]:
    """The unfinished rows of every shard, cut at batch boundaries into units of `batches_per_unit` batches."""
    units, offset = [], 0
    span = batch_size * batches_per_unit
    for shard in dataset.shards:
        pending = np.nonzero(state[offset:offset + len(shard.items)] == PENDING)[0]
        for start in range(0, len(shard.items), span):
            todo = tuple(int(p) for p in pending[(pending >= start) & (pending < start + span)])
            if todo:
                units.append(ImageUnit(offset, shard, todo, batch_size, precision))
        offset += len(shard.items)
    return units


def prepare_for_inference(model: Encoder) -> None:
    """Channels-last weights: oneDNN's fast path for convolutions (about 1.8x for EfficientNet-Lite0).
    Done on every call (a no-op when already so): a model unpickled on a Ray worker arrives contiguous."""
    for mod in model.modules():
        mod.to(memory_format=torch.channels_last)


def embed(model: Encoder, dataset: ImageDataset, batch_size: int | None = None, precision: str = "auto",
          use_cache: bool = True, strict: bool = False, show_progress: bool = True,
          device: str | torch.device | None = None, engine: Engine | None = None) -> Features:
    """Embed every image of `dataset` with `model`'s image tower, through the cache.

    `device` (default: where the model is) moves the model there; `engine` runs the work on Ray instead of in
    this process (same rows, same cache). `batch_size` None = 64 on the CPU, 256 on an accelerator."""
    if not model.has_image:
        raise ConceptlensError(f"{model.name} has no image tower")
    if isinstance(model, MappedEncoder):  # reuse the base tower's cache and map rows on the way out
        base = embed(model.base, dataset, batch_size, precision, use_cache, strict, show_progress, device, engine)
        if device is not None:
            model.to(device)
        return dataclasses.replace(base, X=model.map_features(base.X), model=model.name)
    engine = engine or current()
    dev = engine.resolve_device(device) if device is not None else model.device
    if not engine.is_ray:
        model.to(dev)
    precision = resolve_precision(precision, dev)
    batch_size = batch_size or default_batch_size(dev, 64)
    if dataset.precomputed and (stored := _stored(model, dataset, precision)) is not None:
        return stored
    key = cache_key(model, dataset, precision, dev)
    root = cache_dir("features") / key if use_cache else Path(os.environ.get("TMPDIR", "/tmp")) / f"conceptlens-{key}"
    meta_path = root / "meta.json"
    if use_cache and meta_path.exists():
        return _load(root, json.loads(meta_path.read_text()), dataset, model, hit=True)
    n, dim = len(dataset), model.embed_dim
    feats, state = open_store(root, n, dim)
    errors_path = root / "errors.jsonl"
    bar = progress(total=n, desc=f"embed {dataset.name} [{model.name}]", unit="img", disable=not show_progress or None)
    bar.update(int((state != PENDING).sum()))

    def write(rows: np.ndarray, X: np.ndarray | None, errs: list[tuple[int, str]]) -> None:
        if errs:
            if strict:
                raise ConceptlensError(f"unreadable image: {errs[0][1]} (drop --strict to skip it)")
            with open(errors_path, "a", encoding="utf-8") as f:
                for r, e in errs:
                    warnings.warn(f"skipped {e}", stacklevel=3)
                    f.write(json.dumps({"row": int(r), "error": e}) + "\n")
        if X is not None and len(rows):
            feats[rows] = X
            feats.flush()
        # Flags after data: a kill between the two only redoes this batch.
        state[rows] = DONE
        state[np.asarray([r for r, _ in errs], dtype=np.int64)] = SKIPPED
        state.flush()
        bar.update(len(rows) + len(errs))

    try:
        if engine.is_ray:
            units = image_units(dataset, state, batch_size, precision)
            payload_key = digest([model_identity(model, precision), str(dev)])  # warm workers keep it across jobs
            for _, (rows, X, errs) in engine.map(embed_unit, model, payload_key, units, dev):
                write(rows, X, errs)
        else:
            _embed_local(model, dataset, state, batch_size, precision, write)
    finally:
        bar.close()
    meta = {"model": model.name, "fingerprint": model.fingerprint, "layer": model.layer, "precision": precision,
            "device": dev.type, "preprocess": model.preprocess_id(), "dataset": dataset.name, "root": dataset.root,
            "identity": dataset.identity, "n": n, "dim": dim}
    atomic_write_json(meta_path, meta)
    out = _load(root, meta, dataset, model, hit=False)
    if not use_cache:
        out.X = np.array(out.X)
        shutil.rmtree(root, ignore_errors=True)
        out.path = None
    return out


def _embed_local(model: Encoder, dataset: ImageDataset, state: np.ndarray, batch_size: int, precision: str,
                 write: Callable) -> None:
    """This process: every shard's unfinished rows, batch by batch, decoding ahead in threads."""
    prepare_for_inference(model)
    batcher = ImageBatcher(model.preprocess, batch_size, workers=decode_workers(model.device))
    offset = 0
    try:
        for shard in dataset.shards:
            todo = [int(i) for i in np.nonzero(state[offset:offset + len(shard.items)] == PENDING)[0]]
            for positions, X, errs in (embed_batches(model, batcher, shard, todo, precision) if todo else ()):
                write(offset + np.asarray(positions, dtype=np.int64), X, [(offset + p, e) for p, e in errs])
            offset += len(shard.items)
    finally:
        batcher.close()


def open_store(root: Path, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The resumable store of a cache entry: memory-mapped features [n, dim] and a per-row state flag."""
    root.mkdir(parents=True, exist_ok=True)
    feats_path, state_path = root / "features.npy", root / "state.npy"
    if feats_path.exists() and state_path.exists():
        feats = np.lib.format.open_memmap(feats_path, mode="r+")
        state = np.lib.format.open_memmap(state_path, mode="r+")
        if feats.shape == (n, dim) and state.shape == (n,):
            return feats, state
    feats = np.lib.format.open_memmap(feats_path, mode="w+", dtype=np.float32, shape=(n, dim))
    state = np.lib.format.open_memmap(state_path, mode="w+", dtype=np.uint8, shape=(n,))
    return feats, state


def model_identity(model: Encoder, precision: str) -> dict:
    """What image features depend on: an export is reused only for the same identity."""
    return {"image_model": model.image_model, "fingerprint": model.image_fingerprint, "layer": model.layer,
            "preprocess": model.preprocess_id(), "precision": precision}


def export(feats: Features, dataset: ImageDataset, model: Encoder, out: Path | str, precision: str = "auto",
           rows_per_file: int = 100_000) -> list[Path]:
    """Write `feats` (of `dataset` by `model`) in clip-retrieval's layout (see conceptlens.data.exported)."""
    where = {}
    offset = 0
    for sh in dataset.shards:
        for j, item in enumerate(sh.items):
            where[dataset.keys[offset + j]] = item if sh.kind == "files" else f"{sh.source}:{item}" if sh.kind == "array" \
                else f"{sh.source}:{dataset.keys[offset + j]}"
        offset += len(sh.items)
    side = {"model": model.name, "identity": model_identity(model, resolve_precision(precision, model.device)),
            "skipped": feats.skipped,
            "dataset": {"name": dataset.name, "root": dataset.root, "identity": dataset.identity,
                        "classnames": dataset.classnames, "keys": dataset.keys, "labels": dataset.labels.tolist(),
                        "shards": [{"kind": s.kind, "source": s.source, "items": list(s.items)} for s in dataset.shards]}}
    return write_exported(Path(out), np.asarray(feats.X), list(feats.keys), [str(where[k]) for k in feats.keys],
                          np.asarray(feats.labels), dataset.classnames, side, rows_per_file)


def _stored(model: Encoder, dataset: ImageDataset, precision: str) -> Features | None:
    """The rows of a clip-retrieval export of `dataset`, when it was made by this model (else None: embed)."""
    side = json.loads((Path(dataset.precomputed) / SIDE).read_text())
    if side.get("identity") != model_identity(model, precision):
        return None
    keys = [str(k) for k in read_metadata(Path(dataset.precomputed))["key"]]
    row = {k: i for i, k in enumerate(dataset.keys)}
    return Features(read_embeddings(Path(dataset.precomputed)), dataset.labels[[row[k] for k in keys]], keys,
                    dataset.classnames, side.get("skipped", []), model.name, dataset.name, Path(dataset.precomputed), True)


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


def embed_text_chunk(model: Encoder, chunk: tuple[list[str], int]) -> np.ndarray:
    """The pure per-chunk function (local and Ray): texts embedded in batches of the given size, as numpy."""
    texts, batch_size = chunk
    with torch.inference_mode():
        return torch.cat([model.encode_text(texts[i:i + batch_size]).float()
                          for i in range(0, len(texts), batch_size)]).cpu().numpy()


def embed_texts(model: Encoder, texts: Sequence[str], batch_size: int = 512, use_cache: bool = True,
                device: str | torch.device | None = None, engine: Engine | None = None,
                show_progress: bool = True, batches_per_chunk: int = 8) -> torch.Tensor:
    """Text embeddings [N, D] (on the CPU) through the cache: caption banks are embedded once per model.

    Long lists go chunk by chunk (whole batches, so results do not depend on chunking) into a resumable
    store: a killed run, local or Ray, redoes only unfinished chunks."""
    texts = list(texts)
    engine = engine or current()
    dev = engine.resolve_device(device) if device is not None else model.device
    if not engine.is_ray:
        model.to(dev)
    span = batch_size * batches_per_chunk
    starts = list(range(0, len(texts), span))
    far = engine.is_ray and len(starts) > 1  # a handful of prompts runs here: a Ray round trip would cost more
    if not far:
        dev = model.device
    key = digest([model.name, model.fingerprint, texts, *cache_tag(dev)])
    path = cache_dir("text") / f"{key}.npy"
    if use_cache and path.exists():
        return torch.from_numpy(np.load(path))
    if not texts:
        return torch.zeros(0, model.embed_dim)
    if len(starts) == 1:
        out = embed_text_chunk(model, (texts, batch_size))
    else:
        root = path.with_suffix(".partial") if use_cache else Path(os.environ.get("TMPDIR", "/tmp")) / f"conceptlens-text-{key}"
        feats, state = open_store(root, len(texts), model.embed_dim)
        todo = [s for s in starts if (state[s:s + span] == PENDING).any()]
        units = [(texts[s:s + span], batch_size) for s in todo]
        bar = progress(total=len(texts), desc=f"embed texts [{model.name}]", unit="text",
                       disable=not show_progress or None, leave=False)
        bar.update(int((state == DONE).sum()))
        try:
            for i, X in engine.map(embed_text_chunk, model, f"{model.name}:{model.fingerprint}:{dev}", units, dev):
                s = todo[i]
                feats[s:s + len(X)] = X
                feats.flush()
                state[s:s + len(X)] = DONE
                state.flush()
                bar.update(len(X))
        finally:
            bar.close()
        out = np.array(feats)
        if use_cache:
            atomic_save_npy(path, out)
        shutil.rmtree(root, ignore_errors=True)
        return torch.from_numpy(out)
    if use_cache:
        atomic_save_npy(path, out)
    return torch.from_numpy(out)
