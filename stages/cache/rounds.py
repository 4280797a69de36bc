"""One round of the cache stage (steps 2-5): up to `cache.max_shards_per_write` new shards through one
Ray Data execution, then each shard committed into the shared dir.

`encode_shards` runs the round on the driver: `build_dataset` chains the read (`read_shards`, one
map task per shard over the tolerant tar reader `pipeline.samples.iter_shard`), the decode and the
encoder actor pool (stages/cache/encoder.py) into `write_parquet`, partitioned by shard key; a
`Tally` actor collects the rejects and encoded rows of every worker, a `_Progress` thread prints
and logs them every `cache.log_every_s`; `_commit_shard` moves each shard's Parquet files to
`<shared>/<key>/data/` and writes its `shard.json` last.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from pipeline import samples
from pipeline.resources import worker_runtime_env
from pipeline.run_log import RunLog
from stages.cache.encoder import TeacherEncoder, decode_images, decode_memory_bytes
from stages.cache.shard_keys import DATA_DIR, SHARD_FILE, EncoderSpec, Shard, is_committed

if TYPE_CHECKING:
    from stages.cache import Config

READ_ROWS_PER_BLOCK = 64


def encode_shards(shards: list[Shard], spec: EncoderSpec, cfg: Config, gpus: float, shared: Path, scratch: Path,
                  log: RunLog, started: float, rows_before: int) -> tuple[int, dict[str, dict], float | None]:
    """Read, decode, encode and write `shards`, then commit each into `shared/<key>/`.

    Returns (rows written, {shard key: reject entry} of shards that could not be read, which are
    not committed so the next run tries them again, steady-state rows/s of the encoders)."""
    import ray

    out = scratch / f"write-{uuid.uuid4().hex[:8]}"
    for stale in scratch.glob("write-*"):  # left by a killed run of this fingerprint
        shutil.rmtree(stale, ignore_errors=True)
    tally = ray.remote(num_cpus=0)(Tally).remote()
    try:
        ds = build_dataset(shards, spec, cfg, gpus, tally)
        with _Progress(tally, log, started, rows_before, cfg.log_every_s):
            ds.write_parquet(str(out), partition_cols=["shard_key"])
        rejects, unreadable = ray.get(tally.rejects.remote())
        steady = ray.get(tally.steady_rows_per_s.remote())
    finally:
        ray.kill(tally)

    rows = 0
    failed = {}
    for s in shards:
        if s.key in unreadable:
            failed[s.key] = unreadable[s.key]
            continue
        part = out / f"shard_key={s.key}"
        entries = [{**e, "url": s.url} for e in rejects.get(s.key, [])]  # decode rejects know only the shard key
        rows += _commit_shard(s, part, shared, entries)
    shutil.rmtree(out, ignore_errors=True)
    return rows, failed, steady


def build_dataset(shards: list[Shard], spec: EncoderSpec, cfg: Config, gpus: float, tally):
    """The Ray Data pipeline of steps 2-4 (written by the caller)."""
    import ray

    items = [{"url": s.url, "shard_key": s.key} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow", fn_kwargs={"tally": tally},
                        num_cpus=cfg.num_cpus_per_decoder)
    # The decode tasks reserve the memory their batch needs. That also keeps Ray Data from fusing
    # them into the encoder actors (it fuses maps only with equal remote args): fused, each actor
    # would decode between its forwards instead of decode tasks running beside it.
    ds = ds.map_batches(decode_images, batch_size=cfg.decode_batch_size, batch_format="pyarrow",
                        fn_kwargs={"spec": spec, "tally": tally}, num_cpus=cfg.num_cpus_per_decoder,
                        memory=decode_memory_bytes(spec, cfg.decode_batch_size))
    return ds.map_batches(TeacherEncoder, batch_size=cfg.batch_size, batch_format="numpy",
                          fn_constructor_kwargs={"spec": spec, "tally": tally},
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.num_encoders),
                          num_cpus=cfg.num_cpus_per_encoder, num_gpus=gpus, runtime_env=worker_runtime_env())


# ----------------------------------------------------------------------------- step 2: read


def read_shard(url: str, shard_key: str) -> Iterator[tuple[list[dict], list[dict]]]:
    """(samples, rejects) in chunks (`pipeline.samples.iter_shard`): samples are {key, shard_key,
    prompt, image, image_ext} with the image bytes undecoded. Never raises: a shard that cannot be
    read is one `unreadable_shard` reject (its samples already yielded are dropped by the caller,
    which does not commit it)."""
    rows: list[dict] = []
    for sample, reject in samples.iter_shard(url):
        if reject is not None:
            yield [], [reject]
            if reject["reason"] == "unreadable_shard":
                return
            continue
        rows.append({"key": sample["key"], "shard_key": shard_key, "prompt": sample["prompt"],
                     "image": sample["image"], "image_ext": sample["image_ext"]})
        if len(rows) >= READ_ROWS_PER_BLOCK:
            yield rows, []
            rows = []
    if rows:
        yield rows, []


@functools.cache
def sample_schema():
    """Columns of the samples the reader emits (image bytes undecoded)."""
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("shard_key", pa.string()), ("prompt", pa.string()),
                      ("image", pa.binary()), ("image_ext", pa.string())])


def read_shards(batch, tally):
    """Ray Data map_batches (batch_size=1): one shard in, its samples out in blocks of
    READ_ROWS_PER_BLOCK rows; rejects go to the tally."""
    import pyarrow as pa
    import ray

    for url, key in zip(batch["url"].to_pylist(), batch["shard_key"].to_pylist()):
        for rows, rejects in read_shard(url, key):
            if rejects:
                ray.get(tally.reject.remote(key, rejects))
            if rows:
                yield pa.Table.from_pylist(rows, schema=sample_schema())


# ----------------------------------------------------------------------------- step 5: commit


def _commit_shard(shard: Shard, part: Path, shared: Path, rejects: list[dict]) -> int:
    """Move one shard's Parquet files into `shared/<key>/data/` and write its `shard.json` last."""
    import pyarrow.parquet as pq

    final = shared / shard.key
    if is_committed(shared, shard.key):  # committed meanwhile by a concurrent run: keep that one
        return json.loads((final / SHARD_FILE).read_text())["rows"]
    if final.exists():  # a killed commit
        shutil.rmtree(final)
    for stale in shared.glob(f".tmp-{shard.key}-*"):  # staging left by a killed commit
        shutil.rmtree(stale, ignore_errors=True)
    staging = shared / f".tmp-{shard.key}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    if part.is_dir():
        os.rename(part, staging / DATA_DIR)
    else:  # every sample of the shard was rejected
        (staging / DATA_DIR).mkdir()
    files = sorted((staging / DATA_DIR).glob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    os.rename(staging, final)
    record = {"url": shard.url, "size_bytes": shard.size_bytes, "mtime_ns": shard.mtime_ns, "shard_key": shard.key,
              "rows": rows, "files": [f.name for f in files],
              "rejects": sorted(rejects, key=lambda e: (e["key"], e["reason"]))}
    tmp = final / (SHARD_FILE + ".part")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, final / SHARD_FILE)
    return rows


# ----------------------------------------------------------------------------- the round's tally and progress


class Tally:
    """Ray actor (made with `ray.remote` where it is used, so importing this module needs no Ray):
    rejects, deduplicated so that a retried task does not count twice, and encoded rows, from the
    read, decode and encoder workers of one round."""

    def __init__(self):
        self._rejects: dict[tuple[str, str, str], dict] = {}
        self._unreadable: dict[str, dict] = {}
        self._encoded = 0
        self._batches: list[tuple[float, int]] = []  # (wall time, rows) of each encoded batch

    def reject(self, shard_key: str, entries: list[dict]) -> None:
        for e in entries:
            if e["reason"] == "unreadable_shard":
                self._unreadable[shard_key] = e
            else:
                self._rejects[(shard_key, e["key"], e["reason"])] = e

    def encoded(self, n: int) -> None:
        self._encoded += n
        self._batches.append((time.time(), n))

    def steady_rows_per_s(self) -> float | None:
        """Rows/s from the first encoded batch to the last: the rate once the pipeline is full
        (Ray Data start-up, actor start and model load excluded)."""
        if len(self._batches) < 2:
            return None
        first, last = min(self._batches), max(self._batches)
        rows = sum(n for _, n in self._batches) - first[1]
        return rows / max(1e-9, last[0] - first[0])

    def progress(self) -> tuple[int, int]:
        return self._encoded, len(self._rejects) + len(self._unreadable)

    def rejects(self) -> tuple[dict[str, list[dict]], dict[str, dict]]:
        by_shard: dict[str, list[dict]] = {}
        for (shard_key, _, _), e in self._rejects.items():
            by_shard.setdefault(shard_key, []).append(e)
        return by_shard, self._unreadable


class _Progress:
    """While a round runs: one progress line and rows / rows_per_s / rejects metrics every `every_s`."""

    def __init__(self, tally, log: RunLog, started: float, rows_before: int, every_s: float):
        self.tally, self.log = tally, log
        self.started, self.rows_before, self.every_s = started, rows_before, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="cache-progress")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        import ray

        while not self.stop.wait(self.every_s):
            try:
                encoded, rejects = ray.get(self.tally.progress.remote(), timeout=10)
                elapsed = time.monotonic() - self.started
                rows = self.rows_before + encoded
                print(f"[cache] encoded {rows} rows, {rows / elapsed:.1f} rows/s, {rejects} rejects "
                      f"({elapsed:.0f} s)", flush=True)
                self.log.metrics({"progress_rows": rows, "progress_rows_per_s": rows / elapsed,
                                  "progress_rejects": rejects}, step=int(elapsed))
            except Exception as e:  # progress is best effort; the round itself reports errors
                print(f"[cache] progress unavailable: {type(e).__name__}: {e}", flush=True)
