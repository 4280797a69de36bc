"""The evaluation protocol's files (issue 17): the pre-flight check of every configured path, the
prompt-set eval set, the FID reference, and the protocol record each FID is logged with."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.eval_protocol import ProtocolError, load_reference_stats, read_prompts
from pipeline.metrics import MetricError

if TYPE_CHECKING:
    from stages.evaluate import Config

# config key -> the key that marks its metric optional (None: never optional)
OPTIONAL_BY = {"prompts": None, "fid_reference_stats": "inception_optional", "inception_weights": "inception_optional",
               "clip_model": "clip_optional", "pickscore_model": "pickscore_optional",
               "pickscore_processor": "pickscore_optional"}


def file_problems(cfg: Config) -> list[str]:
    """Every configured protocol file that is missing or unusable, one line each naming its key and the
    fix; files of a metric marked optional are left to the stage (skipped with a warning). Cheap: reads the
    prompt file and the reference header, not the models."""
    problems = []
    for key, optional in OPTIONAL_BY.items():
        spec = getattr(cfg, key)
        if spec is None or (optional and getattr(cfg, optional)):
            continue
        try:
            check_file(cfg, key, spec)
        except (ProtocolError, MetricError) as e:
            problems.append(str(e))
    return problems


def check_file(cfg: Config, key: str, spec: str):
    """The resolved location of one protocol file, or raises naming `evaluate.<key>`."""
    from pipeline.metrics import check_inception_weights, resolve_clip

    if key == "prompts":
        read_prompts(spec, cfg.prompt_column)
        return spec
    if key == "inception_weights":
        return check_inception_weights(spec)
    if key == "fid_reference_stats":
        from pipeline.fid_inception import FEATURE_DIM

        path = Path(os.path.expanduser(spec))
        if not path.is_file():
            raise ProtocolError(f"evaluate.fid_reference_stats {spec!r}: no such file ({path.absolute()}); place "
                                f"the reference .npz there (cluster/README.md) or make one with `python -m "
                                f"pipeline.fid_stats`, or set evaluate.inception_optional=true to skip FID")
        weights = Path(os.path.expanduser(cfg.inception_weights)) if cfg.inception_weights else None
        if weights is not None and weights.is_file():  # (a missing one is its own problem line)
            reference_stats(cfg, weights, FEATURE_DIM)  # pool3; a TorchScript hook is probed in the stage
        else:
            load_reference_stats(spec, FEATURE_DIM)
        return path
    return resolve_clip(spec, f"evaluate.{key}")


def reference_stats(cfg: Config, inception, feature_dim: int | None = None) -> dict:
    """`evaluate.fid_reference_stats` loaded and checked against the FID extractor at `inception`:
    pytorch-fid's `.safetensors` weights by their digest and by `fid_resize` / `fid_image_side_px`, as far as
    the file records how it was made; a TorchScript hook by its feature dimension (`feature_dim`, or None:
    probed with one image)."""
    from pipeline import fid_inception

    if str(inception).endswith(".safetensors"):
        return load_reference_stats(cfg.fid_reference_stats, fid_inception.FEATURE_DIM,
                                    fid_inception.file_digest(inception),
                                    {"resize_rule": cfg.fid_resize, "image_side_px": cfg.fid_image_side_px})
    return load_reference_stats(cfg.fid_reference_stats, feature_dim or _torchscript_dim(inception))


def _torchscript_dim(inception) -> int:
    """The feature dimension of a TorchScript FID hook (one probe image)."""
    import numpy as np

    from pipeline import metrics as M

    return int(M.InceptionFeatures(inception)(np.zeros((1, 32, 32, 3), np.uint8)).shape[1])


def optional_file(cfg: Config, key: str):
    """`check_file`, or None with a warning when it fails and its metric is marked optional."""
    spec = getattr(cfg, key)
    if spec is None:
        return None
    try:
        return check_file(cfg, key, spec)
    except (ProtocolError, MetricError) as e:
        optional = OPTIONAL_BY[key]
        if not (optional and getattr(cfg, optional)):
            raise
        warnings.warn(f"{e}; evaluate.{optional} is true: skipping that metric", stacklevel=2)
        print(f"[evaluate] warning: {e} -- skipped (optional)", flush=True)
        return None


def file_identity(spec: str | None) -> list:
    """A local file by (path, size, mtime), or (path, "missing"); [] when none is set."""
    if not spec:
        return []
    p = Path(os.path.expanduser(spec))
    return [str(p), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [str(p), "missing"]


def prompt_samples(cfg: Config) -> list[dict]:
    """The prompt set as eval samples: the first `max_prompts` prompts, no reference image."""
    prompts = read_prompts(cfg.prompts, cfg.prompt_column)[:cfg.max_prompts]
    if len(prompts) < 2:
        raise ProtocolError(f"evaluate.prompts {cfg.prompts!r}: {len(prompts)} prompt(s) used; the Frechet distance "
                            f"needs at least 2 (evaluate.max_prompts and the file decide how many)")
    return [{"key": f"p{i:08d}", "prompt": p, "image": None, "attributes": None} for i, p in enumerate(prompts)]
