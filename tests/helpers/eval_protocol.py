"""The published evaluation protocol's files, made in code with random weights (nothing downloads): a
prompt file, pytorch-fid's FID Inception as safetensors, tiny CLIP and PickScore directories, and a
reference `.npz` made by `python -m pipeline.fid_stats` (its `main`) from a folder of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def random_inception(path: Path, seed: int = 0) -> Path:
    """The FID Inception-v3 architecture with random weights (and BN statistics), as safetensors."""
    import torch
    from safetensors.torch import save_file

    from pipeline import fid_inception

    torch.manual_seed(seed)
    model = fid_inception.build()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    for k, v in state.items():  # non-trivial BN statistics, so the test sees them used
        if k.endswith("running_var"):
            state[k] = torch.rand_like(v) + 0.5
        elif k.endswith("running_mean"):
            state[k] = 0.1 * torch.randn_like(v)
    save_file(state, str(path))
    return path


def image_folder(directory: Path, count: int, side: int = 48, seed: int = 0) -> Path:
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)).save(directory / f"{i:03d}.png")
    return directory


def protocol_files(root: Path, prompts: list[str], image_side_px: int = 32) -> dict[str, str]:
    """{evaluate key: path} of a complete prompt-set protocol under `root` (the reference statistics made at
    `image_side_px`: set evaluate.fid_image_side_px to the same)."""
    import csv

    from helpers.tiny_metrics import tiny_clip
    from pipeline import fid_stats

    root.mkdir(parents=True, exist_ok=True)
    prompt_file = root / "prompts.csv"
    with open(prompt_file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "file_name", "caption"])  # the released coco.csv's columns
        w.writerows([[i, f"{i}.jpg", p] for i, p in enumerate(prompts)])
    weights = random_inception(root / "fid_inception_v3.safetensors")
    stats = root / "reference.npz"
    fid_stats.main(["--weights", str(weights), "--folder", str(image_folder(root / "ref-images", 6)),
                    "--image-side-px", str(image_side_px), "--out", str(stats), "--batch-size", "3"])
    return {"prompts": str(prompt_file), "inception_weights": str(weights), "fid_reference_stats": str(stats),
            "clip_model": str(tiny_clip(root / "clip")), "pickscore_model": str(tiny_clip(root / "pickscore"))}
