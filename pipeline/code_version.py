"""Which code a stage's output depends on, as a digest: the stage module and every module of this
repository it imports, directly or not, found by reading their `import` statements (the wiring
modules `pipeline.config`, `pipeline.graph` and `pipeline.run` compose stages and are left out).

`tests/stage_versions.json` records each stage's `VERSION` with the digest of its code;
`tests/test_stage_versions.py` fails, naming the stage, when the code changed but `VERSION` did
not. A behaviour change bumps `VERSION` (new fingerprints: no old output is reused); a change that
keeps outputs as they were (a comment, a refactor) records the new digest only:
`python scripts/record_stage_versions.py`.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
WIRING = ("stages", "pipeline.config", "pipeline.graph", "pipeline.run")


def module_file(name: str) -> Path | None:
    """The file of a repository module `pipeline.x.y`, or None when it is not one of ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """Every repository module `path` (module `name`) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pipeline import tiny`
    return {m for m in found if module_file(m) is not None}


def code_modules(name: str) -> list[str]:
    """`name` and the repository modules it depends on, sorted (wiring modules left out)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or current in WIRING:
            continue
        seen.add(current)
        todo += sorted(imported_modules(module_file(current), current) - seen)
    return sorted(seen)


def code_digest(name: str) -> str:
    """sha256 over the sources of `code_modules(name)` (their paths and bytes)."""
    h = hashlib.sha256()
    for module in code_modules(name):
        path = module_file(module)
        h.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
