"""Reliability: run the bad-input catalogue and the fault tests; the tests themselves count what they tried
(cases, clean one-line errors, defects, cache faults recovered, kills survived, concurrency runs) into
benchmarks/results/reliability.json. Goal (issue 16): defects 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, save, table_text

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "counts.json"
        r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_bad_input.py",
                            "tests/test_faults.py"], cwd=ROOT, env=dict(os.environ, CONCEPTLENS_RELIABILITY_OUT=str(out)),
                           capture_output=True, text=True)
        counts = json.loads(out.read_text()) if out.exists() else {}
    summary = next((ln.strip("= ") for ln in reversed(r.stdout.splitlines()) if " passed" in ln or " failed" in ln),
                   r.stderr[-300:])
    bad, faults = counts.get("bad_input", {}), counts.get("faults", {})
    rows = [["measure", "count"], ["bad-input cases", bad.get("cases", 0)], ["clean one-line errors", bad.get("clean_errors", 0)],
            ["defects", len(bad.get("defects", []))], ["cache faults", faults.get("cache_faults", 0)],
            ["cache faults recovered", faults.get("cache_faults_recovered", 0)], ["kills", faults.get("kills", 0)],
            ["kills survived", faults.get("kills_survived", 0)], ["concurrency runs", faults.get("concurrency_runs", 0)],
            ["concurrency runs correct", faults.get("concurrency_ok", 0)]]
    print(table_text(rows))
    print(summary)
    RESULTS.mkdir(exist_ok=True)
    save("reliability", {"pytest": summary, "returncode": r.returncode, **counts})


if __name__ == "__main__":
    main()
