"""`shards` stage: the data every later stage reads.

Steps:
1. If `data.train_shards` / `data.eval_shards` are set, expand them (paths, globs, braces, URIs)
   and record the list; nothing is copied. Their sizes and modification times are part of the
   fingerprint, so adding a shard re-runs what depends on the data.
2. Otherwise generate the procedural shapes dataset (`pipeline/shapes.py`) as WebDataset tars,
   one Ray task per shard: `png` image, `txt` prompt, `json` attributes, members of a sample
   contiguous. Deterministic from `data.generator.seed`; train and eval use separate streams.
3. Write `shards.json`: {"train": [{"url", ...}], "eval": [...]} (generated urls relative to
   the output directory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import DataConfig, GeneratorConfig
from pipeline.context import StageContext
from pipeline.data import SHARDS_FILE, expand_shards

VERSION = "1"
SECTIONS = ("data",)
OUTPUTS = (SHARDS_FILE,)
Config = DataConfig


def external_fingerprint(sections: dict) -> list | None:
    data: DataConfig = sections["data"]
    if data.train_shards is None:
        return None
    return [expand_shards(data.train_shards, "data.train_shards"),
            expand_shards(data.eval_shards, "data.eval_shards")]


def run(ctx: StageContext) -> None:
    import mlflow  # here, not at the top: the Ray tasks that write shards import this module

    data: DataConfig = ctx.config
    mlc = mlflow.MlflowClient(ctx.tracking_uri)
    if data.train_shards is not None:
        listing = {"train": expand_shards(data.train_shards, "data.train_shards"),
                   "eval": expand_shards(data.eval_shards, "data.eval_shards")}
        mlc.set_tag(ctx.run_id, "shards.source", "user")
    else:  # with a prompt file, training images come from the synthesize stage: eval only
        listing = _generate(data.generator, ctx, train=data.prompts is None)
        mlc.set_tag(ctx.run_id, "shards.source", "generated")
    (ctx.output_dir / SHARDS_FILE).write_text(json.dumps(listing, indent=1))
    for split, entries in listing.items():
        mlc.log_metric(ctx.run_id, f"{split}_shards", len(entries))
        ctx.summary[f"{split}_shards"] = len(entries)


def _generate(gen: GeneratorConfig, ctx: StageContext, train: bool = True) -> dict[str, list[dict]]:
    import ray

    write = ray.remote(num_cpus=1)(_write_shard)
    counts = {"train": gen.num_train_samples if train else 0, "eval": gen.num_eval_samples}
    pending = {}
    for split, count in counts.items():
        (ctx.output_dir / split).mkdir()
        for shard, first in enumerate(range(0, count, gen.samples_per_shard)):
            rel = f"{split}/{split}-{shard:06d}.tar"
            indices = range(first, min(first + gen.samples_per_shard, count))
            ref = write.remote(str(ctx.output_dir / rel), split, indices.start, indices.stop, gen)
            pending[ref] = (split, rel, len(indices))
    listing: dict[str, list[dict]] = {split: [] for split in counts}
    total, done, start = sum(counts.values()), 0, time.monotonic()
    remaining = list(pending)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        split, rel, n = pending[ready[0]]
        size = ray.get(ready[0])
        listing[split].append({"url": rel, "size_bytes": size, "samples": n})
        done += n
        print(f"[shards] {done}/{total} samples, {done / (time.monotonic() - start):.0f} samples/s", flush=True)
    ctx.log.metrics({"samples_per_s": total / (time.monotonic() - start)})
    for entries in listing.values():
        entries.sort(key=lambda e: e["url"])
    return listing


def _write_shard(path: str, split: str, start: int, stop: int, gen: GeneratorConfig) -> int:
    import webdataset as wds

    from pipeline.shapes import make_sample

    with wds.TarWriter(path) as sink:  # writes each sample's members together, in order
        for index in range(start, stop):
            sink.write(make_sample(gen.seed, split, index, gen.image_side_px, gen.shapes, gen.colours,
                                   gen.sizes, gen.backgrounds))
    return Path(path).stat().st_size
