"""Step 3 of `evaluate`: the generated and the reference images scored by a Ray Data actor pool
(feature extractors loaded once per actor), and the quality metrics computed from those scores on
the driver: Frechet distances, CLIP score, FID and prompt adherence (`pipeline/metrics.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.eval_record import INTERVAL_PAIRS
from pipeline.resources import worker_runtime_env
from stages.evaluate.eval_set import decode_reference

if TYPE_CHECKING:
    from stages.evaluate import Config


@dataclass
class ScoreSpec:
    device: str
    side: int  # images are scored at the generators' output side (references centre-cropped and resized)
    fd_image_side_px: int
    clip_model: str | None
    inception_weights: str | None
    oracle: bool = False  # read the shapes attributes back (adherence)
    num_threads: int = 1
    fd: bool = True  # EfficientNet-Lite0 features (the eval-shard path; off for a prompt set: no reference images)
    fid_resize: str = "pytorch_fid"
    fid_image_side_px: int | None = None  # Lanczos + centre crop to this side before FID (None: as generated)
    clip_image_side_px: int | None = None  # bicubic to this side before the CLIP / PickScore processors
    pickscore_model: str | None = None
    pickscore_processor: str | None = None


class ScoreActor:
    """Ray Data callable class: loads the feature extractors once; images -> features, scores and the
    oracle's reading of each image (small rows: the images themselves are not returned)."""

    def __init__(self, spec: ScoreSpec):
        import torch

        from pipeline import metrics as M

        if spec.device == "cpu":
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.fd = M.EfficientNetFeatures(spec.device, spec.fd_image_side_px) if spec.fd else None
        self.clip = M.ClipScorer(spec.clip_model, spec.device) if spec.clip_model else None
        self.pick = (M.ClipScorer(spec.pickscore_model, spec.device, "evaluate.pickscore_model", spec.pickscore_processor)
                     if spec.pickscore_model else None)
        self.inception = M.fid_extractor(spec.inception_weights, spec.fid_resize, spec.device)[0] \
            if spec.inception_weights else None

    def __call__(self, batch: dict) -> dict:
        import dataclasses

        import numpy as np

        from pipeline.eval_protocol import bring_to_side
        from pipeline.oracle import recover

        images = np.stack([decode_reference(bytes(b), self.spec.side) for b in batch["image_bytes"]])
        out = {"generator": batch["generator"], "index": batch["index"]}
        if self.fd is not None:
            out["fd"] = self.fd(images)
        if self.clip is not None or self.pick is not None:
            prompts = [str(p) for p in batch["prompt"]]
            small = _resized(images, self.spec.clip_image_side_px)
            if self.clip is not None:
                out["clip_cos"] = self.clip.cosines(small, prompts)
            if self.pick is not None:
                out["pick_cos"] = self.pick.cosines(small, prompts)
                out["pick_scale"] = np.full(len(images), self.pick.logit_scale, dtype=np.float64)
        if self.inception is not None:
            out["fid"] = self.inception(bring_to_side(images, self.spec.fid_image_side_px))
        if self.spec.oracle:
            out["oracle"] = np.asarray([json.dumps(dataclasses.asdict(recover(im))) for im in images], dtype=object)
        return out


def _resized(images, side: int | None):
    """Bicubic to side x side (the released evaluation's PIL resize before CLIP), or as is."""
    import numpy as np
    from PIL import Image

    if side is None or images.shape[1:3] == (side, side):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC)) for im in images])


def score(ds, spec: ScoreSpec, cfg: Config, gpus: float, num_actors: int) -> dict:
    """{generator or "data": {"fd": [N, 1280], "clip_cos": [N], "pick_cos": [N], "pick_scale": [N],
    "fid": [N, 2048], "oracle": [N readings]}} (keys as configured)."""
    import numpy as np
    import ray

    ds = ds.map_batches(ScoreActor, batch_size=cfg.score_batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"spec": spec},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                        num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus, runtime_env=worker_runtime_env())
    rows = ds.take_all()
    out: dict[str, dict] = {}
    for source in sorted({str(r["generator"]) for r in rows}):
        mine = sorted((r for r in rows if r["generator"] == source), key=lambda r: int(r["index"]))
        out[source] = {k: np.stack([np.asarray(r[k]) for r in mine])
                       for k in ("fd", "clip_cos", "pick_cos", "pick_scale", "fid") if k in mine[0]}
        if "oracle" in mine[0]:
            out[source]["oracle"] = [json.loads(r["oracle"]) for r in mine]
    return out


def quality_metrics(scores: dict, names: list[str], targets: list | None, reference: dict | None = None,
                    fid_is_fd: bool = False) -> dict[str, float]:
    """Per generator in `names`: `<name>_fd` (and `<name>_fd_<extractor>`, the same number), `_fid`,
    `_clip_score` (torchmetrics), `_clip_cosine` (released), `_pickscore` (logit_scale * cos),
    `_pickscore_cosine`, `_adherence` (all attributes right) and `_adherence_<attribute>`, each against or
    beside the reference images ("data") or, for FID, the reference statistics `reference` (mu, sigma);
    `data_adherence` (the oracle's ceiling), `data_clip_score`. `fid_is_fd`: a prompt set, where `_fd` is
    the FID (there are no reference images for the EfficientNet FD)."""
    import numpy as np

    from pipeline import metrics as M

    values: dict[str, float] = {}
    for name in names:
        s = scores[name]
        if "fd" in s:
            values[f"{name}_fd"] = M.frechet_distance_of(s["fd"], scores["data"]["fd"])
            values[f"{name}_fd_{M.FD_EXTRACTOR}"] = values[f"{name}_fd"]
        if "fid" in s and (reference is not None or "data" in scores):
            ref = (reference["mu"], reference["sigma"]) if reference is not None else \
                M.feature_statistics(scores["data"]["fid"])
            if s["fid"].shape[1] != ref[0].shape[0]:
                raise M.MetricError(f"evaluate.inception_weights: {s['fid'].shape[1]}-d features against "
                                    f"{ref[0].shape[0]}-d reference statistics (evaluate.fid_reference_stats); "
                                    f"use statistics made with the same extractor")
            values[f"{name}_fid"] = M.frechet_distance(*M.feature_statistics(s["fid"]), *ref)
            if fid_is_fd:
                values[f"{name}_fd"] = values[f"{name}_fid"]
        if "clip_cos" in s:
            values[f"{name}_clip_score"] = M.clip_score_torchmetrics(s["clip_cos"])
            values[f"{name}_clip_cosine"] = float(np.mean(s["clip_cos"]))
        if "pick_cos" in s:
            values[f"{name}_pickscore"] = float(np.mean(M.pickscore(s["pick_cos"], s["pick_scale"][0])))
            values[f"{name}_pickscore_cosine"] = float(np.mean(s["pick_cos"]))
        if targets is not None:
            acc = M.adherence_of(s["oracle"], targets)
            values[f"{name}_adherence"] = acc["all"]
            values.update({f"{name}_adherence_{k}": v for k, v in acc.items() if k != "all"})
    if "data" in scores:
        if targets is not None:  # the oracle on the reference images: the ceiling of adherence
            values["data_adherence"] = M.adherence_of(scores["data"]["oracle"], targets)["all"]
        if "clip_cos" in scores["data"]:
            values["data_clip_score"] = M.clip_score_torchmetrics(scores["data"]["clip_cos"])
    return values


def confidence_intervals(scores: dict, names: list[str], targets: list | None, cfg: Config,
                         reference: dict | None = None) -> dict[str, float]:
    """Paired bootstrap 95% intervals (pipeline/bootstrap.py) of `_adherence` and `_fd` per generator and of
    student - teacher and baseline - student: the same resampled prompt indices for every generator and the
    reference images (the prompt set: the fixed reference statistics)."""
    import numpy as np

    from pipeline import bootstrap as B
    from pipeline import metrics as M

    first = scores[names[0]]
    prompt_set_fd = "fd" not in first and "fid" in first and reference is not None  # `_fd` is the FID
    if targets is None and "fd" not in first and not prompt_set_fd:
        return {}  # neither adherence nor an FD to resample
    n = len(first["fd"] if "fd" in first else first["fid"] if prompt_set_fd else targets)
    idx = B.resample_indices(n, cfg.bootstrap_resamples, cfg.bootstrap_seed)
    resampled: dict[str, dict] = {}
    for name in names:
        s, mine = scores[name], {}
        if targets is not None:
            mine["adherence"] = B.mean_resamples(np.asarray([M.adherence_of([r], [t])["all"]
                                                             for r, t in zip(s["oracle"], targets)]), idx)
        if "fd" in s:
            mine["fd"] = B.fd_resamples(s["fd"], scores["data"]["fd"], idx)
        elif prompt_set_fd:  # against the fixed statistics: only the generated side is resampled
            mine["fd"] = B.fd_resamples(s["fid"], (reference["mu"], reference["sigma"]), idx)
        resampled[name] = mine
    return B.intervals(resampled, list(INTERVAL_PAIRS))
