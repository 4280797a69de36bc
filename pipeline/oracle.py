"""Prompt-adherence oracle for the procedural shapes dataset (`pipeline/shapes.py`).

Reads the attributes back from an image, with no learned parts:
1. background: median colour of the image border -> nearest background in `BACKGROUNDS_RGB`;
2. foreground: pixels far from that background; the largest connected blob is the shape;
3. colour: median colour of the blob's core -> nearest entry of `COLOURS_RGB`;
4. the blob is re-thresholded halfway between background and shape colour (so blurred edges of
   generated images count as they look), then
   - position: centroid -> cell of the 3x3 grid;
   - size: the larger side of the bounding box -> nearest size of `SIZES_CELL_FRACTION`;
   - shape: row-width taper (top third vs bottom third: a triangle points up) and the fill
     ratio of the bounding box (square ~1, circle ~pi/4, triangle ~1/2).
`score` compares against the attributes a prompt asked for: accuracy per attribute, `all_three`
(colour, position and shape all right) and `all` (every attribute right).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict

import numpy as np
from scipy import ndimage

from pipeline.shapes import (BACKGROUNDS_RGB, COLOURS_RGB, POSITIONS, SHAPES, SIZES_CELL_FRACTION,
                             Attributes)

ATTRIBUTE_NAMES = ("colour", "position", "shape", "size", "background")
THREE = ("colour", "position", "shape")
NONE = "none"  # what a field reads when the image shows no shape
FOREGROUND_MIN_DISTANCE = 60.0  # RGB distance from the background that marks a foreground pixel
TAPER_TRIANGLE = 0.6  # top-third / bottom-third mean row width below this: a triangle
FILL_SQUARE = 0.88  # bounding-box fill above this: a square (circle ~0.79)

_PROMPT = re.compile(r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) in the (?P<position>[\w ]+?) "
                     r"on a (?P<background>\w+) background$")


def to_array(image) -> np.ndarray:
    """PIL image, uint8 HxWx3, or float HxWx3 in [0, 1] (diffusers `output_type="np"`) -> uint8."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
    return a[..., :3]


def recover(image) -> Attributes:
    """The attributes an image shows (fields read `none` where there is no shape)."""
    a = to_array(image).astype(np.float32)
    h, w, _ = a.shape
    border = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3),
                             a[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _nearest(bg, BACKGROUNDS_RGB)

    far = np.linalg.norm(a - bg, axis=-1) > FOREGROUND_MIN_DISTANCE
    blob = _largest_component(far)
    if blob is None:
        return Attributes(shape=NONE, colour=NONE, position=NONE, size=NONE, background=background)
    # Core: the blob's pixels furthest from the background (edges are blends with it).
    dist = np.linalg.norm(a[blob] - bg, axis=-1)
    fg = np.median(a[blob][dist >= np.quantile(dist, 0.5)], axis=0)
    colour = _nearest(fg, COLOURS_RGB)

    # Halfway threshold along background -> shape colour.
    d = fg - bg
    t = ((a - bg) @ d) / max(float(d @ d), 1e-6)
    mask = _largest_component(t > 0.5)
    if mask is None:
        mask = blob
    ys, xs = np.nonzero(mask)
    cell_h, cell_w = h / 3, w / 3
    row = min(int((ys.mean() + 0.5) / cell_h), 2)  # pixel centres sit at +0.5
    col = min(int((xs.mean() + 0.5) / cell_w), 2)
    position = POSITIONS[(row, col)]

    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    box_h, box_w = y1 - y0 + 1, x1 - x0 + 1
    extent_cells = (max(box_h / cell_h, box_w / cell_w) - 1 / cell_w) / 2  # half-extent in cells, as in the table
    size = min(SIZES_CELL_FRACTION, key=lambda s: abs(math.log(extent_cells / SIZES_CELL_FRACTION[s])))

    widths = mask[y0:y1 + 1, x0:x1 + 1].sum(axis=1).astype(np.float32)
    third = max(1, len(widths) // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1e-6)
    fill = mask.sum() / float(box_h * box_w)
    if taper < TAPER_TRIANGLE:
        shape = "triangle"
    elif fill > FILL_SQUARE:
        shape = "square"
    else:
        shape = "circle"
    assert shape in SHAPES
    return Attributes(shape=shape, colour=colour, position=position, size=size, background=background)


def parse_prompt(prompt: str) -> Attributes:
    """The attributes a prompt of the shapes grammar asks for (ValueError for other text)."""
    m = _PROMPT.match(prompt.strip().lower())
    if not m:
        raise ValueError(f"prompt {prompt!r} is not of the shapes grammar "
                         f"('a <size> <colour> <shape> in the <position> on a <background> background')")
    return Attributes(**m.groupdict())


def score(images: Iterable, targets: Sequence) -> dict[str, float]:
    """Accuracy of each attribute, `all_three` and `all`, of images against what was asked.

    `targets`: per image an `Attributes`, a dict with the attribute fields (a shard's json), or a
    prompt of the grammar.
    """
    hits = {name: 0 for name in (*ATTRIBUTE_NAMES, "all_three", "all")}
    n = 0
    for image, target in zip(images, targets, strict=True):
        want = _as_attributes(target)
        got = recover(image)
        right = {k: getattr(got, k) == getattr(want, k) for k in ATTRIBUTE_NAMES}
        for k, ok in right.items():
            hits[k] += ok
        hits["all_three"] += all(right[k] for k in THREE)
        hits["all"] += all(right.values())
        n += 1
    if n == 0:
        raise ValueError("score: no images")
    return {k: v / n for k, v in hits.items()}


def _as_attributes(target) -> Attributes:
    if isinstance(target, Attributes):
        return target
    if isinstance(target, str):
        return parse_prompt(target)
    if isinstance(target, dict):
        return Attributes(**{k: target[k] for k in asdict(Attributes("", "", "", "", ""))})
    raise TypeError(f"target {target!r}: expected Attributes, a dict of attributes or a prompt")


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    return min(table, key=lambda name: float(np.sum((rgb - np.asarray(table[name], np.float32)) ** 2)))


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))
