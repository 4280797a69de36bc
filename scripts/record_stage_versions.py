"""Record every stage's VERSION and code digest in tests/stage_versions.json (pipeline/code_version.py).

Run it after bumping a stage's VERSION for a behaviour change, or, for a change that keeps every
output as it was (a comment, a refactor), to record the new digest under the same VERSION:
    python scripts/record_stage_versions.py
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.code_version import REPO_ROOT, code_digest  # noqa: E402
from stages import default_stages  # noqa: E402

RECORD = REPO_ROOT / "tests" / "stage_versions.json"


def current() -> dict[str, dict[str, str]]:
    """{stage module: {"version": VERSION, "digest": code digest}} for every module of the stage graph."""
    modules = sorted({spec.module.__name__ for spec in default_stages()})
    return {m: {"version": importlib.import_module(m).VERSION, "digest": code_digest(m)} for m in modules}


if __name__ == "__main__":
    RECORD.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"recorded {RECORD.relative_to(REPO_ROOT)}")
