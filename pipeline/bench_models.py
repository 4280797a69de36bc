"""Random-init SD3-family transformers for benchmarks and tests: the shapes only, nothing downloaded.

`SD35_MEDIUM` is the transformer config of stabilityai/stable-diffusion-3.5-medium (MMDiT-X:
24 joint blocks, dual attention in blocks 0..12, 24 heads x 64, RMS qk-norm); `TINY` is the
embedded-default teacher shape (latent 16x16x4, patch 2, 4 blocks, 4 heads x 32); `TEST` is
smaller still, for unit tests.
"""

from __future__ import annotations

SD35_MEDIUM: dict = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}

TINY: dict = {  # as pipeline/tiny.py builds the embedded teacher (two 64-wide CLIP states side by side)
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 128,
    "caption_projection_dim": 128,
    "pooled_projection_dim": 128,
    "pos_embed_max_size": 8,
    "dual_attention_layers": [],
    "qk_norm": "rms_norm",
}

# Smallest useful shape, for unit tests (latent sides up to 8, patch 2, 3 blocks, 2 heads x 8).
TEST: dict = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 8,
    "pos_embed_max_size": 8,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}

MODELS = {"sd35-medium": SD35_MEDIUM, "tiny": TINY, "test": TEST}

# Text-sequence length the embeddings get in benchmarks (SD3: 77 CLIP + 256 T5 tokens).
TEXT_TOKENS = {"sd35-medium": 333, "tiny": 16, "test": 5}  # tiny: its CLIP max_length


def build_transformer(name_or_config: str | dict = "tiny", *, seed: int = 0, dtype=None, device=None):
    """A randomly initialised diffusers SD3Transformer2DModel of the named (or given) shape."""
    import torch
    from diffusers import SD3Transformer2DModel

    config = MODELS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    # Built directly on the target device (SD3.5-M is 2.5B parameters: no CPU detour).
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**config)
    model = model.eval().requires_grad_(False)
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model


def random_text_cond(name_or_config: str | dict, batch_size: int, *, seed: int = 0, num_tokens: int | None = None,
                     dtype=None, device=None):
    """Random (prompt_embeds [B, L, joint_attention_dim], pooled [B, pooled_projection_dim]) of the
    model's shapes: stands in for the text encoders in benchmarks and tests."""
    import torch

    config = MODELS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    tokens = num_tokens or (TEXT_TOKENS.get(name_or_config, 8) if isinstance(name_or_config, str) else 8)
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch_size, tokens, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch_size, config["pooled_projection_dim"], generator=g)
    return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)
