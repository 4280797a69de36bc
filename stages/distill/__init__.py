"""`distill` stage: the SwD student, trained with Ray Train (V2) and DeepSpeed from the latent cache.

Steps (SWD.md section 4; DESIGN.md "Ray usage" and "DeepSpeed"):
1. Driver checks before any Ray work (`checks`): the cache holds every latent side the schedule
   needs (a full-resolution baseline needs the largest scale only) and was made with this teacher's
   text settings, the scales fit the teacher (patch size, latent side, feature block), a warm-start
   `init_student` holds a LoRA adapter that fits `swd.student` (`init_student_problems`; its content
   joins the fingerprint). It reads the prompts of the sample grid and the "" prompt's embedding
   (`read_uncond`, stored once by the cache stage) from the cache.
2. `TorchTrainer(worker.train_loop, datasets={"scale_<i>": read_cache(...), ...})`: one dataset per
   scale index (`checks.scale_datasets`; steps that read the same columns share one), each reading only
   that scale's z_i / z_im1_i and the text embeddings (`checks.dataset_columns`; the Parquet read is
   pruned to them), with `ScalingConfig` from
   this section (CPUs not given to the workers stay with Ray Data), `RunConfig(name, storage_path)`
   (storage under the stage's scratch dir unless `storage_path` is set), `FailureConfig(max_failures)`,
   `CheckpointConfig(num_to_keep)`.
3. Each worker (`worker.Trainer`): loads the teacher's transformer only (rank 0 also the VAE, to decode
   the sample grid; no text encoder anywhere: the cache holds every embedding), builds the
   networks (`pipeline.swd.build_networks`: student G = teacher + LoRA, fake score F + GAN head D)
   and one DeepSpeed engine per trained network (each its own config dict, ZeRO `zero_stage`,
   `precision`: bf16-mixed = bf16 base, fp32 LoRA / GAN head, fp32 all-reduce; bf16; fp32; AdamW,
   gradient clipping); the teacher has no engine. It resumes from `ray.train.get_checkpoint()` when
   there is one: engine states, step counter, data position per scale dataset. Otherwise, with `init_student`, the
   student LoRA starts from that adapter (`load_student_lora`, before the engines are built) instead
   of B = 0; the fake network starts afresh either way.
4. Per generator step at scale index i (`choose_scale_index`, the same on every rank; every batch
   of the step comes from scale i's dataset): `fake_updates_per_step` updates of F on fresh batches (student output without grad: no gradient reaches G), then one update of G
   with `generator_loss` (F called as `fake_engine.module` with its parameters frozen: no gradient
   reaches F). Every loss is checked on all ranks before its backward: a non-finite loss is skipped
   on every rank and counted; `max_nonfinite_steps` steps in a row stop the run with a clear error.
5. Every `checkpoint_every_steps` steps (and at the last; `checkpoint.Checkpointer`): every rank saves
   its engine states (`save_checkpoint`, trainable parameters only), rank 0 the loop state; then
   `ray.train.report(metrics, checkpoint=...)` from every rank. The last one also holds the export.
6. Rank 0 logs to the stage's MLflow run (id made by the driver, the same across restarts;
   `metrics.Metrics`): every loss term, grad norms, lr, images/s, scale index every `log_every_steps`
   steps, a sample grid (one column per scale) every `sample_every_steps` steps, and prints one
   progress line. A restarted worker logs only steps past both its checkpoint and the last step
   already in MLflow, so no step is logged twice.
7. Output: `student/` (diffusers / PEFT LoRA, safetensors, or the full transformer), `schedule.json`
   (the schedule and how to run it with stock diffusers' `FlowMatchLCMScheduler.set_scale_factors`),
   `distill.json` (summary); the graph logs all three to the stage's MLflow run.

Test hooks (`faults.Faults`, never in the config, so they do not change the fingerprint): the driver
reads the environment variable `SWD_DISTILL_TEST_HOOKS` (JSON, e.g. {"pid_dir": "/tmp/x",
"nan_at_steps": [3], "fail_at_step": 5, "dump_dir": "/tmp/w", "step_delay_s": 0.5}) once and hands
the workers the parsed object.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config import Section
from pipeline.context import StageContext
from pipeline.student_export import SCHEDULE_FILE, STUDENT_DIR, adapter_digest
from stages.distill import faults

VERSION = "4"  # 4: the cache streams in file order (one config, one worker: one student); 3: one dataset per scale index (a step reads its scale only), the cache's "" embedding
SECTIONS = ("distill", "swd", "teacher")
SUMMARY_FILE = "distill.json"
OUTPUTS = (STUDENT_DIR, SCHEDULE_FILE, SUMMARY_FILE)
HOOKS_ENV = faults.HOOKS_ENV  # the tests' handle on the fault hooks (`faults.Faults`)


class Config(Section):
    # Keys that change how the stage runs, not what it writes: left out of every fingerprint
    # (pipeline/graph.py), so changing one reuses the committed output or resumes the run.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = (
        "log_every_steps", "sample_every_steps", "sample_num_prompts", "max_failures", "checkpoint_every_steps",
        "num_checkpoints_to_keep", "storage_path")

    # Generator steps (each also makes fake_updates_per_step updates of the fake network).
    num_steps: int = Field(300, ge=1)
    batch_size_per_worker: int = Field(8, ge=1)
    # Ray Train workers (data parallel) and what each one holds; CPUs not given to workers feed Ray Data.
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    num_cpus_per_worker: float = Field(1.0, gt=0)
    num_gpus_per_worker: float = Field(1.0, gt=0)
    # DeepSpeed ZeRO stage of both engines (0: plain data parallel, 1: optimizer states, 2: + gradients,
    # 3: + parameters partitioned).
    zero_stage: int = Field(2, ge=0, le=3)
    # bf16: DeepSpeed bf16 (every weight bf16 in the forward, fp32 master copies of the trained ones in the
    # optimizer, gradients all-reduced in bf16). bf16-mixed: the released recipe: frozen base weights in
    # bf16, the trained LoRA and GAN head kept in fp32 (PEFT runs the LoRA path in fp32), fp32 AdamW and
    # gradients all-reduced in fp32; runs on CPU too. fp32: everything fp32. auto: bf16 on GPU, fp32 on CPU.
    precision: Literal["auto", "bf16", "bf16-mixed", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    # AdamW of both engines (SWD.md section 4, released hyperparameters).
    lr: float = Field(5e-6, gt=0)
    fake_lr: float = Field(5e-6, gt=0)
    # The student's lr over the run: constant (as released), or linear_decay: DeepSpeed's WarmupDecayLR,
    # linear warm-up over lr_warmup_steps generator steps, then linear decay to 0 at num_steps, so the
    # exported weights carry less of the last batches' noise (DeepSpeed's linear warm-up gives the
    # first two updates lr 0). The fake network's lr stays constant: it has to keep tracking the
    # student's distribution to the end.
    lr_schedule: Literal["constant", "linear_decay"] = "constant"
    lr_warmup_steps: int = Field(10, ge=1)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(10.0, gt=0)
    fake_updates_per_step: int = Field(5, ge=1)
    seed: int = 0
    # Rows held by each worker's local shuffle buffer (0: stream the cache in order).
    shuffle_buffer_rows: int = Field(256, ge=0)
    # Checkpoints (every rank's engine state + the loop state) every N steps and at the end; kept: the
    # newest num_checkpoints_to_keep. Worker failures restarted from the last one, at most max_failures times.
    checkpoint_every_steps: int = Field(100, ge=1)
    num_checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0)
    # Where Ray Train keeps checkpoints: null: the stage's scratch dir (one machine, or a workdir on
    # shared storage); on a multi-node cluster a shared path or URI (s3://bucket/prefix, /mnt/nfs/...).
    storage_path: str | None = None
    # Metrics + progress line every N steps; sample grid (sample_num_prompts rows, one column per scale).
    log_every_steps: int = Field(10, ge=1)
    sample_every_steps: int = Field(100, ge=1)
    sample_num_prompts: int = Field(4, ge=1)
    # Stop (with the last good checkpoint kept) after this many generator steps in a row with a
    # non-finite loss; every such loss is skipped (never reaches the weights) and counted.
    max_nonfinite_steps: int = Field(10, ge=1)
    # Warm start: the student LoRA starts from an earlier student's adapter (`init_student_adapter`
    # finds it) instead of B = 0; the fake network starts afresh. A checkpoint of this run still wins.
    init_student: str | None = None

    @model_validator(mode="after")
    def _gpu(self) -> "Config":
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("distill.precision: 'bf16' needs distill.use_gpu=true (DeepSpeed's bf16 engine "
                             "is for GPUs); valid here: auto, fp32, bf16-mixed")
        if self.init_student is not None and not self.init_student.strip():
            raise ValueError("distill.init_student: '' is not a directory; give a student exported by this pipeline "
                             "(a distill output or a registered model downloaded from MLflow) or null")
        if self.lr_schedule == "linear_decay" and self.lr_warmup_steps >= self.num_steps:
            # DeepSpeed only warns, and the lr would never decay
            raise ValueError(f"distill.lr_warmup_steps: {self.lr_warmup_steps} leaves no decay in "
                             f"distill.num_steps={self.num_steps}; give fewer warm-up steps than num_steps")
        return self


def external_fingerprint(sections: dict) -> list | None:
    """A warm-start adapter's content (sha256) joins the fingerprint: a new champion re-runs distill,
    the same one is a cache hit."""
    cfg: Config = sections["distill"]
    return None if cfg.init_student is None else adapter_digest(cfg.init_student)


def run(ctx: StageContext) -> None:
    from pipeline.latent_cache import read_manifest, read_uncond
    from pipeline.student_export import init_student_adapter, init_student_problems, schedule_record
    from pipeline.teacher import bundle_location, resolve_pretrained
    from stages.distill import checks
    from stages.distill.checkpoint import EXPORT_DIR, STATE_FILE
    from stages.distill.worker import LoopSpec

    cfg: Config = ctx.config
    swd, teacher = ctx.sections["swd"], ctx.sections["teacher"]
    schedule = swd.schedule
    manifest = read_manifest(ctx.inputs["cache"])
    columns = checks.cache_columns(schedule.scales, manifest["scales"])
    directory = resolve_pretrained(bundle_location(ctx.inputs["teacher"]), teacher.local_files_only)
    checks.check_teacher(swd, directory)
    text = checks.check_cache_text(manifest, directory, teacher)
    problems = init_student_problems(cfg.init_student, swd.student)
    if problems:
        raise ValueError("\n".join(problems))
    init_adapter = str(init_student_adapter(cfg.init_student)) if cfg.init_student is not None else None
    ctx.log.tags({"distill.init_student": init_adapter or "none: from the teacher"})

    spec = LoopSpec(
        distill=cfg.model_dump(mode="json"), swd=swd.model_dump(mode="json"), location=str(directory),
        load_t5=teacher.load_t5, max_sequence_length=text["max_sequence_length"], columns=columns,
        sample_prompts=checks.sample_prompts(ctx.inputs["cache"], cfg.sample_num_prompts),
        uncond={k: t.float().numpy() for k, t in zip(checks.TEXT_COLUMNS, read_uncond(ctx.inputs["cache"]))},
        tracking_uri=ctx.tracking_uri, run_id=ctx.run_id, vae_scale_factor=manifest.get("vae_scale_factor", 8),
        faults=faults.Faults.from_env(), init_student=init_adapter,
    )
    checks.check_data_cpus(cfg)
    storage = cfg.storage_path or str(Path(ctx.scratch_dir) / "ray_train")
    name = f"distill-{ctx.fingerprint}"
    print(f"[distill] {cfg.num_steps} steps, {cfg.num_workers} worker(s) x batch {cfg.batch_size_per_worker}, "
          f"ZeRO-{cfg.zero_stage}, {swd.loss.mode} mode, scales {schedule.scales}; checkpoints in "
          f"{storage}/{name} (re-running the same config resumes from the last one)"
          + (f"; student LoRA warm-started from {init_adapter}" if init_adapter else ""), flush=True)
    started = time.monotonic()
    result = fit(spec, ctx.inputs["cache"], storage, name, cfg)
    wall_s = time.monotonic() - started

    metrics = dict(result.return_value or {})  # rank 0's train_loop return value
    if metrics.get("stopped") == "nonfinite":
        ckpt = result.checkpoint.path if result.checkpoint else None
        raise RuntimeError(
            f"distill: {int(metrics['nonfinite_in_a_row'])} generator steps in a row (distill.max_nonfinite_steps="
            f"{cfg.max_nonfinite_steps}) had a non-finite loss, last at step {int(metrics['step'])}; none of them "
            f"reached the weights ({int(metrics['nonfinite_generator'])} generator and "
            f"{int(metrics['nonfinite_fake'])} fake updates skipped in all). The last good checkpoint is kept "
            f"({ckpt}); lower distill.lr / distill.fake_lr or check the cache, then re-run to resume from it")
    if result.checkpoint is None:
        raise RuntimeError(f"distill: the run {name} ended without a checkpoint (metrics: {metrics})")
    with result.checkpoint.as_directory() as d:
        export = Path(d) / EXPORT_DIR
        if not export.is_dir():
            raise RuntimeError(f"distill: the last checkpoint {result.checkpoint.path} holds no export "
                               f"(step {metrics.get('step')} of {cfg.num_steps})")
        shutil.copytree(export / STUDENT_DIR, ctx.output_dir / STUDENT_DIR)
        state = json.loads((Path(d) / STATE_FILE).read_text())
    schedule_json = schedule_record(swd, spec.vae_scale_factor, state["export_kind"])
    (ctx.output_dir / SCHEDULE_FILE).write_text(json.dumps(schedule_json, indent=1) + "\n")
    summary = {"steps": state["step"], "num_steps": cfg.num_steps, "mode": swd.loss.mode,
               "zero_stage": cfg.zero_stage, "num_workers": cfg.num_workers, "wall_s": round(wall_s, 1),
               "export_kind": state["export_kind"], "nonfinite_generator": state["nonfinite_generator"],
               "nonfinite_fake": state["nonfinite_fake"], "attempts": state.get("attempts", 1),
               "train_s": round(state.get("train_s", 0.0), 1),
               "images_per_s": round(state.get("images_per_s", 0.0), 2), "init_student": init_adapter,
               "checkpoint": str(result.checkpoint.path)}
    (ctx.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    ctx.log.metrics({"distill_wall_s": wall_s})
    ctx.summary.update({k: v for k, v in summary.items() if k != "checkpoint"})
    # The export is committed; the checkpoints were only for resuming this fingerprint.
    ctx.keep_scratch = False
    print(f"[distill] done: {state['step']} steps in {wall_s:.0f} s; student -> {ctx.output_dir / STUDENT_DIR}",
          flush=True)


def fit(spec, cache_dir: str | Path, storage_path: str, name: str, cfg: Config):
    """Build and run the TorchTrainer over `worker.train_loop`; returns its `Result`. Re-running with the
    same storage path and name continues from the newest checkpoint there (Ray Train V2 restores it for
    `get_checkpoint`)."""
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.latent_cache import read_cache
    from pipeline.resources import worker_runtime_env
    from stages.distill.checks import dataset_columns, scale_datasets
    from stages.distill.worker import train_loop

    resources = {"CPU": cfg.num_cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.num_gpus_per_worker
    # One dataset per scale index: a step reads its own scale's columns only.
    datasets = {name: read_cache(cache_dir, columns=dataset_columns(pair))
                for name, pair in dict(zip(scale_datasets(spec.columns), spec.columns)).items()}
    trainer = TorchTrainer(
        train_loop, train_loop_config=spec.__dict__,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
            worker_runtime_env=worker_runtime_env(),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest_options()),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(_training_failure(e, max_failures=cfg.max_failures)) from e


def ingest_options():
    """Ray Train's ingest options with `preserve_order`: Ray Data otherwise hands out blocks in the
    order its read tasks finish, so two runs of one config (seeded shuffle and noise) train on
    different batch sequences and give different students. With one worker the stream is then the
    cache's file order; across workers `streaming_split` still assigns blocks dynamically."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _training_failure(error, max_failures: int) -> str:
    """One line per distinct worker exception (type and message, with the ranks that raised it), so the
    cause reaches the stage's error line: Ray's own message is a traceback snippet that it truncates."""
    failures = dict(getattr(error, "worker_failures", None) or {})
    if not failures and getattr(error, "controller_failure", None) is not None:
        failures = {"controller": error.controller_failure}
    if not failures:
        return f"distill: training failed: {type(error).__name__}: {error}"
    by_cause: dict[str, list] = {}
    for rank, exc in sorted(failures.items(), key=lambda kv: str(kv[0])):
        exc = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the worker's own exception
        message = " ".join(str(exc).split())
        message = message if len(message) <= 600 else message[:600] + " ..."
        by_cause.setdefault(f"{type(exc).__name__}: {message}", []).append(rank)
    causes = "; ".join(f"{cause} (rank {', '.join(map(str, ranks))})" for cause, ranks in by_cause.items())
    return (f"distill: a training worker failed (after {max_failures} restart(s) allowed by distill.max_failures): "
            f"{causes}; the full traceback is in the worker's log above")
