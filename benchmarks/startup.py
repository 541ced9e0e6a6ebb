"""Start-up: wall time of `conceptlens --help` beside the interpreter alone, `import torch`, and the CLI as it was
before the layered package (commit 75412ae, extracted with git archive), measured side by side in one run.
Writes benchmarks/results/startup.json. Target (issue "One clean house"): --help in <= 0.5 s wall."""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save, table_text

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "75412ae"
RUNS = 7


def wall(cmd: list[str], env: dict | None = None) -> list[float]:
    out = []
    for _ in range(RUNS):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    py = sys.executable
    cases = {"python -c pass": [py, "-c", "pass"],
             "python -c 'import torch'": [py, "-c", "import torch"],
             "conceptlens --help": [str(Path(py).with_name("conceptlens")), "--help"]}
    env = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "src"], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            cases[f"conceptlens --help at {BEFORE} (before)"] = [py, "-c", "import sys; sys.argv[0]='conceptlens'; "
                                                                  "from conceptlens.cli import main; main(['--help'])"]
            env = {"PYTHONPATH": str(Path(tmp) / "src"), "PATH": "/usr/bin:/bin"}
        except (subprocess.CalledProcessError, FileNotFoundError):
            print(f"(commit {BEFORE} not in this clone: no before/after figure)")
        times = {name: wall(cmd, env if "before" in name else None) for name, cmd in cases.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [["command", "median s", "min s", "max s", "x conceptlens --help"]]
    for k, v in times.items():
        rows.append([k, f"{med[k]:.3f}", f"{min(v):.3f}", f"{max(v):.3f}", f"{med[k] / med['conceptlens --help']:.2f}"])
    print(table_text(rows))
    save("startup", {"runs": RUNS, "seconds": times, "median_seconds": med, "target_seconds": 0.5,
                     "meets_target": med["conceptlens --help"] <= 0.5})


if __name__ == "__main__":
    main()
