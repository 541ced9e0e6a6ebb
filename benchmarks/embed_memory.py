"""Peak RSS of `conceptlens embed` over 50,000 images (Fashion-MNIST train; only 20,000 CIFAR-10 train images
are available here), cold cache, default backend. Runs the CLI in a child process, samples its resident memory
every second to the end (to show it is flat in N) and reads its peak RSS. Resident memory is split as the kernel
counts it: anonymous (the process's own allocations) and file-backed (mapped files: libraries, model files, and the
input set where it is memory-mapped, as Fashion-MNIST's pixels are — those pages join the resident set as images are
read, 784 bytes an image, and the kernel can drop them at any time). Writes benchmarks/results/embed_memory.json.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save, table_text

N = int(os.environ.get("EMBED_MEMORY_N", 50000))


FIELDS = ("VmRSS", "RssAnon", "RssFile")


def rss_mb(pid: int) -> tuple[float, ...] | None:
    """(resident, anonymous, file-backed) MB of a process, or None once it is gone."""
    try:
        kb = {k: int(v.split()[0]) for k, _, v in
              (ln.partition(":") for ln in Path(f"/proc/{pid}/status").read_text().splitlines()) if k in FIELDS}
    except (OSError, ValueError):
        return None
    return tuple(kb[k] / 1024 for k in FIELDS) if len(kb) == len(FIELDS) else None


def main() -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CONCEPTLENS_CACHE=cache, CONCEPTLENS_QUIET="1")
        cmd = [sys.executable, "-m", "conceptlens.cli.main", "embed", "--model", "builtin:efficientnet-lite0",
               "--data", "fashion-mnist:train", "--limit", str(N)]
        t = time.time()
        proc, trace = subprocess.Popen(cmd, env=env), []
        while proc.poll() is None:
            if (r := rss_mb(proc.pid)) is not None:
                trace.append((time.time() - t, *r))
            time.sleep(1.0)
        secs = time.time() - t
        if proc.returncode:
            raise SystemExit(f"embed failed with exit code {proc.returncode}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    body = [r for s, *r in trace if 0.1 * secs <= s <= 0.95 * secs]  # model loading and the final write excluded
    q = len(body) // 4

    def quarters(j: int) -> list[float]:
        return [max(r[j] for r in body[i * q:(i + 1) * q]) for i in range(4)] if q else []
    res = {"images": N, "dataset": "fashion-mnist:train", "model": "builtin:efficientnet-lite0", "backend": "auto",
           "peak_rss_mb": peak, "seconds": secs, "img_per_s": N / secs, "target_mb": 2048,
           "rss_max_by_quarter_mb": quarters(0), "anon_max_by_quarter_mb": quarters(1),
           "file_max_by_quarter_mb": quarters(2), "input_memmap_mb": N * 28 * 28 / 2**20,
           "rss_trace_mb": {"columns": ["seconds", *FIELDS], "rows": [[round(s, 1), *map(round, r)] for s, *r in trace[::5]]}}
    print(table_text([["images", "peak RSS (MB)", "max per quarter of the run (MB): resident", "anonymous",
                       "file-backed", "seconds", "target"],
                      [N, f"{peak:.0f}", *(" / ".join(f"{v:.0f}" for v in quarters(j)) for j in range(3)), f"{secs:.0f}",
                       "< 2048"]]))
    save("embed_memory", res)
    return res


if __name__ == "__main__":
    main()
