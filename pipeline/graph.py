"""The stage graph and its fingerprint cache.

A stage module declares `VERSION`, `SECTIONS` (the config sections it reads, its own first),
`OUTPUTS` (what `run(ctx)` writes into `ctx.output_dir`; the graph checks them and logs them as the
stage run's artifacts, or only `ARTIFACTS` when a stage declares it) and `run(ctx)`.

A stage's fingerprint hashes its code version, the config sections it declares and its inputs'
fingerprints (plus, for stages that read outside data, a digest of that data). A section leaves out
the keys that do not change any stage's result (`section_fingerprint`: a Config's
`NOT_IN_FINGERPRINT`, or its own `fingerprint_dump`): logging cadence, encoder / actor counts,
retries, checkpoint cadence, retention and location. Changing one of them reuses the committed
output, and a distill run in progress resumes from its checkpoint (same fingerprint, same run name;
a new `distill.storage_path` has no checkpoint to resume from). Its output lives
in `workdir/<stage>/<fingerprint>/` and counts as done only once `manifest.json` is there: the
stage writes into a temporary directory beside it, the manifest last, and one rename commits it.
So a killed run never leaves something that looks finished, rerunning the same command does no
work twice, a forced re-run replaces the old output only once it has committed, and two runs of
one fingerprint serialise on a lock file (the second reuses the first's output).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from pydantic import BaseModel

from pipeline.context import StageContext

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StageSpec:
    """A stage module (VERSION, SECTIONS, OUTPUTS, run; optional external_fingerprint) and the
    stages whose outputs it reads."""

    name: str
    module: ModuleType
    inputs: tuple[str, ...] = ()
    # A variant of a stage (e.g. the full-resolution baseline distill) replaces some of the
    # sections it reads; the replaced sections feed its fingerprint like any config.
    configure: Callable[[BaseModel], dict[str, BaseModel]] | None = None
    # A stage that only runs when the config asks for it; downstream stages see no such input.
    enabled: Callable[[BaseModel], bool] | None = None

    def sections(self, cfg: BaseModel) -> dict[str, BaseModel]:
        """The config sections this stage reads, its own first."""
        sections = {s: getattr(cfg, s) for s in self.module.SECTIONS}
        return {**sections, **(self.configure(cfg) if self.configure else {})}


@dataclass
class PlannedStage:
    spec: StageSpec
    fingerprint: str
    output_dir: Path
    cached: bool
    action: str  # "run" | "cached" | "excluded" | "disabled"
    left_out: tuple[str, ...] = ()  # per section, its keys not in the fingerprint (shown by --dry-run)
    forced: bool = False  # --force: re-run although an output is committed

    @property
    def name(self) -> str:
        return self.spec.name


class PlanError(ValueError):
    pass


def plan(cfg: BaseModel, stages: list[StageSpec], only: set[str] = frozenset(),
         force: set[str] = frozenset()) -> list[PlannedStage]:
    """Fingerprint every stage in order and decide what runs. `only` restricts the run to the
    named stages (their inputs must already be committed); `force` re-runs named stages."""
    names = [s.name for s in stages]
    unknown = sorted((set(only) | set(force)) - set(names))
    if unknown:
        raise PlanError(f"unknown stage(s) {', '.join(unknown)}; stages are: {', '.join(names)}")
    fingerprints: dict[str, str] = {}
    planned: list[PlannedStage] = []
    for spec in stages:
        fp = fingerprint(spec, cfg, {i: fingerprints[i] for i in spec.inputs if i in fingerprints})
        out = stage_dir(cfg.workdir, spec.name) / fp
        cached = (out / MANIFEST).is_file()
        left_out = tuple(not_in_fingerprint(spec, cfg))
        if spec.enabled is not None and not spec.enabled(cfg):
            planned.append(PlannedStage(spec, fp, out, cached, "disabled", left_out))
            continue
        fingerprints[spec.name] = fp
        if only and spec.name not in only:
            action = "cached" if cached else "excluded"
        elif cached and spec.name not in force:
            action = "cached"
        else:
            action = "run"
        planned.append(PlannedStage(spec, fp, out, cached, action, left_out, forced=spec.name in force))
    by_name = {p.name: p for p in planned}
    for p in planned:
        if p.action != "run":
            continue
        # an input that is not in this graph at all is absent, like a disabled one
        missing = [i for i in p.spec.inputs if i in by_name and by_name[i].action == "excluded"]
        if missing:
            raise PlanError(f"stage {p.name} needs the output of {', '.join(missing)}, which is not "
                            f"committed for this config; add it to --only or drop --only")
    return planned


def section_fingerprint(model: BaseModel) -> dict[str, Any]:
    """What of a config section feeds fingerprints: its `fingerprint_dump()` if it has one (a section whose
    keys count only in some settings), else its dump without the top-level keys in `NOT_IN_FINGERPRINT`."""
    if hasattr(model, "fingerprint_dump"):
        return model.fingerprint_dump()
    dump = model.model_dump(mode="json")
    for key in getattr(type(model), "NOT_IN_FINGERPRINT", ()):
        dump.pop(key, None)
    return with_former_keys(model, dump)


def with_former_keys(model: BaseModel, dump: dict[str, Any]) -> dict[str, Any]:
    """A block that replaced flat keys (`Section.FORMER_KEYS`, e.g. `evaluate.teacher_sampler` for
    `teacher_num_steps` / `teacher_guidance_scale`) feeds the fingerprint under its former keys, so
    moving keys into a block keeps every fingerprint."""
    for block, former in getattr(type(model), "FORMER_KEYS", {}).items():
        if block in dump:
            values = dump.pop(block)
            dump.update({old: values[new] for new, old in former.items()})
    return dump


def stage_section_fingerprints(spec: StageSpec, sections: dict[str, BaseModel]) -> dict[str, dict[str, Any]]:
    """Each section's part of the stage's fingerprint. A stage that reads only part of another stage's
    section says so in `FINGERPRINT_VIEWS` ({section: model -> dict}), e.g. the cache reads only the swd
    schedule's latent sides: a loss weight then re-runs distill, not the cache."""
    views = getattr(spec.module, "FINGERPRINT_VIEWS", {})
    return {s: views[s](m) if s in views else section_fingerprint(m) for s, m in sections.items()}


def not_in_fingerprint(spec: StageSpec, cfg: BaseModel) -> list[str]:
    """Per section of the stage, the keys its fingerprint leaves out, for --dry-run:
    `distill.log_every_steps, ...`, or `teacher.* except pretrained, ...` for a section that leaves out most of itself."""
    out = []
    for name, kept in stage_section_fingerprints(spec, spec.sections(cfg)).items():
        model = spec.sections(cfg)[name]
        left = [k for k in model.model_dump(mode="json")
                if k not in kept and k not in getattr(type(model), "FORMER_KEYS", {})]
        if len(left) > len(kept):
            out.append(f"{name}.* except {', '.join(kept)}")
        elif left:
            out.append(", ".join(f"{name}.{k}" for k in left))
    return out


def fingerprint(spec: StageSpec, cfg: BaseModel, input_fingerprints: dict[str, str]) -> str:
    sections = spec.sections(cfg)
    external = getattr(spec.module, "external_fingerprint", None)
    payload = {
        "stage": spec.name,
        "version": spec.module.VERSION,
        "sections": stage_section_fingerprints(spec, sections),
        "inputs": input_fingerprints,
        "external": external(sections) if external else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_dir(workdir: Path, name: str) -> Path:
    return Path(workdir) / name


def read_manifest(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / MANIFEST).read_text())


def execute_stage(p: PlannedStage, cfg: BaseModel, inputs: dict[str, Path], tracking_uri: str,
                  run_id: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one stage into a temporary directory beside its output and commit it in one rename, the
    manifest already inside. Under a per-fingerprint lock: a second run of the same fingerprint waits,
    then reuses what the first committed. A forced re-run replaces the committed output only once its
    own has committed, so a failed or killed forced run keeps the old one."""
    root = stage_dir(cfg.workdir, p.name)
    root.mkdir(parents=True, exist_ok=True)
    with stage_lock(root, p, log):
        _recover_replaced(root, p)
        if (p.output_dir / MANIFEST).is_file() and not p.forced:
            log(f"[pipeline] {p.name}: committed by another run while this one waited for the lock; reusing it")
            return {**read_manifest(p.output_dir), "reused": True}
        for stale in root.glob(f".tmp-{p.fingerprint}-*"):  # left by a killed run (the lock says none is live)
            shutil.rmtree(stale, ignore_errors=True)
        if p.output_dir.exists() and not (p.output_dir / MANIFEST).is_file():  # never committed
            shutil.rmtree(p.output_dir)
        tmp = root / f".tmp-{p.fingerprint}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        scratch = root / f".scratch-{p.fingerprint}"
        scratch.mkdir(exist_ok=True)
        shared = root / "shared"
        shared.mkdir(exist_ok=True)
        sections = p.spec.sections(cfg)
        ctx = StageContext(
            name=p.name, config=sections[p.spec.module.SECTIONS[0]], sections=sections, inputs=inputs,
            output_dir=tmp, scratch_dir=scratch, shared_dir=shared, tracking_uri=tracking_uri,
            run_id=run_id, fingerprint=p.fingerprint,
        )
        start = time.monotonic()
        try:
            p.spec.module.run(ctx)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # scratch stays: the next run resumes from it
            raise
        missing = [o for o in getattr(p.spec.module, "OUTPUTS", ()) if not (tmp / o).exists()]
        if missing:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"stage {p.name} finished without writing its declared outputs: {', '.join(missing)}")
        for name in getattr(p.spec.module, "ARTIFACTS", getattr(p.spec.module, "OUTPUTS", ())):
            ctx.log.artifact(tmp / name)  # the stage's declared outputs, on its MLflow run
        manifest = {
            "stage": p.name,
            "fingerprint": p.fingerprint,
            "version": p.spec.module.VERSION,
            "run_id": run_id,
            "inputs": {name: str(path) for name, path in inputs.items()},
            "sections": {s: m.model_dump(mode="json") for s, m in sections.items()},
            "summary": ctx.summary,
            "wall_s": round(time.monotonic() - start, 3),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        _commit(tmp, p.output_dir, root)
        if not ctx.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
        return manifest


def _commit(tmp: Path, output_dir: Path, root: Path) -> None:
    """tmp (manifest inside) becomes output_dir; a committed output_dir (forced re-run) is moved aside
    first and deleted only after, so at every instant one complete output exists on disk."""
    if not output_dir.exists():
        os.rename(tmp, output_dir)
        return
    old = root / f".replaced-{output_dir.name}-{uuid.uuid4().hex[:8]}"
    os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    shutil.rmtree(old, ignore_errors=True)


def _recover_replaced(root: Path, p: PlannedStage) -> None:
    """A run killed between the two renames of `_commit` left the old output aside: put it back."""
    for old in sorted(root.glob(f".replaced-{p.fingerprint}-*")):
        if not p.output_dir.exists() and (old / MANIFEST).is_file():
            os.rename(old, p.output_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def stage_lock(root: Path, p: PlannedStage, log: Callable[[str], None] = print):
    """An exclusive flock on `root/.lock-<fingerprint>` for the stage's run and commit (released by the
    kernel when the process dies). A second run of the same fingerprint says it waits, then waits."""
    import fcntl

    with open(root / f".lock-{p.fingerprint}", "a+") as f:
        waiting = False
        while True:  # polled, not a blocking flock: a lost schedule lease can still interrupt the wait
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    f.seek(0)
                    holder = f.read().strip() or "another run"
                    log(f"[pipeline] {p.name}: {holder} is running this fingerprint ({p.fingerprint}); waiting for it")
                    waiting = True
                time.sleep(0.5)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def describe_plan(planned: list[PlannedStage]) -> str:
    width = max(len(p.name) for p in planned)
    lines = []
    for p in planned:
        what = {"run": "would run" if not p.cached else "would re-run (forced)",
                "cached": "cached", "excluded": "not run (--only)", "disabled": "disabled by config"}[p.action]
        lines.append(f"  {p.name:<{width}}  {p.fingerprint}  {what:<22} {p.output_dir}")
        if p.left_out:
            lines.append(f"  {'':<{width}}  not in fingerprint: {'; '.join(p.left_out)}")
    return "\n".join(lines)
