"""The SD3.5-structured miniature teacher: SD3.5's components and wiring at a tiny size, random init.

Built in code with nothing downloaded; saved as a diffusers directory (`assets/sd35-miniature`,
`scripts/build_miniature_teacher.py`) that stock `StableDiffusion3Pipeline.from_pretrained(dir,
use_safetensors=True, local_files_only=True)` loads with no extra arguments. Unlike the tiny
bundle (`pipeline/tiny.py`) every slot is filled, so code paths that only a real SD3.5 takes (a
real T5, CLIP widths that differ and are zero-padded to the T5 width, 16 latent channels with a
shift factor, 8x VAE downsampling, dual-attention MMDiT layers) run on CPU in seconds:
- `AutoencoderKL`: 128x128x3 pixels -> 16x16x16 latents; 4 blocks (8, 16, 16, 32 channels, 3
  downsamplings = 8x, as SD3.5), 1 layer per block, no mid attention, no quant convs; SD3.5's
  scaling_factor 1.5305 and shift_factor 0.0609.
- `SD3Transformer2DModel` (MMDiT-X as SD3.5 medium) on 16x16x16 latents: patch 2 (64 image
  tokens), 4 layers of which 0 and 1 have dual attention, 2 heads x 16 (width 32), qk RMSNorm,
  joint_attention_dim 128 (= T5 width), pooled_projection_dim 80 (= the two CLIP widths).
- text_encoder / text_encoder_2: `CLIPTextModelWithProjection` of widths 32 and 48 (projection
  = width), 2 layers, 16 positions; both tokenizers are `tiny.build_tokenizer()` (closed-vocabulary
  CLIP BPE over `pipeline.shapes.vocabulary()`, one token per word).
- text_encoder_3: `T5EncoderModel` (T5 v1.1 style, as SD3's T5-XXL: gated-gelu), d_model 128, 2 layers,
  4 heads x 32, d_ff 256; tokenizer_3: transformers' `T5Tokenizer` (a tokenizers Unigram) with
  T5's conventions (<pad> 0, </s> 1, <unk> 2, Metaspace "▁", </s> appended): one token per
  grammar word, single letters and digits as a fallback; model_max_length 32 (T5 tokens).
- `FlowMatchEulerDiscreteScheduler(shift=3)`, SD3's sampler.

SD3's `encode_prompt` gives prompt_embeds [B, 16 + 32, 128]: the CLIP states (32 + 48 = 80
features, zero-padded to 128) then the T5 states. The T5 length is the T5 tokenizer's
`model_max_length`; no `swd_teacher.json` is written. Deterministic: the same seed gives the
same tensors.
"""

from __future__ import annotations

import string
from pathlib import Path

from pipeline import shapes, tiny

# Pixels and latents.
PIXEL_SIDE = 128
VAE_BLOCK_CHANNELS = (8, 16, 16, 32)  # 4 blocks: 3 downsamplings
VAE_SCALE_FACTOR = 2 ** (len(VAE_BLOCK_CHANNELS) - 1)  # 8 pixels per latent cell, as SD3.5
LATENT_SIDE = PIXEL_SIDE // VAE_SCALE_FACTOR  # 16
LATENT_CHANNELS = 16
VAE_SCALING_FACTOR = 1.5305  # SD3.5's
VAE_SHIFT_FACTOR = 0.0609  # SD3.5's
# Text encoders.
CLIP_WIDTHS = (32, 48)  # text_encoder, text_encoder_2 (different, as SD3.5's CLIP-L 768 / CLIP-G 1280)
CLIP_LAYERS = 2
CLIP_HEADS = 2
CLIP_MAX_LENGTH = tiny.TEXT_MAX_LENGTH  # 16 CLIP tokens
T5_WIDTH = 128  # d_model; >= sum(CLIP_WIDTHS): encode_prompt zero-pads the CLIP states to it
T5_LAYERS = 2
T5_HEADS = 4
T5_HEAD_DIM = 32  # d_kv
T5_FF_WIDTH = 2 * T5_WIDTH
T5_MAX_LENGTH = 32  # T5 tokens (the T5 tokenizer's model_max_length)
T5_PAD, T5_EOS, T5_UNK, T5_SPACE = "<pad>", "</s>", "<unk>", "▁"
T5_FALLBACK_CHARACTERS = string.ascii_letters + string.digits
# Transformer.
PATCH_SIZE = 2
NUM_LAYERS = 4
DUAL_ATTENTION_LAYERS = (0, 1)
NUM_HEADS = 2
HEAD_DIM = 16
POS_EMBED_MAX_SIZE = 16  # patches per side the position table covers (latent side 32 at most)
POOLED_WIDTH = sum(CLIP_WIDTHS)  # 80

assert sum(CLIP_WIDTHS) <= T5_WIDTH and CLIP_WIDTHS[0] != CLIP_WIDTHS[1]


def build_t5_tokenizer(words=None, max_length: int = T5_MAX_LENGTH):
    """transformers' `T5Tokenizer` over a Unigram vocabulary in which every word is one token.

    Ids: <pad> 0, </s> 1, <unk> 2, "▁" 3, then "▁word" for each word (score -1), then single
    letters and digits (score -5, so a word never splits and other text still tokenizes); no
    sentinel <extra_id_N> tokens. The T5Tokenizer class adds T5's WhitespaceSplit + Metaspace
    pre-tokenizer and the template that appends </s>.
    """
    from transformers import T5Tokenizer

    words = sorted(set(words if words is not None else shapes.vocabulary()))
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (T5_SPACE, -2.0)]
    vocab += [(T5_SPACE + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in T5_FALLBACK_CHARACTERS]
    return T5Tokenizer(vocab=vocab, eos_token=T5_EOS, unk_token=T5_UNK, pad_token=T5_PAD, extra_ids=0,
                       model_max_length=max_length)


def build_clip_text_encoder(tokenizer, width: int, seed: int):
    """A `CLIPTextModelWithProjection` of hidden size and projection `width` (tiny.py's, any width)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    import torch

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=CLIP_LAYERS, num_attention_heads=CLIP_HEADS,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=width, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config)


def build_t5_encoder(tokenizer, seed: int):
    """A `T5EncoderModel` shaped like T5 v1.1 (SD3's T5-XXL): gated-gelu feed-forward.

    `tie_word_embeddings=False` is how v1.1 configs say "v1.1" (transformers 5 reads it as
    `scale_decoder_outputs=False` and then always writes `tie_word_embeddings: true`).
    """
    from transformers import T5Config, T5EncoderModel
    import torch

    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=T5_HEAD_DIM, d_ff=T5_FF_WIDTH, num_layers=T5_LAYERS,
        num_heads=T5_HEADS, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def build_vae(seed: int = 0):
    """The 16-channel, 8x VAE with SD3.5's scaling and shift factors."""
    return tiny.build_vae(seed, VAE_BLOCK_CHANNELS, LATENT_CHANNELS, PIXEL_SIDE, VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)


def build_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel
    import torch

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=LATENT_SIDE, patch_size=PATCH_SIZE, in_channels=LATENT_CHANNELS, num_layers=NUM_LAYERS,
        attention_head_dim=HEAD_DIM, num_attention_heads=NUM_HEADS, joint_attention_dim=T5_WIDTH,
        caption_projection_dim=NUM_HEADS * HEAD_DIM, pooled_projection_dim=POOLED_WIDTH,
        out_channels=LATENT_CHANNELS, pos_embed_max_size=POS_EMBED_MAX_SIZE,
        dual_attention_layers=DUAL_ATTENTION_LAYERS, qk_norm="rms_norm",
    )


def build_pipeline(seed: int = 0):
    """A randomly initialised miniature `StableDiffusion3Pipeline` with all three text encoders."""
    from diffusers import StableDiffusion3Pipeline

    tokenizer = tiny.build_tokenizer(max_length=CLIP_MAX_LENGTH)
    tokenizer_2 = tiny.build_tokenizer(max_length=CLIP_MAX_LENGTH)
    tokenizer_3 = build_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=build_transformer(seed=seed), scheduler=tiny.build_scheduler(), vae=build_vae(seed=seed),
        text_encoder=build_clip_text_encoder(tokenizer, CLIP_WIDTHS[0], seed=seed + 1), tokenizer=tokenizer,
        text_encoder_2=build_clip_text_encoder(tokenizer_2, CLIP_WIDTHS[1], seed=seed + 2), tokenizer_2=tokenizer_2,
        text_encoder_3=build_t5_encoder(tokenizer_3, seed=seed + 3), tokenizer_3=tokenizer_3,
    )


def build_bundle(directory: str | Path, seed: int = 0) -> Path:
    """Write a randomly initialised miniature bundle to `directory` (diffusers layout, safetensors)."""
    directory = Path(directory)
    build_pipeline(seed=seed).save_pretrained(directory, safe_serialization=True)
    return directory
