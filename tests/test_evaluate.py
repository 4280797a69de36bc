"""The `evaluate` stage on a tiny random teacher: every canonical metric and artifact, generation that
depends only on prompts and seeds (not on Ray's batching), the student export as the generators load
it, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers.context import stage_context
from helpers.exports import ALL, TINY_SIGMAS, make_shards_output, make_student_export, make_teacher_output
from pipeline import metrics, shapes
from pipeline.eval_record import CANONICAL_METRICS, METRICS_FILE
from pipeline.generate import Generator, GeneratorSpec
from pipeline.resources import ResourceError
from pipeline.student_export import LORA_WEIGHTS, SCHEDULE_FILE, STUDENT_DIR, ExportError, load_student, read_schedule
from pipeline.teacher import TeacherSampler
from stages import evaluate
from stages.evaluate import eval_set, generation
from stages.teacher import Config as TeacherConfig
from helpers.tiny_metrics import tiny_clip, tiny_inception


def context(root: Path, cfg: evaluate.Config, inputs: dict, teacher: TeacherConfig | None = None):
    return stage_context("evaluate", {"evaluate": cfg, "teacher": teacher or TeacherConfig()}, root, inputs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate-inputs")
    teacher = make_teacher_output(root)
    bundle = root / "bundle"
    shards = make_shards_output(root / "shards", 8)
    # a "tar" of random bytes listed first: counted and reported (FAST allows it), not fatal
    junk = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (shards / "eval" / "eval-junk.tar").write_bytes(junk)
    listing = json.loads((shards / "shards.json").read_text())
    listing["eval"].insert(0, {"url": "eval/eval-junk.tar"})
    (shards / "shards.json").write_text(json.dumps(listing))
    return {"shards": shards, "teacher": teacher,
            "distill": make_student_export(root / "distill", bundle, [8, 10, 12, 16]),
            "distill_baseline": make_student_export(root / "baseline", bundle, [16, 16, 16, 16], seed=2)}


FAST = dict(max_prompts=6, batch_size=3, latency_warmup_batches=1, latency_repeats=2, fd_image_side_px=64,
            score_batch_size=8, grid_prompts=3, max_bad_fraction=0.2, bootstrap_resamples=50)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, inputs, ray_local):
    tmp = tmp_path_factory.mktemp("evaluate-run")
    cfg = evaluate.Config(**FAST, clip_model=str(tiny_clip(tmp / "clip")),
                          inception_weights=str(tiny_inception(tmp / "inception.pt")))
    ctx = context(tmp, cfg, inputs)
    evaluate.run(ctx)
    return ctx


def test_every_canonical_metric_is_logged_and_mirrored(evaluated):
    record = json.loads((evaluated.output_dir / METRICS_FILE).read_text())
    values = record["metrics"]
    assert set(CANONICAL_METRICS) - {k for k in CANONICAL_METRICS if "pickscore" in k} <= set(values)
    assert all(math.isfinite(v) for v in values.values())
    assert values["speedup_vs_teacher"] == pytest.approx(values["teacher_latency_s"] / values["student_latency_s"])
    assert values["speedup_vs_baseline"] == pytest.approx(values["baseline_latency_s"] / values["student_latency_s"])
    for g in ("student", "teacher", "baseline"):
        assert values[f"{g}_fd"] == values[f"{g}_fd_efficientnet_lite0"] > 0
        assert 0 <= values[f"{g}_adherence"] <= values[f"{g}_adherence_colour"] + 1e-9
        assert 0 <= values[f"{g}_clip_score"] <= 100 and values[f"{g}_fid"] >= 0
    assert values["data_adherence"] == 1.0  # the oracle reads the reference images right
    assert record["eval_set"]["num_prompts"] == 6 and record["image_side_px"] == 64
    assert record["generators"]["teacher"]["num_forwards"] == 56  # 28 steps, CFG as one forward of 2B
    assert record["generators"]["student"]["scales"] == [8, 10, 12, 16]
    # MLflow: every metric on the stage's run, the artifacts, the canonical ones for the parent run.
    run = mlflow.MlflowClient(evaluated.tracking_uri).get_run(evaluated.run_id)
    assert {k for k in CANONICAL_METRICS if k in values} <= set(run.data.metrics)
    assert run.data.tags["fd_extractor"] == "efficientnet_lite0"
    assert run.data.tags["eval_set_fingerprint"] == record["eval_set"]["fingerprint"]
    assert not mlflow.MlflowClient(evaluated.tracking_uri).list_artifacts(evaluated.run_id)  # the graph logs OUTPUTS
    from pipeline.eval_record import PARENT_METRICS

    assert evaluated.summary["parent_metrics"] == {k: values[k] for k in PARENT_METRICS if k in values}
    assert set(CANONICAL_METRICS) - {k for k in CANONICAL_METRICS if "pickscore" in k} <= set(values)


def test_a_bad_eval_shard_is_counted_and_reported_not_fatal(evaluated):
    """The inputs list a tar of random bytes before the good eval shard: one corrupt_tar reject (1 of
    9 samples read, under evaluate.max_bad_fraction=0.2) in metrics.json, MLflow and the summary."""
    record = json.loads((evaluated.output_dir / METRICS_FILE).read_text())
    reads = record["reads"]
    junk = str(evaluated.inputs["shards"] / "eval" / "eval-junk.tar")
    assert reads["shards_read"] == 2 and reads["rejects_by_reason"] == {"corrupt_tar": 1}
    assert [(e["url"], e["key"], e["reason"]) for e in reads["rejects"]] == [(junk, f"{junk}@0", "corrupt_tar")]
    assert reads["bad_fraction"] == pytest.approx(1 / 9, abs=1e-6)
    assert record["eval_set"]["num_prompts"] == 6  # the good shard's first 6
    logged = mlflow.MlflowClient(evaluated.tracking_uri).get_run(evaluated.run_id).data.metrics
    assert logged["eval_rejects"] == 1 and logged["eval_rejects_corrupt_tar"] == 1 and logged["eval_shards_read"] == 2
    assert evaluated.summary["eval_rejects"] == 1 and evaluated.summary["eval_unreadable_shards"] == 0


def test_too_many_bad_eval_samples_fail_before_any_work_naming_the_shards(tmp_path, inputs):
    ctx = context(tmp_path, evaluate.Config(max_prompts=6), inputs)  # the default limit, 0.01
    with pytest.raises(evaluate.EvaluateError, match=r"evaluate: 11\.11% of the eval samples read are bad, more than "
                                                     r"evaluate\.max_bad_fraction=0\.01 .*eval-junk\.tar \(1 rejected "
                                                     r"sample\(s\)\)\. Fix or remove the bad shards, or raise "
                                                     r"evaluate\.max_bad_fraction"):
        evaluate.run(ctx)


def test_artifacts_grid_strip_and_report(evaluated):
    from PIL import Image

    grid = Image.open(evaluated.output_dir / evaluate.GRID_FILE)
    # columns data, student, teacher, baseline (64 px upscaled nearest x3); 3 prompt rows; a prompt column
    assert grid.size == (220 + (192 + 2) * 4, 18 + (192 + 2) * 3)
    strip = Image.open(evaluated.output_dir / evaluate.STRIP_FILE)
    assert strip.size == (64 * 4, 64 * 4)  # 4 scales x 4 prompts
    report = (evaluated.output_dir / evaluate.REPORT_FILE).read_text()
    assert "| generator | steps (forwards) | latency s/img" in report
    for name in ("| student | 4 (4)", "| teacher | 28 (56)", "| baseline | 4 (4)", "CLIP score", "FID (Inception)",
                 "Not FID", "FD 95% CI", "adherence 95% CI", "## Gaps (paired bootstrap", "student - teacher adherence",
                 "baseline - student fd"):
        assert name in report
    assert report.count("real: the interval excludes 0") + report.count("not resolved: the interval includes 0") == 4


def test_confidence_intervals_are_logged_everywhere(evaluated):
    from pipeline.eval_record import INTERVAL_METRICS

    record = json.loads((evaluated.output_dir / METRICS_FILE).read_text())
    values = record["metrics"]
    assert set(INTERVAL_METRICS) <= set(values)  # every generator and both differences, adherence and FD
    for g in ("student", "teacher", "baseline"):
        for m in ("adherence", "fd"):
            assert values[f"{g}_{m}_ci95_low"] <= values[f"{g}_{m}_ci95_high"]
        assert values[f"{g}_fd_ci95_low"] <= values[f"{g}_fd"] * 1.5  # FD's bootstrap is biased upward
    assert record["bootstrap"]["resamples"] == 50 and record["bootstrap"]["paired"]
    logged = mlflow.MlflowClient(evaluated.tracking_uri).get_run(evaluated.run_id).data.metrics
    assert set(INTERVAL_METRICS) <= set(logged) and "fd_protocol_id" in logged and "fid_protocol_id" in logged
    assert set(INTERVAL_METRICS) <= set(evaluated.summary["parent_metrics"])
    assert record["protocols"]["fd"]["extractor"] == "efficientnet_lite0"
    assert record["protocols"]["fid"]["extractor"] == "torchscript_inception"


def test_generation_depends_on_prompts_and_seeds_only(inputs, ray_local):
    """Ray Data with two actors gives the same images as one direct, sequential generator."""
    from pipeline.teacher import bundle_location

    prompts = [shapes.make_sample(0, "eval", i, 64, *ALL)["txt"] for i in range(5)]
    chunks = eval_set.make_chunks(prompts, 2, seed=7)
    assert [c["index"] for c in chunks] == [[0, 1], [2, 3], [4]]
    spec = GeneratorSpec(name="student", location=bundle_location(inputs["teacher"]), dtype="float32",
                                  device="cpu", load_t5="auto", local_files_only=True, student_dir=str(inputs["distill"]))
    cfg = evaluate.Config(num_actors=2, num_cpus_per_actor=1)
    teacher = GeneratorSpec(**{**spec.__dict__, "name": "teacher", "student_dir": None,
                                        "teacher_num_steps": 3, "guidance_scale": 2.0, "latent_side": 16})
    via_ray = generation.collect_images(generation.generate(chunks, [spec, teacher], cfg, gpus=0, num_actors=2),
                                      ["student", "teacher"])
    for s in (spec, teacher):
        direct = Generator(s)  # its own bundle, not shared
        expected = np.concatenate([direct(c["prompt"], c["seed"]) for c in chunks])
        assert via_ray[s.name].shape == (5, 64, 64, 3) and via_ray[s.name].dtype == np.uint8
        # Equal up to float summation order (actors run 1 torch thread, this process more): a rare
        # pixel may round the other way.
        diff = np.abs(via_ray[s.name].astype(int) - expected.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_lora_export_is_loaded_fused_and_equals_stock_diffusers_lora(inputs):
    from pipeline.teacher import bundle_location, load_bundle

    bundle = load_bundle(bundle_location(inputs["teacher"]))
    transformer, schedule = load_student(inputs["distill"], bundle)
    assert schedule == {"scales": [8, 10, 12, 16], "sigmas": TINY_SIGMAS}
    assert not any("lora" in n for n, _ in transformer.named_parameters())  # fused, LoRA layers removed
    # Reference: stock diffusers loading of the export, LoRA kept as separate layers (not fused).
    reference = load_bundle(bundle_location(inputs["teacher"])).transformer
    reference.load_lora_adapter(str(inputs["distill"] / STUDENT_DIR), weight_name=LORA_WEIGHTS,
                                prefix="transformer")
    assert any("lora" in n for n, _ in reference.named_parameters())
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds, pooled = bundle.encode_prompt(["a large red circle in the top on a black background"] * 2)
    with torch.no_grad():
        args = dict(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                    timestep=torch.tensor([700.0, 300.0]), return_dict=False)
        student = transformer(**args)[0]
        torch.testing.assert_close(student, reference(**args)[0], rtol=1e-4, atol=1e-4)
        teacher = load_bundle(bundle_location(inputs["teacher"])).transformer(**args)[0]
        assert (teacher - student).abs().max() > 1e-3  # the export is not the teacher


def test_full_transformer_export_and_broken_exports(inputs, tmp_path):
    from pipeline.teacher import bundle_location, load_bundle

    location = bundle_location(inputs["teacher"])
    full = make_student_export(tmp_path / "full", Path(location), [8, 16], full=True)
    json.loads((full / SCHEDULE_FILE).read_text())
    (full / SCHEDULE_FILE).write_text(json.dumps({"scales": [8, 16], "sigmas": [1.0, 0.7, 0.0]}))
    transformer, schedule = load_student(full, load_bundle(location))
    assert schedule["scales"] == [8, 16] and type(transformer).__name__ == "SD3Transformer2DModel"

    (tmp_path / "empty" / STUDENT_DIR).mkdir(parents=True)
    (tmp_path / "empty" / SCHEDULE_FILE).write_text(json.dumps({"scales": [8], "sigmas": [1.0, 0.0]}))
    with pytest.raises(ExportError, match=r"holds neither a LoRA export \(pytorch_lora_weights"):
        load_student(tmp_path / "empty", load_bundle(location))
    with pytest.raises(ExportError, match=r"schedule\.json is missing"):
        read_schedule(tmp_path)
    (tmp_path / SCHEDULE_FILE).write_text(json.dumps({"scales": [8, 16], "sigmas": [1.0, 0.0]}))
    with pytest.raises(ExportError, match=r"expected scales \(N latent sides\) and sigmas \(N \+ 1"):
        read_schedule(tmp_path)


# ----------------------------------------------------------------------------- bad input


def test_no_eval_prompts_is_a_clear_error(tmp_path, inputs):
    empty_list = tmp_path / "listed-none"
    empty_list.mkdir()
    (empty_list / "shards.json").write_text(json.dumps({"train": [], "eval": []}))
    ctx = context(tmp_path, evaluate.Config(), {**inputs, "shards": empty_list})
    with pytest.raises(evaluate.EvaluateError, match=r"no eval prompts: the shards stage lists no eval shard"):
        evaluate.run(ctx)
    empty_tar = make_shards_output(tmp_path / "empty-tar", 0)
    ctx = context(tmp_path, evaluate.Config(), {**inputs, "shards": empty_tar})
    with pytest.raises(evaluate.EvaluateError, match=r"no eval prompts: the eval shards \(1: .*eval-000000.tar\) "
                                                     r"hold no samples"):
        evaluate.run(ctx)


def test_missing_clip_or_inception_path_fails_before_any_work(tmp_path, inputs):
    ctx = context(tmp_path, evaluate.Config(clip_model=str(tmp_path / "no-clip")), inputs)
    with pytest.raises(metrics.MetricError, match=r"evaluate\.clip_model .*no-clip.*no such directory"):
        evaluate.run(ctx)
    ctx = context(tmp_path, evaluate.Config(inception_weights=str(tmp_path / "no-inception.pt")), inputs)
    with pytest.raises(metrics.MetricError, match=r"evaluate\.inception_weights .*no-inception\.pt.*no such file"):
        evaluate.run(ctx)


def test_optional_metric_with_a_missing_path_is_skipped_with_a_warning(tmp_path):
    from stages.evaluate.protocol import optional_file

    cfg = evaluate.Config(clip_model=str(tmp_path / "no-clip"), clip_optional=True,
                          inception_weights=str(tmp_path / "x.pt"), inception_optional=True)
    with pytest.warns(UserWarning, match=r"no-clip.*evaluate\.clip_optional is true: skipping that metric"):
        assert optional_file(cfg, "clip_model") is None
    with pytest.warns(UserWarning, match=r"evaluate\.inception_optional is true"):
        assert optional_file(cfg, "inception_weights") is None
    assert optional_file(evaluate.Config(), "clip_model") is None
    with pytest.raises(metrics.MetricError, match=r"evaluate\.clip_model .*no-clip"):
        optional_file(cfg.model_copy(update={"clip_optional": False}), "clip_model")


def test_adherence_needs_the_shapes_grammar_or_attributes(tmp_path):
    prompts = ["a photo of a cat", "a large red circle in the top on a black background"]
    samples, _ = eval_set.read_eval_samples(
        [str(make_shards_output(tmp_path / "s", 2, prompts) / "eval" / "eval-000000.tar")], None)
    with pytest.warns(UserWarning, match=r"1 of 2 eval samples .*'eval-0000000'.* adherence metrics skipped"):
        assert eval_set.adherence_targets(samples, "auto") is None
    with pytest.raises(evaluate.EvaluateError, match=r"evaluate\.adherence 'on': 1 of 2 eval samples"):
        eval_set.adherence_targets(samples, "on")
    assert eval_set.adherence_targets(samples, "off") is None
    assert eval_set.adherence_targets(samples[1:], "on")[0].colour == "red"


def test_float16_on_cpu_actors_fails_before_any_work(tmp_path, inputs):
    ctx = context(tmp_path, evaluate.Config(max_prompts=6, max_bad_fraction=0.2, num_gpus_per_actor=0), inputs,
                  teacher=TeacherConfig(dtype="float16"))
    with pytest.raises(ResourceError, match=r"teacher\.dtype 'float16': the evaluate actors run on the CPU here .*"
                                            r"evaluate\.num_gpus_per_actor=0"):
        evaluate.run(ctx)


def test_the_teacher_sampler_block_keeps_the_fingerprint_of_the_former_keys():
    """`teacher_sampler` replaced `teacher_num_steps` / `teacher_guidance_scale`: the fingerprint still
    sees the former keys, so committed evaluate outputs stay reusable."""
    import hashlib

    from pydantic import ValidationError

    from pipeline.graph import section_fingerprint

    cfg = evaluate.Config(teacher_sampler={"num_steps": 5, "guidance_scale": 2.0})
    assert cfg.teacher_sampler == TeacherSampler(num_steps=5, guidance_scale=2.0)
    assert evaluate.Config().teacher_sampler == TeacherSampler(num_steps=28, guidance_scale=3.0)
    dump = section_fingerprint(cfg)
    assert "teacher_sampler" not in dump and (dump["teacher_num_steps"], dump["teacher_guidance_scale"]) == (5, 2.0)
    assert "num_actors" not in dump and "num_cpus_per_actor" not in dump
    # The default's section digest as it was before the block (stages/evaluate.py at c6f28d2), over the
    # keys that existed then (keys added since change the digest by design; VERSION bumps with them).
    at_c6f28d2 = {"baseline", "max_prompts", "max_bad_fraction", "seed", "batch_size", "num_gpus_per_actor",
                  "teacher_num_steps", "teacher_guidance_scale", "adherence", "fd_image_side_px", "score_batch_size",
                  "clip_model", "clip_optional", "inception_weights", "inception_optional", "latency_warmup_batches",
                  "latency_repeats", "grid_prompts"}
    then = {k: v for k, v in section_fingerprint(evaluate.Config()).items() if k in at_c6f28d2}
    digest = hashlib.sha256(json.dumps(then, sort_keys=True).encode()).hexdigest()
    assert digest[:16] == "e4e80ffd092c45cc"
    with pytest.raises(ValidationError, match=r"teacher_num_steps"):
        evaluate.Config(teacher_num_steps=5)


def test_config_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"evaluate\.clip_model: empty string"):
        evaluate.Config(clip_model=" ")
    with pytest.raises(ValidationError, match=r"adherence"):
        evaluate.Config(adherence="sometimes")
