"""The layout is the architecture: `pipeline/` never imports `stages/` (only the entry point
`pipeline/run.py` does), no stage imports another, and the registered model needs only `pipeline/`."""

from __future__ import annotations

from pathlib import Path

from conftest import REPO_ROOT
from pipeline.code_version import imported_modules

ENTRY_POINT = "pipeline.run"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str | None = None) -> set[str]:
    """Every repository module `path` (module `name`) imports, anywhere in it (relative imports resolved)."""
    return imported_modules(path, name or module_name(path))


def stage_of(module: str) -> str | None:
    """`stages.distill.worker` -> "distill"; None for `stages` itself and non-stage modules."""
    parts = module.split(".")
    return parts[1] if parts[0] == "stages" and len(parts) > 1 else None


def test_pipeline_never_imports_stages_except_the_entry_point():
    offenders = {module_name(p): sorted(m for m in imports(p) if m == "stages" or m.startswith("stages."))
                 for p in sorted((REPO_ROOT / "pipeline").rglob("*.py")) if module_name(p) != ENTRY_POINT}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_stage_imports_another_stage():
    offenders = {}
    for path in sorted((REPO_ROOT / "stages").rglob("*.py")):
        own = stage_of(module_name(path))
        if own is None:
            continue  # stages/__init__.py composes them all
        # `from stages import x` names stage x; `from stages.x import y` is stage x too
        others = sorted({stage_of(m) for m in imports(path)} - {own, None})
        if others:
            offenders[module_name(path)] = others
    assert offenders == {}


def test_the_checks_see_a_violation(tmp_path):
    """The walker finds every kind of import the tests above refuse, so they can fail."""
    bad = tmp_path / "worker.py"
    bad.write_text("from stages.cache import Config\nimport stages.evaluate\ndef f():\n    from stages import register\n"
                   "from ..synthesize import x\nfrom . import helpers\n")
    found = imports(bad, "stages.distill.worker")
    assert {stage_of(m) for m in found} - {None} == {"cache", "evaluate", "register", "synthesize", "distill"}


def test_the_registered_model_ships_only_pipeline():
    """The pyfunc entry and the Generator it serves import nothing outside pipeline/."""
    from pipeline.code_version import code_modules

    assert [m for m in code_modules("pipeline.generate") if not m.startswith("pipeline")] == []
    from pipeline.generate import MODEL_CODE

    assert "stages" not in MODEL_CODE
