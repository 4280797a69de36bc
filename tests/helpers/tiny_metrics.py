"""Tiny random scorers built in code: a CLIP directory and an FID-style Inception module."""

from __future__ import annotations

import torch



def tiny_clip(directory):
    """A random CLIP (transformers) with the closed-vocabulary tokenizer, saved as a local directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pipeline.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(directory)
    return directory



def tiny_inception(path):
    """A TorchScript module with the FID Inception interface: model(x, return_features=True) -> [B, F]."""
    import warnings

    class TinyInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(3 * 4 * 4, 12)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.shape[-1] == 299
            f = self.proj(torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1))
            return f if return_features else f.softmax(-1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(TinyInception()), str(path))
    return path
