"""`make bench`: every benchmark in turn; each prints a table and writes benchmarks/results/NAME.json; then which
result files are stale (stale.py)."""
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("startup", "scale", "device_check", "reliability", "cli_timings", "zeroshot_accuracy", "embed_speed",
         "text_speed", "embed_memory", "align_speed", "lite_clip", "text_to_concept", "decompose", "decode", "falcon",
         "clip_training", "diffusion_batching", "diffusion_timesteps", "diffusion_training", "diffusion",
         "offline_quality")


def main() -> None:
    sys.path.insert(0, str(HERE))
    for name in NAMES:
        print(f"\n=== {name} ===")
        runpy.run_path(str(HERE / f"{name}.py"), run_name="__main__")
    print("\n=== stale results ===")
    import stale
    sys.exit(stale.main([]))


if __name__ == "__main__":
    main()
