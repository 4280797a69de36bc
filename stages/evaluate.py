"""`evaluate` stage: the student against the teacher (and the full-resolution baseline) on held-out prompts.

Steps:
1. Eval set: the first `max_prompts` samples of the eval shards (`shards` stage, `data.eval_shards`):
   prompt, image (the reference set), json attributes where present, read whole shard by whole
   shard with the tolerant tar reader, key rule, caption rule and image decoder every stage shares
   (`pipeline.samples`). Unreadable shards, tar faults, missing / empty / non-UTF-8 captions and
   images that do not decode are counted rejects (`metrics.json` "reads", MLflow `eval_*`); the
   stage fails, naming the bad shards, only when their fraction exceeds `max_bad_fraction`. Its
   fingerprint (keys, prompts, image digests, seeds and batching, metric settings) is what
   `register` compares champions on.
2. Generation with Ray Data: the eval prompts in fixed chunks of `batch_size` (one seed per chunk,
   the same chunks and seeds for every generator), one row per (generator, chunk), through
   `map_batches` with the callable class `GenerateActor` on an `ActorPoolStrategy` pool; each actor
   loads the teacher bundle once and each generator once on first use (one GPU per actor where the
   cluster has GPUs). Generators:
   - `student`: the distilled scale-wise student (`distill` output, `load_student`), SWD.md section 3
     sampler (`sample_scalewise`), no guidance;
   - `teacher`: the teacher's Euler sampler on its own grid (`teacher_num_steps`, its scheduler's
     shift) with classifier-free guidance `teacher_guidance_scale` (`sample_teacher`);
   - `baseline` (when the graph has a `distill_baseline` stage): the full-resolution few-step student.
   Every generator produces images at the student's final scale.
3. Scoring with Ray Data (`ScoreActor` pool, models loaded once per actor) over the generated images
   (kept in the object store as lossless PNG rows) and the reference images (decoded, centre-cropped
   and resized to the generated side in the scorer): EfficientNet-Lite0 features for the Frechet
   distance (`pipeline/metrics.py`), CLIP score (`clip_model`), Inception features for FID
   (`inception_weights`), and the shapes oracle's reading of each image, from which the driver
   computes prompt adherence per attribute and overall (= every attribute of the prompt right).
4. Latency: one Ray task with the resources of one generation actor times each generator in turn:
   `latency_warmup_batches` untimed then `latency_repeats` timed calls of `batch_size` prompts
   (text encoding + sampling + VAE decode); seconds per image = median / batch size; speedups from
   it. The student's task also renders the per-scale progression strip.
5. Outputs, all logged to the stage's MLflow run: `metrics.json` (canonical metrics, eval set),
   `report.md` (comparison table), `samples.png` (prompts x [data, student, teacher, baseline]),
   `progression.png` (the student's clean estimate after each scale). The canonical metrics go to
   `ctx.summary["parent_metrics"]`, which `pipeline/run.py` mirrors onto the pipeline's parent run.

The distill stage's export is read in one place, `load_student`: `<distill output>/student/` (a
diffusers / PEFT LoRA directory from `pipeline.swd.networks.save_student`, or a full transformer) and
`<distill output>/schedule.json` ({"scales": [...], "sigmas": [...]}).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.context import StageContext
from pipeline.eval_record import CANONICAL_METRICS, METRICS_FILE
from pipeline.generate import Generator, GeneratorSpec, decode_png, encode_png
from pipeline.student_export import read_schedule
from pipeline.samples import (DEFAULT_MAX_BAD_FRACTION, ShardReads, bad_data_problem, by_reason, decode_image,
                              read_shards, square_image)

VERSION = "2"
SECTIONS = ("evaluate", "teacher")
REPORT_FILE = "report.md"
GRID_FILE = "samples.png"
STRIP_FILE = "progression.png"
OUTPUTS = (METRICS_FILE, REPORT_FILE, GRID_FILE, STRIP_FILE)
METRICS_VERSION = "1"  # of the metric definitions below; part of the eval-set fingerprint


class EvaluateError(ValueError):
    """Evaluation input that cannot be used: says what was given and what was expected."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
    # Keys that change how the stage runs, not what it writes: left out of every fingerprint
    # (pipeline/graph.py), so changing one reuses the committed output.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("num_actors", "num_cpus_per_actor")

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
    teacher_num_steps: int = Field(28, ge=1)
    teacher_guidance_scale: float = Field(3.0, ge=1.0)
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
    cfg: Config = sections["evaluate"]
    out: list = []
    if cfg.inception_weights:
        p = Path(os.path.expanduser(cfg.inception_weights))
        out.append([str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [str(p), "missing"])
    return out


# ----------------------------------------------------------------------------- stage


def run(ctx: StageContext) -> None:
    import mlflow
    import numpy as np
    import ray

    from pipeline import metrics as M
    from pipeline.data import shard_urls
    from pipeline.teacher import bundle_location, resolve_pretrained

    cfg: Config = ctx.config
    teacher_cfg = ctx.sections["teacher"]
    mlc = mlflow.MlflowClient(ctx.tracking_uri)
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

    gpus = cfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    device = "cuda" if gpus > 0 else "cpu"
    if teacher_cfg.dtype == "float16" and device == "cpu":
        raise EvaluateError("teacher.dtype 'float16': the evaluate actors run on the CPU here (no GPU in the Ray "
                            "cluster, or evaluate.num_gpus_per_actor=0), where float16 is not supported; use "
                            "float32 or bfloat16, or give the actors GPUs")
    location = str(resolve_pretrained(bundle_location(ctx.inputs["teacher"]), teacher_cfg.local_files_only))
    common = dict(location=location, dtype=teacher_cfg.dtype, device=device, load_t5=teacher_cfg.load_t5,
                  max_sequence_length=teacher_cfg.max_sequence_length, local_files_only=teacher_cfg.local_files_only, num_threads=max(1, int(cfg.num_cpus_per_actor)))
    student_schedule = read_schedule(ctx.inputs["distill"])
    specs = {"student": GeneratorSpec(name="student", student_dir=str(ctx.inputs["distill"]), **common),
             "teacher": GeneratorSpec(name="teacher", teacher_num_steps=cfg.teacher_num_steps,
                                      guidance_scale=cfg.teacher_guidance_scale,
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
    values: dict[str, float] = {}
    for name in specs:
        values[f"{name}_fd"] = M.frechet_distance_of(scores[name]["fd"], scores["data"]["fd"])
        values[f"{name}_fd_{M.FD_EXTRACTOR}"] = values[f"{name}_fd"]
        if "fid" in scores["data"]:
            values[f"{name}_fid"] = M.frechet_distance_of(scores[name]["fid"], scores["data"]["fid"])
        if "clip" in scores[name]:
            values[f"{name}_clip_score"] = float(np.mean(scores[name]["clip"]))
        if targets is not None:
            acc = M.adherence_of(scores[name]["oracle"], targets)
            values[f"{name}_adherence"] = acc["all"]
            values.update({f"{name}_adherence_{k}": v for k, v in acc.items() if k != "all"})
    if targets is not None:  # the oracle on the reference images: the ceiling of adherence
        values["data_adherence"] = M.adherence_of(scores["data"]["oracle"], targets)["all"]
    if "clip" in scores["data"]:
        values["data_clip_score"] = float(np.mean(scores["data"]["clip"]))
    print(f"[evaluate] scored {len(specs) + 1} x {len(prompts)} images in {score_s:.1f} s", flush=True)

    # 4. latency, one generator after the other in one task (same process, same resources)
    latency_prompts = [prompts[i % len(prompts)] for i in range(cfg.batch_size)]
    timing = measure_latency(list(specs.values()), latency_prompts, cfg, gpus, strip_prompts=prompts[:4])
    for name, result in timing.items():
        values[f"{name}_latency_s"] = result["latency_s"]
        values[f"{name}_sampling_latency_s"] = result["sampling_latency_s"]
        values[f"{name}_latency_cpu_s"] = result["latency_cpu_s"]
        print(f"[evaluate] {name}: {result['latency_s'] * 1000:.2f} ms/image (sampling "
              f"{result['sampling_latency_s'] * 1000:.2f} ms/image) at batch {cfg.batch_size}", flush=True)
    strip = timing["student"].pop("strip")
    for other in ("teacher", "baseline"):
        if other in specs:
            values[f"speedup_vs_{other}"] = values[f"{other}_latency_s"] / values["student_latency_s"]
            values[f"speedup_vs_{other}_cpu"] = values[f"{other}_latency_cpu_s"] / values["student_latency_cpu_s"]

    # 5. outputs
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
    (ctx.output_dir / REPORT_FILE).write_text(report(record, prompts[:grid_rows], targets is not None))

    _log(mlc, ctx.run_id, values, {"fd_extractor": M.FD_EXTRACTOR, "eval_set_fingerprint": eval_set["fingerprint"],
                                   "eval_num_prompts": str(len(prompts))})
    _log(mlc, ctx.run_id, reads.metrics("eval_"), {})
    mlc.log_metric(ctx.run_id, "evaluate_wall_s", time.monotonic() - started)
    for name in OUTPUTS:
        mlc.log_artifact(ctx.run_id, str(ctx.output_dir / name))
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


def _log(mlc, run_id: str, values: dict, tags: dict) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in values.items() if math.isfinite(v)]
    for i in range(0, len(items), 500):
        mlc.log_batch(run_id, metrics=items[i:i + 500])
    mlc.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _describe(spec: "GeneratorSpec", timing: dict) -> dict:
    out = {"kind": "scalewise" if spec.student_dir else "teacher",
           **{k: timing[k] for k in ("latency_s", "sampling_latency_s", "latency_cpu_s", "times_s", "num_forwards",
                                      "scales",
                                      "sigmas", "guidance_scale")}}
    if spec.student_dir:
        out["source"] = spec.student_dir
    return out


# ----------------------------------------------------------------------------- step 1: the eval set


def read_eval_samples(urls: list[str], max_prompts: int | None, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
                      ) -> tuple[list[dict], ShardReads]:
    """(the first `max_prompts` eval samples in shard order: key, prompt, image bytes, attributes or
    None; what was read: `pipeline.samples.ShardReads`). Shards are read whole, by the reader every
    stage shares; a reference image that does not decode is a `not_image` reject. Raises when more
    than `max_bad_fraction` of the samples read is bad (naming the bad shards), or too few are left."""
    if not urls:
        raise EvaluateError("evaluate: no eval prompts: the shards stage lists no eval shard (data.eval_shards)")
    def check_image(data: bytes) -> None:  # raises for bytes that are not an image; the bytes are kept
        square_image(data)

    reads = read_shards(urls, members=("json",), decode=check_image, max_samples=max_prompts)
    if reads.rejects:
        print(f"[evaluate] {len(reads.rejects)} reject(s) in {reads.shards_read} eval shard(s) read "
              f"{by_reason(reads.rejects)}, {len(reads.unreadable)} unreadable; bad fraction "
              f"{reads.bad_fraction:.2%}", flush=True)
    problem = bad_data_problem("evaluate", "eval samples read", reads.bad_fraction, max_bad_fraction, reads.rejects,
                               "evaluate.max_bad_fraction")
    if problem:
        raise EvaluateError(problem)
    samples = [{"key": s["key"], "prompt": s["prompt"], "image": s["image"],
                "attributes": json.loads(s["json"]) if s["json"] is not None else None} for s in reads.samples]
    if not samples:
        raise EvaluateError(f"evaluate: no eval prompts: the eval shards ({len(urls)}: {', '.join(urls[:3])}) hold "
                            f"no samples")
    if len(samples) < 2:
        raise EvaluateError(f"evaluate: 1 eval prompt; the Frechet distance needs at least 2 (evaluate.max_prompts "
                            f"and the eval shards decide how many are used)")
    return samples, reads


def adherence_targets(samples: list[dict], mode: str) -> list | None:
    """What each prompt asks for (shard json attributes, else the shapes grammar), or None when off.
    `auto` skips adherence with a warning when some sample has neither; `on` makes that an error."""
    from pipeline.oracle import ATTRIBUTE_NAMES, parse_prompt

    if mode == "off":
        return None
    targets, missing = [], []
    for s in samples:
        attrs = s["attributes"]
        if isinstance(attrs, dict) and all(k in attrs for k in ATTRIBUTE_NAMES):
            targets.append({k: attrs[k] for k in ATTRIBUTE_NAMES})
            continue
        try:
            targets.append(parse_prompt(s["prompt"]))
        except ValueError:
            missing.append(s["key"])
    if not missing:
        return targets
    message = (f"{len(missing)} of {len(samples)} eval samples (e.g. {missing[:3]}) have no shapes attributes "
               f"(json) and a prompt outside the shapes grammar, so the adherence oracle cannot score them")
    if mode == "on":
        raise EvaluateError(f"evaluate.adherence 'on': {message}; use 'auto' or 'off' for other data")
    warnings.warn(f"evaluate.adherence 'auto': {message}; adherence metrics skipped", stacklevel=2)
    print(f"[evaluate] warning: {message}; adherence metrics skipped", flush=True)
    return None


def decode_reference(data: bytes, side: int):
    """A reference image as the generators' output size: upright RGB, centre crop to a square, bicubic
    resize (`pipeline.samples.decode_image`, the image decoder of every stage): uint8 [side, side, 3]."""
    return decode_image(data, side)


def eval_set_identity(samples: list[dict], cfg: Config, inception) -> dict:
    """What makes two evaluations comparable: the samples, the seeds and chunking, the metric settings."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s["key"], s["prompt"], hashlib.sha256(s["image"]).hexdigest()]).encode())
    settings = {"metrics_version": METRICS_VERSION, "seed": cfg.seed, "batch_size": cfg.batch_size,
                "fd_image_side_px": cfg.fd_image_side_px, "clip_model": cfg.clip_model,
                "inception_weights": external_fingerprint({"evaluate": cfg}) if inception else None,
                "adherence": cfg.adherence}
    h.update(json.dumps(settings, sort_keys=True).encode())
    return {"fingerprint": h.hexdigest()[:16], "num_prompts": len(samples), **settings}


def make_chunks(prompts: list[str], batch_size: int, seed: int) -> list[dict]:
    """Fixed chunks of consecutive prompts, one seed each: the unit of generation for every generator,
    so images do not depend on how Ray Data forms blocks."""
    return [{"chunk": c, "index": list(range(i, min(i + batch_size, len(prompts)))),
             "prompt": prompts[i:i + batch_size], "seed": chunk_seed(seed, c)}
            for c, i in enumerate(range(0, len(prompts), batch_size))]


def chunk_seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"evaluate/{seed}/{chunk}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- the student export


# ----------------------------------------------------------------------------- generators


class GenerateActor:
    """Ray Data callable class: loads the teacher bundle once and each generator on first use (sharing
    the bundle's text encoders and VAE); one chunk row per call -> one output row per image."""

    def __init__(self, specs: list[GeneratorSpec]):
        from pipeline.teacher import load_bundle

        self.specs = {s.name: s for s in specs}
        first = specs[0]
        self.bundle = load_bundle(first.location, first.dtype, first.device, first.local_files_only, first.load_t5,
                         first.max_sequence_length)
        self.generators: dict[str, Generator] = {}

    def generator(self, name: str) -> Generator:
        if name not in self.generators:
            self.generators[name] = Generator(self.specs[name], self.bundle)
        return self.generators[name]

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        names, index, prompts, images = [], [], [], []
        for i in range(len(batch["chunk"])):
            chunk_prompts = [str(p) for p in batch["prompt"][i]]
            images.append(self.generator(str(batch["generator"][i]))(chunk_prompts, int(batch["seed"][i])))
            names += [str(batch["generator"][i])] * len(chunk_prompts)
            index += [int(j) for j in batch["index"][i]]
            prompts += chunk_prompts
        return {"generator": np.asarray(names, dtype=object), "index": np.asarray(index, dtype=np.int64),
                "prompt": np.asarray(prompts, dtype=object),
                "image_bytes": np.asarray([encode_png(im) for im in np.concatenate(images)], dtype=object)}


def generate(chunks: list[dict], specs: list[GeneratorSpec], cfg: Config, gpus: float):
    """Every chunk of every generator through one `GenerateActor` pool -> a materialized dataset of
    rows (generator, index, prompt, image_bytes: lossless PNG). Rows go in generator by generator, so
    an actor mostly runs one generator at a time."""
    import ray

    items = [{"generator": spec.name, **chunk} for spec in specs for chunk in chunks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(GenerateActor, batch_size=1, batch_format="numpy", fn_constructor_kwargs={"specs": specs},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
                        num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus)
    return ds.materialize()


def collect_images(ds, names: list[str], max_index: int | None = None) -> dict:
    """{generator: uint8 images [N, H, W, 3] in prompt order} from generated rows (index < max_index)."""
    import numpy as np

    if max_index is not None:
        ds = ds.filter(lambda row: row["index"] < max_index)
    rows = ds.take_all()
    out = {}
    for name in names:
        mine = sorted((r for r in rows if r["generator"] == name), key=lambda r: int(r["index"]))
        out[name] = np.stack([decode_png(r["image_bytes"]) for r in mine])
    return out


def reference_dataset(samples: list[dict]):
    """The eval set's images as rows like the generated ones (generator "data"); the scorer decodes
    them (centre crop, resize to the generated side)."""
    import ray

    items = [{"generator": "data", "index": i, "prompt": s["prompt"], "image_bytes": s["image"]}
             for i, s in enumerate(samples)]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 64, 64)))


def measure_latency(specs: list[GeneratorSpec], prompts: list[str], cfg: Config, gpus: float,
                    strip_prompts: list[str]) -> dict[str, dict]:
    """Every generator's latency, measured one after the other in one Ray task with the resources of
    one generation actor; the student's progression strip on the side."""
    import ray

    task = ray.remote(num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus,
                      runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})(_latency_task)
    return ray.get(task.remote(specs, prompts, cfg.latency_warmup_batches, cfg.latency_repeats, strip_prompts))


def _latency_task(specs: list[GeneratorSpec], prompts: list[str], num_warmup: int, num_repeats: int,
                  strip_prompts: list[str]) -> dict[str, dict]:
    """Seconds per image, end to end (text encoding + sampling + decode) and sampling alone."""
    import gc

    from pipeline.metrics import time_batches

    from pipeline.teacher import load_bundle

    out = {}
    n = len(prompts)
    first = specs[0]
    bundle = load_bundle(first.location, first.dtype, first.device, first.local_files_only, first.load_t5,
                         first.max_sequence_length)
    for spec in specs:
        gen = Generator(spec, bundle)
        full = time_batches(lambda: gen(prompts, 0), num_warmup, num_repeats, gen.sync)
        cond = gen.encode(prompts)
        sampling = time_batches(lambda: gen.sample(cond, 0), num_warmup, num_repeats, gen.sync)
        out[spec.name] = {"latency_s": full["median_s"] / n, "sampling_latency_s": sampling["median_s"] / n,
                          "latency_cpu_s": full["cpu_median_s"] / n,
                          "times_s": [round(t, 5) for t in full["times_s"]], "batch_size": n,
                          "num_forwards": gen.num_forwards, "scales": gen.scales,
                          "sigmas": [round(s, 5) for s in gen.sigmas], "guidance_scale": gen.guidance_scale}
        if spec.name == "student":
            side = gen(strip_prompts[:1], 0).shape[1]
            out[spec.name]["strip"] = gen.progression(strip_prompts, 0, side)
        del gen, cond
        gc.collect()
        if spec.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- scoring


@dataclass
class ScoreSpec:
    device: str
    side: int  # images are scored at the generators' output side (references centre-cropped and resized)
    fd_image_side_px: int
    clip_model: str | None
    inception_weights: str | None
    oracle: bool = False  # read the shapes attributes back (adherence)
    num_threads: int = 1


class ScoreActor:
    """Ray Data callable class: loads the feature extractors once; images -> features, scores and the
    oracle's reading of each image (small rows: the images themselves are not returned)."""

    def __init__(self, spec: ScoreSpec):
        import torch

        from pipeline import metrics as M

        if spec.device == "cpu":
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.fd = M.EfficientNetFeatures(spec.device, spec.fd_image_side_px)
        self.clip = M.ClipScorer(spec.clip_model, spec.device) if spec.clip_model else None
        self.inception = M.InceptionFeatures(spec.inception_weights, spec.device) if spec.inception_weights else None

    def __call__(self, batch: dict) -> dict:
        import dataclasses

        import numpy as np

        from pipeline.oracle import recover

        images = np.stack([decode_reference(bytes(b), self.spec.side) for b in batch["image_bytes"]])
        out = {"generator": batch["generator"], "index": batch["index"], "fd": self.fd(images)}
        if self.clip is not None:
            out["clip"] = self.clip(images, [str(p) for p in batch["prompt"]])
        if self.inception is not None:
            out["fid"] = self.inception(images)
        if self.spec.oracle:
            out["oracle"] = np.asarray([json.dumps(dataclasses.asdict(recover(im))) for im in images], dtype=object)
        return out


def score(ds, spec: ScoreSpec, cfg: Config, gpus: float) -> dict:
    """{generator or "data": {"fd": [N, 1280], "clip": [N], "fid": [N, 2048], "oracle": [N readings]}}."""
    import numpy as np

    import ray

    ds = ds.map_batches(ScoreActor, batch_size=cfg.score_batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"spec": spec},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
                        num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus)
    rows = ds.take_all()
    out: dict[str, dict] = {}
    for source in sorted({str(r["generator"]) for r in rows}):
        mine = sorted((r for r in rows if r["generator"] == source), key=lambda r: int(r["index"]))
        out[source] = {k: np.stack([np.asarray(r[k]) for r in mine]) for k in ("fd", "clip", "fid") if k in mine[0]}
        if "oracle" in mine[0]:
            out[source]["oracle"] = [json.loads(r["oracle"]) for r in mine]
    return out


# ----------------------------------------------------------------------------- artifacts


def save_grid(path: Path, columns: list, labels: list[str]) -> None:
    """Rows = prompts, columns = image sets (uint8 [rows, H, W, 3] each), a label above each column."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows, side = columns[0].shape[0], columns[0].shape[1]
    header = 12
    canvas = Image.new("RGB", (side * len(columns), header + side * rows), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (ims, label) in enumerate(zip(columns, labels)):
        draw.text((c * side + 2, 0), label, fill=(0, 0, 0))
        for r in range(rows):
            canvas.paste(Image.fromarray(np.asarray(ims[r])), (c * side, header + r * side))
    canvas.save(path)


def save_strip(path: Path, strip, side: int) -> None:
    """The student's clean estimate after each scale: rows = prompts, columns = steps."""
    import numpy as np
    from PIL import Image

    if strip is None:
        Image.new("RGB", (side, side)).save(path)
        return
    rows, steps = strip.shape[:2]
    canvas = np.concatenate([np.concatenate(list(strip[r]), axis=1) for r in range(rows)], axis=0)
    Image.fromarray(canvas).save(path)


def report(record: dict, grid_prompts: list[str], with_adherence: bool) -> str:
    """The Markdown report: the comparison table, how each number was measured, the grid's prompts."""
    v, gens = record["metrics"], record["generators"]
    es = record["eval_set"]

    def f(key: str, fmt: str = "{:.4g}") -> str:
        return fmt.format(v[key]) if key in v else "-"

    cols = ["generator", "steps (forwards)", "latency s/img", "sampling s/img", "CPU s/img", "speedup (student vs)",
            "CPU-time speedup",
            f"FD ({record['fd_extractor']})"]
    if with_adherence:
        cols += ["adherence (all)", "all three", "colour", "position", "shape", "size", "background"]
    if any(k.endswith("_clip_score") for k in v):
        cols.append("CLIP score")
    if any(k.endswith("_fid") for k in v):
        cols.append("FID (Inception)")
    lines = [f"# Evaluation: student vs teacher" + (" vs baseline" if "baseline" in gens else ""), "",
             f"{es['num_prompts']} eval prompts (eval set {es['fingerprint']}), seed {es['seed']}, images "
             f"{record['image_side_px']} px, batch {es['batch_size']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, g in gens.items():
        speedup = "1" if name == "student" else f(f"speedup_vs_{name}", "{:.2f}x")
        speedup_cpu = "1" if name == "student" else f(f"speedup_vs_{name}_cpu", "{:.2f}x")
        row = [name, f"{len(g['scales']) if g['kind'] == 'scalewise' else len(g['sigmas']) - 1} ({g['num_forwards']})",
               f(f"{name}_latency_s", "{:.5f}"), f(f"{name}_sampling_latency_s", "{:.5f}"),
               f(f"{name}_latency_cpu_s", "{:.5f}"), speedup, speedup_cpu, f(f"{name}_fd")]
        if with_adherence:
            row += [f(f"{name}_adherence", "{:.3f}")] + [f(f"{name}_adherence_{a}", "{:.3f}") for a in
                                                          ("all_three", "colour", "position", "shape", "size",
                                                           "background")]
        if "CLIP score" in cols:
            row.append(f(f"{name}_clip_score"))
        if "FID (Inception)" in cols:
            row.append(f(f"{name}_fid"))
        lines.append("| " + " | ".join(row) + " |")
    if with_adherence:
        lines += ["", f"Oracle adherence of the reference images themselves: {f('data_adherence', '{:.3f}')}."]
    lines += ["", "## How each number is measured",
              f"- FD: Frechet distance between Gaussians fitted to {record['fd_extractor']} features (ImageNet "
              f"EfficientNet-Lite0, 1280-d pre-logit global average pool; images resized bicubic to "
              f"{record['fd_image_side_px']} px, (x - 127) / 128) of each generator's images and of the eval "
              f"set's reference images. Not FID: compare only with FDs of the same extractor, reference set and "
              f"sample count.",
              "- Adherence: the shapes oracle (pipeline/oracle.py) reads colour, position, shape, size and "
              "background back from each image; 'all' = every attribute of the prompt right.",
              "- Latency: median over timed calls after warm-up, same resources and batch size for every "
              "generator, divided by the batch size; end to end (text encoding + sampling + VAE decode); "
              "'sampling' excludes text encoding and decoding; 'CPU s/img' is the process's CPU time (all "
              "threads) per image, which other load on a shared CPU moves less than wall time.",
              "- Speedup: teacher (or baseline) latency / student latency.", "",
              "## Generators"]
    for name, g in gens.items():
        lines.append(f"- {name}: {g['kind']}, scales {g['scales']}, sigmas {g['sigmas']}, guidance "
                     f"{g['guidance_scale']}; latency batch times {g['times_s']} s")
    lines += ["", "## Sample grid prompts (rows of samples.png; columns: data, " + ", ".join(gens) + ")"]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(grid_prompts)]
    return "\n".join(lines) + "\n"
