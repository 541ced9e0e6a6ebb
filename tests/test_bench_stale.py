"""benchmarks/stale.py: a result whose recorded files changed is stale; unchanged ones are current."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _stale():
    sys.path.insert(0, str(BENCH))
    try:
        import stale
        return stale
    finally:
        sys.path.remove(str(BENCH))


def test_recorded_files_decide_current_or_stale(tmp_path):
    stale = _stale()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    recorded = {name: stale.file_digest(tmp_path / name) for name in ("a.py", "b.py")}
    assert stale.changed_files(recorded, tmp_path) == []
    (tmp_path / "a.py").write_text("x = 3\n")
    (tmp_path / "b.py").unlink()
    assert stale.changed_files(recorded, tmp_path) == ["a.py", "b.py"]


def test_a_fresh_source_record_is_current():
    stale = _stale()
    import provenance
    import conceptlens.concepts.align  # noqa: F401 - a module the "benchmark" ran
    src = provenance.source("align_speed")
    assert "benchmarks/align_speed.py" in src["files"] and "src/conceptlens/concepts/align.py" in src["files"]
    assert stale.check("align_speed", {"source": src})["status"] == "current"
    src["files"]["src/conceptlens/concepts/align.py"] = "0" * 16
    row = stale.check("align_speed", {"source": src})
    assert row["status"] == "stale" and row["changed"] == ["src/conceptlens/concepts/align.py"]


def test_a_result_read_as_input_is_recorded():
    _stale()  # puts benchmarks/provenance.py in sys.modules
    import provenance
    provenance.read_input(provenance.RESULTS / "lite_clip.json")
    try:
        assert "benchmarks/results/lite_clip.json" in provenance.source("offline_quality")["files"]
    finally:
        provenance.INPUTS.clear()


def test_only_the_assets_a_process_asked_for_are_recorded(monkeypatch):
    _stale()
    import provenance
    from conceptlens import io
    monkeypatch.setattr(io, "ASSETS_USED", set())
    files = provenance.source("align_speed")["files"]
    assert not any(f.startswith("src/conceptlens/assets/") for f in files)  # nothing asked for, nothing recorded
    io.asset_path("")  # the folder itself is not an asset
    io.asset_path("tiny_diffusion_cifar10.safetensors")
    files = provenance.source("align_speed")["files"]
    assert [f for f in files if f.startswith("src/conceptlens/assets/")] == \
        ["src/conceptlens/assets/tiny_diffusion_cifar10.safetensors"]
