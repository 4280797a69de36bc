"""The published-protocol side of evaluation: prompt files, FID reference statistics, and the protocol
record every FID carries (pure numpy; no Ray, no MLflow).

- `read_prompts`: `evaluate.prompts`, a `.txt` (one prompt per line), `.csv` or `.parquet` (column
  `evaluate.prompt_column`) file, as `data.prompts` is read; empty or column-less files are errors.
- Reference statistics (`evaluate.fid_reference_stats`): an `.npz` with `mu` [D] and `sigma` [D, D],
  the format pytorch-fid and the released SwD evaluation use (`fid_stats_mscoco256_val.npz`). Files made
  by `python -m pipeline.fid_stats` also record how they were made (`protocol_json`: extractor, weights
  sha256, resize rule, resolution, image count, source); `load_reference_stats` checks the dimension
  against the extractor and, when recorded, the weights digest against the configured weights.
- `fid_protocol`: extractor, weights digest, resize rule, resolution, sample count and reference identity
  of one FID; `protocol_id` is its short digest, the number `compare` checks before putting two FIDs side
  by side (a metric, `fid_protocol_id`, so it reaches the parent run for cached stages too).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pipeline.data import PromptFileError, read_prompt_values


class ProtocolError(ValueError):
    """Evaluation protocol input that cannot be used; names the config key and the fix."""


def read_prompts(spec: str, column: str, key: str = "evaluate.prompts") -> list[str]:
    """Every prompt of the file, in order (`pipeline.data.read_prompt_values`); raises naming `key` for an
    unknown format, an unreadable or empty file, a missing column, or an empty prompt."""
    try:
        prompts = read_prompt_values(spec, column, key, "evaluate.prompt_column")
    except PromptFileError as e:
        raise ProtocolError(str(e)) from None
    if not prompts:
        raise ProtocolError(f"{key}: {spec!r} holds no prompt; give a file with one prompt per line, or a "
                            f"{column!r} column")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ProtocolError(f"{key}: {spec!r}: {len(empty)} empty prompt(s) (rows {empty[:5]}, 0-based); "
                            f"remove them from the file")
    return prompts


def load_reference_stats(spec: str, feature_dim: int, weights_sha256: str | None = None,
                         preprocessing: dict | None = None, key: str = "evaluate.fid_reference_stats") -> dict:
    """{"mu", "sigma", "sha256", "protocol" (dict or None)} of a reference `.npz`; raises naming `key`
    when mu/sigma are missing or malformed, their dimension is not the extractor's, or what the file
    records of how it was made (`python -m pipeline.fid_stats`) differs from the configuration: the
    weights digest (`weights_sha256`), and each of `preprocessing` ({"resize_rule": evaluate.fid_resize,
    "image_side_px": evaluate.fid_image_side_px}). Files without a record (the released ones) are taken
    as they are."""
    path = Path(os.path.expanduser(spec))
    try:
        data = np.load(path, allow_pickle=False)  # arrays only: never unpickle
    except (OSError, ValueError) as e:
        raise ProtocolError(f"{key}: {spec!r} is not a readable .npz ({e}); make one with "
                            f"`python -m pipeline.fid_stats`") from None
    with data:
        names = set(data.files)
        if not {"mu", "sigma"} <= names:
            raise ProtocolError(f"{key}: {spec!r} holds {sorted(names)}, not 'mu' and 'sigma' (the pytorch-fid "
                                f"statistics format); make one with `python -m pipeline.fid_stats`")
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        protocol = json.loads(str(data["protocol_json"])) if "protocol_json" in names else None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ProtocolError(f"{key}: {spec!r}: mu {mu.shape} / sigma {sigma.shape}; expected mu [D] and sigma [D, D]")
    if mu.size != feature_dim:
        raise ProtocolError(f"{key}: {spec!r} holds {mu.size}-d statistics but the FID extractor gives "
                            f"{feature_dim}-d features (pool3 of pytorch-fid's Inception is 2048-d); use statistics "
                            f"made with the same extractor")
    if weights_sha256 and protocol and protocol.get("weights_sha256") not in (None, weights_sha256):
        raise ProtocolError(f"{key}: {spec!r} was made with Inception weights sha256 "
                            f"{protocol['weights_sha256'][:16]}..., but evaluate.inception_weights has "
                            f"{weights_sha256[:16]}...; use the weights the statistics were made with, or remake "
                            f"the statistics with `python -m pipeline.fid_stats`")
    config_key = {"resize_rule": ("evaluate.fid_resize", "--resize"),
                  "image_side_px": ("evaluate.fid_image_side_px", "--image-side-px")}
    for name, want in (preprocessing or {}).items():
        if protocol and name in protocol and protocol[name] != want:
            option, flag = config_key[name]
            raise ProtocolError(f"{key}: {spec!r} was made with {name} {protocol[name]!r}, but {option} is "
                                f"{want!r}; set {option}: {protocol[name]!r} (FID compares like with like), or "
                                f"remake the statistics with `python -m pipeline.fid_stats {flag} ...`")
    from pipeline.fid_inception import file_digest

    return {"mu": mu, "sigma": sigma, "sha256": file_digest(path), "protocol": protocol}


def fid_protocol(extractor: str, weights_sha256: str, resize_rule: str, image_side_px: int | None,
                 num_samples: int, reference: dict) -> dict:
    """What makes two FIDs comparable. `reference`: {"kind": "stats", "sha256", "protocol"} or
    {"kind": "images", "eval_set": fingerprint}; `image_side_px`: the side images are brought to before
    the extractor's own resize (None: as generated)."""
    out = {"extractor": extractor, "weights_sha256": weights_sha256, "resize_rule": resize_rule,
           "image_side_px": image_side_px, "num_samples": num_samples, "reference": reference}
    out["id"] = protocol_id(out)
    return out


def protocol_id(protocol: dict) -> int:
    """A 48-bit digest of a protocol (exact as an MLflow float metric)."""
    body = {k: v for k, v in protocol.items() if k != "id"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return int(digest[:12], 16)


def bring_to_side(images: np.ndarray, side: int | None) -> np.ndarray:
    """The released evaluation's step before FID: PIL Lanczos resize of the short side to `side`, centre
    crop to side x side (torchvision Resize(side, LANCZOS) + CenterCrop(side) on PIL images); None: as is."""
    from PIL import Image

    if side is None or images.shape[1:3] == (side, side):
        return images
    out = []
    for im in images:
        pil = Image.fromarray(np.asarray(im))
        w, h = pil.size  # torchvision's rule: the short side to `side`, the long one int(side * long / short)
        size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
        pil = pil.resize(size, resample=Image.LANCZOS)
        w, h = pil.size
        left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
        out.append(np.asarray(pil.crop((left, top, left + side, top + side))))
    return np.stack(out)
