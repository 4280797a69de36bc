"""`SwdConfig`: the `swd` section of the config tree (schedule, networks, losses of SWD.md).

The schedule is given one way only: a `preset`, or `scales` plus either `sigmas` or `boundaries`
(indices into the teacher's grid). The fields keep what the user wrote, so a dumped config
validates again; `SwdConfig.schedule` is the resolved schedule (scales, sigmas, boundaries).
Checks that need the teacher (patch size, latent side, number of blocks) are in
`check_against_teacher`, called once the teacher is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from pipeline.swd.schedules import (PRESETS, boundaries_to_sigmas, check_boundaries, check_scales,
                                    check_scales_for_patch, check_sigmas, teacher_sigmas)

# Attention q/k/v/out (image and text streams, and attn2 of dual-attention blocks) and MLP
# projections of diffusers' JointTransformerBlock (SWD.md section 4, released recipe).
DEFAULT_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class GridConfig(_Section):
    """The teacher's sigma grid (diffusers FlowMatchEulerDiscreteScheduler, shift, set_timesteps)."""
    num_steps: int = Field(28, ge=1, le=1000)
    shift: float = Field(3.0, gt=0)


# The released training code's LoRA targets: attention q/k/v/out of both attention layers and the
# MLPs of both streams, without the text stream's add_*_proj / to_add_out.
RELEASED_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
]


class StudentConfig(_Section):
    """Student G = teacher + LoRA (B = 0 at start, so G == T), or a full fine-tune."""
    lora_rank: int = Field(64, ge=1)
    lora_alpha: float = Field(64.0, gt=0)
    # How PEFT draws LoRA A (B is zero either way): kaiming (PEFT's default) or gaussian (std 1/r, released).
    lora_init: Literal["kaiming", "gaussian"] = "kaiming"
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)
    full_finetune: bool = False  # train every weight; the teacher becomes a frozen copy (2x memory)


class FakeConfig(_Section):
    """Fake score network F = copy of the teacher + its own LoRA + GAN head D."""
    lora_rank: int = Field(64, ge=1)
    lora_alpha: float = Field(64.0, gt=0)
    lora_init: Literal["kaiming", "gaussian"] = "kaiming"  # as StudentConfig.lora_init
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)
    gan_head_num_layers: int = Field(4, ge=1)  # LayerNorm, GELU, Linear; widths narrow linearly to one logit


class LossConfig(_Section):
    """SWD.md section 4, "Losses". k ranges are half-open [lo, hi) over the teacher's grid indices."""
    mode: Literal["full", "mmd_only"] = "full"   # mmd_only: no fake network, teacher features
    dmd_weight: float = Field(1.0, ge=0)
    gan_weight: float = Field(0.005, ge=0)       # generator side of the GAN
    mmd_weight: float = Field(1.0, ge=0)
    fake_gan_weight: float = Field(0.01, ge=0)   # discriminator term in the fake-score loss
    guidance_scale: float = Field(7.0, ge=1.0)   # teacher CFG in DMD (7.0 SD3.5-M, 4.5 SD3.5-L); 1 = none
    dmd_k_range: tuple[int, int] = (12, 28)
    mmd_k_range: tuple[int, int] = (18, 28)
    fake_k_range: tuple[int, int] = (0, 28)
    mmd_kernel: Literal["linear", "rbf"] = "linear"  # linear: pseudo-Huber on token means (released)
    huber_c: float = Field(1e-3, ge=0)
    rbf_bandwidth: float = Field(100.0, gt=0)
    mmd_pooling: Literal["per_image", "batch"] = "per_image"
    mmd_features: Literal["teacher", "fake"] = "teacher"  # paper: teacher; released code: fake
    mmd_noise: bool = True                                # noise real and fake with the same k', eps
    dmd_normaliser_min: float = Field(1e-5, gt=0)         # floor of mean|x - x0_real| (released: 1e-5)

    @model_validator(mode="after")
    def _mode(self) -> "LossConfig":
        if self.mode == "mmd_only" and self.mmd_features != "teacher":
            raise ValueError(f"swd.loss.mmd_features: {self.mmd_features!r} needs the fake network, which "
                             "swd.loss.mode='mmd_only' does not build; valid: 'teacher'")
        if self.mode == "mmd_only" and self.mmd_weight == 0:
            raise ValueError("swd.loss.mmd_weight: 0 leaves swd.loss.mode='mmd_only' with no loss; valid: > 0")
        return self


@dataclass(frozen=True)
class Schedule:
    """The resolved schedule: latent sides, sigmas (len + 1, from 1 to 0), grid indices if on the grid."""
    scales: list[int]
    sigmas: list[float]
    boundaries: list[int] | None
    grid: list[float]  # the teacher's full grid (num_steps + 1 values), for the k-sampled losses


class SwdConfig(_Section):
    preset: str | None = "tiny-4step"
    scales: list[int] | None = None      # latent sides, one per step (non-decreasing; all equal = baseline)
    sigmas: list[float] | None = None    # len(scales) + 1, strictly decreasing from 1.0 to 0.0
    boundaries: list[int] | None = None  # or: one grid index per step (final sigma 0 implied)
    grid: GridConfig = GridConfig()
    # Every latent side of the schedule is divided by this (each must divide exactly): the same
    # schedule on a smaller teacher, e.g. 8 for the SD3.5 profiles' miniatures (128 -> 16). 1: as given.
    latent_side_divisor: int = Field(1, ge=1)
    scale_index: Literal["cycle", "random"] = "cycle"  # released code: step mod N; earlier draft: random
    # Image-token features after this transformer block (0-based) feed the GAN head and the MMD loss:
    # about the middle; 1 of 4 for the embedded tiny teacher, 11 of 24 for SD3.5-M, 20 of 38 for SD3.5-L.
    feature_block: int = Field(1, ge=0)
    # Feature-only calls end the forward after `feature_block` (saves the later blocks). Works under
    # every DeepSpeed ZeRO stage (ZeRO-3 gathers and releases each block's parameters in its own hooks).
    stop_at_feature_block: bool = False
    student: StudentConfig = StudentConfig()
    fake: FakeConfig = FakeConfig()
    loss: LossConfig = LossConfig()

    _schedule: Schedule = PrivateAttr()

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in PRESETS:
            raise ValueError(f"swd.preset: {v!r} is not a preset; valid: {sorted(PRESETS)} or null")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> "SwdConfig":
        num_steps = self.grid.num_steps
        for key in ("dmd_k_range", "mmd_k_range", "fake_k_range"):
            lo, hi = getattr(self.loss, key)
            if not 0 <= lo < hi <= num_steps:
                raise ValueError(f"swd.loss.{key}: {[lo, hi]} must be a half-open range [lo, hi) of grid indices "
                                 f"with 0 <= lo < hi <= swd.grid.num_steps = {num_steps}")
        grid = teacher_sigmas(num_steps, self.grid.shift)
        if self.preset is not None:
            given = [k for k in ("scales", "sigmas", "boundaries") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"swd.{given[0]}: given together with swd.preset={self.preset!r}; give one "
                                 "schedule only: a preset, or set swd.preset=null and give swd.scales with "
                                 "swd.sigmas or swd.boundaries")
            p = PRESETS[self.preset]
            scales, boundaries = list(p.scales), list(p.boundaries)
            check_boundaries(boundaries, len(scales), num_steps)
            sigmas = boundaries_to_sigmas(boundaries, grid)
        else:
            if self.scales is None:
                raise ValueError("swd.scales: missing; with swd.preset=null give swd.scales and one of swd.sigmas "
                                 f"or swd.boundaries (or a preset: {sorted(PRESETS)})")
            scales = check_scales(self.scales)
            if (self.sigmas is None) == (self.boundaries is None):
                raise ValueError(f"swd.sigmas / swd.boundaries: give exactly one of them (got "
                                 f"sigmas={self.sigmas}, boundaries={self.boundaries})")
            if self.boundaries is not None:
                boundaries = check_boundaries(self.boundaries, len(scales), num_steps)
                sigmas = boundaries_to_sigmas(boundaries, grid)
            else:
                boundaries = None
                sigmas = check_sigmas(self.sigmas, len(scales))
        if self.latent_side_divisor != 1:
            d = self.latent_side_divisor
            if any(side % d for side in scales):
                raise ValueError(f"swd.latent_side_divisor: {d} does not divide every latent side of the schedule "
                                 f"{scales}; valid: a common divisor of them, e.g. "
                                 f"{math.gcd(*scales)}, or 1")
            scales = [side // d for side in scales]
        self._schedule = Schedule(scales=scales, sigmas=sigmas, boundaries=boundaries, grid=grid)
        return self

    @property
    def schedule(self) -> Schedule:
        return self._schedule


def check_feature_block(feature_block: int, num_layers: int) -> None:
    """The feature block must exist in the teacher."""
    if not 0 <= feature_block < num_layers:
        raise ValueError(f"swd.feature_block: {feature_block} is not a block of the teacher, which has "
                         f"{num_layers} blocks; valid: 0..{num_layers - 1} (about the middle, e.g. {num_layers // 2 - 1})")


def check_against_teacher(cfg: SwdConfig, patch_size: int, latent_side: int, num_layers: int) -> None:
    """Every check that needs the teacher, all problems reported at once (one per line)."""
    problems = []
    for check in (lambda: check_scales_for_patch(cfg.schedule.scales, patch_size, latent_side),
                  lambda: check_feature_block(cfg.feature_block, num_layers)):
        try:
            check()
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ValueError("\n".join(problems))
