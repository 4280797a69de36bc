"""The prompt-set path of the `evaluate` stage (issue 17), in miniature: a prompt file, pytorch-fid's FID
Inception with random weights, tiny random CLIP and PickScore models, and a reference `.npz` made by
`python -m pipeline.fid_stats`; student, teacher and baseline under the same protocol, each FID logged
with it, bootstrap intervals against the fixed reference statistics. Real local Ray (slow)."""

from __future__ import annotations

import json
import math

import mlflow
import pytest

from helpers.context import stage_context
from helpers.eval_protocol import protocol_files
from helpers.exports import ALL, make_shards_output, make_student_export, make_teacher_output
from pipeline import shapes
from pipeline.eval_record import INTERVAL_METRICS, METRICS_FILE
from stages import evaluate
from stages.teacher import Config as TeacherConfig


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("prompt-set")
    teacher = make_teacher_output(root)
    bundle = root / "bundle"
    inputs = {"shards": make_shards_output(root / "shards", 2), "teacher": teacher,
              "distill": make_student_export(root / "distill", bundle, [8, 10, 12, 16]),
              "distill_baseline": make_student_export(root / "baseline", bundle, [16, 16, 16, 16], seed=2)}
    prompts = [shapes.make_sample(0, "eval", i, 64, *ALL)["txt"] for i in range(5)]
    files = protocol_files(root / "protocol", prompts)
    cfg = evaluate.Config(**files, max_prompts=4, batch_size=2, latency_warmup_batches=0, latency_repeats=1,
                          score_batch_size=8, grid_prompts=2, clip_image_side_px=48, fid_image_side_px=32, bootstrap_resamples=40)
    assert evaluate.file_problems(cfg) == []
    ctx = stage_context("evaluate", {"evaluate": cfg, "teacher": TeacherConfig()}, root / "run", inputs)
    evaluate.run(ctx)
    return ctx, files


def test_the_prompt_set_is_scored_against_the_reference_statistics(evaluated):
    ctx, files = evaluated
    record = json.loads((ctx.output_dir / METRICS_FILE).read_text())
    values = record["metrics"]
    assert record["eval_set"]["num_prompts"] == 4 and record["prompts"] == files["prompts"]
    for g in ("student", "teacher", "baseline"):  # the teacher under the same protocol as the student
        assert values[f"{g}_fd"] == values[f"{g}_fid"] > 0  # on a prompt set FD is the FID
        assert f"{g}_fd_efficientnet_lite0" not in values  # no reference images: no EfficientNet FD
        for k in ("clip_score", "clip_cosine", "pickscore", "pickscore_cosine", "adherence"):
            assert math.isfinite(values[f"{g}_{k}"]), k
        assert 0 <= values[f"{g}_clip_score"] <= 100
    assert set(INTERVAL_METRICS) <= set(values)
    fid = record["protocols"]["fid"]
    assert fid == record["protocols"]["fd"]
    assert (fid["extractor"], fid["resize_rule"], fid["image_side_px"], fid["num_samples"]) == \
        ("inception_v3_pytorch_fid_pool3", "pytorch_fid", 32, 4)
    assert fid["reference"]["kind"] == "stats" and fid["reference"]["made"]["num_images"] == 6
    assert fid["weights_sha256"] == fid["reference"]["made"]["weights_sha256"]
    run = mlflow.MlflowClient(ctx.tracking_uri).get_run(ctx.run_id)
    assert json.loads(run.data.tags["fid_protocol"])["id"] == fid["id"] == int(run.data.metrics["fid_protocol_id"])
    assert ctx.summary["parent_metrics"]["fid_protocol_id"] == fid["id"]
    report = (ctx.output_dir / evaluate.REPORT_FILE).read_text()
    assert "PickScore" in report and "FD is the FID" in report and f"protocol id {fid['id']:x}" in report
    from PIL import Image

    assert Image.open(ctx.output_dir / evaluate.GRID_FILE).size[0] == 220 + 3 * (192 + 2)  # no data column


def test_weights_other_than_the_references_are_refused(evaluated, tmp_path):
    from helpers.eval_protocol import random_inception
    from pipeline.eval_protocol import ProtocolError

    ctx, files = evaluated
    other = random_inception(tmp_path / "other.safetensors", seed=1)
    cfg = ctx.config.model_copy(update={"inception_weights": str(other)})
    bad = stage_context("evaluate", {"evaluate": cfg, "teacher": TeacherConfig()}, tmp_path / "run", ctx.inputs)
    with pytest.raises(ProtocolError, match=r"evaluate\.fid_reference_stats: .* was made with Inception weights "
                                            r"sha256 .* but evaluate\.inception_weights has"):
        evaluate.run(bad)
