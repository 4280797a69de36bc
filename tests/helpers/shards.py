"""WebDataset shards written by hand: exactly the members given, in order."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image



def image_bytes(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """A smooth random RGB image (so the tiny VAE sees structure, not only noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()



def prompt(seed: int) -> str:
    shapes, colours = ["circle", "square", "triangle"], ["red", "green", "blue", "yellow"]
    return f"a {colours[seed % 4]} {shapes[seed % 3]} on a black background"



def sample(key: str, seed: int, width: int = 64, height: int = 64) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes(width, height, seed)), (f"{key}.txt", prompt(seed).encode()),
            (f"{key}.json", json.dumps({"seed": seed}).encode())]



def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Members in exactly the given order (tarfile adds the end-of-archive blocks)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path



def good_shard(path: Path, prefix: str, n: int, seed: int = 0) -> Path:
    members = []
    for i in range(n):
        w, h = [(64, 64), (80, 64), (64, 96)][i % 3]  # non-square ones exercise the centre crop
        members += sample(f"{prefix}{i:04d}", seed + i, w, h)
    return write_tar(path, members)
