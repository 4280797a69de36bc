"""Legible comparison grids (PIL only): thumbnails upscaled nearest-neighbour (pixels stay pixels, no
blur that would hide a few-step student's artefacts), rows labelled with their prompts, columns with the
generator or variant.

- `labelled_grid(columns, column_labels, row_labels, thumbnail_px)` -> PIL image: the evaluate stage's
  `samples.png` (columns: data, student, teacher, baseline).
- `ablation_grid(images_by_variant, prompts, thumbnail_px)` -> PIL image: the same prompts and seeds
  across variants, one column per variant (bench/ablations.py).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

PROMPT_COLUMN_PX = 220  # the left column holding each row's prompt
HEADER_PX = 18
LINE_PX = 12  # PIL's default bitmap font is ~11 px high


def upscale_nearest(image: np.ndarray, side_px: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [k H, k W, 3], k = max(1, floor(side_px / H)): an integer nearest-neighbour
    factor, never down (an image already larger than `side_px` stays as it is; no padding)."""
    factor = max(1, side_px // image.shape[0])
    return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def labelled_grid(columns: list, column_labels: list[str], row_labels: list[str] | None = None,
                  thumbnail_px: int = 192):
    """Rows = prompts, columns = image sets (uint8 [rows, H, W, 3] each): a label above each column and,
    when `row_labels` are given, the prompt (wrapped) left of each row."""
    from PIL import Image, ImageDraw

    if len(columns) != len(column_labels):
        raise ValueError(f"labelled_grid: {len(columns)} columns but {len(column_labels)} labels")
    rows = columns[0].shape[0]
    if any(c.shape[0] != rows for c in columns):
        raise ValueError(f"labelled_grid: columns of {[c.shape[0] for c in columns]} rows; give the same prompts to each")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"labelled_grid: {rows} rows but {len(row_labels)} row labels")
    thumbs = [[upscale_nearest(c[r], thumbnail_px) for r in range(rows)] for c in columns]
    side = thumbs[0][0].shape[0]
    left = PROMPT_COLUMN_PX if row_labels is not None else 0
    gap = 2
    canvas = Image.new("RGB", (left + (side + gap) * len(columns), HEADER_PX + (side + gap) * rows), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels):
        draw.text((left + c * (side + gap) + 4, 3), str(label), fill=(0, 0, 0))
    for r in range(rows):
        top = HEADER_PX + r * (side + gap)
        if row_labels is not None:
            lines = textwrap.wrap(str(row_labels[r]), width=max(8, (left - 8) // 6))[: max(1, side // LINE_PX)]
            for i, line in enumerate(lines):
                draw.text((4, top + 2 + i * LINE_PX), line, fill=(0, 0, 0))
        for c in range(len(columns)):
            canvas.paste(Image.fromarray(thumbs[c][r]), (left + c * (side + gap), top))
    return canvas


def ablation_grid(images_by_variant: dict[str, np.ndarray], prompts: list[str], thumbnail_px: int = 192,
                  path: str | Path | None = None):
    """The ablation grid: {variant: uint8 [len(prompts), H, W, 3], generated from the same prompts and
    seeds}, one column per variant in the dict's order, a row per prompt; saved to `path` when given."""
    names = list(images_by_variant)
    grid = labelled_grid([np.asarray(images_by_variant[n]) for n in names], names, list(prompts), thumbnail_px)
    if path is not None:
        grid.save(path)
    return grid
