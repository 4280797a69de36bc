"""The procedural text-to-image dataset of the embedded default: one coloured shape per image.

Every sample is drawn from a small closed grammar (shape, colour, position, size, background), so
the prompt says exactly what the image shows and evaluation can check adherence attribute by
attribute (see `pipeline/oracle.py`). Deterministic: a sample depends only on (seed, split, index).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

# RGB of each named colour; the oracle matches against the same table.
COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUNDS_RGB: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "white": (230, 230, 230),
}
SHAPES = ("circle", "square", "triangle")
# Half-extent of the shape as a fraction of one grid cell.
SIZES_CELL_FRACTION: dict[str, float] = {"small": 0.28, "large": 0.40}
# Grid cell (row, col) -> words; the 3x3 grid of the prompts.
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "centre", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
POSITION_NAMES = tuple(POSITIONS.values())


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    position: str
    size: str
    background: str

    def prompt(self) -> str:
        # "the centre" reads oddly but keeps one fixed template; every word is one token.
        return f"a {self.size} {self.colour} {self.shape} in the {self.position} on a {self.background} background"


def vocabulary(shapes=SHAPES, colours=tuple(COLOURS_RGB), sizes=tuple(SIZES_CELL_FRACTION),
               backgrounds=tuple(BACKGROUNDS_RGB)) -> list[str]:
    """Every word any prompt of this grammar can contain (for the closed-vocabulary tokenizer)."""
    words = {"a", "in", "the", "on", "background", *shapes, *colours, *sizes, *backgrounds}
    for name in POSITION_NAMES:
        words.update(name.split())
    return sorted(words)


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample_attributes(rng: random.Random, shapes, colours, sizes, backgrounds) -> Attributes:
    return Attributes(
        shape=rng.choice(list(shapes)),
        colour=rng.choice(list(colours)),
        position=rng.choice(POSITION_NAMES),
        size=rng.choice(list(sizes)),
        background=rng.choice(list(backgrounds)),
    )


def render(attrs: Attributes, rng: random.Random, side_px: int = 64) -> Image.Image:
    """Draw the shape with small jitter in position, size and colour."""
    cell = side_px / 3
    row, col = next(rc for rc, name in POSITIONS.items() if name == attrs.position)
    half = SIZES_CELL_FRACTION[attrs.size] * cell * rng.uniform(0.9, 1.1)
    cx = (col + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
    bg = tuple(max(0, min(255, c + rng.randint(-8, 8))) for c in BACKGROUNDS_RGB[attrs.background])
    fg = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS_RGB[attrs.colour])
    image = Image.new("RGB", (side_px, side_px), bg)
    draw = ImageDraw.Draw(image)
    box = (cx - half, cy - half, cx + half, cy + half)
    if attrs.shape == "circle":
        draw.ellipse(box, fill=fg)
    elif attrs.shape == "square":
        draw.rectangle(box, fill=fg)
    elif attrs.shape == "triangle":
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fg)
    else:
        raise ValueError(f"unknown shape {attrs.shape!r}; known: {', '.join(SHAPES)}")
    return image


def make_sample(seed: int, split: str, index: int, side_px: int, shapes, colours, sizes,
                backgrounds) -> dict[str, bytes | str]:
    """One WebDataset sample: `png`, `txt` (the prompt) and `json` (attributes, seed)."""
    rng = sample_rng(seed, split, index)
    attrs = sample_attributes(rng, shapes, colours, sizes, backgrounds)
    image = render(attrs, rng, side_px)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    meta = {**asdict(attrs), "seed": seed, "split": split, "index": index}
    return {
        "__key__": f"{split}-{index:07d}",
        "png": buf.getvalue(),
        "txt": attrs.prompt(),
        "json": json.dumps(meta, sort_keys=True),
    }
