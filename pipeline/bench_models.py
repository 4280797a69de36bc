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


def reduced_depth(name_or_config: str | dict, num_layers: int | None) -> dict:
    """The config with `num_layers` joint blocks (None: unchanged). Leading dual-attention blocks keep
    their share of the depth (SD3.5-M, 13 of 24: 1 of 2); other dual blocks keep their indices below
    the new depth. As in diffusers, the last block is always the context-pre-only one."""
    config = dict(MODELS[name_or_config] if isinstance(name_or_config, str) else name_or_config)
    if num_layers is None or num_layers == config["num_layers"]:
        return config
    if num_layers < 1:
        raise ValueError(f"num_layers: {num_layers} must be >= 1")
    dual = list(config.get("dual_attention_layers", ()))
    if dual == list(range(len(dual))):  # leading dual blocks (MMDiT-X): keep their share of the depth
        dual = list(range(min(num_layers, round(len(dual) * num_layers / config["num_layers"]))))
    else:
        dual = [i for i in dual if i < num_layers]
    config["num_layers"] = num_layers
    config["dual_attention_layers"] = dual
    return config


def transformer_flops(name_or_config: str | dict, image_tokens: int, text_tokens: int, *, attention: bool = True) -> float:
    """FLOPs of one SD3/SD3.5 (MMDiT, MMDiT-X) transformer forward for one sample: every per-token
    matmul at 2 FLOPs per weight per token, plus attention (QK^T and AV: 4 * L^2 * width).

    Per joint block, with width d: image stream q, k, v, out (4d^2) and MLP (8d^2); text stream the
    same, except the last block (context-pre-only: only q, k, v); joint attention over the image +
    text sequence; a dual-attention block (MMDiT-X) adds image-only attention (4d^2, 4 N^2 d).
    Outside the blocks: patch embedding, the text projection and the output projection. Per-sample
    work (timestep/pooled embeddings, adaLN modulation) and elementwise ops are left out.
    `attention=False`: only the matmuls with weights (what torch's FlopCounterMode counts on CPU).
    """
    c = MODELS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    d = c["num_attention_heads"] * c["attention_head_dim"]
    n, t, depth = image_tokens, text_tokens, c["num_layers"]
    dual = set(c.get("dual_attention_layers", ()))
    flops = 0.0
    for i in range(depth):
        image_params = 12 * d * d + (4 * d * d if i in dual else 0)
        text_params = 3 * d * d if i == depth - 1 else 12 * d * d
        flops += 2 * image_params * n + 2 * text_params * t
        if attention:
            flops += 4 * (n + t) ** 2 * d + (4 * n * n * d if i in dual else 0)
    patch = c["patch_size"] ** 2
    flops += 2 * patch * c["in_channels"] * d * n + 2 * c["joint_attention_dim"] * d * t
    flops += 2 * d * patch * c["out_channels"] * n
    return flops


def image_tokens(name_or_config: str | dict, latent_side: int) -> int:
    c = MODELS[name_or_config] if isinstance(name_or_config, str) else name_or_config
    return (latent_side // c["patch_size"]) ** 2


def schedule_flops(name_or_config: str | dict, scales, text_tokens: int, full_side: int | None = None) -> float:
    """FLOP-model cost of one sample of a scale-wise schedule (one forward per scale, no CFG), in
    full-resolution forwards (`full_side`, default the largest scale)."""
    full = transformer_flops(name_or_config, image_tokens(name_or_config, full_side or max(scales)), text_tokens)
    return sum(transformer_flops(name_or_config, image_tokens(name_or_config, s), text_tokens) for s in scales) / full
