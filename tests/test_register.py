"""The `register` stage against a real MLflow server on loopback: first version promoted, a worse one
not (tagged why), a better one promoted; the pyfunc model loads with mlflow.pyfunc.load_model and
generates; a champion alias whose version was deleted is a clear error. Plus the decision rule alone."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipeline.context import StageContext
from helpers.context import stage_context
from pipeline.eval_record import METRICS_FILE
from pipeline.generate import Generator, GeneratorSpec
from stages import register
from stages.teacher import Config as TeacherConfig
from helpers.exports import make_student_export, make_teacher_output

PROMPTS = ["a large red circle in the top on a black background", "a small blue square in the left on a white background"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("register-inputs")
    teacher = make_teacher_output(root)
    return {"teacher": teacher, "distill": make_student_export(root / "distill", root / "bundle", [8, 10, 12, 16])}


def evaluation(root: Path, student_fd: float, fingerprint: str = "evalset-a") -> Path:
    """An `evaluate` output as register reads it: metrics.json with the canonical metrics and the eval set."""
    root.mkdir(parents=True)
    metrics = {"student_fd": student_fd, "teacher_fd": 10.0, "student_adherence": 0.8, "teacher_adherence": 0.9,
               "student_latency_s": 0.01, "teacher_latency_s": 0.2, "speedup_vs_teacher": 20.0}
    (root / METRICS_FILE).write_text(json.dumps({"metrics": metrics, "eval_set": {"fingerprint": fingerprint}}))
    return root


def register_once(tmp: Path, uri: str, inputs: dict, cfg: register.Config, student_fd: float,
                  fingerprint: str = "evalset-a") -> StageContext:
    ctx = stage_context("register", {"register": cfg, "teacher": TeacherConfig()}, tmp, uri=uri,
                        inputs={**inputs, "evaluate": evaluation(tmp / "evaluate", student_fd, fingerprint)},
                        experiment="register-test")
    register.run(ctx)
    return ctx


def test_promotion_first_better_worse_and_the_pyfunc_model(tmp_path, mlflow_server, inputs, monkeypatch):
    name = "swd-student-promotion"
    cfg = register.Config(model_name=name)
    client = mlflow.MlflowClient(mlflow_server)

    first = register_once(tmp_path / "1", mlflow_server, inputs, cfg, student_fd=20.0)
    assert first.summary["promoted"] and "first version" in first.summary["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    v1 = client.get_model_version(name, "1")
    assert v1.tags["eval_set_fingerprint"] == "evalset-a" and float(v1.tags["metric.student_fd"]) == 20.0
    assert v1.tags["promotion"].startswith("promoted: first version")

    worse = register_once(tmp_path / "2", mlflow_server, inputs, cfg, student_fd=25.0)
    assert not worse.summary["promoted"]
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version(name, "2").tags["promotion"] == (
        "not promoted: student_fd 25 vs champion version 1 20 (lower is better, improvement -5, tolerance 0)")

    better = register_once(tmp_path / "3", mlflow_server, inputs, cfg, student_fd=15.0)
    assert better.summary["promoted"]
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    assert client.get_registered_model(name).tags["champion_version"] == "3"
    result = json.loads((better.output_dir / register.RESULT_FILE).read_text())
    assert result["champion_before"] == {"version": 1, "value": 20.0, "eval_set_fingerprint": "evalset-a"}

    # Better, but measured on another eval set: not comparable, the champion stays.
    other = register_once(tmp_path / "4", mlflow_server, inputs, cfg, student_fd=5.0, fingerprint="evalset-b")
    assert not other.summary["promoted"] and "evaluated on eval set evalset-a, this version on evalset-b" \
        in client.get_model_version(name, "4").tags["promotion"]
    assert client.get_model_version_by_alias(name, "champion").version == "3"

    # The champion as a pyfunc model: prompts in, uint8 images out, the same as the student directly.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"seed": 3})
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert model.predict(pd.DataFrame({"prompt": PROMPTS[:1]})).shape == (1, 64, 64, 3)  # seed defaults to 0
    direct = Generator(GeneratorSpec(
        name="student", location=json.loads((inputs["teacher"] / "teacher.json").read_text())["location"],
        dtype="float32", device="cpu", load_t5="auto", local_files_only=True, num_threads=None,
        student_dir=str(inputs["distill"])))
    np.testing.assert_array_equal(images, direct(PROMPTS, 3))
    meta = model.metadata.metadata["swd"]
    assert meta["scales"] == [8, 10, 12, 16]


def test_champion_alias_to_a_deleted_version_is_a_clear_error(tmp_path, mlflow_server, inputs):
    name = "swd-student-deleted"
    cfg = register.Config(model_name=name)
    register_once(tmp_path / "1", mlflow_server, inputs, cfg, student_fd=20.0)
    client = mlflow.MlflowClient(mlflow_server)
    client.delete_model_version(name, "1")
    with pytest.raises(register.RegisterError, match=r"registered model 'swd-student-deleted': the 'champion' alias "
                                                     r"points at version 1, which was deleted"):
        register_once(tmp_path / "2", mlflow_server, inputs, cfg, student_fd=10.0)
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == []  # nothing was registered


def test_a_metric_the_evaluation_lacks_is_an_error(tmp_path, mlflow_server, inputs):
    cfg = register.Config(model_name="swd-student-clip", metric="student_clip_score")
    with pytest.raises(register.RegisterError, match=r"register\.metric 'student_clip_score': the evaluate stage did "
                                                     r"not produce it"):
        register_once(tmp_path, mlflow_server, inputs, cfg, student_fd=1.0)


@pytest.mark.parametrize("metric, higher, candidate, best, tolerance, promoted", [
    ("student_fd", False, 9.0, 10.0, 0.0, True),
    ("student_fd", False, 10.0, 10.0, 0.0, False),      # equal is not better
    ("student_fd", False, 9.5, 10.0, 1.0, False),       # better, but not by more than the tolerance
    ("student_fd", False, 10.5, 10.0, -1.0, True),      # a negative tolerance accepts a little worse
    ("student_adherence", True, 0.91, 0.90, 0.0, True),
    ("student_adherence", True, 0.89, 0.90, 0.0, False),
])
def test_decision_rule(metric, higher, candidate, best, tolerance, promoted):
    cfg = register.Config(metric=metric, tolerance=tolerance)
    champion = {"version": 2, "eval_set_fingerprint": "x", "tags": {f"metric.{metric}": repr(best)}, "value": None}
    assert register.decide(candidate, "x", champion, cfg, higher)[0] is promoted
    assert register.decide(candidate, "x", None, cfg, higher)[0] is True  # first ever
    assert register.decide(candidate, "y", dict(champion), register.Config(metric=metric, eval_set_mismatch="promote"),
                           higher)[0] is True
    ok, why = register.decide(candidate, "x", {**champion, "tags": {}}, cfg, higher)
    assert not ok and "has no" in why


def test_config_rejects_unknown_metrics():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"register\.metric: 'teacher_fd' is not a metric .*valid: .*student_fd"):
        register.Config(metric="teacher_fd")


@pytest.mark.parametrize("candidate", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("metric, higher", [("student_fd", False), ("student_adherence", True)])
def test_a_non_finite_metric_never_promotes(candidate, metric, higher):
    """Not as the first version, not on another eval set with eval_set_mismatch=promote, not against a
    champion (where -inf FD or +inf adherence would look infinitely better), not with any tolerance."""
    champion = {"version": 2, "eval_set_fingerprint": "x", "tags": {f"metric.{metric}": repr(10.0)}, "value": None}
    promote_anyway = register.Config(metric=metric, eval_set_mismatch="promote", tolerance=-1e30)
    for fingerprint, champ in [("x", None), ("y", None), ("y", champion), ("x", champion),
                               ("x", {**champion, "tags": {}})]:
        ok, why = register.decide(candidate, fingerprint, None if champ is None else dict(champ), promote_anyway, higher)
        assert not ok, (fingerprint, champ, why)
        assert why == f"{metric} = {candidate} is not finite: a non-finite metric is never promoted"
