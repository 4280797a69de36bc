"""Training inputs at scale index i (SWD.md section 4, "Training inputs").

The latent-caching stage precomputes, per scale i, the target latent z_i = E(I_i) and the
previous-scale latent z_im1 = E(I_im1) (`scale_images` gives the two images); training then needs
only `training_inputs`: u = bicubic(z_im1 -> s[i]), x_in = (1 - sig[i]) u + sig[i] eps, t = 1000 sig[i].
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from pipeline.swd.sampler import add_noise, bicubic_resize
from pipeline.swd.schedules import NUM_TRAIN_TIMESTEPS


class TrainingInputs(NamedTuple):
    scale_index: int
    u: torch.Tensor       # [B, C, s_i, s_i]: stands in for the student's previous x0
    x_in: torch.Tensor    # [B, C, s_i, s_i]: the student's input
    sigma: torch.Tensor   # [B] = sig[i]
    t: torch.Tensor       # [B] = 1000 * sig[i], the transformer's timestep
    eps: torch.Tensor     # the noise used


def area_downsample(image: torch.Tensor, side: int) -> torch.Tensor:
    """Area (box-filter) downsampling of [B, C, H, W] to side x side; the same size is the identity."""
    if image.shape[-1] == side and image.shape[-2] == side:
        return image
    return F.interpolate(image, size=(side, side), mode="area")


def scale_images(image: torch.Tensor, scales, scale_index: int, vae_scale_factor: int):
    """(I_i, I_im1) for one scale: I_i = area(image -> pixels of s[i]), I_im1 = area(I_i -> pixels of s[i-1]),
    with s[-1] := s[0]. Encode both with the VAE to get z_i and z_im1."""
    scales = list(scales)
    prev = scales[max(scale_index - 1, 0)]
    image_i = area_downsample(image, scales[scale_index] * vae_scale_factor)
    image_im1 = area_downsample(image_i, prev * vae_scale_factor)
    return image_i, image_im1


def choose_scale_index(step: int, num_scales: int, mode: Literal["cycle", "random"],
                       generator: torch.Generator | None = None) -> int:
    """The scale index of a generator step: step mod N (released code) or uniform (earlier draft)."""
    if mode == "cycle":
        return step % num_scales
    if mode == "random":
        dev = generator.device if generator is not None else "cpu"
        return int(torch.randint(num_scales, (), generator=generator, device=dev))
    raise ValueError(f"swd.scale_index: {mode!r} is not a mode; valid: 'cycle', 'random'")


def training_inputs(z_im1: torch.Tensor, scale_index: int, scales, sigmas,
                    generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> TrainingInputs:
    """u = bicubic_resize(z_im1, s[i]); x_in = (1 - sig[i]) u + sig[i] eps (sig[0] = 1: pure noise)."""
    side = list(scales)[scale_index]
    u = bicubic_resize(z_im1.float(), side)
    if eps is None:
        eps = torch.randn(u.shape, generator=generator, device=u.device)
    sigma = torch.full((u.shape[0],), float(sigmas[scale_index]), device=u.device)
    return TrainingInputs(scale_index, u, add_noise(u, sigma, eps), sigma, NUM_TRAIN_TIMESTEPS * sigma, eps)


def grid_indices(k_range, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """k uniform in the half-open range [lo, hi) of the teacher's grid, one per sample."""
    lo, hi = k_range
    if generator is not None:
        device = generator.device
    return torch.randint(lo, hi, (batch_size,), generator=generator, device=device)
