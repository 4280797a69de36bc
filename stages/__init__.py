"""The stages and the config tree they compose: the one place that knows every stage.

`STAGES` is the graph `pipeline/run.py` plans and runs (pipeline/graph.py fingerprints and commits
each); `PipelineConfig` is the tree `pipeline.yaml` fills, one section per stage plus the shared
sections of `pipeline/config.py`. A stage module never imports another stage: what two stages share
lives in `pipeline/`.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import ClassVar

from pipeline import config as config_mod
from pipeline.config import DataConfig, RayConfig, Section, TrackingConfig
from pipeline.graph import StageSpec
from pipeline.schedule import Config as ScheduleConfig
from pipeline.swd.config import SwdConfig
from stages import cache, distill, evaluate, register, shards, synthesize, teacher
from stages.cache import Config as CacheConfig
from stages.distill import Config as DistillConfig
from stages.evaluate import Config as EvaluateConfig
from stages.register import Config as RegisterConfig
from stages.synthesize import Config as SynthesizeConfig
from stages.teacher import Config as TeacherConfig

with warnings.catch_warnings():  # `register` is also ABCMeta.register; the field wins, as intended
    warnings.filterwarnings("ignore", message='Field name "register"')

    class PipelineConfig(Section):
        """The whole config tree (pipeline.yaml documents every key)."""

        # A config file named `miniature.yaml` (cluster/miniature.yaml) shrinks a cluster profile to a
        # laptop / CI run of the same settings. It may set only these size and hardware keys (a
        # trailing `*` covers a whole section), so the miniature cannot drift from the profile it
        # stands for: ZeRO stage, gradient checkpointing, early exit, MMD features, loss weights and
        # ranges, fake updates per step, LoRA targets and rank, CFG and the number of scales all stay
        # the profile's.
        MINIATURE_KEYS: ClassVar[tuple[str, ...]] = (
            "workdir", "ray.*", "data.*",
            # the SD3.5-structured miniature teacher
            "teacher.pretrained",
            # the same schedule on the miniature's 8x smaller latents; the feature block at the same relative depth
            "swd.latent_side_divisor", "swd.feature_block",
            "synthesize.num_actors", "synthesize.num_cpus_per_actor", "synthesize.num_gpus_per_actor",
            "cache.num_encoders", "cache.batch_size", "cache.num_cpus_per_encoder", "cache.num_gpus_per_encoder",
            "cache.num_cpus_per_decoder", "cache.decode_batch_size", "cache.log_every_s",
            "distill.num_steps", "distill.num_workers", "distill.batch_size_per_worker", "distill.use_gpu",
            "distill.num_cpus_per_worker", "distill.num_gpus_per_worker", "distill.storage_path",
            "distill.checkpoint_every_steps", "distill.log_every_steps", "distill.sample_every_steps",
            "distill.sample_num_prompts",
            "distill.shuffle_buffer_rows",
            "evaluate.num_actors", "evaluate.num_cpus_per_actor", "evaluate.num_gpus_per_actor", "evaluate.batch_size",
            "evaluate.max_prompts", "evaluate.score_batch_size", "evaluate.latency_warmup_batches",
            "evaluate.latency_repeats", "evaluate.grid_prompts",
            # the published protocol's files live on the cluster volume: a miniature evaluates on its eval shards
            "evaluate.prompts", "evaluate.fid_reference_stats", "evaluate.inception_weights", "evaluate.clip_model",
            "evaluate.pickscore_model", "evaluate.pickscore_processor", "evaluate.bootstrap_resamples",
            "register.device",
        )

        # Keys of earlier releases: a config that sets one fails naming its new key.
        RENAMED_KEYS: ClassVar[dict[str, str]] = {
            "teacher.sample_num_steps": "teacher.sampler.num_steps",
            "teacher.sample_guidance_scale": "teacher.sampler.guidance_scale",
            "synthesize.num_steps": "synthesize.teacher_sampler.num_steps",
            "synthesize.guidance_scale": "synthesize.teacher_sampler.guidance_scale",
            "evaluate.teacher_num_steps": "evaluate.teacher_sampler.num_steps",
            "evaluate.teacher_guidance_scale": "evaluate.teacher_sampler.guidance_scale",
            "distill.checkpoint_every": "distill.checkpoint_every_steps",
            "distill.log_every": "distill.log_every_steps",
            "distill.sample_every": "distill.sample_every_steps",
        }

        workdir: Path = Path("workdir")
        tracking: TrackingConfig = TrackingConfig()
        ray: RayConfig = RayConfig()
        data: DataConfig = DataConfig()
        teacher: TeacherConfig = TeacherConfig()
        synthesize: SynthesizeConfig = SynthesizeConfig()
        swd: SwdConfig = SwdConfig()
        cache: CacheConfig = CacheConfig()
        distill: DistillConfig = DistillConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        register: RegisterConfig = RegisterConfig()
        schedule: ScheduleConfig = ScheduleConfig()


MINIATURE_KEYS = PipelineConfig.MINIATURE_KEYS
load_config = functools.partial(config_mod.load_config, PipelineConfig)
validate = functools.partial(config_mod.validate, PipelineConfig)


def full_resolution_swd(swd: SwdConfig) -> SwdConfig:
    """The baseline SwD is compared against: every step at the largest scale, same sigmas."""
    sched = swd.schedule
    on_grid = sched.boundaries is not None
    return SwdConfig.model_validate({
        **swd.model_dump(), "preset": None, "scales": [sched.scales[-1]] * len(sched.scales),
        "boundaries": sched.boundaries if on_grid else None, "sigmas": None if on_grid else sched.sigmas})


def default_stages() -> list[StageSpec]:
    """Every stage in run order, with the stages whose outputs it reads."""
    return [
        StageSpec("shards", shards),
        StageSpec("teacher", teacher, inputs=("shards",)),
        StageSpec("synthesize", synthesize, inputs=("shards", "teacher"), enabled=synthesize.enabled),
        StageSpec("cache", cache, inputs=("shards", "teacher", "synthesize")),
        StageSpec("distill", distill, inputs=("cache", "teacher")),
        StageSpec("distill_baseline", distill, inputs=("cache", "teacher"),
                  # from the teacher, never a warm start: the scale-wise champion is no baseline
                  configure=lambda cfg: {"swd": full_resolution_swd(cfg.swd),
                                         "distill": cfg.distill.model_copy(update={"init_student": None})},
                  enabled=lambda cfg: cfg.evaluate.baseline),
        StageSpec("evaluate", evaluate, inputs=("shards", "teacher", "distill", "distill_baseline")),
        StageSpec("register", register, inputs=("teacher", "distill", "evaluate")),
    ]
