"""Scales and sigmas of a scale-wise schedule (SWD.md sections 2 and 3).

- `teacher_sigmas`: the teacher's shifted sigma grid, exactly what diffusers'
  `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)` produces, plus the final 0.
- `boundaries_to_sigmas`: a SwD schedule picks a subset of that grid ("boundaries").
- `PRESETS`: the published 4- and 6-step SD3.5 schedules, and `tiny-4step` for the embedded teacher.
- `check_scales`, `check_sigmas`, `check_boundaries`, `check_scales_for_patch`: validation with messages
  that name the key, the bad value and what is valid.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_TRAIN_TIMESTEPS = 1000  # the transformer's timestep input is 1000 * sigma


@dataclass(frozen=True)
class Preset:
    scales: tuple[int, ...]       # latent sides, one per step
    boundaries: tuple[int, ...]   # indices into the teacher's grid, one per step (final sigma 0 implied)
    description: str


# SWD.md section 3, "Published schedules" (SD3.5, VAE factor 8, 1024 px = latent side 128).
PRESETS: dict[str, Preset] = {
    "sd35-medium-4step": Preset((64, 80, 96, 128), (0, 7, 14, 18),
                                "SwD 4 steps, SD3.5 at 1024 px; sigmas 1.0, 0.8959, 0.7371, 0.6022, 0"),
    "sd35-medium-6step": Preset((32, 48, 64, 80, 96, 128), (0, 4, 7, 12, 14, 18),
                                "SwD 6 steps, SD3.5 at 1024 px; sigmas 1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022, 0"),
    # The embedded tiny teacher: latent side 16, patch size 2; the 4-step ratios 64:80:96:128 / 8.
    "tiny-4step": Preset((8, 10, 12, 16), (0, 7, 14, 18),
                         "SwD 4 steps for the embedded tiny teacher (latent side 16, patch 2)"),
    # The embedded default: one upsampling, 8 -> 16. The tiny teacher's one-step clean estimates at sides
    # 10 and 12 lose shapes (untrained, one step per scale: adherence 0.59 for 8-10-12-16 vs 0.68 here), and
    # the student starts from them; README "Quality of the default".
    "tiny-4step-8-16": Preset((8, 16, 16, 16), (0, 7, 14, 18),
                              "SwD 4 steps for the embedded tiny teacher, one upsampling 8 -> 16"),
}


def teacher_sigmas(num_steps: int = 28, shift: float = 3.0) -> list[float]:
    """The teacher's sigma grid: `num_steps` shifted sigmas from 1 down, plus a final 0 (SWD.md section 2).

    Same arithmetic as diffusers' FlowMatchEulerDiscreteScheduler: the training sigmas t/1000 for
    t = 1000..1 are shifted once at construction, so the smallest is shift(1/1000); inference
    sigmas are spaced linearly from 1 to that value and shifted again: sigma = shift*s / (1 + (shift-1)*s).
    """
    if num_steps < 1:
        raise ValueError(f"swd.grid.num_steps: {num_steps} must be >= 1")
    if shift <= 0:
        raise ValueError(f"swd.grid.shift: {shift} must be > 0")

    def shifted(s: float) -> float:
        return shift * s / (1 + (shift - 1) * s)

    s_min = shifted(1 / NUM_TRAIN_TIMESTEPS)
    if num_steps == 1:
        s = [1.0]
    else:
        s = [1.0 + (s_min - 1.0) * j / (num_steps - 1) for j in range(num_steps)]
    return [shifted(v) for v in s] + [0.0]


def boundaries_to_sigmas(boundaries: list[int] | tuple[int, ...], grid: list[float]) -> list[float]:
    """sig[i] = grid[boundaries[i]], then the final 0 (SWD.md section 3)."""
    return [grid[b] for b in boundaries] + [0.0]


def check_scales(scales) -> list[int]:
    """Latent sides, one per step: positive, non-decreasing (increasing for SwD; all equal = the
    full-resolution few-step baseline)."""
    scales = list(scales)
    if not scales:
        raise ValueError("swd.scales: [] must hold at least one latent side")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
        raise ValueError(f"swd.scales: {scales} must be positive integer latent sides")
    if any(b < a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"swd.scales: {scales} must be non-decreasing latent sides "
                         "(increasing for scale-wise sampling, all equal for the full-resolution baseline)")
    return scales


def check_sigmas(sigmas, num_scales: int) -> list[float]:
    """len(scales) + 1 sigmas, strictly decreasing from 1 to 0."""
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) != num_scales + 1:
        raise ValueError(f"swd.sigmas: {sigmas} has {len(sigmas)} entries; it needs len(swd.scales) + 1 = "
                         f"{num_scales + 1} (one per step plus the final 0)")
    if sigmas[0] != 1.0 or sigmas[-1] != 0.0 or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"swd.sigmas: {sigmas} must be strictly decreasing from 1 to 0 "
                         "(first entry 1.0, last entry 0.0)")
    return sigmas


def check_boundaries(boundaries, num_scales: int, num_steps: int) -> list[int]:
    """One grid index per step: starts at 0, strictly increasing, below the grid's num_steps."""
    boundaries = list(boundaries)
    if len(boundaries) != num_scales:
        raise ValueError(f"swd.boundaries: {boundaries} has {len(boundaries)} entries; it needs one grid index "
                         f"per step, len(swd.scales) = {num_scales} (the final sigma 0 is implied)")
    if (any(isinstance(b, bool) or not isinstance(b, int) for b in boundaries) or boundaries[0] != 0
            or any(b >= a for b, a in zip(boundaries, boundaries[1:])) or boundaries[-1] >= num_steps):
        raise ValueError(f"swd.boundaries: {boundaries} must be strictly increasing grid indices starting at 0 "
                         f"and below swd.grid.num_steps = {num_steps} (valid: 0..{num_steps - 1})")
    return boundaries


def check_scales_for_patch(scales, patch_size: int, latent_side: int) -> None:
    """Once the teacher is known: every side a multiple of its patch size and at most its latent side."""
    scales = list(scales)
    bad_patch = [s for s in scales if s % patch_size]
    if bad_patch:
        raise ValueError(f"swd.scales: {scales} has sides {bad_patch} that are not multiples of the teacher's "
                         f"patch size {patch_size}; every latent side must be a multiple of {patch_size}")
    too_big = [s for s in scales if s > latent_side]
    if too_big:
        raise ValueError(f"swd.scales: {scales} has sides {too_big} larger than the teacher's latent side "
                         f"{latent_side}; valid sides are multiples of {patch_size} up to {latent_side}")


def relative_cost(scales, full_side: int | None = None) -> float:
    """Transformer cost of the schedule in full-resolution forwards, counting tokens (side squared)."""
    full = full_side or max(scales)
    return sum((s / full) ** 2 for s in scales)
