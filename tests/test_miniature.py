"""The SD3.5-structured miniature teacher (`pipeline/miniature.py`, `assets/sd35-miniature`):
stock diffusers loads it with all three text encoders, its structure is SD3.5's, it encodes
prompts through a real T5, it samples, and the shipped directory is what the builder makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import miniature, shapes

ASSET = Path(__file__).resolve().parent.parent / "assets" / "sd35-miniature"
VOLATILE_KEYS = {"_diffusers_version", "transformers_version", "_name_or_path"}
PROMPTS = ["a large red circle in the top left on a black background",
           "a small blue triangle in the bottom right on a white background"]


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(ASSET, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_pipeline_loads_every_component_with_sd35_structure(pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    assert type(pipe.transformer) is SD3Transformer2DModel and type(pipe.vae) is AutoencoderKL
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert type(pipe.text_encoder) is CLIPTextModelWithProjection
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert type(pipe.text_encoder_3) is T5EncoderModel
    assert type(pipe.tokenizer) is CLIPTokenizer and type(pipe.tokenizer_2) is CLIPTokenizer
    assert type(pipe.tokenizer_3) is T5Tokenizer
    assert pipe.image_encoder is None and pipe.feature_extractor is None
    index = json.loads((ASSET / "model_index.json").read_text())
    assert index["tokenizer_3"] == ["transformers", "T5Tokenizer"]
    assert not (ASSET / "swd_teacher.json").exists()  # the T5 length is the T5 tokenizer's

    clip_widths = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    assert clip_widths == miniature.CLIP_WIDTHS and clip_widths[0] != clip_widths[1]
    assert pipe.text_encoder.config.projection_dim == clip_widths[0]
    assert pipe.text_encoder_2.config.projection_dim == clip_widths[1]
    t5 = pipe.text_encoder_3.config
    assert (t5.d_model, t5.num_layers, t5.num_heads, t5.d_kv) == (miniature.T5_WIDTH, 2, 4, 32)
    assert t5.vocab_size == len(pipe.tokenizer_3)
    tc = pipe.transformer.config
    assert tc.joint_attention_dim == t5.d_model >= sum(clip_widths)
    assert tc.pooled_projection_dim == sum(clip_widths)
    assert tuple(tc.dual_attention_layers) == (0, 1) and tc.qk_norm == "rms_norm"
    assert (tc.sample_size, tc.patch_size, tc.in_channels, tc.out_channels, tc.num_layers) == (16, 2, 16, 16, 4)
    assert tc.caption_projection_dim == tc.num_attention_heads * tc.attention_head_dim
    vc = pipe.vae.config
    assert vc.latent_channels == miniature.LATENT_CHANNELS == 16
    assert (vc.scaling_factor, vc.shift_factor) == (1.5305, 0.0609)
    assert len(vc.block_out_channels) == 4 and pipe.vae_scale_factor == miniature.VAE_SCALE_FACTOR == 8
    assert not vc.use_quant_conv and not vc.use_post_quant_conv and not vc.mid_block_add_attention
    assert vc.sample_size == miniature.PIXEL_SIDE == 128
    assert miniature.PIXEL_SIDE // miniature.VAE_SCALE_FACTOR == miniature.LATENT_SIDE == tc.sample_size
    assert pipe.scheduler.config.shift == 3.0 and pipe.scheduler.config.num_train_timesteps == 1000


def test_encode_prompt_appends_real_prompt_dependent_t5_states(pipe):
    import torch

    t5_len = pipe.tokenizer_3.model_max_length
    assert t5_len == miniature.T5_MAX_LENGTH == 32
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, max_sequence_length=t5_len)
    clip_len = pipe.tokenizer_max_length
    assert embeds.shape == (len(PROMPTS), clip_len + t5_len, miniature.T5_WIDTH)
    assert pooled.shape == (len(PROMPTS), sum(miniature.CLIP_WIDTHS))
    clip_part, t5_part = embeds[:, :clip_len], embeds[:, clip_len:]
    assert torch.all(clip_part[..., sum(miniature.CLIP_WIDTHS):] == 0)  # CLIP states zero-padded to T5 width
    assert clip_part[..., :sum(miniature.CLIP_WIDTHS)].abs().sum() > 0
    assert t5_part.abs().amax(dim=-1).min() > 0  # every T5 position (pads too) carries a state
    assert not torch.allclose(t5_part[0], t5_part[1])


def test_shipped_asset_equals_a_fresh_build(tmp_path):
    from safetensors.torch import load_file
    import torch

    fresh = miniature.build_bundle(tmp_path / "fresh", seed=0)
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(ASSET) for p in ASSET.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".safetensors":
            a, b = load_file(ASSET / rel), load_file(fresh / rel)
            assert a.keys() == b.keys(), rel
            for name in a:
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (rel, name)
        elif rel.suffix == ".json":
            a, b = (json.loads((d / rel).read_text()) for d in (ASSET, fresh))
            if isinstance(a, dict):
                a, b = ({k: v for k, v in d.items() if k not in VOLATILE_KEYS} for d in (a, b))
            assert a == b, rel
        else:
            assert (ASSET / rel).read_bytes() == (fresh / rel).read_bytes(), rel


def test_two_step_sampling_at_128_px(pipe):
    import torch

    images = pipe(prompt=PROMPTS[:1], num_inference_steps=2, guidance_scale=2.0,
                  max_sequence_length=pipe.tokenizer_3.model_max_length, output_type="pil",
                  generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 1 and images[0].size == (miniature.PIXEL_SIDE, miniature.PIXEL_SIDE)


def test_t5_tokenizer_one_token_per_word_and_eos(pipe):
    tok = pipe.tokenizer_3
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    words = shapes.vocabulary()
    ids = set()
    for word in words:
        encoded = tok(word).input_ids
        assert len(encoded) == 2 and encoded[-1] == tok.eos_token_id, (word, encoded)
        assert tok.convert_ids_to_tokens(encoded[0]) == "▁" + word
        ids.add(encoded[0])
    assert len(ids) == len(words) and tok.unk_token_id not in ids
    prompt = PROMPTS[0]
    encoded = tok(prompt).input_ids
    assert len(encoded) == len(prompt.split()) + 1 and encoded[-1] == tok.eos_token_id
    assert tok.decode(encoded, skip_special_tokens=True) == prompt
    padded = tok(prompt, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 32 and padded[len(encoded):] == [tok.pad_token_id] * (32 - len(encoded))
    # the in-code tokenizer and the shipped one agree
    fresh = miniature.build_t5_tokenizer()
    assert fresh.get_vocab() == tok.get_vocab() and fresh(PROMPTS).input_ids == tok(PROMPTS).input_ids
