"""The scale-wise sampler and the teacher's sampler: shapes, determinism, and equivalence with
stock diffusers schedulers driven by hand with the same transformer and the same noise."""

import pytest
import torch

from pipeline.bench_models import TEST, build_transformer, random_text_cond
from pipeline.swd.sampler import TextCond, add_noise, bicubic_resize, sample_scalewise, sample_teacher, x0_hat
from pipeline.swd.schedules import boundaries_to_sigmas, teacher_sigmas

SCALES = [4, 6, 8]
SIGMAS = boundaries_to_sigmas([0, 7, 18], teacher_sigmas())
BATCH = 3


@pytest.fixture(scope="module")
def model():
    return build_transformer("test", seed=0)


@pytest.fixture(scope="module")
def cond():
    return TextCond(*random_text_cond("test", BATCH, seed=1))


def test_shapes_and_progression(model, cond):
    x0, steps = sample_scalewise(model, cond, SCALES, SIGMAS, generator=torch.Generator().manual_seed(0),
                                 return_steps=True)
    assert x0.shape == (BATCH, TEST["in_channels"], 8, 8) and x0.dtype == torch.float32
    assert [s.shape[-1] for s in steps] == SCALES
    assert torch.equal(steps[-1], x0)
    assert torch.isfinite(x0).all()


def test_determinism(model, cond):
    def run(seed):
        return sample_scalewise(model, cond, SCALES, SIGMAS, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_first_step_is_x0_hat_of_pure_noise(model, cond):
    noise = torch.randn(BATCH, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    _, steps = sample_scalewise(model, cond, SCALES, SIGMAS, noise=noise, return_steps=True)
    with torch.no_grad():
        expected = x0_hat(model, noise, 1.0, cond)
    torch.testing.assert_close(steps[0], expected)


def _diffusers_lcm_loop(model, cond, scales, sigmas, seed):
    """Stock diffusers FlowMatchLCMScheduler with set_scale_factors, stepped by hand."""
    from diffusers import FlowMatchLCMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    scheduler = FlowMatchLCMScheduler(shift=1.0)  # shift 1: the sigmas we pass are used as they are
    assert scheduler.config.upscale_mode == "bicubic"  # diffusers' default upscale mode is SwD's bicubic
    scheduler.set_scale_factors([s / scales[0] for s in scales[1:]], upscale_mode="bicubic")
    scheduler.set_timesteps(sigmas=sigmas[:-1])
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor((BATCH, 4, scales[0], scales[0]), generator=generator, dtype=torch.float32)
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(hidden_states=latents, encoder_hidden_states=cond.prompt_embeds,
                      pooled_projections=cond.pooled_prompt_embeds, timestep=t.expand(BATCH), return_dict=False)[0]
            latents = scheduler.step(v, t, latents, generator=generator).prev_sample
    return latents


@pytest.mark.parametrize("scales", [SCALES, [8, 8, 8]], ids=["scale-wise", "full-resolution"])
def test_matches_diffusers_flow_match_lcm_scale_factors(model, cond, scales):
    ours = sample_scalewise(model, cond, scales, SIGMAS, generator=torch.Generator().manual_seed(7))
    theirs = _diffusers_lcm_loop(model, cond, scales, SIGMAS, seed=7)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_teacher_sampler_matches_diffusers_euler_with_cfg(model, cond):
    from diffusers import FlowMatchEulerDiscreteScheduler

    num_steps, guidance = 6, 4.5
    uncond = TextCond(*random_text_cond("test", 1, seed=2))
    noise = torch.randn(BATCH, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = sample_teacher(model, cond, uncond, teacher_sigmas(num_steps, 3.0), 8, guidance_scale=guidance,
                          noise=noise)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    latents = noise.clone()
    embeds = torch.cat([uncond.prompt_embeds.expand(BATCH, -1, -1), cond.prompt_embeds])
    pooled = torch.cat([uncond.pooled_prompt_embeds.expand(BATCH, -1), cond.pooled_prompt_embeds])
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(hidden_states=torch.cat([latents] * 2), encoder_hidden_states=embeds, pooled_projections=pooled,
                      timestep=t.expand(2 * BATCH), return_dict=False)[0]
            v_u, v_c = v.chunk(2)
            latents = scheduler.step(v_u + guidance * (v_c - v_u), t, latents).prev_sample
    torch.testing.assert_close(ours, latents, rtol=1e-4, atol=1e-4)


def test_bicubic_resize_identity_and_upsampling():
    x = torch.randn(2, 4, 4, 4)
    assert bicubic_resize(x, 4) is x
    up = bicubic_resize(x, 8)
    assert up.shape == (2, 4, 8, 8)
    torch.testing.assert_close(up, torch.nn.functional.interpolate(x, size=(8, 8), mode="bicubic"))


# ---- sampling-time ablations (bench/ablations.py): nearest upsampling, upsampling the noisy latent


def _reference_scalewise(model, cond, scales, sigmas, seed, mode="bicubic"):
    """The sampler's loop as it was before the ablation knobs (SWD.md section 3): upsample the clean
    estimate, fresh noise at the next scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, scales[0], scales[0], generator=g)
    with torch.no_grad():
        for i in range(len(scales)):
            x0 = x0_hat(model, x, sigmas[i], cond)
            if i == len(scales) - 1:
                return x0
            x0 = (bicubic_resize(x0, scales[i + 1]) if mode == "bicubic"
                  else torch.nn.functional.interpolate(x0, size=(scales[i + 1],) * 2, mode=mode))
            eps = torch.randn(x0.shape, generator=g)
            x = add_noise(x0, sigmas[i + 1], eps)


def test_defaults_are_swd_bit_exactly(model, cond):
    default = sample_scalewise(model, cond, SCALES, SIGMAS, generator=torch.Generator().manual_seed(11))
    explicit = sample_scalewise(model, cond, SCALES, SIGMAS, generator=torch.Generator().manual_seed(11),
                                upsample="bicubic", upsample_source="clean")
    assert torch.equal(default, explicit)
    assert torch.equal(default, _reference_scalewise(model, cond, SCALES, SIGMAS, seed=11))


def test_nearest_upsampling_differs_and_is_nearest(model, cond):
    bicubic = sample_scalewise(model, cond, SCALES, SIGMAS, generator=torch.Generator().manual_seed(11))
    nearest = sample_scalewise(model, cond, SCALES, SIGMAS, generator=torch.Generator().manual_seed(11),
                               upsample="nearest")
    assert nearest.shape == bicubic.shape and not torch.allclose(nearest, bicubic)
    assert torch.equal(nearest, _reference_scalewise(model, cond, SCALES, SIGMAS, seed=11, mode="nearest"))


def test_noisy_source_upsamples_the_renoised_latent(model, cond):
    """x_1 = bicubic((1 - sig1) x0_0 + sig1 eps), eps drawn at the first scale (4 x 4), not at the next."""
    scales, sigmas = [4, 8], [1.0, 0.6, 0.0]
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(BATCH, 4, 4, 4, generator=g)
    eps = torch.randn(BATCH, 4, 4, 4, generator=g)  # the second draw, at the current scale
    with torch.no_grad():
        x0_0 = x0_hat(model, noise, 1.0, cond)
        x_1 = torch.nn.functional.interpolate(0.4 * x0_0 + 0.6 * eps, size=(8, 8), mode="bicubic")
        expected = x0_hat(model, x_1, 0.6, cond)
    ours, steps = sample_scalewise(model, cond, scales, sigmas, generator=torch.Generator().manual_seed(5),
                                   upsample_source="noisy", return_steps=True)
    torch.testing.assert_close(steps[0], x0_0)
    torch.testing.assert_close(ours, expected)
    clean = sample_scalewise(model, cond, scales, sigmas, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(ours, clean)


def test_unknown_sampler_ablation_values_are_errors(model, cond):
    with pytest.raises(ValueError, match=r"upsample: 'bilinear' .* valid: bicubic, nearest"):
        sample_scalewise(model, cond, SCALES, SIGMAS, upsample="bilinear")
    with pytest.raises(ValueError, match=r"upsample_source: 'x' .* valid: clean, noisy"):
        sample_scalewise(model, cond, SCALES, SIGMAS, upsample_source="x")
