"""A stage's code cannot change its outputs silently: `tests/stage_versions.json` holds each stage's
VERSION with the digest of its code (pipeline/code_version.py: the stage module and every repository
module it imports). Changed code under the same VERSION fails here, naming the stage: bump VERSION
(a behaviour change: new fingerprints, nothing old reused) or record the new digest
(`python scripts/record_stage_versions.py`: outputs unchanged)."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO_ROOT
from pipeline.code_version import code_digest, code_modules

spec = importlib.util.spec_from_file_location("record_stage_versions", REPO_ROOT / "scripts" / "record_stage_versions.py")
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)


def test_every_stage_code_change_comes_with_a_version_or_a_recorded_digest():
    recorded = json.loads(record.RECORD.read_text())
    problems = []
    for module, now in record.current().items():
        was = recorded.get(module)
        if was is None:
            problems.append(f"{module}: not recorded; run python scripts/record_stage_versions.py")
        elif now["digest"] != was["digest"] and now["version"] == was["version"]:
            problems.append(f"{module}: its code changed (digest {now['digest']}, recorded {was['digest']}) but VERSION "
                            f"is still {now['version']!r}; bump VERSION in {module.replace('.', '/')}.py if its "
                            f"outputs change, then (or else only) run python scripts/record_stage_versions.py")
        elif now != was:
            problems.append(f"{module}: VERSION {was['version']!r} -> {now['version']!r} is not recorded; run "
                            f"python scripts/record_stage_versions.py")
    assert not problems, "\n".join(problems)


def test_the_digest_follows_the_code_a_stage_imports(tmp_path):
    assert "pipeline.swd.losses" in code_modules("stages.distill")  # the loss changes distill's output
    assert "pipeline.config" not in code_modules("stages.distill")  # wiring, not behaviour
    assert code_digest("stages.distill") != code_digest("stages.shards")
