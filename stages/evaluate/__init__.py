"""`evaluate` stage: the student against the teacher (and the full-resolution baseline) on held-out prompts.

Steps:
1. Eval set (`eval_set.py`): the first `max_prompts` samples of the eval shards (`shards` stage,
   `data.eval_shards`): prompt, image (the reference set), json attributes where present, read whole
   shard by whole shard with the tolerant tar reader, key rule, caption rule and image decoder every
   stage shares (`pipeline.samples`). Unreadable shards, tar faults, missing / empty / non-UTF-8
   captions and images that do not decode are counted rejects (`metrics.json` "reads", MLflow
   `eval_*`); the stage fails, naming the bad shards, only when their fraction exceeds
   `max_bad_fraction`. Its fingerprint (keys, prompts, image digests, seeds and batching, metric
   settings) is what `register` compares champions on.
2. Generation with Ray Data (`generation.py`): the eval prompts in fixed chunks of `batch_size` (one
   seed per chunk, the same chunks and seeds for every generator), one row per (generator, chunk),
   through `map_batches` with the callable class `GenerateActor` on an `ActorPoolStrategy` pool; each
   actor loads the teacher bundle once and each generator once on first use (one GPU per actor where
   the cluster has GPUs). Generators (`pipeline.generate.Generator`):
   - `student`: the distilled scale-wise student (`distill` output, `pipeline.student_export`), SWD.md
     section 3 sampler (`sample_scalewise`), no guidance;
   - `teacher`: the teacher's Euler sampler on its own grid (`teacher_sampler.num_steps`, its
     scheduler's shift) with classifier-free guidance `teacher_sampler.guidance_scale` (`sample_teacher`);
   - `baseline` (when the graph has a `distill_baseline` stage): the full-resolution few-step student.
   Every generator produces images at the student's final scale.
3. Scoring with Ray Data (`scoring.py`: a `ScoreActor` pool, models loaded once per actor) over the
   generated images (kept in the object store as lossless PNG rows) and the reference images
   (decoded, centre-cropped and resized to the generated side in the scorer): EfficientNet-Lite0
   features for the Frechet distance (`pipeline/metrics.py`), CLIP score (`clip_model`), Inception
   features for FID (`inception_weights`), and the shapes oracle's reading of each image, from which
   the driver computes prompt adherence per attribute and overall (= every attribute of the prompt right).
4. Latency (`latency.py`): one Ray task with the resources of one generation actor times each
   generator in turn: `latency_warmup_batches` untimed then `latency_repeats` timed calls of
   `batch_size` prompts (text encoding + sampling + VAE decode); seconds per image = median / batch
   size; speedups from it. The student's task also renders the per-scale progression strip.
5. Outputs (`report.py` draws the images and the table), logged by the graph as the stage run's
   artifacts: `metrics.json` (canonical metrics, eval set; `pipeline.eval_record`), `report.md`
   (comparison table), `samples.png` (prompts x [data, student, teacher, baseline]),
   `progression.png` (the student's clean estimate after each scale). Every metric goes to the
   stage's MLflow run; the canonical ones also to `ctx.summary["parent_metrics"]`, which
   `pipeline/run.py` mirrors onto the pipeline's parent run.

The distill stage's export (`<distill output>/student/` and `schedule.json`) is read by
`pipeline.student_export` (`read_schedule` here, `load_student` in the generators).
"""

from __future__ import annotations

import json
import time
import warnings
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from pipeline.config import Section
from pipeline.context import StageContext
from pipeline.eval_record import CANONICAL_METRICS, METRICS_FILE
from pipeline.generate import GeneratorSpec, decode_png
from pipeline.resources import actor_device, check_actor_dtype, gpus_per_actor
from pipeline.samples import by_reason
from pipeline.student_export import read_schedule
from pipeline.teacher import TeacherSampler
from stages.evaluate.eval_set import (EvaluateError, adherence_targets, decode_reference, eval_set_identity,
                                      inception_weights_identity, make_chunks, read_eval_samples, reference_dataset)
from stages.evaluate.generation import collect_images, generate
from stages.evaluate.latency import latency_metrics, measure_latency
from stages.evaluate.report import report_markdown, save_grid, save_strip
from stages.evaluate.scoring import ScoreSpec, quality_metrics, score

__all__ = ["Config", "VERSION", "SECTIONS", "OUTPUTS", "run", "external_fingerprint", "EvaluateError"]

VERSION = "2"
SECTIONS = ("evaluate", "teacher")
REPORT_FILE = "report.md"
GRID_FILE = "samples.png"
STRIP_FILE = "progression.png"
OUTPUTS = (METRICS_FILE, REPORT_FILE, GRID_FILE, STRIP_FILE)


class Config(Section):
    # Keys that change how the stage runs, not what it writes: left out of every fingerprint
    # (pipeline/graph.py), so changing one reuses the committed output.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("num_actors", "num_cpus_per_actor")
    # the sampler's keys were flat keys of this section before the block: fingerprints stay
    FORMER_KEYS: ClassVar[dict[str, dict[str, str]]] = {"teacher_sampler": {"num_steps": "teacher_num_steps", "guidance_scale": "teacher_guidance_scale"}}

    # Also distil and evaluate the full-resolution few-step baseline (the `distill_baseline` stage:
    # the distill stage with every swd scale set to the largest, same sigmas, losses and steps).
    baseline: bool = False
    max_prompts: int | None = Field(None, ge=1)  # null: every eval sample
    # Fail the stage when more than this fraction of the eval samples read is bad (unreadable shard, bad
    # tar, missing / empty / non-UTF-8 caption, image that does not decode); as cache.max_bad_fraction,
    # an unreadable shard counting as an average shard. Below it, bad shards are counted and reported.
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    seed: int = 0
    batch_size: int = Field(32, ge=1)  # prompts per generation call, and per timed latency call
    num_actors: int = Field(1, ge=1)
    num_cpus_per_actor: float = Field(2.0, gt=0)
    num_gpus_per_actor: float | None = Field(None, ge=0)  # null: 1 when the Ray cluster has GPUs
    teacher_sampler: TeacherSampler = TeacherSampler()  # the `teacher` generator's steps and guidance
    adherence: Literal["auto", "on", "off"] = "auto"
    fd_image_side_px: int = Field(224, ge=32)
    score_batch_size: int = Field(64, ge=1)
    clip_model: str | None = None
    clip_optional: bool = False
    inception_weights: str | None = None
    inception_optional: bool = False
    latency_warmup_batches: int = Field(1, ge=0)
    latency_repeats: int = Field(5, ge=1)
    grid_prompts: int = Field(8, ge=1)

    @field_validator("clip_model", "inception_weights")
    @classmethod
    def _not_empty(cls, v: str | None, info) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(f"evaluate.{info.field_name}: empty string; give a path (or hub id) or null")
        return v


def external_fingerprint(sections: dict) -> list:
    """A local Inception weights file (size, mtime) joins the fingerprint; a CLIP directory by path."""
    return inception_weights_identity(sections["evaluate"].inception_weights)


# ----------------------------------------------------------------------------- stage


def run(ctx: StageContext) -> None:
    import numpy as np

    from pipeline import metrics as M
    from pipeline.data import shard_urls
    from pipeline.teacher import bundle_location, resolve_pretrained

    cfg: Config = ctx.config
    teacher_cfg = ctx.sections["teacher"]
    started = time.monotonic()

    # Optional metrics: a missing path is an error, or a warning and the metric skipped.
    clip_model = _optional(cfg.clip_model, cfg.clip_optional, "clip_model", M.resolve_clip)
    inception = _optional(cfg.inception_weights, cfg.inception_optional, "inception_weights",
                          M.check_inception_weights)

    # 1. the eval set
    urls = shard_urls(ctx.inputs["shards"], "eval")
    samples, reads = read_eval_samples(urls, cfg.max_prompts, cfg.max_bad_fraction)
    prompts = [s["prompt"] for s in samples]
    targets = adherence_targets(samples, cfg.adherence)

    gpus = gpus_per_actor(cfg.num_gpus_per_actor)
    device = actor_device(gpus)
    check_actor_dtype(teacher_cfg.dtype, gpus, "evaluate actors", "evaluate.num_gpus_per_actor")
    location = str(resolve_pretrained(bundle_location(ctx.inputs["teacher"]), teacher_cfg.local_files_only))
    common = dict(location=location, dtype=teacher_cfg.dtype, device=device, load_t5=teacher_cfg.load_t5,
                  max_sequence_length=teacher_cfg.max_sequence_length, local_files_only=teacher_cfg.local_files_only,
                  num_threads=max(1, int(cfg.num_cpus_per_actor)))
    student_schedule = read_schedule(ctx.inputs["distill"])
    specs = {"student": GeneratorSpec(name="student", student_dir=str(ctx.inputs["distill"]), **common),
             "teacher": GeneratorSpec(name="teacher", teacher_num_steps=cfg.teacher_sampler.num_steps,
                                      guidance_scale=cfg.teacher_sampler.guidance_scale,
                                      latent_side=student_schedule["scales"][-1], **common)}
    if ctx.inputs.get("distill_baseline") is not None:
        specs["baseline"] = GeneratorSpec(name="baseline", student_dir=str(ctx.inputs["distill_baseline"]), **common)
    print(f"[evaluate] {len(prompts)} eval prompts from {len(urls)} shard(s); generators {', '.join(specs)}; "
          f"{cfg.num_actors} actor(s) x ({cfg.num_cpus_per_actor} CPU, {gpus} GPU) on {device}", flush=True)

    # 2. generation (Ray Data), the same chunks and seeds for every generator; the images stay in
    # Ray's object store (materialized), the driver takes only the grid's rows
    chunks = make_chunks(prompts, cfg.batch_size, cfg.seed)
    t0 = time.monotonic()
    generated = generate(chunks, list(specs.values()), cfg, gpus)
    generate_s = time.monotonic() - t0
    side = int(decode_png(generated.take(1)[0]["image_bytes"]).shape[0])
    print(f"[evaluate] generated {len(specs)} x {len(prompts)} images of {side} px in {generate_s:.1f} s", flush=True)

    # 3. scores (Ray Data) of generated and reference images; adherence from the oracle's readings
    score_spec = ScoreSpec(device=device, side=side, fd_image_side_px=cfg.fd_image_side_px, clip_model=clip_model,
                           inception_weights=str(inception) if inception else None, oracle=targets is not None,
                           num_threads=max(1, int(cfg.num_cpus_per_actor)))
    t0 = time.monotonic()
    scores = score(generated.union(reference_dataset(samples)), score_spec, cfg, gpus)
    score_s = time.monotonic() - t0
    values = quality_metrics(scores, list(specs), targets)
    print(f"[evaluate] scored {len(specs) + 1} x {len(prompts)} images in {score_s:.1f} s", flush=True)

    # 4. latency, one generator after the other in one task (same process, same resources)
    latency_prompts = [prompts[i % len(prompts)] for i in range(cfg.batch_size)]
    timing = measure_latency(list(specs.values()), latency_prompts, cfg, gpus, strip_prompts=prompts[:4])
    strip = timing["student"].pop("strip")
    values.update(latency_metrics(timing))
    for name, result in timing.items():
        print(f"[evaluate] {name}: {result['latency_s'] * 1000:.2f} ms/image (sampling "
              f"{result['sampling_latency_s'] * 1000:.2f} ms/image) at batch {cfg.batch_size}", flush=True)

    # 5. outputs (the graph logs them as the run's artifacts)
    eval_set = eval_set_identity(samples, cfg, inception)
    generators = {name: _describe(spec, timing[name]) for name, spec in specs.items()}
    record = {"metrics": values, "canonical": [k for k in CANONICAL_METRICS if k in values],
              "eval_set": eval_set, "generators": generators, "fd_extractor": M.FD_EXTRACTOR,
              "fd_image_side_px": cfg.fd_image_side_px, "image_side_px": side,
              "clip_model": clip_model, "inception_weights": str(inception) if inception else None,
              "generate_s": round(generate_s, 2), "score_s": round(score_s, 2),
              "reads": {"shards_read": reads.shards_read, "unreadable_shards": [e["url"] for e in reads.unreadable],
                        "rejects_by_reason": by_reason(reads.rejects), "bad_fraction": round(reads.bad_fraction, 6),
                        "rejects": reads.rejects}}
    (ctx.output_dir / METRICS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    grid_rows = min(cfg.grid_prompts, len(prompts))
    grid = collect_images(generated, list(specs), max_index=grid_rows)
    grid["data"] = np.stack([decode_reference(s["image"], side) for s in samples[:grid_rows]])
    columns = ["data", *specs]
    save_grid(ctx.output_dir / GRID_FILE, [grid[c] for c in columns], columns)
    save_strip(ctx.output_dir / STRIP_FILE, strip, side)
    (ctx.output_dir / REPORT_FILE).write_text(report_markdown(record, prompts[:grid_rows], targets is not None))

    ctx.log.metrics(values)
    ctx.log.tags({"fd_extractor": M.FD_EXTRACTOR, "eval_set_fingerprint": eval_set["fingerprint"],
                  "eval_num_prompts": str(len(prompts))})
    ctx.log.metrics(reads.metrics("eval_"))
    ctx.log.metrics({"evaluate_wall_s": time.monotonic() - started})
    canonical = {k: values[k] for k in CANONICAL_METRICS if k in values}
    ctx.summary.update({"parent_metrics": canonical, "eval_set_fingerprint": eval_set["fingerprint"],
                        "num_prompts": len(prompts), "eval_unreadable_shards": len(reads.unreadable),
                        "eval_rejects": len(reads.rejects)})
    print("[evaluate] " + ", ".join(f"{k} {v:.4g}" for k, v in canonical.items()), flush=True)


def _optional(spec: str | None, optional: bool, key: str, check):
    """A configured optional metric's resolved location, None when off; a missing one raises unless
    the config marks it optional (then a warning, and the metric is skipped)."""
    from pipeline.metrics import MetricError

    if spec is None:
        return None
    try:
        return check(spec)
    except MetricError as e:
        if not optional:
            raise
        warnings.warn(f"{e}; evaluate.{key.split('_')[0]}_optional is true: skipping that metric", stacklevel=2)
        print(f"[evaluate] warning: {e} -- skipped (optional)", flush=True)
        return None


def _describe(spec: GeneratorSpec, timing: dict) -> dict:
    """A generator as metrics.json and report.md describe it: its kind, sampler and latency figures."""
    out = {"kind": "scalewise" if spec.student_dir else "teacher",
           **{k: timing[k] for k in ("latency_s", "sampling_latency_s", "latency_cpu_s", "times_s", "num_forwards",
                                      "scales", "sigmas", "guidance_scale")}}
    if spec.student_dir:
        out["source"] = spec.student_dir
    return out
