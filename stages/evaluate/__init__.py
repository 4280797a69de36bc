"""`evaluate` stage: the student against the teacher (and the full-resolution baseline) on held-out prompts.

Steps:
1. Eval set (`eval_set.py`): the first `max_prompts` samples of the eval shards (`shards` stage,
   `data.eval_shards`): prompt, image (the reference set), json attributes where present, read whole
   shard by whole shard with the tolerant tar reader, key rule, caption rule and image decoder every
   stage shares (`pipeline.samples`). Unreadable shards, tar faults, missing / empty / non-UTF-8
   captions and images that do not decode are counted rejects (`metrics.json` "reads", MLflow
   `eval_*`); the stage fails, naming the bad shards, only when their fraction exceeds
   `max_bad_fraction`. Its fingerprint (keys, prompts, image digests, seeds and batching, metric
   settings) is what `register` compares champions on. Or, with `prompts` set (the published protocol,
   `protocol.py`, issue 17): the first `max_prompts` prompts of a prompt file, no reference images; FID
   against `fid_reference_stats` (pytorch-fid's `.npz`), and `_fd` is that FID. Every configured protocol
   file is checked while the graph is planned (`external_fingerprint`), before any Ray work.
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
   the driver computes prompt adherence per attribute and overall (= every attribute of the prompt right);
   PickScore (`pickscore_model`) and both CLIP-score definitions; the standard FID (`pipeline/fid_inception.py`)
   with its protocol (`pipeline/eval_protocol.py`). Then paired bootstrap 95% intervals (`bootstrap_resamples`,
   `pipeline/bootstrap.py`) of adherence and FD per generator and of student - teacher, baseline - student.
4. Latency (`latency.py`): one Ray task with the resources of one generation actor times each
   generator in turn: `latency_warmup_batches` untimed then `latency_repeats` timed calls of
   `batch_size` prompts (text encoding + sampling + VAE decode); seconds per image = median / batch
   size; speedups from it. The student's task also renders the per-scale progression strip.
5. Outputs (`report.py` draws the images and the table), logged by the graph as the stage run's
   artifacts: `metrics.json` (canonical metrics, eval set; `pipeline.eval_record`), `report.md`
   (comparison table, intervals, one sentence per gap, protocols), `samples.png` (prompt-labelled rows x
   [data, student, teacher, baseline], nearest-neighbour thumbnails; `pipeline/image_grid.py`),
   `progression.png` (the student's clean estimate after each scale). Every metric goes to the
   stage's MLflow run; the canonical ones also to `ctx.summary["parent_metrics"]`, which
   `pipeline/run.py` mirrors onto the pipeline's parent run.

The distill stage's export (`<distill output>/student/` and `schedule.json`) is read by
`pipeline.student_export` (`read_schedule` here, `load_student` in the generators).
"""

from __future__ import annotations

import json
import time
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Section
from pipeline.context import StageContext
from pipeline import fid_inception
from pipeline.eval_record import CANONICAL_METRICS, GENERATORS, METRICS_FILE, PARENT_METRICS
from pipeline.generate import GeneratorSpec, decode_png
from pipeline.resources import actor_count, actor_device, check_actor_dtype, gpus_per_actor
from pipeline.samples import by_reason
from pipeline.student_export import read_schedule
from pipeline.teacher import TeacherSampler
from stages.evaluate.eval_set import (EvaluateError, adherence_targets, decode_reference, eval_set_identity,
                                      inception_weights_identity, make_chunks, read_eval_samples, reference_dataset)
from stages.evaluate.generation import collect_images, generate
from stages.evaluate.latency import latency_metrics, measure_latency
from stages.evaluate.report import report_markdown, save_grid, save_strip
from stages.evaluate.protocol import file_identity, file_problems, optional_file, prompt_samples, reference_stats
from stages.evaluate.scoring import ScoreSpec, confidence_intervals, quality_metrics, score

__all__ = ["Config", "VERSION", "SECTIONS", "OUTPUTS", "run", "external_fingerprint", "EvaluateError"]

VERSION = "3"
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
    # Actors per Ray Data pool (generation, scoring). null: one per `num_gpus_per_actor` of the cluster's GPUs
    # (a pool that fills the cluster; 1 on a CPU-only one).
    num_actors: int | None = Field(None, ge=1)
    num_cpus_per_actor: float = Field(2.0, gt=0)
    num_gpus_per_actor: float | None = Field(None, ge=0)  # null: 1 when the Ray cluster has GPUs
    teacher_sampler: TeacherSampler = TeacherSampler()  # the `teacher` generator's steps and guidance
    # Sampling-time ablations of the student's (and baseline's) scale-wise sampler (SWD.md section 3;
    # bench/ablations.py): how the latent moves to the next scale (bicubic: SwD; nearest: the first public
    # release's aliasing), and which latent is upsampled (clean: the clean estimate, SwD; noisy: the
    # re-noised latent at the current scale, the paper's failure case). Not distill keys: a variant
    # reuses the trained student.
    student_upsample: Literal["bicubic", "nearest"] = "bicubic"
    student_upsample_source: Literal["clean", "noisy"] = "clean"
    adherence: Literal["auto", "on", "off"] = "auto"
    fd_image_side_px: int = Field(224, ge=32)
    score_batch_size: int = Field(64, ge=1)
    # CLIP: a local transformers CLIP directory or a hub id in the local Hugging Face cache; both the
    # torchmetrics CLIPScore (`_clip_score`, max(100 * mean cos, 0)) and the released cosine (`_clip_cosine`).
    clip_model: str | None = None
    clip_optional: bool = False
    # Side (px) images are resized to (bicubic) before the CLIP / PickScore processor; null: as generated
    # (the released evaluation: 512).
    clip_image_side_px: int | None = Field(None, ge=16)
    # PickScore (`_pickscore`, logit_scale * cos as the PickScore paper; `_pickscore_cosine` as the released
    # code): a local CLIP directory (PickScore_v1), its processor from pickscore_processor (null: the same dir).
    pickscore_model: str | None = None
    pickscore_processor: str | None = None
    pickscore_optional: bool = False
    # FID: a `.safetensors` of pytorch-fid's FID Inception-v3 (pipeline/fid_inception.py; the standard FID),
    # or a TorchScript `.pt` (the older hook); null: no FID. Optional: skipped with a warning when missing
    # (the weights or fid_reference_stats).
    inception_weights: str | None = None
    inception_optional: bool = False
    # The resize rule to Inception's 299 px (safetensors weights): pytorch_fid (bilinear, the released
    # statistics') or clean_fid (PIL bicubic per channel, clean-fid's rule).
    fid_resize: Literal["pytorch_fid", "clean_fid"] = "pytorch_fid"
    # Side (px) images are brought to before FID (Lanczos + centre crop, as the released evaluation's 256);
    # null: as generated.
    fid_image_side_px: int | None = Field(None, ge=16)
    # Prompt-set evaluation (issue 17): a prompt file (.txt one per line, .csv / .parquet column
    # prompt_column) instead of the eval shards; its first max_prompts are generated and scored against
    # fid_reference_stats (an .npz with mu and sigma, python -m pipeline.fid_stats), so `_fd` is that FID.
    prompts: str | None = None
    prompt_column: str = "caption"
    fid_reference_stats: str | None = None
    # Bootstrap 95% intervals over the eval prompts (paired: the same resampled prompts for every
    # generator and the reference set); 0: none. Cost: ~8 ms per resample per generator at 256 prompts
    # x 1280-d (exact Gram form, pipeline/bootstrap.py); with more prompts than feature dimensions a
    # D x D eigendecomposition per resample (seconds at 5000 x 2048: use ~100 there).
    bootstrap_resamples: int = Field(1000, ge=0)
    bootstrap_seed: int = 0
    # The paper's figures for this setting (SWD.md section 5), shown beside this evaluation's in report.md
    # and metrics.json: {metric as logged, e.g. student_fid: value}; {}: none. Read by people, never compared
    # automatically (a published FID is comparable only under the same protocol).
    published: dict[str, float] = {}
    latency_warmup_batches: int = Field(1, ge=0)
    latency_repeats: int = Field(5, ge=1)
    grid_prompts: int = Field(8, ge=1)
    # Side (px) of each thumbnail in samples.png (nearest-neighbour upscaled, never downscaled).
    grid_thumbnail_px: int = Field(192, ge=16)

    @field_validator("clip_model", "inception_weights", "pickscore_model", "pickscore_processor", "prompts",
                     "fid_reference_stats")
    @classmethod
    def _not_empty(cls, v: str | None, info) -> str | None:
        if v is not None and not v.strip():
            raise ValueError(f"evaluate.{info.field_name}: empty string; give a path (or hub id) or null")
        return v

    @model_validator(mode="after")
    def _protocol_complete(self):
        problems = []
        known = set(CANONICAL_METRICS) | {f"{g}_{m}" for g in GENERATORS for m in ("clip_cosine", "pickscore_cosine")}
        for key in sorted(set(self.published) - known):
            problems.append(f"evaluate.published.{key}: not a metric the stage logs; use one of "
                            f"{', '.join(sorted(known))}")
        if self.fid_reference_stats is not None and self.inception_weights is None:
            problems.append("evaluate.fid_reference_stats: set without evaluate.inception_weights; FID against "
                            "reference statistics needs the Inception weights they were made with")
        if self.prompts is not None and self.inception_weights is not None and self.fid_reference_stats is None:
            problems.append("evaluate.fid_reference_stats: null with evaluate.prompts and evaluate.inception_weights "
                            "set; a prompt set has no reference images, so FID needs reference statistics (an "
                            ".npz with mu and sigma; `python -m pipeline.fid_stats` makes one), or set "
                            "evaluate.inception_weights to null")
        if self.pickscore_processor is not None and self.pickscore_model is None:
            problems.append("evaluate.pickscore_processor: set without evaluate.pickscore_model")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def external_fingerprint(sections: dict) -> list:
    """Local protocol files (path, size, mtime) join the fingerprint; CLIP directories by path. Also the
    pre-flight check: a configured protocol file that is missing or unusable (and not marked optional) is a
    ConfigError naming its key, raised while the graph is planned, before any Ray work starts."""
    from pipeline.config import ConfigError

    cfg = sections["evaluate"]
    problems = file_problems(cfg)
    if problems:
        raise ConfigError(problems)
    extra = [[key, file_identity(getattr(cfg, key))] for key in ("prompts", "fid_reference_stats")
             if getattr(cfg, key) is not None]
    return inception_weights_identity(cfg.inception_weights) + extra


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
    clip_model = optional_file(cfg, "clip_model")
    pickscore_model = optional_file(cfg, "pickscore_model")
    pickscore_processor = optional_file(cfg, "pickscore_processor") if pickscore_model else None
    inception = optional_file(cfg, "inception_weights")
    reference_file = optional_file(cfg, "fid_reference_stats") if inception else None
    inception_sha256 = fid_inception.file_digest(inception) if inception else None
    # the reference statistics, checked against the extractor: its dimension, the weights and preprocessing
    # they were made with
    reference = reference_stats(cfg, inception) if reference_file else None
    if cfg.prompts is not None and reference is None:
        inception = inception_sha256 = None  # a prompt set has FID only against reference statistics

    # 1. the eval set: the eval shards (prompts + reference images), or a prompt file (issue 17)
    if cfg.prompts is not None:
        urls, reads = [cfg.prompts], None
        samples = prompt_samples(cfg)
    else:
        urls = shard_urls(ctx.inputs["shards"], "eval")
        samples, reads = read_eval_samples(urls, cfg.max_prompts, cfg.max_bad_fraction)
    prompts = [s["prompt"] for s in samples]
    targets = adherence_targets(samples, cfg.adherence)

    gpus = gpus_per_actor(cfg.num_gpus_per_actor)
    num_actors = actor_count(cfg.num_actors, gpus)
    device = actor_device(gpus)
    check_actor_dtype(teacher_cfg.dtype, gpus, "evaluate actors", "evaluate.num_gpus_per_actor")
    location = str(resolve_pretrained(bundle_location(ctx.inputs["teacher"]), teacher_cfg.local_files_only))
    common = dict(location=location, dtype=teacher_cfg.dtype, device=device, load_t5=teacher_cfg.load_t5,
                  max_sequence_length=teacher_cfg.max_sequence_length, local_files_only=teacher_cfg.local_files_only,
                  num_threads=max(1, int(cfg.num_cpus_per_actor)))
    student_schedule = read_schedule(ctx.inputs["distill"])
    sampler = dict(upsample=cfg.student_upsample, upsample_source=cfg.student_upsample_source)  # students only
    specs = {"student": GeneratorSpec(name="student", student_dir=str(ctx.inputs["distill"]), **sampler, **common),
             "teacher": GeneratorSpec(name="teacher", teacher_num_steps=cfg.teacher_sampler.num_steps,
                                      guidance_scale=cfg.teacher_sampler.guidance_scale,
                                      latent_side=student_schedule["scales"][-1], **common)}
    if ctx.inputs.get("distill_baseline") is not None:
        specs["baseline"] = GeneratorSpec(name="baseline", student_dir=str(ctx.inputs["distill_baseline"]),
                                          **sampler, **common)
    print(f"[evaluate] {len(prompts)} eval prompts from {len(urls)} shard(s); generators {', '.join(specs)}; "
          f"{num_actors} actor(s) x ({cfg.num_cpus_per_actor} CPU, {gpus} GPU) on {device}", flush=True)

    # 2. generation (Ray Data), the same chunks and seeds for every generator; the images stay in
    # Ray's object store (materialized), the driver takes only the grid's rows
    chunks = make_chunks(prompts, cfg.batch_size, cfg.seed)
    t0 = time.monotonic()
    generated = generate(chunks, list(specs.values()), cfg, gpus, num_actors)
    generate_s = time.monotonic() - t0
    side = int(decode_png(generated.take(1)[0]["image_bytes"]).shape[0])
    print(f"[evaluate] generated {len(specs)} x {len(prompts)} images of {side} px in {generate_s:.1f} s", flush=True)

    # 3. scores (Ray Data) of generated and reference images; adherence from the oracle's readings
    prompt_set = cfg.prompts is not None
    score_spec = ScoreSpec(device=device, side=side, fd_image_side_px=cfg.fd_image_side_px, clip_model=clip_model,
                           inception_weights=str(inception) if inception else None, oracle=targets is not None,
                           num_threads=max(1, int(cfg.num_cpus_per_actor)), fd=not prompt_set,
                           fid_resize=cfg.fid_resize, fid_image_side_px=cfg.fid_image_side_px,
                           clip_image_side_px=cfg.clip_image_side_px, pickscore_model=pickscore_model,
                           pickscore_processor=pickscore_processor)
    t0 = time.monotonic()
    scores = score(generated if prompt_set else generated.union(reference_dataset(samples)), score_spec, cfg, gpus, num_actors)
    score_s = time.monotonic() - t0
    values = quality_metrics(scores, list(specs), targets, reference, fid_is_fd=prompt_set)
    print(f"[evaluate] scored {len(specs) + (0 if prompt_set else 1)} x {len(prompts)} images in {score_s:.1f} s",
          flush=True)
    bootstrap_s = 0.0
    if cfg.bootstrap_resamples:  # paired bootstrap intervals over the prompts
        t0 = time.monotonic()
        values.update(confidence_intervals(scores, list(specs), targets, cfg, reference))
        bootstrap_s = time.monotonic() - t0
        print(f"[evaluate] {cfg.bootstrap_resamples} bootstrap resamples in {bootstrap_s:.1f} s", flush=True)
    protocols = _protocols(cfg, samples, prompt_set, inception, inception_sha256, reference, values)
    values.update({f"{kind}_protocol_id": float(p["id"]) for kind, p in protocols.items()})

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
    fd_extractor = protocols["fd"]["extractor"] if "fd" in protocols else M.FD_EXTRACTOR
    record = {"metrics": values, "canonical": [k for k in CANONICAL_METRICS if k in values],
              "eval_set": eval_set, "generators": generators, "fd_extractor": fd_extractor,
              "fd_image_side_px": cfg.fd_image_side_px, "image_side_px": side,
              "clip_model": clip_model, "inception_weights": str(inception) if inception else None,
              "pickscore_model": pickscore_model, "prompts": cfg.prompts, "protocols": protocols,
              "published": dict(cfg.published),
              "bootstrap": {"resamples": cfg.bootstrap_resamples, "seed": cfg.bootstrap_seed, "paired": True,
                            "level": 0.95, "seconds": round(bootstrap_s, 2)},
              "generate_s": round(generate_s, 2), "score_s": round(score_s, 2),
              "reads": None if reads is None else
              {"shards_read": reads.shards_read, "unreadable_shards": [e["url"] for e in reads.unreadable],
               "rejects_by_reason": by_reason(reads.rejects), "bad_fraction": round(reads.bad_fraction, 6),
               "rejects": reads.rejects}}
    (ctx.output_dir / METRICS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    grid_rows = min(cfg.grid_prompts, len(prompts))
    grid = collect_images(generated, list(specs), max_index=grid_rows)
    columns = list(specs)
    if not prompt_set:
        grid["data"] = np.stack([decode_reference(s["image"], side) for s in samples[:grid_rows]])
        columns = ["data", *specs]
    save_grid(ctx.output_dir / GRID_FILE, [grid[c] for c in columns], columns, prompts[:grid_rows],
              cfg.grid_thumbnail_px)
    save_strip(ctx.output_dir / STRIP_FILE, strip, side)
    (ctx.output_dir / REPORT_FILE).write_text(report_markdown(record, prompts[:grid_rows], targets is not None))

    ctx.log.metrics(values)
    ctx.log.tags({"fd_extractor": fd_extractor, "eval_set_fingerprint": eval_set["fingerprint"],
                  "eval_num_prompts": str(len(prompts)),
                  **{f"{kind}_protocol": json.dumps(p, sort_keys=True) for kind, p in protocols.items()}})
    if reads is not None:
        ctx.log.metrics(reads.metrics("eval_"))
    ctx.log.metrics({"evaluate_wall_s": time.monotonic() - started, "evaluate_bootstrap_s": bootstrap_s})
    parent = {k: values[k] for k in PARENT_METRICS if k in values}
    ctx.summary.update({"parent_metrics": parent, "eval_set_fingerprint": eval_set["fingerprint"],
                        "num_prompts": len(prompts), "eval_unreadable_shards": len(reads.unreadable) if reads else 0,
                        "eval_rejects": len(reads.rejects) if reads else 0})
    canonical = {k: values[k] for k in CANONICAL_METRICS if k in values}
    print("[evaluate] " + ", ".join(f"{k} {v:.4g}" for k, v in canonical.items()), flush=True)


def _protocols(cfg: Config, samples: list[dict], prompt_set: bool, inception, inception_sha256, reference,
               values: dict) -> dict[str, dict]:
    """{"fd": the protocol of `_fd`, "fid": of `_fid`} (`pipeline.eval_protocol.fid_protocol`), each
    present when its metric is; `compare` compares a metric only between runs of one protocol id."""
    from pipeline import metrics as M
    from pipeline.eval_protocol import fid_protocol

    n = len(samples)
    out = {}
    images_ref = {"kind": "images", "eval_set": eval_set_identity(samples, cfg, inception)["fingerprint"]}
    if any(k.endswith("_fid") for k in values):
        fields = ({"extractor": fid_inception.EXTRACTOR, "resize_rule": cfg.fid_resize}
                  if str(inception).endswith(".safetensors") else
                  {"extractor": "torchscript_inception", "resize_rule": "bicubic_antialias_299"})
        ref = ({"kind": "stats", "sha256": reference["sha256"], "made": reference["protocol"]}
               if reference is not None else images_ref)
        out["fid"] = fid_protocol(fields["extractor"], inception_sha256, fields["resize_rule"], cfg.fid_image_side_px,
                                  n, ref)
    if prompt_set and "fid" in out:
        out["fd"] = out["fid"]
    elif not prompt_set:
        out["fd"] = fid_protocol(M.FD_EXTRACTOR, "efficientnet-lite0-57934424", "bicubic_antialias",
                                 cfg.fd_image_side_px, n, images_ref)
    return out


def _describe(spec: GeneratorSpec, timing: dict) -> dict:
    """A generator as metrics.json and report.md describe it: its kind, sampler and latency figures."""
    out = {"kind": "scalewise" if spec.student_dir else "teacher",
           **{k: timing[k] for k in ("latency_s", "sampling_latency_s", "latency_cpu_s", "times_s", "num_forwards",
                                      "scales", "sigmas", "guidance_scale")}}
    if spec.student_dir:
        out["source"] = spec.student_dir
    return out
