"""Which result files are stale? A result is stale when a file it ran from has changed since it was measured
(regenerate a result whenever what it measures changes: a stale file is a false claim).

Results written since provenance is recorded carry `source.files` (provenance.source): a digest of each file that
ran. They are `current` or `stale` (with the changed or removed files). Older results carry none: the commit
that last wrote the file stands in for their code, and the package and benchmark files changed since that
commit are listed as `unrecorded` (a person judges those; rerunning the benchmark records its source).
`python benchmarks/stale.py [NAME ...]` (`make bench-stale`) prints a table; exit status 1 when a recorded result
is stale.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from common import table_text
from provenance import RESULTS, ROOT, file_digest, git


def changed_files(recorded: dict[str, str], root: Path = ROOT) -> list[str]:
    """Files whose digest differs from the recorded one, or that are gone."""
    return sorted(rel for rel, digest in recorded.items()
                  if not (root / rel).is_file() or file_digest(root / rel) != digest)


def check(name: str, data: dict) -> dict:
    """Status of one result: `current`, `stale` or `unrecorded`, the files behind it, and when it was measured."""
    src = data.get("source")
    if src and "files" in src:
        changed = changed_files(src["files"])
        return {"name": name, "measured": (src.get("commit") or "?")[:8] + " (dirty)" * bool(src.get("dirty")),
                "status": "stale" if changed else "current", "changed": changed}
    commit = git("log", "-1", "--format=%H", "--", str((RESULTS / f"{name}.json").relative_to(ROOT)))
    paths = ["src/conceptlens", f"benchmarks/{name}.py", "benchmarks/common.py"]
    changed = sorted(set(git("diff", "--name-only", commit, "--", *paths).split())) if commit else []
    return {"name": name, "measured": f"{commit[:8]} (file's commit)" if commit else "uncommitted",
            "status": "unrecorded", "changed": changed}


def main(names: list[str]) -> int:
    paths = [RESULTS / f"{n}.json" for n in names] if names else sorted(RESULTS.glob("*.json"))
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        print(f"stale.py: no result file {', '.join(missing)} in {RESULTS}", file=sys.stderr)
        return 2
    rows = [check(p.stem, json.loads(p.read_text())) for p in paths]
    print(table_text([["result", "measured at", "status", "files changed since"]] +
                     [[r["name"], r["measured"], r["status"],
                       (f"{len(r['changed'])}: " + ", ".join(Path(c).name for c in r["changed"][:4])
                        + " …" * (len(r["changed"]) > 4)) if r["changed"] else "-"] for r in rows]))
    return int(any(r["status"] == "stale" for r in rows))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
