"""Step 1 of `evaluate`: the eval set. The first `max_prompts` eval samples, what each prompt asks
of the adherence oracle, the reference images as scorer rows, the fixed generation chunks and their
seeds, and the eval set's identity (what `register` compares champions on)."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.samples import (DEFAULT_MAX_BAD_FRACTION, ShardReads, bad_data_problem, by_reason, decode_image,
                              read_shards, square_image)

if TYPE_CHECKING:
    from stages.evaluate import Config

METRICS_VERSION = "1"  # of the metric definitions (scoring.py); part of the eval-set fingerprint


class EvaluateError(ValueError):
    """Evaluation input that cannot be used: says what was given and what was expected."""


def read_eval_samples(urls: list[str], max_prompts: int | None, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
                      ) -> tuple[list[dict], ShardReads]:
    """(the first `max_prompts` eval samples in shard order: key, prompt, image bytes, attributes or
    None; what was read: `pipeline.samples.ShardReads`). Shards are read whole, by the reader every
    stage shares; a reference image that does not decode is a `not_image` reject. Raises when more
    than `max_bad_fraction` of the samples read is bad (naming the bad shards), or too few are left."""
    if not urls:
        raise EvaluateError("evaluate: no eval prompts: the shards stage lists no eval shard (data.eval_shards)")

    def check_image(data: bytes) -> None:  # raises for bytes that are not an image; the bytes are kept
        square_image(data)

    reads = read_shards(urls, members=("json",), decode=check_image, max_samples=max_prompts)
    if reads.rejects:
        print(f"[evaluate] {len(reads.rejects)} reject(s) in {reads.shards_read} eval shard(s) read "
              f"{by_reason(reads.rejects)}, {len(reads.unreadable)} unreadable; bad fraction "
              f"{reads.bad_fraction:.2%}", flush=True)
    problem = bad_data_problem("evaluate", "eval samples read", reads.bad_fraction, max_bad_fraction, reads.rejects,
                               "evaluate.max_bad_fraction")
    if problem:
        raise EvaluateError(problem)
    samples = [{"key": s["key"], "prompt": s["prompt"], "image": s["image"],
                "attributes": json.loads(s["json"]) if s["json"] is not None else None} for s in reads.samples]
    if not samples:
        raise EvaluateError(f"evaluate: no eval prompts: the eval shards ({len(urls)}: {', '.join(urls[:3])}) hold "
                            f"no samples")
    if len(samples) < 2:
        raise EvaluateError("evaluate: 1 eval prompt; the Frechet distance needs at least 2 (evaluate.max_prompts "
                            "and the eval shards decide how many are used)")
    return samples, reads


def adherence_targets(samples: list[dict], mode: str) -> list | None:
    """What each prompt asks for (shard json attributes, else the shapes grammar), or None when off.
    `auto` skips adherence with a warning when some sample has neither; `on` makes that an error."""
    from pipeline.oracle import ATTRIBUTE_NAMES, parse_prompt

    if mode == "off":
        return None
    targets, missing = [], []
    for s in samples:
        attrs = s["attributes"]
        if isinstance(attrs, dict) and all(k in attrs for k in ATTRIBUTE_NAMES):
            targets.append({k: attrs[k] for k in ATTRIBUTE_NAMES})
            continue
        try:
            targets.append(parse_prompt(s["prompt"]))
        except ValueError:
            missing.append(s["key"])
    if not missing:
        return targets
    message = (f"{len(missing)} of {len(samples)} eval samples (e.g. {missing[:3]}) have no shapes attributes "
               f"(json) and a prompt outside the shapes grammar, so the adherence oracle cannot score them")
    if mode == "on":
        raise EvaluateError(f"evaluate.adherence 'on': {message}; use 'auto' or 'off' for other data")
    warnings.warn(f"evaluate.adherence 'auto': {message}; adherence metrics skipped", stacklevel=2)
    print(f"[evaluate] warning: {message}; adherence metrics skipped", flush=True)
    return None


def decode_reference(data: bytes, side: int):
    """A reference image as the generators' output size: upright RGB, centre crop to a square, bicubic
    resize (`pipeline.samples.decode_image`, the image decoder of every stage): uint8 [side, side, 3]."""
    return decode_image(data, side)


def reference_dataset(samples: list[dict]):
    """The eval set's images as rows like the generated ones (generator "data"); the scorer decodes
    them (centre crop, resize to the generated side)."""
    import ray

    items = [{"generator": "data", "index": i, "prompt": s["prompt"], "image_bytes": s["image"]}
             for i, s in enumerate(samples)]
    return ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // 64, 64)))


def inception_weights_identity(inception_weights: str | None) -> list:
    """A local Inception weights file by (path, size, mtime), or (path, "missing"); [] when none is set."""
    if not inception_weights:
        return []
    p = Path(os.path.expanduser(inception_weights))
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [str(p), "missing"]]


def eval_set_identity(samples: list[dict], cfg: Config, inception) -> dict:
    """What makes two evaluations comparable: the samples, the seeds and chunking, the metric settings."""
    h = hashlib.sha256()
    for s in samples:  # a prompt set has no reference images
        image = hashlib.sha256(s["image"]).hexdigest() if s["image"] is not None else None
        h.update(json.dumps([s["key"], s["prompt"], image]).encode())
    settings = {"metrics_version": METRICS_VERSION, "seed": cfg.seed, "batch_size": cfg.batch_size,
                "fd_image_side_px": cfg.fd_image_side_px, "clip_model": cfg.clip_model,
                "inception_weights": inception_weights_identity(cfg.inception_weights) if inception else None,
                "adherence": cfg.adherence}
    # The published-protocol settings join only when set, so the eval-shard path keeps its fingerprint
    # (register compares champions on it).
    extra = {k: getattr(cfg, k) for k in ("prompts", "prompt_column", "fid_reference_stats", "fid_resize",
                                          "fid_image_side_px", "clip_image_side_px", "pickscore_model",
                                          "pickscore_processor")
             if getattr(cfg, k) is not None and (k, getattr(cfg, k)) not in (("prompt_column", "caption"),
                                                                             ("fid_resize", "pytorch_fid"))}
    if cfg.prompts is None:
        extra.pop("prompt_column", None)
    settings.update(extra)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return {"fingerprint": h.hexdigest()[:16], "num_prompts": len(samples), **settings}


def make_chunks(prompts: list[str], batch_size: int, seed: int) -> list[dict]:
    """Fixed chunks of consecutive prompts, one seed each: the unit of generation for every generator,
    so images do not depend on how Ray Data forms blocks."""
    return [{"chunk": c, "index": list(range(i, min(i + batch_size, len(prompts)))),
             "prompt": prompts[i:i + batch_size], "seed": chunk_seed(seed, c)}
            for c, i in enumerate(range(0, len(prompts), batch_size))]


def chunk_seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"evaluate/{seed}/{chunk}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
