"""Peak RSS of `conceptlens embed` over 50,000 images (Fashion-MNIST train; only 20,000 CIFAR-10 train
images are available here). Runs the CLI in a child process and reads its peak RSS."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

from common import save, table_text

N = int(os.environ.get("EMBED_MEMORY_N", 50000))


def main() -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CONCEPTLENS_CACHE=cache, CONCEPTLENS_QUIET="1")
        cmd = [sys.executable, "-m", "conceptlens.cli", "embed", "--model", "builtin:efficientnet-lite0",
               "--data", "fashion-mnist:train", "--limit", str(N)]
        t = time.time()
        subprocess.run(cmd, env=env, check=True)
        secs = time.time() - t
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    res = {"images": N, "dataset": "fashion-mnist:train", "model": "builtin:efficientnet-lite0",
           "peak_rss_mb": rss_mb, "seconds": secs, "target_mb": 2048}
    print(table_text([["images", "peak RSS (MB)", "seconds", "target"], [N, f"{rss_mb:.0f}", f"{secs:.0f}", "< 2048"]]))
    save("embed_memory", res)
    return res


if __name__ == "__main__":
    main()
