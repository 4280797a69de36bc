"""`distill` stage: the SwD student, trained with Ray Train (V2) and DeepSpeed from the latent cache.

Steps (SWD.md section 4; DESIGN.md "Ray usage" and "DeepSpeed"):
1. Driver checks before any Ray work: the cache holds every latent side the schedule needs (a
   full-resolution baseline needs the largest scale only), the scales fit the teacher (patch
   size, latent side, feature block), a warm-start `init_student` holds a LoRA adapter that fits
   `swd.student` (`init_student_problems`; its content joins the fingerprint). It reads the prompts
   of the sample grid from the cache.
2. `TorchTrainer(train_loop, datasets={"train": read_cache(...)})` with `ScalingConfig` from this
   section (CPUs not given to the workers stay with Ray Data), `RunConfig(name, storage_path)`
   (storage under the stage's scratch dir unless `storage_path` is set), `FailureConfig(max_failures)`,
   `CheckpointConfig(num_to_keep)`.
3. Each worker (`Trainer`): loads the teacher bundle, encodes the "" prompt once, builds the
   networks (`pipeline.swd.build_networks`: student G = teacher + LoRA, fake score F + GAN head D)
   and one DeepSpeed engine per trained network (each its own config dict, ZeRO `zero_stage`,
   `precision`: bf16-mixed = bf16 base, fp32 LoRA / GAN head, fp32 all-reduce; bf16; fp32; AdamW, gradient clipping); the teacher has no engine. It resumes from
   `ray.train.get_checkpoint()` when there is one: engine states, step counter, data position.
   Otherwise, with `init_student`, the student LoRA starts from that adapter (`load_student_lora`,
   before the engines are built) instead of B = 0; the fake network starts afresh either way.
4. Per generator step at scale index i (`choose_scale_index`): `fake_updates_per_step` updates of
   F on fresh batches (student output without grad: no gradient reaches G), then one update of G
   with `generator_loss` (F called as `fake_engine.module` with its parameters frozen: no gradient
   reaches F). Every loss is checked on all ranks before its backward: a non-finite loss is skipped
   on every rank and counted; `max_nonfinite_steps` steps in a row stop the run with a clear error.
5. Every `checkpoint_every` steps (and at the last): every rank saves its engine states
   (`save_checkpoint`, trainable parameters only), rank 0 the loop state; then
   `ray.train.report(metrics, checkpoint=...)` from every rank. The last one also holds the export.
6. Rank 0 logs to the stage's MLflow run (id made by the driver, the same across restarts): every
   loss term, grad norms, lr, images/s, scale index every `log_every` steps, a sample grid (one
   column per scale) every `sample_every` steps, and prints one progress line. A restarted worker
   logs only steps past both its checkpoint and the last step already in MLflow, so no step is
   logged twice.
7. Output: `student/` (diffusers / PEFT LoRA, safetensors, or the full transformer), `schedule.json`
   (the schedule and how to run it with stock diffusers' `FlowMatchLCMScheduler.set_scale_factors`),
   `distill.json` (summary); the first two are logged to MLflow too.

Test hooks (never in the config, so they do not change the fingerprint): the environment variable
`SWD_DISTILL_TEST_HOOKS` on the driver holds JSON, e.g. {"pid_dir": "/tmp/x", "nan_at_steps": [3],
"fail_at_step": 5, "dump_dir": "/tmp/w", "step_delay_s": 0.5}.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.context import StageContext
from pipeline.student_export import (SCHEDULE_FILE, STUDENT_DIR, adapter_digest, init_student_adapter,
                                     init_student_problems, schedule_record)

VERSION = "2"
SECTIONS = ("distill", "swd", "teacher")
SUMMARY_FILE = "distill.json"
OUTPUTS = (STUDENT_DIR, SCHEDULE_FILE, SUMMARY_FILE)
HOOKS_ENV = "SWD_DISTILL_TEST_HOOKS"
STATE_FILE = "state.json"   # rank 0's loop state inside each checkpoint
EXPORT_DIR = "export"       # the final checkpoint also holds the export
ENGINE_TAG = "state"        # DeepSpeed checkpoint tag (one per Ray Train checkpoint directory)
PROGRESS_METRIC = "progress"  # logged with every batch of metrics: the last step in MLflow
# Where distill.init_student's adapter may lie, first match wins: the `student/` export itself, a distill
# stage output, an MLflow model of the register stage (pyfunc artifact "export" = the distill export).


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
    # Keys that change how the stage runs, not what it writes: left out of every fingerprint
    # (pipeline/graph.py), so changing one reuses the committed output or resumes the run.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("log_every", "sample_every", "sample_num_prompts", "max_failures",
                          "checkpoint_every", "num_checkpoints_to_keep", "storage_path")

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
    # AdamW of both engines (SWD.md section 4, released hyperparameters), constant lr.
    lr: float = Field(5e-6, gt=0)
    fake_lr: float = Field(5e-6, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(10.0, gt=0)
    fake_updates_per_step: int = Field(5, ge=1)
    seed: int = 0
    # Rows held by each worker's local shuffle buffer (0: stream the cache in order).
    shuffle_buffer_rows: int = Field(256, ge=0)
    # Checkpoints (every rank's engine state + the loop state) every N steps and at the end; kept: the
    # newest num_checkpoints_to_keep. Worker failures restarted from the last one, at most max_failures times.
    checkpoint_every: int = Field(100, ge=1)
    num_checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0)
    # Where Ray Train keeps checkpoints: null: the stage's scratch dir (one machine, or a workdir on
    # shared storage); on a multi-node cluster a shared path or URI (s3://bucket/prefix, /mnt/nfs/...).
    storage_path: str | None = None
    # Metrics + progress line every N steps; sample grid (sample_num_prompts rows, one column per scale).
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(100, ge=1)
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
        return self


# ----------------------------------------------------------------------------- warm start


def external_fingerprint(sections: dict) -> list | None:
    """A warm-start adapter's content (sha256) joins the fingerprint: a new champion re-runs distill,
    the same one is a cache hit."""
    cfg: Config = sections["distill"]
    return None if cfg.init_student is None else adapter_digest(cfg.init_student)


# ----------------------------------------------------------------------------- stage (driver)


def run(ctx: StageContext) -> None:
    import mlflow

    from pipeline.teacher import bundle_location, resolve_pretrained
    from pipeline.latent_cache import read_manifest

    cfg: Config = ctx.config
    swd, teacher = ctx.sections["swd"], ctx.sections["teacher"]
    schedule = swd.schedule
    manifest = read_manifest(ctx.inputs["cache"])
    columns = cache_columns(schedule.scales, manifest["scales"])
    directory = resolve_pretrained(bundle_location(ctx.inputs["teacher"]), teacher.local_files_only)
    check_teacher(swd, directory)
    text = check_cache_text(manifest, directory, teacher)
    problems = init_student_problems(cfg.init_student, swd.student)
    if problems:
        raise ValueError("\n".join(problems))
    init_adapter = str(init_student_adapter(cfg.init_student)) if cfg.init_student is not None else None
    hooks = json.loads(os.environ.get(HOOKS_ENV) or "{}")
    mlc = mlflow.MlflowClient(ctx.tracking_uri)
    mlc.set_tag(ctx.run_id, "distill.init_student", init_adapter or "none: from the teacher")

    spec = LoopSpec(
        distill=cfg.model_dump(mode="json"), swd=swd.model_dump(mode="json"), location=str(directory),
        load_t5=teacher.load_t5, max_sequence_length=text["max_sequence_length"], columns=columns,
        sample_prompts=sample_prompts(ctx.inputs["cache"], cfg.sample_num_prompts),
        tracking_uri=ctx.tracking_uri, run_id=ctx.run_id, vae_scale_factor=manifest.get("vae_scale_factor", 8),
        hooks=hooks, init_student=init_adapter,
    )
    check_data_cpus(cfg)
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
    mlc.log_artifacts(ctx.run_id, str(ctx.output_dir / STUDENT_DIR), STUDENT_DIR)
    mlc.log_artifact(ctx.run_id, str(ctx.output_dir / SCHEDULE_FILE))
    mlc.log_artifact(ctx.run_id, str(ctx.output_dir / SUMMARY_FILE))
    mlc.log_metric(ctx.run_id, "distill_wall_s", wall_s)
    ctx.summary.update({k: v for k, v in summary.items() if k != "checkpoint"})
    # The export is committed; the checkpoints were only for resuming this fingerprint.
    ctx.keep_scratch = False
    print(f"[distill] done: {state['step']} steps in {wall_s:.0f} s; student -> {ctx.output_dir / STUDENT_DIR}",
          flush=True)


def fit(spec: "LoopSpec", cache_dir: str | Path, storage_path: str, name: str, cfg: Config):
    """Build and run the TorchTrainer; returns its `Result`. Re-running with the same storage path and
    name continues from the newest checkpoint there (Ray Train V2 restores it for `get_checkpoint`)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.latent_cache import read_cache

    resources = {"CPU": cfg.num_cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.num_gpus_per_worker
    needed = sorted({c for pair in spec.columns for c in pair} | {"prompt_embeds", "pooled_prompt_embeds"})
    dataset = read_cache(cache_dir, columns=[f"{c}{s}" for c in needed for s in ("", "_shape", "_dtype")])
    trainer = TorchTrainer(
        train_loop, train_loop_config=spec.__dict__,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_checkpoints_to_keep),
            # Passive OpenMP waits: spinning threads slow training several-fold on shared cores.
            worker_runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}},
        ),
        datasets={"train": dataset},
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(training_failure(e, max_failures=cfg.max_failures)) from e


def training_failure(error, max_failures: int) -> str:
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


@dataclass
class LoopSpec:
    """Everything a worker needs (plain data: it travels as `train_loop_config`)."""
    distill: dict
    swd: dict
    location: str                       # the teacher bundle directory
    load_t5: bool | str                 # teacher.load_t5: true, false or "auto"
    columns: list                       # per scale index: (z column, z_im1 column) in the cache
    sample_prompts: dict                # prompts + their embeddings, for the sample grid
    tracking_uri: str
    run_id: str
    vae_scale_factor: int
    hooks: dict
    init_student: str | None = None     # warm start: the adapter file (on every worker's file system)
    max_sequence_length: int | None = None  # T5 tokens of the cache's prompt embeddings (the "" prompt's too)


def cache_columns(scales: list[int], cache_scales: list[int]) -> list[tuple[str, str]]:
    """Per step i of the schedule: the cache columns of z_i (side s[i]) and z_im1 (E of the image at
    s[i] downsampled to s[i-1]). A cache made for another schedule serves when it holds the same
    sides, e.g. the full-resolution baseline (all scales equal) from a scale-wise cache holding its side."""
    out, missing = [], []
    for i, side in enumerate(scales):
        prev = scales[max(i - 1, 0)]
        j = next((j for j, s in enumerate(cache_scales) if s == side and (prev == side or cache_scales[max(j - 1, 0)] == prev)), None)
        if j is None:
            missing.append(f"step {i}: side {side}" + (f" after {prev}" if prev != side else ""))
            continue
        out.append((f"z_{j}", f"z_{j}" if prev == side else f"z_im1_{j}"))
    if missing:
        raise ValueError(f"distill: the latent cache holds scales {list(cache_scales)}, which lack what swd scales "
                         f"{list(scales)} need ({'; '.join(missing)}); re-run the cache stage with this swd schedule "
                         f"(or choose scales the cache holds)")
    return out


def check_cache_text(manifest: dict, directory: Path, teacher) -> dict:
    """The cache's prompt embeddings were made as this teacher config makes them: the same text encoders
    (files), T5 loaded or not, the same T5 length. The "" prompt the workers encode for CFG must match
    them. Returns the text settings; ValueError naming the key otherwise."""
    from pipeline.teacher import text_settings
    from pipeline.latent_cache import encoder_digest

    expected = {**text_settings(directory, teacher.load_t5, teacher.max_sequence_length),
                "encoder_digest": encoder_digest(directory)}
    cached = manifest.get("text")
    if cached is None:
        raise ValueError("distill: the latent cache records no text settings (made by an older version of the "
                         "cache stage); re-run the cache stage")
    keys = {"t5": "teacher.load_t5", "max_sequence_length": "teacher.max_sequence_length",
            "encoder_digest": "teacher.pretrained (its text encoder / tokenizer / VAE files)"}
    differ = [f"{keys[k]}: the cache has {cached.get(k)!r}, this config's teacher gives {expected[k]!r}"
              for k in keys if cached.get(k) != expected[k]]
    if differ:
        raise ValueError("distill: the latent cache's prompt embeddings were made with other text settings than "
                         "the distill stage expects: " + "; ".join(differ) + "; re-run the cache stage with this "
                         "teacher config, or set the teacher keys to the cache's")
    return expected


def check_data_cpus(cfg: Config) -> None:
    """Ray Data reads the cache with the CPUs the workers leave: say so when there are none (a fixed-size
    cluster would then stall on its first batch; an autoscaling one may still add nodes)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    taken = cfg.num_workers * cfg.num_cpus_per_worker
    if total - taken < 1:
        print(f"[distill] warning: the workers reserve {taken:g} of the cluster's {total:g} CPUs, which leaves less "
              f"than one for Ray Data to read the cache; lower distill.num_cpus_per_worker or distill.num_workers "
              f"unless the cluster scales up", flush=True)


def check_teacher(swd, directory: Path) -> None:
    """The schedule against the teacher's transformer config (patch size, latent side, blocks)."""
    from pipeline.swd.config import check_against_teacher

    config = json.loads((Path(directory) / "transformer" / "config.json").read_text())
    check_against_teacher(swd, config["patch_size"], config["sample_size"], config["num_layers"])


def sample_prompts(cache_dir: str | Path, n: int) -> dict:
    """The first n rows of the cache: prompts and their embeddings (rows of the sample grid)."""
    import pyarrow.dataset as pads

    from pipeline.latent_cache import decode_batch, read_manifest

    manifest = read_manifest(cache_dir)
    dirs = [e["dir"] for e in manifest["shards"] if e["rows"]]
    names = [f"{c}{s}" for c in ("prompt_embeds", "pooled_prompt_embeds") for s in ("", "_shape", "_dtype")]
    table = pads.dataset(dirs[0], format="parquet").head(n, columns=["prompt", *names])
    batch = decode_batch(table)
    return {"prompts": batch["prompt"], "prompt_embeds": batch["prompt_embeds"].float().numpy(),
            "pooled_prompt_embeds": batch["pooled_prompt_embeds"].float().numpy()}


# ----------------------------------------------------------------------------- worker


def train_loop(config: dict) -> dict:
    """Ray Train's per-worker function; rank 0's return value reaches the driver (`Result.return_value`)."""
    return Trainer(LoopSpec(**config)).train()


def ds_config(cfg: Config, lr: float, world_size: int, bf16: bool) -> dict:
    """One engine's DeepSpeed config: AdamW (torch's; no op build), clipping, ZeRO stage, precision."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size_per_worker,
        "train_batch_size": cfg.batch_size_per_worker * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(cfg.betas), "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        # Gradients are averaged over ranks in fp32 unless the engine is a bf16 one (as released).
        "communication_data_type": "bf16" if bf16 else "fp32",
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Trainer:
    """The state of one worker over the run: networks, engines, data position, counters, logging."""

    def __init__(self, spec: LoopSpec):
        import ray.train
        import ray.train.torch
        import torch

        from pipeline.swd.config import SwdConfig

        self.spec = spec
        self.cfg = Config(**spec.distill)
        self.swd = SwdConfig(**spec.swd)
        self.hooks = spec.hooks
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.cfg.use_gpu)
        self.mixed = self.cfg.precision == "bf16-mixed"  # bf16 base, fp32 trained weights, fp32 engines
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "nonfinite_generator": 0, "nonfinite_fake": 0,
                      "nonfinite_in_a_row": 0, "attempts": 0, "train_s": 0.0, "images": 0}
        if self.hooks.get("pid_dir"):
            Path(self.hooks["pid_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(self.hooks["pid_dir"]) / f"rank{self.rank}.pid").write_text(str(os.getpid()))

    # ---------------------------------------------------------------- setup

    def build(self, warm_start: bool = True) -> None:
        """Teacher, networks, engines. `warm_start`: the student LoRA from `spec.init_student`, if any
        (off when a checkpoint will be restored: the checkpoint wins)."""
        import deepspeed
        import torch

        from pipeline.student_export import load_student_lora
        from pipeline.swd import TextCond, build_networks
        from pipeline.teacher import load_bundle

        # bf16 engines hold bf16 weights (fp32 master copies of the trained ones in the optimiser):
        # load the teacher in bf16 then, so a large teacher and its fake copy fit before partitioning.
        dtype = "bfloat16" if self.bf16 or self.mixed else "float32"
        bundle = load_bundle(self.spec.location, dtype, str(self.device), True, self.spec.load_t5,
                             self.spec.max_sequence_length)
        with torch.no_grad():
            self.uncond = TextCond(*(t.float() for t in bundle.encode_prompt([""])))
        p = self.spec.sample_prompts
        self.sample_cond = TextCond(torch.tensor(p["prompt_embeds"], device=self.device),
                                    torch.tensor(p["pooled_prompt_embeds"], device=self.device))
        self.vae_decode = bundle.decode_latents if self.rank == 0 else None
        # The cache holds the prompt embeddings: drop the text encoders (and the VAE off rank 0).
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3") + (("vae",) if self.rank else ()):
            setattr(bundle, name, None)
            setattr(bundle.pipeline, name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(self.cfg.seed)  # PEFT draws LoRA A from the global generator: the same on every rank and run
        nets = build_networks(bundle.transformer, self.swd)
        self.warm_started = warm_start and self.spec.init_student is not None
        if self.warm_started:  # before the engines: ZeRO-3 partitions the weights as loaded here
            load_student_lora(nets.student, self.spec.init_student)
        if self.mixed:  # the released precision: trained weights in fp32 over the bf16 base
            for param in nets.student_parameters() + nets.fake_parameters():
                param.data = param.data.float()
        if self.cfg.gradient_checkpointing:
            nets.student.enable_gradient_checkpointing()
            if nets.fake is not None:
                nets.fake.transformer.enable_gradient_checkpointing()
        self.nets = nets
        self.student, *_ = deepspeed.initialize(
            model=nets.student, model_parameters=nets.student_parameters(),
            config=ds_config(self.cfg, self.cfg.lr, self.world, self.bf16))
        self.fake = None
        if nets.fake is not None:
            self.fake, *_ = deepspeed.initialize(
                model=nets.fake, model_parameters=nets.fake_parameters(),
                config=ds_config(self.cfg, self.cfg.fake_lr, self.world, self.bf16))

    def restore_engines(self, checkpoint) -> None:
        """Both engines' states from a checkpoint (every rank reads its own ZeRO partition)."""
        with checkpoint.as_directory() as d:
            for engine, sub in ((self.student, "student"), (self.fake, "fake")):
                if engine is not None:
                    path, _ = engine.load_checkpoint(str(Path(d) / sub), tag=ENGINE_TAG, load_module_strict=False)
                    if path is None:
                        raise RuntimeError(f"distill: checkpoint {checkpoint.path} has no {sub} engine state")

    # ---------------------------------------------------------------- the run

    def train(self) -> dict:
        """The run from wherever the checkpoint left it; returns how it ended (the last step, and
        `stopped` when the non-finite guard ended it)."""
        import ray.train

        started = time.monotonic()
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:  # the loop state first: the data position decides what to skip
            with checkpoint.as_directory() as d:
                self.state.update(json.loads((Path(d) / STATE_FILE).read_text()))
        # Ray Data starts streaming (tens of seconds on a busy machine) while the models load.
        batches = Prefetch(self.batches()) if self.state["step"] < self.cfg.num_steps else iter(())
        self.build(warm_start=checkpoint is None)
        if checkpoint is not None:
            self.restore_engines(checkpoint)
        self.state["attempts"] += 1
        self.logger = MetricsLogger(self) if self.rank == 0 else None
        if self.rank == 0:
            _say(f"[distill] worker ready in {time.monotonic() - started:.1f} s (teacher, networks, "
                 f"{'two engines' if self.fake is not None else 'one engine'}, checkpoint) on {self.device}")
        if checkpoint is not None and self.rank == 0:
            _say(f"[distill] resumed at step {self.state['step']}/{self.cfg.num_steps} (attempt "
                 f"{self.state['attempts']}); MLflow continues after step {self.logger.last_logged}")
            self._dump_weights(f"loaded_step{self.state['step']}")
        if self.warm_started and self.rank == 0:
            _say(f"[distill] student LoRA warm-started from {self.spec.init_student}")
            self._dump_weights("init_student")
        start_step = self.state["step"]
        interval = Interval()
        while self.state["step"] < self.cfg.num_steps:
            step = self.state["step"] + 1
            t0, cpu0 = time.monotonic(), time.process_time()
            parts, skipped = self.generator_step(step, batches)
            dt = time.monotonic() - t0
            self.state["step"] = step
            self.state["train_s"] += dt
            self.state["images"] += self.images_per_step
            self.state["nonfinite_in_a_row"] = self.state["nonfinite_in_a_row"] + 1 if skipped else 0
            interval.add(parts, dt, time.process_time() - cpu0)
            if step % self.cfg.log_every == 0 or step == self.cfg.num_steps:
                self.log(step, interval)
                interval = Interval()
            if step % self.cfg.sample_every == 0 or step == self.cfg.num_steps:
                self.sample(step)
            if self.state["nonfinite_in_a_row"] >= self.cfg.max_nonfinite_steps:
                # Not an exception: Ray Train would retry it (max_failures). No checkpoint either: the last
                # one holds the last good weights. Every rank stops here (the skips are collective).
                self._dump_weights(f"stopped_step{step}")
                return {"stopped": "nonfinite", **self.report_metrics(step)}
            if step % self.cfg.checkpoint_every == 0 or step == self.cfg.num_steps:
                self.checkpoint(step, final=step == self.cfg.num_steps)
            self._hook_step(step)
        if start_step >= self.cfg.num_steps and self.rank == 0:
            _say(f"[distill] the checkpoint is already at step {start_step}; nothing left to train")
        return self.report_metrics(self.state["step"])

    @property
    def images_per_step(self) -> int:
        """Cache rows consumed per generator step (fake updates included), all workers."""
        updates = 1 + (self.cfg.fake_updates_per_step if self.fake is not None else 0)
        return updates * self.cfg.batch_size_per_worker * self.world

    def batches(self):
        """Batches of this worker's shard forever, epoch after epoch; the position (epoch, batches
        consumed in it) is part of the loop state, so a resumed run skips what the checkpoint consumed
        (the rows behind a position may differ: Ray Data's split is dynamic)."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        collate = _collate_fn()
        while True:
            skip, yielded = self.state["batches_in_epoch"], False
            for j, batch in enumerate(shard.iter_torch_batches(
                    batch_size=self.cfg.batch_size_per_worker, drop_last=True, collate_fn=collate,
                    local_shuffle_buffer_size=self.cfg.shuffle_buffer_rows or None,
                    local_shuffle_seed=self.cfg.seed + 1000 * self.state["epoch"] + self.rank)):
                yielded = True
                if j < skip:
                    continue
                self.state["batches_in_epoch"] = j + 1
                yield batch
            if not yielded:
                raise RuntimeError(f"distill: worker {self.rank} got no full batch of "
                                   f"{self.cfg.batch_size_per_worker} rows from the cache; it needs at least "
                                   f"batch_size_per_worker x num_workers rows")
            self.state["epoch"] += 1
            self.state["batches_in_epoch"] = 0

    def inputs(self, batch: dict, i: int, generator):
        import torch

        from pipeline.swd import TextCond, training_inputs

        z_col, zim1_col = self.spec.columns[i]
        z = batch[z_col].to(self.device, torch.float32)
        z_im1 = batch[zim1_col].to(self.device, torch.float32)
        cond = TextCond(batch["prompt_embeds"].to(self.device, torch.float32),
                        batch["pooled_prompt_embeds"].to(self.device, torch.float32))
        s = self.swd.schedule
        return training_inputs(z_im1, i, s.scales, s.sigmas, generator=generator), z, cond

    def generator_step(self, step: int, batches) -> tuple[dict, bool]:
        """`fake_updates_per_step` updates of F, then one of G, at scale index i; every loss checked on
        every rank first. Returns the loss terms and grad norms, and whether an update was skipped."""
        import torch

        from pipeline.swd import Networks, choose_scale_index, fake_loss, frozen, generator_loss, x0_hat

        s = self.swd.schedule
        i = choose_scale_index(step - 1, len(s.scales), self.swd.scale_index,
                               self._generator(step, 99))
        parts: dict[str, float] = {"scale_index": float(i)}
        skipped = False
        if self.fake is not None:
            fake_sums: dict[str, float] = {}
            for k in range(self.cfg.fake_updates_per_step):
                g = self._generator(step, k)
                inp, z, cond = self.inputs(next(batches), i, g)
                with torch.no_grad():                       # the student's sample; no gradient reaches G
                    x = x0_hat(self.student.module, inp.x_in, inp.sigma, cond)
                loss, terms = fake_loss(self.fake, x, z, cond, self.swd, generator=g)
                if self._all_finite(loss):
                    self.fake.backward(loss)
                    norm = self._grad_norm(self.fake)
                    self.fake.step()
                    norm = norm if norm is not None else self.fake.get_global_grad_norm()
                    terms = {**terms, "grad_norm_fake": math.nan if norm is None else float(norm)}
                else:
                    self.state["nonfinite_fake"] += 1
                    skipped = True
                    self.fake.zero_grad()
                for name, v in terms.items():
                    fake_sums[name] = fake_sums.get(name, 0.0) + float(v if v is not None else math.nan)
            parts.update({k: v / self.cfg.fake_updates_per_step for k, v in fake_sums.items()})
        g = self._generator(step, 100)
        inp, z, cond = self.inputs(next(batches), i, g)
        x = x0_hat(self.student, inp.x_in, inp.sigma, cond)
        networks = Networks(student=self.student.module, fake=None if self.fake is None else self.fake.module,
                            frozen_teacher=self.nets.frozen_teacher)
        # F stays frozen through the backward and the optimiser step: gradient checkpointing recomputes
        # its forward inside the backward, and must see the same flags as the forward did.
        with frozen(networks.fake):
            loss, terms = generator_loss(networks, x, z, cond, self.uncond, self.swd, generator=g)
            if step in self.hooks.get("nan_at_steps", ()) and self.rank == 0:
                loss = loss * math.nan                      # test hook: one rank's loss goes non-finite
            if self._all_finite(loss):
                self.student.backward(loss)
                norm = self._grad_norm(self.student)
                self.student.step()
                norm = norm if norm is not None else self.student.get_global_grad_norm()
                parts["grad_norm_student"] = math.nan if norm is None else float(norm)
            else:
                self.state["nonfinite_generator"] += 1
                skipped = True
                self.student.zero_grad()
        parts.update({k: float(v) for k, v in terms.items()})
        return parts, skipped

    def _generator(self, step: int, k: int):
        """A generator per (seed, step, update, rank): a resumed run draws the same noise."""
        import torch

        g = torch.Generator(self.device)
        g.manual_seed(((self.cfg.seed * 1_000_003 + step) * 1009 + k) * 4099 + self.rank)
        return g

    def _all_finite(self, loss) -> bool:
        """True when the loss is finite on every rank (all ranks then agree to step or to skip)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0], device=self.device)
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def _grad_norm(self, engine) -> float | None:
        """Global gradient norm before clipping, where DeepSpeed does not compute it (ZeRO-0 in fp32;
        gradients are already averaged over ranks after `backward`)."""
        import torch

        if self.cfg.zero_stage != 0 or self.bf16:
            return None
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    # ---------------------------------------------------------------- checkpoints, export

    def checkpoint(self, step: int, final: bool) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="distill-ckpt-") as tmp:
            tmp = Path(tmp)
            for engine, sub in ((self.student, "student"), (self.fake, "fake")):
                if engine is not None:
                    engine.save_checkpoint(str(tmp / sub), tag=ENGINE_TAG, exclude_frozen_parameters=True)
            kind = self.export(tmp / EXPORT_DIR / STUDENT_DIR) if final else None
            if self.rank == 0:
                state = {**self.state, "export_kind": kind,
                         "images_per_s": self.state["images"] / max(self.state["train_s"], 1e-9)}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
                self._dump_weights(f"saved_step{step}")
            ray.train.report(self.report_metrics(step), checkpoint=Checkpoint.from_directory(str(tmp)),
                             checkpoint_dir_name=f"checkpoint_step{step:08d}")

    def export(self, directory: Path) -> str | None:
        """The student for stock diffusers (`pipeline.swd.save_student`), written by rank 0; under
        ZeRO-3 every rank first gathers the parameters it needs."""
        import deepspeed

        from pipeline.student_export import save_student

        module = self.student.module
        params = [p for p in module.parameters() if p.requires_grad] if not self.swd.student.full_finetune \
            else list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.zero_stage == 3):
            if self.rank == 0:
                directory.mkdir(parents=True, exist_ok=True)
                return save_student(module, directory)
        return None

    def report_metrics(self, step: int) -> dict:
        keys = ("nonfinite_generator", "nonfinite_fake", "nonfinite_in_a_row", "attempts")
        return {"step": step, **{k: self.state[k] for k in keys}}

    # ---------------------------------------------------------------- logging, samples

    def log(self, step: int, interval: "Interval") -> None:
        """Average every term over the interval and over ranks (one all-reduce), then rank 0 logs."""
        import torch
        import torch.distributed as dist

        names = sorted(interval.sums)  # the same on every rank: skips are collective
        values = torch.tensor([interval.sums[n] for n in names] + [interval.counts[n] for n in names]
                              + [interval.seconds], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(values)
        if self.logger is None:
            return
        values = values.tolist()
        means = {n: values[j] / values[len(names) + j] for j, n in enumerate(names) if values[len(names) + j]}
        seconds = values[-1] / self.world
        s = self.swd.schedule
        metrics = {f"loss/{n}": v for n, v in means.items() if n not in ("scale_index",) and not n.startswith("grad")}
        metrics.update({n: v for n, v in means.items() if n.startswith("grad_norm")})
        metrics.update({
            "scale_index": interval.last.get("scale_index", 0.0),
            "scale_side": float(s.scales[int(interval.last.get("scale_index", 0))]),
            "lr/student": float(self.student.get_lr()[0]),
            "images_per_s": interval.steps * self.images_per_step / max(seconds, 1e-9),
            "s_per_step": seconds / max(interval.steps, 1),
            "cpu_s_per_step": interval.cpu_seconds / max(interval.steps, 1),
            "nonfinite/generator_skipped": self.state["nonfinite_generator"],
            "nonfinite/fake_skipped": self.state["nonfinite_fake"],
            "epoch": self.state["epoch"],
        })
        if self.fake is not None:
            metrics["lr/fake"] = float(self.fake.get_lr()[0])
        self.logger.log(step, metrics)
        left = (self.cfg.num_steps - step) * seconds / max(interval.steps, 1)
        losses = " ".join(f"{n} {means[n]:.4g}" for n in ("generator_total", "dmd", "mmd", "fake_total") if n in means)
        _say(f"[distill] step {step}/{self.cfg.num_steps} scale {s.scales[int(metrics['scale_index'])]} | {losses} | "
              f"{metrics['images_per_s']:.1f} img/s | {_duration(left)} left")

    def sample(self, step: int) -> None:
        """The sample grid: one row per prompt, one column per scale (each step's clean estimate).
        Under ZeRO-3 every rank runs the sampler (parameters are gathered collectively)."""
        import torch

        from pipeline.swd import sample_scalewise

        if self.rank != 0 and self.cfg.zero_stage != 3:
            return
        s = self.swd.schedule
        g = torch.Generator(self.device).manual_seed(self.cfg.seed + 7)
        with torch.no_grad():
            _, steps = sample_scalewise(self.student.module, self.sample_cond, s.scales, s.sigmas, generator=g,
                                        return_steps=True)
            if self.logger is None:
                return
            images = [self.vae_decode(x).float().clamp(-1, 1) for x in steps]
        self.logger.log_grid(step, images, self.spec.sample_prompts["prompts"])

    # ---------------------------------------------------------------- test hooks

    def _hook_step(self, step: int) -> None:
        if self.hooks.get("pid_dir"):
            (Path(self.hooks["pid_dir"]) / f"rank{self.rank}.step").write_text(str(step))
        if self.hooks.get("step_delay_s"):
            time.sleep(float(self.hooks["step_delay_s"]))
        if self.hooks.get("fail_at_step") == step:
            raise RuntimeError(f"test hook: failing at step {step}")

    def _dump_weights(self, name: str) -> None:
        if not self.hooks.get("dump_dir") or self.cfg.zero_stage == 3:
            return
        from safetensors.torch import save_file

        tensors = {n: p.detach().float().cpu().contiguous() for n, p in self.student.module.named_parameters()
                   if p.requires_grad}
        Path(self.hooks["dump_dir"]).mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(Path(self.hooks["dump_dir"]) / f"{name}.safetensors"))


class Prefetch:
    """An iterator whose first item is fetched in a background thread from construction on."""

    def __init__(self, iterator):
        import threading

        self.iterator, self.first, self.error = iterator, None, None
        self.thread = threading.Thread(target=self._fetch, daemon=True, name="distill-prefetch")
        self.thread.start()

    def _fetch(self):
        try:
            self.first = next(self.iterator)
        except BaseException as e:  # re-raised in the training thread
            self.error = e

    def __iter__(self):
        return self

    def __next__(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            if self.error is not None:
                raise self.error
            return self.first
        return next(self.iterator)


class Interval:
    """Sums of the per-step terms since the last log."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # this process's CPU time (training thread, data decode, Ray)
        self.steps = 0
        self.last: dict[str, float] = {}

    def add(self, parts: dict, seconds: float, cpu_seconds: float = 0.0) -> None:
        for k, v in parts.items():
            self.sums.setdefault(k, 0.0)
            self.counts.setdefault(k, 0)
            if v is not None and math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        self.steps += 1
        self.last = parts


class MetricsLogger:
    """Rank 0's MLflow logging into the driver's stage run. Steps at or before the last one already in
    MLflow (an earlier attempt got further than its last checkpoint) are not logged again."""

    def __init__(self, trainer: Trainer):
        import mlflow

        self.client = mlflow.MlflowClient(trainer.spec.tracking_uri)
        self.run_id = trainer.spec.run_id
        self.trainer = trainer
        history = self.client.get_metric_history(self.run_id, PROGRESS_METRIC)
        # Steps up to here are in MLflow already (or belong to the checkpoint this attempt resumed from).
        self.last_logged = max([int(m.step) for m in history] + [trainer.state["step"]])
        self.total = trainer.cfg.num_steps

    def log(self, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        if step <= self.last_logged:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        items.append(Metric(PROGRESS_METRIC, step / self.total, now, step))
        self.client.log_batch(self.run_id, metrics=items)

    def log_grid(self, step: int, images: list, prompts: list[str]) -> None:
        """images: per scale, pixels [B, 3, h, w] in [-1, 1]; upscaled (nearest) to the last size."""
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image

        if step <= self.last_logged:
            return
        side = images[-1].shape[-1]
        cols = [F.interpolate(x.cpu(), size=(side, side), mode="nearest") for x in images]
        rows = torch.cat([torch.cat([c[b] for c in cols], dim=-1) for b in range(cols[0].shape[0])], dim=-2)
        array = ((rows.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"samples_step{step:06d}.png"
            Image.fromarray(array).save(path)
            (Path(tmp) / f"samples_step{step:06d}.txt").write_text("\n".join(prompts) + "\n")
            self.client.log_artifacts(self.run_id, tmp, "samples")


def _collate_fn():
    """Arrow batch of cache rows -> {column: float tensor} (moved to the device by Ray Train)."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    from pipeline.latent_cache import decode_batch

    class Collate(ArrowBatchCollateFn):
        def __call__(self, batch):
            out = decode_batch(batch)
            return {k: v for k, v in out.items() if k not in ("key", "prompt", "z", "z_im1")}

    return Collate()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _say(line: str) -> None:
    """One line on the worker's stdout. Not `print`: Ray Train patches it to log *and* tee, which
    shows every line twice on the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
