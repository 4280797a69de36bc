"""A distill export in stock diffusers: `StableDiffusion3Pipeline.load_lora_weights` plus the recipe that
`schedule.json` records (`FlowMatchLCMScheduler.set_scale_factors`), checked against our scale-wise
sampler (SWD.md section 3) on the same noise. Shared by the distill test and the profile miniatures."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def check_export_in_stock_diffusers(pipe, export_dir: Path, prompts: list[str], max_sequence_length: int,
                                    atol: float = 1e-4, lora_effect_atol: float = 1e-3) -> torch.Tensor:
    """Load the export into `pipe` (a stock StableDiffusion3Pipeline), sample with diffusers and with
    `sample_scalewise` from the same noise, and assert they agree and that the LoRA changes the output by
    more than `lora_effect_atol` (0: at all; a few steps at the released lr move it little).
    Returns diffusers' latents."""
    from diffusers import FlowMatchLCMScheduler

    from pipeline.swd import TextCond, sample_scalewise

    schedule = json.loads((Path(export_dir) / "schedule.json").read_text())
    recipe = schedule["diffusers"]
    pipe.load_lora_weights(str(Path(export_dir) / schedule["student"]["dir"]),
                           weight_name=schedule["student"]["weight_name"])
    pipe.scheduler = FlowMatchLCMScheduler(**recipe["scheduler_kwargs"])
    pipe.scheduler.set_scale_factors(**recipe["set_scale_factors"])
    kwargs = {**recipe["call_kwargs"], "max_sequence_length": max_sequence_length}
    channels, first = pipe.transformer.config.in_channels, schedule["scales"][0]
    noise = torch.randn(len(prompts), channels, first, first, generator=torch.Generator().manual_seed(3))
    # SD3's pipeline calls scheduler.step without its generator: the per-step noise comes from torch's
    # global generator, so seed that one for both samplers.
    torch.manual_seed(5)
    latents = pipe(prompts, latents=noise.clone(), output_type="latent", **kwargs).images
    last = schedule["scales"][-1]
    assert latents.shape == (len(prompts), channels, last, last) and torch.isfinite(latents).all()
    images = pipe(prompts, generator=torch.Generator().manual_seed(3), output_type="pil", **kwargs).images
    assert images[0].size == (last * schedule["vae_scale_factor"],) * 2
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    torch.manual_seed(5)
    ours = sample_scalewise(pipe.transformer, TextCond(embeds, pooled), schedule["scales"], schedule["sigmas"],
                            noise=noise.clone(), generator=torch.default_generator)
    torch.testing.assert_close(ours, latents.float(), rtol=atol, atol=atol)
    # The LoRA is really applied: without it the outputs differ.
    pipe.disable_lora()
    torch.manual_seed(5)
    plain = pipe(prompts, latents=noise.clone(), output_type="latent", **kwargs).images
    assert not torch.allclose(plain, latents, rtol=0, atol=lora_effect_atol)
    pipe.enable_lora()
    return latents
