"""Step 3 of `evaluate`: the generated and the reference images scored by a Ray Data actor pool
(feature extractors loaded once per actor), and the quality metrics computed from those scores on
the driver: Frechet distances, CLIP score, FID and prompt adherence (`pipeline/metrics.py`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


class ScoreActor:
    """Ray Data callable class: loads the feature extractors once; images -> features, scores and the
    oracle's reading of each image (small rows: the images themselves are not returned)."""

    def __init__(self, spec: ScoreSpec):
        import torch

        from pipeline import metrics as M

        if spec.device == "cpu":
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.fd = M.EfficientNetFeatures(spec.device, spec.fd_image_side_px)
        self.clip = M.ClipScorer(spec.clip_model, spec.device) if spec.clip_model else None
        self.inception = M.InceptionFeatures(spec.inception_weights, spec.device) if spec.inception_weights else None

    def __call__(self, batch: dict) -> dict:
        import dataclasses

        import numpy as np

        from pipeline.oracle import recover

        images = np.stack([decode_reference(bytes(b), self.spec.side) for b in batch["image_bytes"]])
        out = {"generator": batch["generator"], "index": batch["index"], "fd": self.fd(images)}
        if self.clip is not None:
            out["clip"] = self.clip(images, [str(p) for p in batch["prompt"]])
        if self.inception is not None:
            out["fid"] = self.inception(images)
        if self.spec.oracle:
            out["oracle"] = np.asarray([json.dumps(dataclasses.asdict(recover(im))) for im in images], dtype=object)
        return out


def score(ds, spec: ScoreSpec, cfg: Config, gpus: float) -> dict:
    """{generator or "data": {"fd": [N, 1280], "clip": [N], "fid": [N, 2048], "oracle": [N readings]}}."""
    import numpy as np
    import ray

    ds = ds.map_batches(ScoreActor, batch_size=cfg.score_batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"spec": spec},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_actors),
                        num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus, runtime_env=worker_runtime_env())
    rows = ds.take_all()
    out: dict[str, dict] = {}
    for source in sorted({str(r["generator"]) for r in rows}):
        mine = sorted((r for r in rows if r["generator"] == source), key=lambda r: int(r["index"]))
        out[source] = {k: np.stack([np.asarray(r[k]) for r in mine]) for k in ("fd", "clip", "fid") if k in mine[0]}
        if "oracle" in mine[0]:
            out[source]["oracle"] = [json.loads(r["oracle"]) for r in mine]
    return out


def quality_metrics(scores: dict, names: list[str], targets: list | None) -> dict[str, float]:
    """Per generator in `names`: `<name>_fd` (and `<name>_fd_<extractor>`, the same number), `_fid`,
    `_clip_score`, `_adherence` (all attributes right) and `_adherence_<attribute>`, each against or
    beside the reference images ("data"); `data_adherence` (the oracle's ceiling), `data_clip_score`."""
    import numpy as np

    from pipeline import metrics as M

    values: dict[str, float] = {}
    for name in names:
        values[f"{name}_fd"] = M.frechet_distance_of(scores[name]["fd"], scores["data"]["fd"])
        values[f"{name}_fd_{M.FD_EXTRACTOR}"] = values[f"{name}_fd"]
        if "fid" in scores["data"]:
            values[f"{name}_fid"] = M.frechet_distance_of(scores[name]["fid"], scores["data"]["fid"])
        if "clip" in scores[name]:
            values[f"{name}_clip_score"] = float(np.mean(scores[name]["clip"]))
        if targets is not None:
            acc = M.adherence_of(scores[name]["oracle"], targets)
            values[f"{name}_adherence"] = acc["all"]
            values.update({f"{name}_adherence_{k}": v for k, v in acc.items() if k != "all"})
    if targets is not None:  # the oracle on the reference images: the ceiling of adherence
        values["data_adherence"] = M.adherence_of(scores["data"]["oracle"], targets)["all"]
    if "clip" in scores["data"]:
        values["data_clip_score"] = float(np.mean(scores["data"]["clip"]))
    return values
