"""`teacher` stage: the frozen teacher every later stage distils from.

Steps:
1. If `teacher.pretrained` is set (a local diffusers directory or a hub id), check that it is an
   SD3-family diffusers pipeline (model_index.json naming StableDiffusion3Pipeline, an
   SD3Transformer2DModel, an AutoencoderKL) and record where it lives in `teacher.json`; nothing
   is trained. A local directory's file sizes and modification times join the fingerprint.
2. Otherwise train the embedded tiny bundle (`pipeline/tiny.py`) on the train shards with
   `pipeline.teacher_training.train` (its docstring has the steps: VAE, latent statistics,
   multi-resolution rectified flow with EMA, the bundle saved with `save_pretrained`, a sample
   grid with `teacher.sampler` and oracle scores of the eval prompts), in one Ray task on this
   node's CPUs with the workers' environment (`pipeline.resources`: passive OpenMP waits, since
   spinning threads made a training step ~5x slower whenever other work shared the cores). Bad
   train shards are counted and fail the stage only above 1% of the samples. The scratch dir
   keeps the finished VAE and a flow checkpoint, so a killed run resumes; `teacher.json` records
   the training figures and the sample grid is logged to MLflow with the loss curves.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from pipeline.config import Section
from pipeline.context import StageContext
from pipeline.teacher import TEACHER_FILE
from pipeline.teacher_training import BUNDLE_DIR, GRID_FILE, TRAINER_VERSION, TrainingConfig

VERSION = "2"
SECTIONS = ("teacher",)
# bundle/ and samples.png exist only when the stage trains; teacher.json is always written.
OUTPUTS = (TEACHER_FILE,)


class _Where(Section):
    """Where the teacher lives and how every stage loads it: all a pretrained teacher's fingerprint holds."""

    # A local diffusers directory of an SD3/SD3.5 pipeline (relative paths are relative to the
    # repository root) or a hub id. null: train the embedded tiny teacher.
    pretrained: str | None = None
    local_files_only: bool = True  # never reach the hub when loading a hub id
    # SD3's T5 encoder: true requires one (a teacher without text_encoder_3/ is an error), auto loads it
    # when the teacher has one, false leaves the slot empty (zero T5 embeddings; saves memory).
    load_t5: bool | Literal["auto"] = "auto"
    # T5 tokens of every prompt embedding; null: the T5 tokenizer's model_max_length (the released
    # recipe pads to it), or, for a teacher without T5, the bundle's own value (tiny: 0), else 256.
    # The cache records it; distill refuses a cache made with another.
    max_sequence_length: int | None = Field(None, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class Config(TrainingConfig, _Where):
    """The `teacher` section: `_Where`'s keys, then the training knobs (`pipeline.teacher_training.TrainingConfig`:
    seed, init_bundle, vae_*, num_steps, ..., sampler, grid_*, eval_num_prompts), which count only when the
    stage trains (pretrained null). pydantic orders fields from the last base on, so `_Where`'s come first."""

    PRETRAINED_KEYS: ClassVar[tuple[str, ...]] = tuple(_Where.model_fields)

    def fingerprint_dump(self) -> dict:
        """The keys that change this section's results (pipeline/graph.py: section_fingerprint); a trained
        teacher's also name the trainer's version."""
        dump = self.model_dump(mode="json")
        if self.pretrained is not None:
            return {k: dump[k] for k in self.PRETRAINED_KEYS}
        return {**{k: v for k, v in dump.items() if k not in self.NOT_IN_FINGERPRINT}, "trainer_version": TRAINER_VERSION}

    def training(self) -> TrainingConfig:
        """The training knobs alone, what `pipeline.teacher_training.train` takes."""
        return TrainingConfig.model_validate(self.model_dump(include=set(TrainingConfig.model_fields)))


def external_fingerprint(sections: dict) -> list | None:
    """A local pretrained directory's files (path, size, mtime) join the fingerprint."""
    from pipeline.teacher import directory_digest, resolve_pretrained

    cfg: Config = sections["teacher"]
    if cfg.pretrained is None:
        init = Path(os.path.expanduser(cfg.init_bundle)) if cfg.init_bundle else None
        return [str(init), directory_digest(init)] if init and init.is_dir() else None
    directory = resolve_pretrained(cfg.pretrained, cfg.local_files_only)
    return [str(directory), directory_digest(directory)]


def run(ctx: StageContext) -> None:
    from pipeline.data import shard_urls
    from pipeline.teacher import resolve_pretrained

    cfg: Config = ctx.config
    if cfg.pretrained is not None:
        directory = resolve_pretrained(cfg.pretrained, cfg.local_files_only)  # TeacherError if not SD3
        record = {"source": "pretrained", "location": str(directory), "pretrained": cfg.pretrained}
        (ctx.output_dir / TEACHER_FILE).write_text(json.dumps(record, indent=1) + "\n")
        ctx.log.tags({"teacher.source": "pretrained", "teacher.location": str(directory)})
        ctx.summary.update(source="pretrained", location=str(directory))
        print(f"[teacher] pretrained teacher at {directory}; nothing to train", flush=True)
        return

    result = _train_in_ray_task(cfg, shard_urls(ctx.inputs["shards"], "train"),
                                shard_urls(ctx.inputs["shards"], "eval"), ctx)
    record = {"source": "trained", "location": BUNDLE_DIR, **result}
    (ctx.output_dir / TEACHER_FILE).write_text(json.dumps(record, indent=1) + "\n")
    ctx.log.tags({"teacher.source": "trained"})
    if (ctx.output_dir / GRID_FILE).is_file():  # not an OUTPUT (a config may draw no grid): logged here
        ctx.log.artifact(ctx.output_dir / GRID_FILE)
    ctx.summary.update(source="trained", **{k: v for k, v in result.items() if not isinstance(v, (dict, list))},
                       **{f"oracle_{k}": v for k, v in result.get("oracle", {}).items()})


def _train_in_ray_task(cfg: Config, train_urls: list[str], eval_urls: list[str], ctx: StageContext) -> dict:
    """`pipeline.teacher_training.train` in one Ray task of `teacher.num_cpus` CPUs on this node (it writes
    into this node's output dir)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline import teacher_training
    from pipeline.resources import worker_runtime_env

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=cfg.num_cpus, scheduling_strategy=here,
                      runtime_env=worker_runtime_env())(teacher_training.train)
    return ray.get(task.remote(cfg.training(), train_urls, eval_urls, str(ctx.output_dir), str(ctx.scratch_dir),
                               ctx.tracking_uri, ctx.run_id))
