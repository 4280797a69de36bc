"""`teacher` stage: the frozen teacher every later stage distils from.

Steps:
1. If `teacher.pretrained` is set (a local diffusers directory or a hub id), check that it is an
   SD3-family diffusers pipeline (model_index.json naming StableDiffusion3Pipeline, an
   SD3Transformer2DModel, an AutoencoderKL) and record where it lives in `teacher.json`; nothing
   is trained. A local directory's file sizes and modification times join the fingerprint.
2. Otherwise train the embedded tiny bundle (`pipeline/tiny.py`) on the train shards, in one Ray
   task on the CPU:
   a. decode the train shards into memory (uint8 images, prompts);
   b. VAE: reconstruction MSE + per-dimension KL; then measure the latents' mean and std and
      store them as the VAE's `shift_factor` / `1 / scaling_factor` (as SD3 does);
   c. encode every image once (posterior mean and std; a fresh posterior sample per step);
   d. transformer + both CLIP text encoders jointly, rectified flow (SWD.md section 2):
      x_sigma = (1 - sigma) x0 + sigma eps, velocity target eps - x0, sigma logit-normal,
      `prompt_dropout` of the prompts replaced by "" so classifier-free guidance works, EMA of
      the weights (the EMA weights are what gets saved);
   e. save the bundle with `save_pretrained` (diffusers layout, safetensors) into `bundle/`.
   Progress and a resumable checkpoint (safetensors) go to the scratch dir every
   `checkpoint_every_steps`; a killed run resumes from the last one.
3. Sample grid (`grid_prompts` eval prompts x `grid_samples_per_prompt`, `sample_num_steps` Euler
   steps, CFG `sample_guidance_scale`) with the stock StableDiffusion3Pipeline, oracle scores of
   `eval_num_prompts` eval samples; both logged to MLflow with the loss curves.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.context import StageContext

VERSION = "1"
SECTIONS = ("teacher",)
TEACHER_FILE = "teacher.json"
BUNDLE_DIR = "bundle"
GRID_FILE = "samples.png"
OUTPUTS = (TEACHER_FILE, BUNDLE_DIR, GRID_FILE)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    # Where the teacher lives: a local diffusers directory of an SD3/SD3.5 pipeline (relative paths
    # are relative to the repository root) or a hub id. null: train the embedded tiny teacher.
    pretrained: str | None = None
    local_files_only: bool = True  # never reach the hub when loading a hub id
    load_t5: bool = True  # false: leave SD3's T5 slot empty (zero T5 embeddings), saves memory
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"  # cpu | cuda | cuda:N, for the stages that load the teacher

    # ---- training the embedded tiny teacher (only when pretrained is null)
    seed: int = 0
    num_cpus: int = Field(2, ge=1)  # CPUs of the Ray task that trains
    time_limit_s: float | None = Field(None, gt=0)  # stop a phase early past this wall time (null: steps only)
    vae_num_steps: int = Field(400, ge=1)
    vae_batch_size: int = Field(32, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    vae_kl_weight: float = Field(1e-4, ge=0)
    num_steps: int = Field(1200, ge=1)  # transformer steps
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    prompt_dropout: float = Field(0.1, ge=0, lt=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    patch_size: int = 2
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=8)
    log_every_steps: int = Field(50, ge=1)
    checkpoint_every_steps: int = Field(250, ge=1)
    # ---- samples and oracle scores logged after training
    sample_num_steps: int = Field(28, ge=1)
    sample_guidance_scale: float = Field(3.0, ge=1)
    grid_prompts: int = Field(8, ge=0)
    grid_samples_per_prompt: int = Field(4, ge=1)
    eval_num_prompts: int = Field(128, ge=0)  # 0: no oracle scores

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError(f"teacher.device {v!r} is not supported; valid: cpu, cuda, cuda:N")
        return v

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: int) -> int:
        if v not in (1, 2, 4):
            raise ValueError(f"teacher.patch_size {v} is not supported; valid: 1, 2, 4 (16x16 latents)")
        return v


def run(ctx: StageContext) -> None:
    raise NotImplementedError("teacher stage: being written (issue 3)")
