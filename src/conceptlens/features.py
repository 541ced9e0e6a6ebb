"""Feature extraction with a content-keyed, resumable, memory-mapped cache.

The cache key is model id + weights hash + preprocessing + layer + precision (+ backend) + device type (none for the
CPU) + the data files' identity. Rows are written batch by batch into a memory-mapped array with a per-row
done flag; a killed run resumes at the first unfinished batch. Batches have fixed boundaries inside each
shard, so a resumed run, and a Ray run (`engine=Engine("ray")`, units of whole batches through the same
`embed_batches`), compute exactly what an uninterrupted local one would. `meta.json` is written last,
atomically: its presence marks a complete entry. Caption banks go through the same kind of store in
chunks of whole batches (`embed_texts`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import mmap
import os
import shutil
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import filelock
import numpy as np
import torch

from .data import DECODE_VERSION, ImageDataset, Shard, iter_shard
from .data.exported import SIDE, read_embeddings, read_metadata, write_exported
from .engine import Engine, current
from .errors import ConceptlensError
from .io import atomic_save_npy, atomic_write_json, cache_dir, digest, progress
from .models import Encoder, MappedEncoder
from .models.vision import Compose, is_normalize, is_to_tensor, pipeline_steps
from .runtime import (autocast, cache_tag, decode_workers, default_batch_size, resolve_backend, resolve_precision,
                      to_device, tune_allocator)

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
    """Split a Compose pipeline (ours or torchvision's) at ToTensor: PIL work per image, tensor work once per batch.

    Returns (per_image, per_batch). per_image gives uint8 HWC arrays when the split applies; per_batch turns
    them into a float NCHW batch through a per-channel table of the 256 possible values, computed with the very
    ops ToTensor + Normalize apply (so bit-identical to them), 3x faster than converting and normalising.
    """
    steps = pipeline_steps(preprocess)
    if steps is not None:
        cut = next((i for i, s in enumerate(steps) if is_to_tensor(s)), None)
        if cut is not None and all(is_normalize(s) for s in steps[cut + 1:]):
            pil_steps, tensor_steps = Compose(steps[:cut]), steps[cut + 1:]
            tables: dict[int, np.ndarray] = {}

            def per_image(im):
                return np.asarray(pil_steps(im), dtype=np.uint8)

            def table(channels: int) -> np.ndarray:
                if channels not in tables:
                    t = torch.arange(256, dtype=torch.float32).div_(255.0).view(1, 1, 256, 1)
                    t = t.expand(1, channels, 256, 1).contiguous()
                    for s in tensor_steps:
                        t = s(t)
                    tables[channels] = t[0, :, :, 0].numpy().copy()
                return tables[channels]

            def per_batch(arrs: list[np.ndarray]) -> torch.Tensor:
                h, w, c = arrs[0].shape
                lut, out = table(c), np.empty((len(arrs), c, h, w), np.float32)
                for i, a in enumerate(arrs):
                    for ch in range(c):
                        np.take(lut[ch], a[..., ch], out=out[i, ch])
                return torch.from_numpy(out)

            return per_image, per_batch
    return preprocess, None


class ImageBatcher:
    """Decode + preprocess images of one shard in a thread pool, yielding fixed-boundary batches."""

    def __init__(self, preprocess, batch_size: int, workers: int = 2, ahead: int = 2):
        self.per_image, self.per_batch = split_preprocess(preprocess)
        self.batch_size, self.ahead = batch_size, ahead
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def _load(self, shard: Shard, positions: list[int]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        """One batch, decoded and assembled in a pool thread (off the thread that runs the model)."""
        loaded = sorted(((pos, None if im is None else self.per_image(im), err) for pos, im, err in iter_shard(shard)),
                        key=lambda r: r[0])
        ok = [(positions[i], arr) for i, arr, err in loaded if arr is not None]
        errs = [(positions[i], err) for i, arr, err in loaded if arr is None]
        if not ok:
            return [], None, errs
        arrs = [a for _, a in ok]
        return [p for p, _ in ok], self.per_batch(arrs) if self.per_batch else torch.stack(arrs), errs

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
                                                            tuple(shard.items[p] for p in chunks[c])), chunks[c])

        for c in order[:self.ahead]:
            submit(c)
        for i, c in enumerate(order):
            if i + self.ahead < len(order):
                submit(order[i + self.ahead])
            yield futures.pop(c).result()

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


def cache_key(model: Encoder, dataset: ImageDataset, precision: str, device: torch.device | None = None) -> str:
    return digest([model.image_model, model.image_fingerprint, model.preprocess_id(), model.layer, precision, dataset.identity,
                   dataset.keys[:1], len(dataset), DECODE_VERSION, *cache_tag(device or torch.device("cpu"))])


def encode_batch(model: Encoder, x: torch.Tensor, precision: str) -> torch.Tensor:
    """One forward pass of the image tower on the model's device, channels-last, in the requested precision
    ("fp32/onnxruntime": through the exported tower, see `embed`); the result stays on the device."""
    precision, _, backend = precision.partition("/")
    if backend in ("onnxruntime", "openvino"):
        from .models import onnx
        path = onnx.export(model, tuple(x.shape[1:]))
        if path is None:
            raise ConceptlensError(f"{model.name} does not export to ONNX: use --backend torch")
        return onnx.run(path, x) if backend == "onnxruntime" else onnx.run_openvino(path, x, precision)
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


def whole_batches(pending: np.ndarray, n: int, batch_size: int) -> list[int]:
    """Every position of each batch that has a pending row: a batch is always recomputed whole, because fp32
    results depend on the batch's composition (a row recomputed alone differs in the last bits)."""
    out: list[int] = []
    for b in np.unique(np.asarray(pending, dtype=np.int64) // batch_size):
        out += range(int(b) * batch_size, min(n, (int(b) + 1) * batch_size))
    return out


def image_units(dataset: ImageDataset, state: np.ndarray, batch_size: int, precision: str, workers: int = 1,
                batches_per_unit: int | None = None) -> list[ImageUnit]:
    """The unfinished rows of every shard, cut at batch boundaries into units of whole batches. Default size:
    about three units per worker (each unit starts its decoding pipeline afresh, and with one unit in flight per
    worker the worker waits for the next; fewer, larger units cost less), 2 to 32 batches, so resume keeps a
    fine grain."""
    if batches_per_unit is None:
        pending_batches = math.ceil(int((state == PENDING).sum()) / batch_size)
        batches_per_unit = min(32, max(2, math.ceil(pending_batches / (3 * workers))))
    units, offset = [], 0
    span = batch_size * batches_per_unit
    for shard in dataset.shards:
        pending = np.asarray(whole_batches(np.nonzero(state[offset:offset + len(shard.items)] == PENDING)[0],
                                           len(shard.items), batch_size), dtype=np.int64)
        for start in range(0, len(shard.items), span):
            todo = tuple(int(p) for p in pending[(pending >= start) & (pending < start + span)])
            if todo:
                units.append(ImageUnit(offset, shard, todo, batch_size, precision))
        offset += len(shard.items)
    return units


def prepare_for_inference(model: Encoder) -> None:
    """Channels-last weights: oneDNN's fast path for convolutions (about 1.8x for EfficientNet-Lite0).
    Done on every call (a no-op when already so): a model unpickled on a Ray worker arrives contiguous. Also
    keeps the process's freed buffers mapped (`runtime.tune_allocator`)."""
    tune_allocator()
    for mod in model.modules():
        mod.to(memory_format=torch.channels_last)


def compute_mode(model: Encoder, device: torch.device, precision: str, backend: str = "auto",
                 requested: str | None = None) -> str:
    """How `embed` computes on `device` at a resolved precision: "fp32", "bf16", ... for torch, "fp32/onnxruntime"
    for ONNX Runtime, "fp32/openvino" / "bf16/openvino" for OpenVINO (the tower exported on first use). The mode is
    part of the cache key, the store's metadata and results. Under `--precision auto --backend auto` on a CPU
    with native bf16 (`requested` "auto", `precision` resolved to bf16), ONNX Runtime fp32 comes first where the
    model exports: fp32's features, and faster than bf16 autocast (embed_speed.json)."""
    if requested == "auto" and backend == "auto" and precision == "bf16" and device.type == "cpu":
        if (mode := compute_mode(model, device, "fp32", backend)) != "fp32":
            return mode
    runtime = resolve_backend(backend, device, precision)
    if runtime in ("onnxruntime", "openvino"):
        from .models import onnx
        if onnx.export(model, onnx.input_shape(model)) is not None:  # once per model; then a file check
            return f"{precision}/{runtime}"
        if backend == runtime:
            raise ConceptlensError(f"{model.name} does not export to ONNX: use --backend torch")
    return precision


def embed(model: Encoder, dataset: ImageDataset, batch_size: int | None = None, precision: str = "auto",
          use_cache: bool = True, strict: bool = False, show_progress: bool = True,
          device: str | torch.device | None = None, engine: Engine | None = None, backend: str = "auto") -> Features:
    """Embed every image of `dataset` with `model`'s image tower, through the cache.

    `device` (default: where the model is) moves the model there; `engine` runs the work on Ray instead of in
    this process (same rows, same cache). `batch_size` None = 64 on the CPU, 256 on an accelerator. `backend`
    (see `conceptlens.runtime`): auto = ONNX Runtime for fp32 on the CPU where the model exports, else torch."""
    if not model.has_image:
        raise ConceptlensError(f"{model.name} has no image tower")
    if isinstance(model, MappedEncoder):  # reuse the base tower's cache and map rows on the way out
        base = embed(model.base, dataset, batch_size, precision, use_cache, strict, show_progress, device, engine,
                     backend)
        if device is not None:
            model.to(device)
        return dataclasses.replace(base, X=model.map_features(base.X), model=model.name)
    engine = engine or current()
    dev = engine.resolve_device(device) if device is not None else model.device
    if not engine.is_ray:
        model.to(dev)
    requested, precision = precision, resolve_precision(precision, dev)
    batch_size = batch_size or default_batch_size(dev, 64)
    if dataset.precomputed and (stored := _stored(model, dataset, precision)) is not None:
        return stored
    precision = compute_mode(model, dev, precision, backend, requested)
    key = cache_key(model, dataset, precision, dev)
    n, dim = len(dataset), model.embed_dim
    if not use_cache:  # a private temp dir: two --no-cache runs never share (or delete) each other's
        with tempfile.TemporaryDirectory(prefix=f"conceptlens-{key[:12]}-") as tmp:
            out = _compute(model, dataset, Path(tmp), key, n, dim, batch_size, precision, dev, engine, strict, show_progress)
            out.X, out.path = np.array(out.X), None
            return out
    root = cache_dir("features") / key
    if (hit := _verified_hit(root, key, dataset, model, n, dim)) is not None:
        return hit
    with entry_lock(root):  # concurrent runs on one entry: one computes, the others wait and read it
        if (hit := _verified_hit(root, key, dataset, model, n, dim)) is not None:
            return hit
        return _compute(model, dataset, root, key, n, dim, batch_size, precision, dev, engine, strict, show_progress)


def _verified_hit(root: Path, key: str, dataset: ImageDataset, model: Encoder, n: int, dim: int) -> Features | None:
    """The complete entry at `root` if it passes verification; a failed one is reopened for recomputation."""
    if not (root / "meta.json").exists():
        return None
    problem = Store.problem(root, n, dim)
    if problem is None:
        return _load(root, dataset, model, hit=True)
    warnings.warn(f"feature cache entry {key[:12]} failed verification ({problem}): recomputing what is wrong",
                  stacklevel=3)
    (root / "meta.json").unlink(missing_ok=True)
    return None


@contextlib.contextmanager
def entry_lock(root: Path):
    """An exclusive lock beside a cache entry (released by the OS if the holder dies)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(root) + ".lock")
    try:
        lock.acquire(timeout=0.5)
    except filelock.Timeout:
        warnings.warn(f"another process is computing {root.name[:12]}: waiting for it", stacklevel=4)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _compute(model: Encoder, dataset: ImageDataset, root: Path, key: str, n: int, dim: int, batch_size: int,
             precision: str, dev: torch.device, engine: Engine, strict: bool, show_progress: bool) -> Features:
    store = Store(root, n, dim)
    redo = store.verify()
    if redo:
        warnings.warn(f"{redo} cached rows of {key[:12]} failed their checksum: recomputing them", stacklevel=4)
    bar = progress(total=n, desc=f"embed {dataset.name} [{model.name}]", unit="img", disable=not show_progress or None)
    bar.update(int((store.state != PENDING).sum()))

    def write(rows: np.ndarray, X: np.ndarray | None, errs: list[tuple[int, str]]) -> None:
        if errs and strict:
            raise ConceptlensError(f"unreadable image: {errs[0][1]} (drop --strict to skip it)")
        for _, e in errs:
            warnings.warn(f"skipped {e}", stacklevel=3)
        if X is not None and len(rows):
            if not np.isfinite(X).all():
                raise ConceptlensError(f"{model.name} gave NaN/inf features under {precision}; use --precision fp32")
            store.write(rows, X)
        store.skip(errs)
        bar.update(len(rows) + len(errs))

    try:
        if engine.is_ray:
            units = image_units(dataset, store.state, batch_size, precision, engine.worker_count(dev))
            payload_key = digest([model_identity(model, precision), str(dev)])  # warm workers keep it across jobs
            for _, (rows, X, errs) in engine.map(embed_unit, model, payload_key, units, dev):
                write(rows, X, errs)
        else:
            _embed_local(model, dataset, store.state, batch_size, precision, write)
    finally:
        bar.close()
    store.complete({"model": model.name, "fingerprint": model.fingerprint, "layer": model.layer, "precision": precision,
                    "device": dev.type, "preprocess": model.preprocess_id(), "dataset": dataset.name,
                    "root": dataset.root, "identity": dataset.identity, "n": n, "dim": dim})
    return _load(root, dataset, model, hit=False)


def _embed_local(model: Encoder, dataset: ImageDataset, state: np.ndarray, batch_size: int, precision: str,
                 write: Callable) -> None:
    """This process: every shard's unfinished rows, batch by batch, decoding ahead in threads."""
    prepare_for_inference(model)
    batcher = ImageBatcher(model.preprocess, batch_size, workers=decode_workers(model.device))
    offset = 0
    try:
        for shard in dataset.shards:
            todo = whole_batches(np.nonzero(state[offset:offset + len(shard.items)] == PENDING)[0], len(shard.items),
                                 batch_size)
            for positions, X, errs in (embed_batches(model, batcher, shard, todo, precision) if todo else ()):
                write(offset + np.asarray(positions, dtype=np.int64), X, [(offset + p, e) for p, e in errs])
            offset += len(shard.items)
    finally:
        batcher.close()


FORMAT = 2  # of a cache entry; other formats are recomputed


def row_crc(X: np.ndarray) -> np.ndarray:
    """CRC32 of every float32 row: what a cache entry checks its rows against."""
    X = np.ascontiguousarray(X, np.float32)
    return np.fromiter((zlib.crc32(r) for r in X), dtype=np.uint32, count=len(X))


class Store:
    """A resumable, self-verifying cache entry: features [n, dim] (memory-mapped; disk space reserved up front,
    so a full disk is an error at the start, never a SIGBUS later), a per-row state flag, a per-row CRC32, skip
    messages by row (`errors.jsonl`, idempotent), and `meta.json` written last with the format and the CRC of
    the CRCs. Rows are written data first, checksum second, flag last."""

    def __init__(self, root: Path, n: int, dim: int):
        self.root, self.n, self.dim = root, n, dim
        root.mkdir(parents=True, exist_ok=True)
        self.feats, self.state, self.crc = self._open()

    def _paths(self) -> tuple[Path, Path, Path]:
        return self.root / "features.npy", self.root / "state.npy", self.root / "crc.npy"

    def _open(self):
        fp, sp, cp = self._paths()
        if fp.exists() and sp.exists() and cp.exists():
            try:
                f = np.lib.format.open_memmap(fp, mode="r+")
                st = np.lib.format.open_memmap(sp, mode="r+")
                c = np.lib.format.open_memmap(cp, mode="r+")
                if f.shape == (self.n, self.dim) and f.dtype == np.float32 and st.shape == c.shape == (self.n,):
                    st[st > SKIPPED] = PENDING  # garbled flags: redo those rows
                    return f, st, c
            except (OSError, ValueError, EOFError):
                pass
            warnings.warn(f"cache files in {self.root} were unreadable or of another shape: starting the entry again",
                          stacklevel=4)
        need = self.n * (self.dim * 4 + 5) + (1 << 20)
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise ConceptlensError(f"not enough disk space for the feature cache in {self.root}: needs "
                                   f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free (set CONCEPTLENS_CACHE elsewhere)")
        for p in (self.root / "errors.jsonl", self.root / "meta.json"):
            p.unlink(missing_ok=True)
        f = np.lib.format.open_memmap(fp, mode="w+", dtype=np.float32, shape=(self.n, self.dim))
        try:
            with open(fp, "r+b") as fh:
                os.posix_fallocate(fh.fileno(), 0, os.path.getsize(fp))
        except (AttributeError, OSError) as exc:  # no fallocate (macOS) or the disk filled meanwhile
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise ConceptlensError(f"disk full while reserving the feature cache in {self.root}") from None
        st = np.lib.format.open_memmap(sp, mode="w+", dtype=np.uint8, shape=(self.n,))
        c = np.lib.format.open_memmap(cp, mode="w+", dtype=np.uint32, shape=(self.n,))
        return f, st, c

    def verify(self) -> int:
        """Flag rows marked done whose checksum fails as pending again; returns how many."""
        bad = _bad_rows(self.feats, self.state, self.crc)
        self.state[bad] = PENDING
        self.state.flush()
        return len(bad)

    def write(self, rows: np.ndarray, X: np.ndarray) -> None:
        self.feats[rows] = X
        self.feats.flush()
        _release(self.feats)
        self.crc[rows] = row_crc(X)
        self.crc.flush()
        self.state[rows] = DONE
        self.state.flush()

    def skip(self, errs: list[tuple[int, str]]) -> None:
        if not errs:
            return
        with open(self.root / "errors.jsonl", "a", encoding="utf-8") as f:
            for r, e in errs:
                f.write(json.dumps({"row": int(r), "error": e}) + "\n")
        self.state[np.asarray([r for r, _ in errs], dtype=np.int64)] = SKIPPED
        self.state.flush()

    def complete(self, meta: dict) -> None:
        atomic_write_json(self.root / "meta.json", meta | {"format": FORMAT, "crc": zlib.crc32(np.asarray(self.crc).tobytes())})

    @staticmethod
    def problem(root: Path, n: int, dim: int) -> str | None:
        """Why the entry at `root` is not a complete, intact one (None when it is)."""
        try:
            meta = json.loads((root / "meta.json").read_text())
            if meta.get("format") != FORMAT:
                return f"format {meta.get('format', 1)}, this version writes {FORMAT}"
            feats = np.load(root / "features.npy", mmap_mode="r", allow_pickle=False)
            state = np.load(root / "state.npy", allow_pickle=False)
            crc = np.load(root / "crc.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError, AttributeError) as exc:
            return f"unreadable: {type(exc).__name__}"
        if feats.shape != (n, dim) or state.shape != (n,) or crc.shape != (n,):
            return "arrays of the wrong shape"
        if (state == PENDING).any() or (state > SKIPPED).any():
            return f"{int((state != DONE).sum() - (state == SKIPPED).sum())} rows unfinished"
        if zlib.crc32(crc.tobytes()) != meta.get("crc"):
            return "checksum table does not match meta.json"
        bad = _bad_rows(feats, state, crc)
        return f"{len(bad)} rows fail their checksum" if len(bad) else None


def _release(arr: np.ndarray) -> None:
    """Drop a flushed memory-mapped array's pages from this process's resident set (they stay in the file and the
    page cache): otherwise RSS grows by every feature written, 5 KB an image at 1,280 dims (measured)."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED)


def _bad_rows(feats: np.ndarray, state: np.ndarray, crc: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Rows flagged done whose features do not match their CRC32 (read in chunks: bounded memory)."""
    done = np.nonzero(state == DONE)[0]
    bad = [done[i:i + chunk][row_crc(feats[done[i:i + chunk]]) != crc[done[i:i + chunk]]] for i in range(0, len(done), chunk)]
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


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


def _load(root: Path, dataset: ImageDataset, model: Encoder, hit: bool) -> Features:
    feats = np.load(root / "features.npy", mmap_mode="r")
    state = np.load(root / "state.npy")
    by_row: dict[int, str] = {}
    if (root / "errors.jsonl").exists():
        for ln in (root / "errors.jsonl").read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(ln)
                by_row[int(rec["row"])] = str(rec["error"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn line from a killed run: the state flags are the truth
    skipped_rows = np.nonzero(state == SKIPPED)[0]
    skipped = [by_row.get(int(r), f"{dataset.keys[r]}: unreadable") for r in skipped_rows]
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


def text_cache_key(model: Encoder, texts: Sequence[str], device: torch.device | None = None) -> str:
    """The text cache entry of `texts` (`TEXT_CACHE/KEY.npy`; `KEY.partial/` while being computed)."""
    return digest([model.text_model, model.text_fingerprint, list(texts), "length-sorted",
                   *cache_tag(device or torch.device("cpu"))])


def _unsort(X: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(X)
    out[order] = X
    return out


def embed_texts(model: Encoder, texts: Sequence[str], batch_size: int = 512, use_cache: bool = True,
                device: str | torch.device | None = None, engine: Engine | None = None,
                show_progress: bool = True, batches_per_chunk: int = 8) -> torch.Tensor:
    """Text embeddings [N, D] (on the CPU) through the cache, keyed on the text tower (`Encoder.text_model` and
    `text_fingerprint`): a caption bank is embedded once per text tower, whatever aligner or image model is in front.

    Lists longer than a batch go batch by batch (chunks of whole batches on Ray, so results do not depend on
    chunking) into a resumable store, with progress: a killed run, local or Ray, redoes only unfinished batches."""
    texts = list(texts)
    engine = engine or current()
    dev = engine.resolve_device(device) if device is not None else model.device
    if not engine.is_ray:
        model.to(dev)
    span = batch_size * (batches_per_chunk if engine.is_ray else 1)  # here: one batch per unit, resumable and shown
    starts = list(range(0, len(texts), span))
    far = engine.is_ray and len(starts) > 1  # a handful of prompts runs here: a Ray round trip would cost more
    if not far:
        dev = model.device
    key = text_cache_key(model, texts, dev)
    path = cache_dir("text") / f"{key}.npy"
    if use_cache and path.exists():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.shape == (len(texts), model.embed_dim) and np.isfinite(cached).all():
                return torch.from_numpy(cached)
        except (OSError, ValueError, EOFError):
            pass
        warnings.warn(f"text cache {path.name} is damaged: recomputing it", stacklevel=2)
    if not texts:
        return torch.zeros(0, model.embed_dim)
    # shortest first: batches of similar lengths pad less (MiniLM on caption banks: 125 -> 180 texts/s here)
    order = np.argsort([len(t) for t in texts], kind="stable")
    texts = [texts[i] for i in order]
    if len(starts) == 1:
        out = _unsort(embed_text_chunk(model, (texts, batch_size)), order)
    else:
        with contextlib.ExitStack() as stack:
            if use_cache:
                root = path.with_suffix(".partial")
                stack.enter_context(entry_lock(root))
                if path.exists():  # another process finished it while this one waited
                    return torch.from_numpy(np.load(path, allow_pickle=False))
            else:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"conceptlens-text-{key[:12]}-")))
            store = Store(root, len(texts), model.embed_dim)
            store.verify()
            todo = [s for s in starts if (store.state[s:s + span] == PENDING).any()]
            units = [(texts[s:s + span], batch_size) for s in todo]
            bar = progress(total=len(texts), desc=f"embed texts [{model.name}]", unit="text",
                           disable=not show_progress or None, leave=False)
            bar.update(int((store.state == DONE).sum()))
            try:
                for i, X in engine.map(embed_text_chunk, model, f"{model.text_model}:{model.text_fingerprint}:{dev}", units, dev):
                    store.write(np.arange(todo[i], todo[i] + len(X)), X)
                    bar.update(len(X))
            finally:
                bar.close()
            out = _unsort(np.array(store.feats), order)
            if use_cache:
                atomic_save_npy(path, out)
                shutil.rmtree(root, ignore_errors=True)
        return torch.from_numpy(out)
    if use_cache:
        atomic_save_npy(path, out)
    return torch.from_numpy(out)
