"""`register` stage: the student as an MLflow model, promoted to the champion alias only if it is better.

Steps:
1. Read the `evaluate` output (`metrics.json`): the candidate's value of `register.metric` and the
   eval-set fingerprint. A metric the evaluation did not produce is an error, before anything is logged.
2. Save the student as an MLflow pyfunc model ("models from code": `student_model()`, no pickled
   Python objects; weights stay safetensors): artifacts = the distill export (`student/` LoRA
   directory + `schedule.json`) and the teacher bundle (copied when `copy_teacher`, otherwise its
   location / hub id goes into the model config). `predict` takes prompts (a DataFrame with a
   `prompt` column; param `seed`, default 0) and returns uint8 images [B, H, W, 3], generated with
   the diffusers SD3 components and the scale-wise sampler of SWD.md section 3. Logged under the
   stage's run as `student/`, then registered as a new version of `register.model_name`, tagged with
   the eval-set fingerprint, every canonical metric (`metric.<name>`) and the source runs.
3. Promotion: the version takes the `register.alias` ("champion") alias only if its metric is finite
   (a NaN / inf candidate never promotes, whatever else holds) and
   - there is no champion yet (first version ever), or
   - it beats the champion on `register.metric` by more than `register.tolerance` (lower is better
     for FD/FID/latency, higher for adherence/CLIP score/speedup), measured on the same eval set
     (same eval-set fingerprint; a different one decides by `register.eval_set_mismatch`).
   Otherwise the version gets the tag `promotion` with why not. The registered model's tag
   `champion_version` records the champion, so an alias that vanished because its version was
   deleted is an error (never a silent "first version ever").
4. Output: `registration.json` (name, version, model URI, promoted, reason, champion before).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipeline.config import Section
from pipeline.context import StageContext
from pipeline.eval_record import CANONICAL_METRICS, HIGHER_IS_BETTER, METRICS_FILE
from pipeline.generate import MODEL_CODE
from pipeline.student_export import SCHEDULE_FILE, STUDENT_DIR

VERSION = "3"  # 3: the registered model ships pipeline/ only (pipeline.generate.student_pyfunc)
SECTIONS = ("register", "teacher")
RESULT_FILE = "registration.json"
OUTPUTS = (RESULT_FILE,)
MODEL_ARTIFACT = "student"
CHAMPION_TAG = "champion_version"  # on the registered model: the version that holds the alias
PROMOTION_TAG = "promotion"  # on each version: promoted, or why not
EVAL_SET_TAG = "eval_set_fingerprint"
METRIC_TAG_PREFIX = "metric."
REPO_ROOT = Path(__file__).resolve().parent.parent


class RegisterError(ValueError):
    """A registration that cannot go ahead: says what was found and what to do."""


class Config(Section):

    model_name: str = Field("swd-student", min_length=1)
    alias: str = Field("champion", min_length=1)
    metric: str = "student_fd"
    tolerance: float = 0.0
    eval_set_mismatch: Literal["keep_champion", "promote"] = "keep_champion"
    copy_teacher: bool = True
    device: str = "cpu"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"register.device {v!r} is not supported; valid: cpu, cuda, cuda:N")
        return v

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in HIGHER_IS_BETTER:
            raise ValueError(f"register.metric: {v!r} is not a metric the evaluate stage compares on; valid: "
                             f"{', '.join(sorted(HIGHER_IS_BETTER))}")
        return v


# ----------------------------------------------------------------------------- stage


def run(ctx: StageContext) -> None:
    import mlflow


    cfg: Config = ctx.config
    teacher_cfg = ctx.sections["teacher"]
    mlc = mlflow.MlflowClient(ctx.tracking_uri)

    # 1. the candidate's evaluation
    record = json.loads((Path(ctx.inputs["evaluate"]) / METRICS_FILE).read_text())
    values, fingerprint = record["metrics"], record["eval_set"]["fingerprint"]
    if cfg.metric not in values:
        raise RegisterError(f"register.metric {cfg.metric!r}: the evaluate stage did not produce it (it produced "
                            f"{', '.join(sorted(values))}); choose one of those or configure evaluate to compute it")
    candidate = float(values[cfg.metric])
    champion = current_champion(mlc, cfg.model_name, cfg.alias)  # before anything is logged: a broken alias stops here

    # 2. the pyfunc model, logged and registered
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=ctx.scratch_dir) as tmp:
        model_dir = Path(tmp) / MODEL_ARTIFACT
        save_student_model(model_dir, ctx.inputs["distill"], ctx.inputs["teacher"], teacher_cfg, cfg, Path(tmp))
        mlc.log_artifacts(ctx.run_id, str(model_dir), MODEL_ARTIFACT)
    source = f"{mlc.get_run(ctx.run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    ensure_registered_model(mlc, cfg.model_name)
    tags = {EVAL_SET_TAG: fingerprint, "register.metric": cfg.metric, "source_run_id": ctx.run_id,
            **{f"{METRIC_TAG_PREFIX}{k}": repr(float(values[k])) for k in CANONICAL_METRICS if k in values}}
    version = mlc.create_model_version(cfg.model_name, source=source, run_id=ctx.run_id, tags=tags,
                                       description=f"SwD student; {cfg.metric} = {candidate:.6g} on eval set "
                                                   f"{fingerprint}").version
    log_s = time.monotonic() - started

    # 3. promotion
    promote, reason = decide(candidate, fingerprint, champion, cfg, HIGHER_IS_BETTER[cfg.metric])
    if promote:
        mlc.set_registered_model_alias(cfg.model_name, cfg.alias, version)
        mlc.set_registered_model_tag(cfg.model_name, CHAMPION_TAG, str(version))
    mlc.set_model_version_tag(cfg.model_name, version, PROMOTION_TAG,
                              ("promoted: " if promote else "not promoted: ") + reason)
    result = {"model_name": cfg.model_name, "version": int(version), "model_uri": f"models:/{cfg.model_name}/{version}",
              "alias": cfg.alias, "promoted": promote, "reason": reason, "metric": cfg.metric, "value": candidate,
              "eval_set_fingerprint": fingerprint, "source": source,
              "champion_before": None if champion is None else {k: champion[k] for k in ("version", "value",
                                                                                         "eval_set_fingerprint")}}
    (ctx.output_dir / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    mlc.log_metric(ctx.run_id, "promoted", float(promote))
    mlc.log_metric(ctx.run_id, "model_version", float(version))
    mlc.log_metric(ctx.run_id, "log_model_s", log_s)
    mlc.set_tag(ctx.run_id, "registered_model", f"{cfg.model_name}/{version}")
    ctx.summary.update({"version": int(version), "promoted": promote, "reason": reason})
    print(f"[register] {cfg.model_name} version {version}: {'promoted to ' + cfg.alias if promote else 'not promoted'}"
          f" ({reason})", flush=True)


def ensure_registered_model(mlc, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlc.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        mlc.create_registered_model(name, description="SwD scale-wise students (pipeline/run.py register stage)")


def current_champion(mlc, name: str, alias: str) -> dict | None:
    """{"version", "value" per metric tag, "eval_set_fingerprint", "tags"} of the alias's version, or
    None when the model has never had a champion. A champion whose version was deleted is an error."""
    from mlflow.exceptions import MlflowException

    try:
        model = mlc.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    recorded = (model.tags or {}).get(CHAMPION_TAG)
    version = (model.aliases or {}).get(alias)
    if version is None and recorded is not None:
        if _version_exists(mlc, name, recorded):
            print(f"[register] {name}: alias {alias!r} was removed by hand (last champion: version {recorded}); "
                  f"treating the model as having no champion", flush=True)
            return None
        version = recorded  # MLflow drops the alias of a deleted version; our record still names it
    if version is None:
        return None
    try:
        mv = mlc.get_model_version(name, str(version))
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegisterError(
            f"registered model {name!r}: the {alias!r} alias points at version {version}, which was deleted; "
            f"there is no champion to compare against. Point the alias at the version that should be champion "
            f"(MlflowClient().set_registered_model_alias({name!r}, {alias!r}, VERSION) and set the registered "
            f"model tag {CHAMPION_TAG!r} to it), or delete that tag and alias to let the next version become "
            f"champion") from None
    tags = mv.tags or {}
    return {"version": int(mv.version), "eval_set_fingerprint": tags.get(EVAL_SET_TAG), "tags": tags,
            "value": None}


def _version_exists(mlc, name: str, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        mlc.get_model_version(name, str(version))
        return True
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def decide(candidate: float, fingerprint: str, champion: dict | None, cfg: Config,
           higher_is_better: bool) -> tuple[bool, str]:
    """(promote, reason). A non-finite candidate never wins the alias (not as the first version, not on
    another eval set); otherwise the first version does, and one better by more than `tolerance` on the
    same eval set."""
    if not math.isfinite(candidate):  # before every other rule: NaN compares false, +-inf looks infinitely better
        return False, f"{cfg.metric} = {candidate} is not finite: a non-finite metric is never promoted"
    if champion is None:
        return True, f"first version with {cfg.alias!r}: no champion yet ({cfg.metric} = {candidate:.6g})"
    raw = champion["tags"].get(METRIC_TAG_PREFIX + cfg.metric)
    if raw is None:
        return False, (f"champion version {champion['version']} has no {cfg.metric} (tag "
                       f"{METRIC_TAG_PREFIX}{cfg.metric}); cannot compare, champion kept")
    best = float(raw)
    champion["value"] = best
    if champion["eval_set_fingerprint"] != fingerprint:
        where = (f"champion version {champion['version']} was evaluated on eval set "
                 f"{champion['eval_set_fingerprint']}, this version on {fingerprint}")
        if cfg.eval_set_mismatch == "promote":
            return True, f"{where}; register.eval_set_mismatch is 'promote'"
        return False, f"{where}: not comparable (register.eval_set_mismatch is 'keep_champion')"
    gain = candidate - best if higher_is_better else best - candidate
    direction = "higher" if higher_is_better else "lower"
    verdict = (f"{cfg.metric} {candidate:.6g} vs champion version {champion['version']} {best:.6g} "
               f"({direction} is better, improvement {gain:.6g}, tolerance {cfg.tolerance:g})")
    return gain > cfg.tolerance, verdict


# ----------------------------------------------------------------------------- the pyfunc model


def save_student_model(model_dir: Path, distill_dir: Path, teacher_dir: Path, teacher_cfg, cfg: Config,
                       tmp: Path) -> None:
    """An MLflow pyfunc model directory (models from code) with the student export and the teacher."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline.teacher import bundle_location

    export = tmp / "export"
    export.mkdir()
    shutil.copytree(Path(distill_dir) / STUDENT_DIR, export / STUDENT_DIR)
    shutil.copy2(Path(distill_dir) / SCHEDULE_FILE, export / SCHEDULE_FILE)
    artifacts = {"export": str(export)}
    location = bundle_location(teacher_dir)
    model_config = {"dtype": teacher_cfg.dtype, "device": cfg.device, "load_t5": teacher_cfg.load_t5,
                    "max_sequence_length": teacher_cfg.max_sequence_length,
                    "local_files_only": teacher_cfg.local_files_only}
    if cfg.copy_teacher and Path(location).is_dir():
        artifacts["teacher"] = location
    else:
        model_config["teacher_location"] = location
    code = tmp / "swd_student_model.py"
    code.write_text(MODEL_CODE)
    packages = tmp / "code"
    # the project's code the model imports (pipeline/ only: no stage), without bytecode caches
    shutil.copytree(REPO_ROOT / "pipeline", packages / "pipeline", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    signature = infer_signature(pd.DataFrame({"prompt": ["a prompt"]}), np.zeros((1, 8, 8, 3), np.uint8),
                                params={"seed": 0})
    mlflow.pyfunc.save_model(
        str(model_dir), python_model=str(code), artifacts=artifacts, model_config=model_config,
        code_paths=[str(packages / "pipeline")], signature=signature,
        pip_requirements=pip_requirements(),
        metadata={"swd": json.loads((export / SCHEDULE_FILE).read_text())})


def pip_requirements() -> list[str]:
    """The packages the model imports, pinned to what is installed (local version labels dropped)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "diffusers", "transformers", "peft", "safetensors", "numpy", "pandas", "pillow",
                 "pydantic", "pyyaml", "scipy", "webdataset", "braceexpand", "pyarrow"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return out


