"""Write the SD3.5-structured miniature teacher (`pipeline/miniature.py`), random init, untrained.

    python scripts/build_miniature_teacher.py                  # -> assets/sd35-miniature, seed 0

The directory is built beside `--out` and then put in its place, so no stale file of an older
build survives. `tests/test_miniature.py` checks that the shipped directory equals a fresh build.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "assets" / "sd35-miniature"),
                        help="output directory (replaced; default: assets/sd35-miniature)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    args = parser.parse_args(argv)

    from pipeline import miniature

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        miniature.build_bundle(staging / "bundle", seed=args.seed)
        for path in (staging / "bundle").rglob("*"):  # safetensors files are written 0600
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        (staging / "bundle").rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = subprocess.run(["du", "-sh", str(out)], capture_output=True, text=True).stdout.split()[0]
    print(f"wrote {out} ({size}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
