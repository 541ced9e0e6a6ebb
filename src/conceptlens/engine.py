"""Where heavy per-shard work runs: in this process (`local`) or on a Ray cluster (`ray`).

Callers cut their work into units (a shard's batches, a chunk of captions, a few images) and give a pure
module-level function `fn(payload, unit) -> result`, where the payload is a model with `to(device)`; the local
path calls the same function. On Ray each
unit is one task (`num_cpus` per worker, one GPU per worker on CUDA); at most `workers` run at once, and
results come back as they finish, so the caller writes each to its resumable store and a killed driver
redoes only unfinished units. A worker that dies is retried by Ray (`max_retries`) and, `fn` being pure,
the result is unchanged. The payload (a model) is put in the object store once and kept per worker
process by its key, so a warm cluster does not reload it between jobs.

Ray tasks rather than Ray Data actors: on this 2-core machine tasks measured faster to start (no actor
pool or dataset planning) and give exact control over units, which resume and retry depend on.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .errors import ConceptlensError
from .runtime import parse_device, resolve_device

ENGINES = ("local", "ray")
_CURRENT: contextvars.ContextVar["Engine | None"] = contextvars.ContextVar("conceptlens_engine", default=None)
_PAYLOADS: dict[str, Any] = {}  # per worker process: payload key -> materialised payload on its device


@dataclass(frozen=True)
class Engine:
    """`local` (this process) or `ray` (`address` None = start a local cluster; `workers` None = one per CPU,
    or one per GPU on CUDA).

    `threads` defaults to the driver's torch thread count because oneDNN's fp32 results depend on it (a batch
    of 4 differs in the 6th digit between 1 and 2 threads): equal counts make Ray bit-identical to local. Set
    `threads=cpus_per_worker` for throughput on many-core nodes (results then agree to ~1e-6, not bit for bit)."""

    kind: str = "local"
    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    threads: int | None = None  # torch threads per worker; None = this process's count (see below)
    max_retries: int = 3

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise ConceptlensError(f"unknown engine {self.kind!r}: use local or ray")
        if any(v is not None and v < 1 for v in (self.workers, self.cpus_per_worker, self.threads)):
            raise ConceptlensError("--ray-workers, CPUs and threads per worker must be positive")
        if self.kind == "local" and self.address:
            raise ConceptlensError("--ray-address needs --engine ray")

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"

    def resolve_device(self, spec: str | torch.device | None) -> torch.device:
        """The device work runs on. Locally it must exist here; on Ray it must exist on the workers (`auto`
        = CUDA when the cluster has GPUs), so a CPU-only driver can send work to GPU workers."""
        if not self.is_ray or isinstance(spec, torch.device):
            return resolve_device(spec)
        spec = (spec or "cpu").strip().lower()
        if spec == "auto":
            return torch.device("cuda" if connect(self.address).cluster_resources().get("GPU", 0) else "cpu")
        return parse_device(spec)

    def worker_count(self, device: torch.device | str = "cpu") -> int:
        """How many units run at once: 1 locally; on Ray `workers`, else one per CPU (per GPU on CUDA)."""
        if not self.is_ray:
            return 1
        if self.workers:
            return self.workers
        gpu = resolve_device(device).type == "cuda"
        res = connect(self.address).cluster_resources()
        return max(1, int(res.get("GPU", 1) if gpu else res.get("CPU", 1) // self.cpus_per_worker))

    def map(self, fn: Callable[[Any, Any], Any], payload: Any, key: str, units: Sequence[Any],
            device: torch.device | str = "cpu") -> Iterator[tuple[int, Any]]:
        """(unit index, fn(payload, unit)) for every unit: in order locally, as they finish on Ray."""
        if not self.is_ray:
            for i, unit in enumerate(units):
                yield i, fn(payload, unit)
            return
        if not units:
            return
        ray = connect(self.address)
        dev = resolve_device(device)
        gpus = 1 if dev.type == "cuda" else 0
        workers = self.worker_count(dev)
        task = ray.remote(_run).options(num_cpus=self.cpus_per_worker, num_gpus=gpus, max_retries=self.max_retries)
        threads = self.threads or torch.get_num_threads()
        box = [ray.put(payload)]  # in a list: Ray passes the reference; a worker fetches it once per process
        pending, todo = {}, list(enumerate(units))
        try:
            while todo or pending:
                while todo and len(pending) < workers:
                    i, unit = todo.pop(0)
                    pending[task.remote(fn, box, key, unit, str(dev), threads)] = i
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    yield i, _get(ray, ref)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)


def current() -> Engine:
    """The engine in effect: the innermost `using(...)`, else local."""
    return _CURRENT.get() or Engine()


@contextlib.contextmanager
def using(engine: Engine):
    """Run everything inside on `engine` unless a call names its own (`with using(Engine("ray")): ...`)."""
    token = _CURRENT.set(engine)
    try:
        yield engine
    finally:
        _CURRENT.reset(token)


def _get(ray, ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # the worker's own error: re-raise it as it was
        cause = exc.as_instanceof_cause()
        if isinstance(cause, ConceptlensError):
            raise ConceptlensError(str(cause).splitlines()[-1]) from None
        raise
    except ray.exceptions.RayError as exc:
        raise ConceptlensError(f"Ray task failed after retries: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _run(fn, box, key: str, unit, device: str, threads: int):
    """One task on a Ray worker: materialise the payload once per process, then the pure function."""
    import ray
    torch.set_num_threads(threads)
    if key not in _PAYLOADS:
        payload = ray.get(box[0])
        _PAYLOADS[key] = payload.to(device)  # an Encoder, Denoiser or DiffusionClassifier: all have `to`
    return fn(_PAYLOADS[key], unit)


def connect(address: str | None):
    """The `ray` module, connected: to `address` (host:port, ray://host:port or auto), or a new local cluster."""
    try:
        import ray
    except ImportError:
        raise ConceptlensError("--engine ray needs Ray: pip install 'ray[data]'") from None
    if address and address != "auto":  # checked first: Ray itself would retry a dead address for minutes
        host, port = _host_port(address)
        try:
            socket.create_connection((host, port), timeout=3).close()
        except OSError as exc:
            raise ConceptlensError(f"cannot reach a Ray cluster at {address}: {exc.strerror or exc} "
                                   "(start one with `ray start --head`)") from None
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConceptlensError(f"cannot start or join Ray ({address or 'local'}): {str(exc).splitlines()[0]}") from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConceptlensError(f"bad --ray-address {address!r}: use HOST:PORT, ray://HOST:PORT or auto")
    return host, int(port)
