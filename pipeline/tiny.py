"""The embedded tiny SD3-family bundle, built in code with nothing downloaded.

Same component classes as a real SD3/SD3.5 teacher, so it goes through the same loader
(`pipeline.teacher.load_bundle`) and runs in a stock `StableDiffusion3Pipeline`:
- `AutoencoderKL`: 64x64x3 pixels -> 16x16x4 latents (channels 16, 32, 64; no mid attention).
- `SD3Transformer2DModel` on 16x16x4 latents: patch 2 (64 image tokens), 4 layers, 4 heads x 32.
- two tiny `CLIPTextModelWithProjection` (SD3 has two CLIP encoders; the T5 slot stays empty).
- a closed-vocabulary CLIP BPE tokenizer built from `pipeline.shapes.vocabulary()`: every word of
  the grammar is exactly one token, read by the stock `CLIPTokenizer`.
- `FlowMatchEulerDiscreteScheduler(shift=3)`, SD3's sampler.

`max_sequence_length` (the number of zero T5 tokens SD3's `encode_prompt` appends when there is
no T5) is 0 for the tiny bundle: the zero tokens carry nothing and would triple the sequence.
It is written to `swd_teacher.json` in the bundle so every user of the bundle agrees on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import shapes

# Component sizes; measured on the 2-core CPU (see pipeline/teacher_training.py and assets/README.md).
PIXEL_SIDE = 64
LATENT_CHANNELS = 4
VAE_BLOCK_CHANNELS = (16, 32, 64)  # 3 blocks: 2 downsamplings, 64 -> 16
LATENT_SIDE = PIXEL_SIDE // 2 ** (len(VAE_BLOCK_CHANNELS) - 1)  # 16
TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_MAX_LENGTH = 16  # bos + the longest prompt (12 words) + eos fits
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BUNDLE_INFO_FILE = "swd_teacher.json"  # extra facts a diffusers directory cannot hold


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word (what the tokenizers BPE model does): merge the lowest-rank pair."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def closed_vocabulary_bpe(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocab + merges in which every word of `words` is one token.

    Vocabulary: the special tokens, the 256 byte symbols and their end-of-word forms (so any text
    still tokenizes, letter by letter), then every merge result. Merges are added only where BPE
    with the merges so far does not yet reach one token; a merge appended last can only fire
    when no earlier one applies, so it never changes the tokenization of a word already done.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = [BOS, EOS] + alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(w.lower() for w in words)):
        while len(symbols := _bpe(word, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in vocab_list:
                vocab_list.append(pair[0] + pair[1])
    vocab = {token: i for i, token in enumerate(vocab_list)}
    return vocab, merges


def build_tokenizer(words=None, max_length: int = TEXT_MAX_LENGTH):
    """Stock `CLIPTokenizer` over the closed vocabulary of the shapes grammar (one token per word)."""
    from transformers import CLIPTokenizer

    vocab, merges = closed_vocabulary_bpe(words if words is not None else shapes.vocabulary())
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length,
                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)


def build_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    import torch

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=TEXT_HIDDEN, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config)


def build_vae(seed: int = 0, block_channels=VAE_BLOCK_CHANNELS, latent_channels: int = LATENT_CHANNELS,
              pixel_side: int = PIXEL_SIDE, scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """A small `AutoencoderKL` (one layer per block, no mid attention, no quant convs); the defaults are
    the tiny bundle's, `pipeline/miniature.py` passes SD3.5's latent channels and factors."""
    from diffusers import AutoencoderKL
    import torch

    torch.manual_seed(seed)
    n = len(block_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_channels),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, sample_size=pixel_side,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False, force_upcast=False,
    )


def build_transformer(patch_size: int = 2, num_layers: int = 4, num_heads: int = 4, head_dim: int = 32,
                      seed: int = 0):
    from diffusers import SD3Transformer2DModel
    import torch

    latent_side = LATENT_SIDE
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=latent_side, patch_size=patch_size, in_channels=LATENT_CHANNELS, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads,
        joint_attention_dim=2 * TEXT_HIDDEN,  # the two CLIP hidden states side by side
        caption_projection_dim=num_heads * head_dim, pooled_projection_dim=2 * TEXT_HIDDEN,
        out_channels=LATENT_CHANNELS, pos_embed_max_size=latent_side // patch_size, qk_norm="rms_norm",
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def build_pipeline(seed: int = 0, words=None, patch_size: int = 2, num_layers: int = 4, num_heads: int = 4,
                   head_dim: int = 32):
    """A randomly initialised tiny `StableDiffusion3Pipeline` (T5 slot empty)."""
    from diffusers import StableDiffusion3Pipeline

    tokenizer = build_tokenizer(words)
    tokenizer_2 = build_tokenizer(words)
    return StableDiffusion3Pipeline(
        transformer=build_transformer(patch_size, num_layers, num_heads, head_dim, seed=seed),
        scheduler=build_scheduler(), vae=build_vae(seed=seed),
        text_encoder=build_text_encoder(tokenizer, seed=seed + 1), tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(tokenizer_2, seed=seed + 2), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )


def save_bundle(pipe, directory: str | Path, info: dict | None = None) -> Path:
    """`save_pretrained` in diffusers layout (safetensors) plus `swd_teacher.json`."""
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    facts = {"max_sequence_length": 0, **(info or {})}
    (directory / BUNDLE_INFO_FILE).write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
    return directory


def build_bundle(directory: str | Path, seed: int = 0, info: dict | None = None) -> Path:
    """Write a randomly initialised tiny bundle to `directory` (tests, and the start of training)."""
    return save_bundle(build_pipeline(seed=seed), directory, info)


def synthetic_cache(root: str | Path, bundle_dir: str | Path, rows: int, scales: list[int]) -> Path:
    """A committed-looking `cache` stage output in the `pipeline.latent_cache` format (tests, bench_distill):
    the bundle's real prompt embeddings of shapes prompts (and of "", `uncond.safetensors`) and random
    latents per scale, one Parquet file. The random draws are those of every z_im1_i, in the order they
    always were; the implied ones (z_im1_0) are then not stored, as the cache stage does not store them."""
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from pipeline.shapes import COLOURS_RGB, SHAPES
    from pipeline.teacher import load_bundle, text_settings
    from pipeline import latent_cache as cache

    root = Path(root)
    colours = list(COLOURS_RGB)
    prompts = [f"a {colours[i % len(colours)]} {SHAPES[i % len(SHAPES)]} in the top left on a black background"
               for i in range(rows)]
    bundle = load_bundle(bundle_dir, components=("text",))
    with torch.no_grad():
        prompt_embeds, pooled = bundle.encode_prompt(prompts)
        uncond = bundle.encode_prompt([""])
    layout = cache.text_layout(bundle, prompt_embeds.shape)
    g = torch.Generator().manual_seed(0)
    tensors = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    for i, side in enumerate(scales):
        prev = scales[max(i - 1, 0)]
        tensors[f"z_{i}"] = torch.randn(rows, LATENT_CHANNELS, side, side, generator=g)
        tensors[f"z_im1_{i}"] = torch.randn(rows, LATENT_CHANNELS, prev, prev, generator=g)
    data = root / "data"
    data.mkdir(parents=True)
    table = cache.rows_table([f"k{i:05d}" for i in range(rows)], prompts, ["shard0"] * rows, tensors,
                             cache.stored_columns(scales), layout)
    pq.write_table(table, data / "part-0.parquet")
    save_file({"prompt_embeds": uncond[0].contiguous(), "pooled_prompt_embeds": uncond[1].contiguous()},
              str(root / cache.UNCOND_FILE))
    text = {**text_settings(bundle_dir), "encoder_digest": cache.encoder_digest(bundle_dir)}
    (root / cache.CACHE_FILE).write_text(json.dumps({
        "format_version": cache.FORMAT_VERSION, "scales": list(scales), "vae_scale_factor": PIXEL_SIDE // LATENT_SIDE,
        "rejects_by_reason": {}, "text": text, "columns": cache.stored_columns(scales),
        "implied_columns": cache.implied_columns(scales), "text_layout": layout.as_dict(),
        "uncond": {"file": cache.UNCOND_FILE, "prompt": "", "dtype": "float32",
                   "prompt_embeds_shape": list(uncond[0].shape), "pooled_prompt_embeds_shape": list(uncond[1].shape)},
        "shards": [{"dir": str(data), "rows": rows}]}))
    return root
