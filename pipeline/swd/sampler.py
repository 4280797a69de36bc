"""Sampling (SWD.md section 3): the scale-wise `x0_hat` loop, and the teacher's Euler sampler with CFG.

Any SD3-family transformer works: `transformer(hidden_states, encoder_hidden_states,
pooled_projections, timestep, return_dict=False)[0]` is the velocity v, timestep = 1000 * sigma,
and the clean estimate is x0_hat = x - sigma * v (SWD.md section 2). Latents stay float32 between
steps; the transformer sees them in its own dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.swd.schedules import NUM_TRAIN_TIMESTEPS


class TextCond(NamedTuple):
    """Text conditioning of a batch, as the transformer takes it."""
    prompt_embeds: torch.Tensor          # [B, L, joint_attention_dim]
    pooled_prompt_embeds: torch.Tensor   # [B, pooled_projection_dim]

    def cat(self, other: "TextCond") -> "TextCond":
        return TextCond(torch.cat([self.prompt_embeds, other.prompt_embeds]),
                        torch.cat([self.pooled_prompt_embeds, other.pooled_prompt_embeds]))


def _model_dtype(transformer) -> torch.dtype:
    return next(transformer.parameters()).dtype


def velocity(transformer, x: torch.Tensor, sigma, cond: TextCond) -> torch.Tensor:
    """v = transformer(x, cond, t = 1000 * sigma); sigma a float or a [B] tensor. Returns float32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    dtype = _model_dtype(transformer)
    v = transformer(hidden_states=x.to(dtype), encoder_hidden_states=cond.prompt_embeds.to(dtype),
                    pooled_projections=cond.pooled_prompt_embeds.to(dtype),
                    timestep=NUM_TRAIN_TIMESTEPS * sigma, return_dict=False)[0]
    return v.float()


def x0_hat(transformer, x: torch.Tensor, sigma, cond: TextCond) -> torch.Tensor:
    """One step's clean estimate: x0_hat = x - sigma * G(x, cond, 1000 * sigma)."""
    return x.float() - _per_sample(sigma, x) * velocity(transformer, x, sigma, cond)


def add_noise(x0: torch.Tensor, sigma, eps: torch.Tensor) -> torch.Tensor:
    """Forward process x_sigma = (1 - sigma) * x0 + sigma * eps; sigma a float or a [B] tensor."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * eps


def bicubic_resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Resize a latent to side x side (bicubic; the same size is the identity)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bicubic")


# Sampler ablations (SWD.md section 3): how a latent moves to the next scale, and which latent moves.
UPSAMPLE_MODES = ("bicubic", "nearest")     # bicubic: SwD; nearest: the first public release (aliasing)
UPSAMPLE_SOURCES = ("clean", "noisy")       # clean: SwD; noisy: the paper's failure case (FID 122+ vs 14.7)


def resize_latent(x: torch.Tensor, side: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize a latent to side x side with `mode` (UPSAMPLE_MODES); the same size is the identity."""
    if mode == "bicubic":
        return bicubic_resize(x, side)
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample: {mode!r} is not an upsampling mode; valid: {', '.join(UPSAMPLE_MODES)}")
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode=mode)


@torch.no_grad()
def sample_scalewise(transformer, cond: TextCond, scales, sigmas, *, generator: torch.Generator | None = None,
                     num_channels: int | None = None, noise: torch.Tensor | None = None,
                     return_steps: bool = False, upsample: str = "bicubic", upsample_source: str = "clean"):
    """The SwD sampler (SWD.md section 3): noise at the smallest scale, then per step one forward
    without CFG, bicubic upsampling of the clean estimate and fresh noise at the next sigma.

    `noise` (optional): the starting noise [B, C, s0, s0]; otherwise drawn from `generator`, with
    fresh noise drawn from it after each step (so one seed gives one batch of images).
    Ablations (the defaults are SwD): `upsample="nearest"` resizes with nearest-neighbour instead of
    bicubic; `upsample_source="noisy"` forms the next noisy latent x_{i+1} = (1 - sig[i+1]) x0 +
    sig[i+1] eps at the current scale s[i] (eps drawn at s[i]) and upsamples that instead of x0.
    Returns the final x0 [B, C, s[-1], s[-1]] (float32), and with `return_steps` also the list of
    per-step clean estimates (a progression strip: one image per scale).
    """
    scales, sigmas = list(scales), [float(s) for s in sigmas]
    if len(sigmas) != len(scales) + 1:
        raise ValueError(f"sigmas: {sigmas} needs len(scales) + 1 = {len(scales) + 1} entries")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample: {upsample!r} is not an upsampling mode; valid: {', '.join(UPSAMPLE_MODES)}")
    if upsample_source not in UPSAMPLE_SOURCES:
        raise ValueError(f"upsample_source: {upsample_source!r} is not a latent to upsample; valid: "
                         f"{', '.join(UPSAMPLE_SOURCES)}")
    batch = cond.prompt_embeds.shape[0]
    device = cond.prompt_embeds.device
    if noise is None:
        channels = num_channels or transformer.config.in_channels
        noise = torch.randn(batch, channels, scales[0], scales[0], generator=generator, device=device)
    x = noise.float()                                                    # pure noise at the smallest scale
    steps = []
    for i, side in enumerate(scales):
        x0 = x0_hat(transformer, x, sigmas[i], cond)                     # one forward, no CFG
        steps.append(x0)
        if i == len(scales) - 1:
            break
        if upsample_source == "noisy":  # ablation: noise at s[i], then upsample the noisy latent
            eps = torch.randn(x0.shape, generator=generator, device=device)
            x = resize_latent(add_noise(x0, sigmas[i + 1], eps), scales[i + 1], upsample)
            continue
        x0 = resize_latent(x0, scales[i + 1], upsample)                  # upsample the CLEAN estimate
        eps = torch.randn(x0.shape, generator=generator, device=device)  # fresh noise each step
        x = add_noise(x0, sigmas[i + 1], eps)
    return (x0, steps) if return_steps else x0


@torch.no_grad()
def sample_teacher(transformer, cond: TextCond, uncond: TextCond, sigmas, latent_side: int, *,
                   guidance_scale: float = 7.0, generator: torch.Generator | None = None,
                   num_channels: int | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The teacher's Euler sampler on its grid (`teacher_sigmas`), classifier-free guidance with the
    conditional and unconditional halves as one forward of 2B (as diffusers' SD3 pipeline does):
    v = v_u + w (v_c - v_u); x <- x + (sigma_next - sigma) v. Returns the final latent (float32)."""
    sigmas = [float(s) for s in sigmas]
    batch = cond.prompt_embeds.shape[0]
    if noise is None:
        channels = num_channels or transformer.config.in_channels
        noise = torch.randn(batch, channels, latent_side, latent_side, generator=generator,
                            device=cond.prompt_embeds.device)
    x = noise.float()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = guided_velocity(transformer, x, sigma, cond, uncond, guidance_scale)
        x = x + (sigma_next - sigma) * v                                 # Euler step
    return x


def guided_velocity(transformer, x: torch.Tensor, sigma, cond: TextCond, uncond: TextCond,
                    guidance_scale: float) -> torch.Tensor:
    """Velocity with classifier-free guidance, v_u + w (v_c - v_u), the unconditional and conditional
    halves as one forward of 2B (as diffusers' SD3 pipeline does). `uncond` has batch 1 or B and the
    same sequence length as `cond`; guidance_scale 1 is a plain conditional forward."""
    if guidance_scale == 1.0:
        return velocity(transformer, x, sigma, cond)
    batch = x.shape[0]
    if uncond.prompt_embeds.shape[0] == 1 and batch > 1:
        uncond = TextCond(uncond.prompt_embeds.expand(batch, -1, -1), uncond.pooled_prompt_embeds.expand(batch, -1))
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)
    v_u, v_c = velocity(transformer, torch.cat([x, x]), torch.cat([sigma, sigma]), uncond.cat(cond)).chunk(2)
    return v_u + guidance_scale * (v_c - v_u)


def _per_sample(sigma, like: torch.Tensor) -> torch.Tensor:
    """A float or [B] sigma as a tensor broadcastable against [B, C, H, W]."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    return s.reshape(-1, *([1] * (like.ndim - 1))) if s.ndim else s
