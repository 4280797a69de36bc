"""`cache` stage: per-scale teacher latents and text embeddings of the train shards, in Parquet.

Steps (SWD.md section 4, "Training inputs"; DESIGN.md "Data formats"):
1. Key every train shard by content: url, size and mtime, the encoder identity (bundle location and
   a digest of its VAE / text-encoder / tokenizer files, dtype, posterior), the scales and this
   module's format version. A shard whose key is already committed under the stage's shared dir
   is reused as it is, so adding shards encodes only the new ones.
2. Read the new shards with Ray Data, one map task per shard (`read_shard`): the tolerant
   WebDataset tar reader every stage shares (`pipeline.samples.iter_shard`: WebDataset's key rule,
   the caption rule) keeps the image bytes undecoded and turns every tar fault (truncated,
   corrupt, members of a sample not contiguous, unreadable shard) into a counted reject instead of
   an exception. Why not `ray.data.read_webdataset`: in its read task a truncated member raises
   `tarfile.ReadError` and non-contiguous members raise `ValueError`, which fails the whole
   Dataset (`DataContext.max_errored_blocks` would instead drop the whole block, good samples
   included), and a corrupt header mid-file silently ends the shard.
3. Decode on CPU (`map_batches`): image -> upright RGB -> centre-crop to a square
   (`pipeline.samples.square_image`, the image decoder of every stage) ->
   I_i = area(image -> pixels of s[i]), I_im1 = area(I_i -> pixels of s[i-1]) with s[-1] := s[0]
   (`pipeline.swd.inputs.scale_images`). Bytes that are not an image and images smaller than the
   largest scale are rejects; captions were checked by the reader (missing, empty, not UTF-8).
4. Encode (`map_batches` with the callable class `TeacherEncoder` on an `ActorPoolStrategy` pool,
   one GPU per actor where the cluster has GPUs): each actor loads the teacher's VAE and text
   encoders once (`pipeline.teacher.load_bundle`); z_i = (E(I_i) - shift) * scaling, the same for
   z_im1 (posterior mode by default, see `Config.posterior`); prompt_embeds and
   pooled_prompt_embeds from `TeacherBundle.encode_prompt` (== StableDiffusion3Pipeline).
5. `write_parquet` partitioned by shard key into the scratch dir; each shard's directory is then
   moved into the shared dir and committed by its `shard.json` (rows, rejects). Up to
   `max_shards_per_write` shards per Ray Data execution, so a killed run keeps finished rounds.
6. Output: `cache.json` (encoder identity, scales, columns, rows, per-shard parquet dirs, `text`:
   T5 loaded, T5 tokens and the encoder files' digest, which distill checks against its teacher,
   fingerprint) and `rejects.jsonl`; rows/s and rejects by reason go to the stage's MLflow run with
   both files. The stage fails, after committing the shards, when the rejected fraction exceeds
   `max_bad_fraction`.

Reading the cache (the `distill` stage): `read_cache(cache_dir)` -> `ray.data.Dataset`
(`ray.data.read_parquet` over the listed shard dirs); `decode_batch` / `decode_row` turn rows back
into torch tensors (`z` / `z_im1`: one [B, C, s_i, s_i] tensor per scale index i).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline import samples
from pipeline.context import StageContext
from pipeline.latent_cache import (CACHE_FILE, FORMAT_VERSION, encoder_digest, from_numpy, rows_table, tensor_names,
                                   to_numpy, transport_dtype, vae_scale_factor)
from pipeline.samples import REASONS

VERSION = "2"
SECTIONS = ("cache", "swd", "teacher")
REJECTS_FILE = "rejects.jsonl"
OUTPUTS = (CACHE_FILE, REJECTS_FILE)
SHARD_FILE = "shard.json"  # a shard directory counts as committed once this is there
DATA_DIR = "data"  # the Parquet files of one shard: <shared>/<shard key>/data/*.parquet

# Why a sample or a shard was skipped (counted per reason, listed in rejects.jsonl): REASONS, from
# pipeline.samples (the reasons of every stage).


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
    # Keys that change how the stage runs, not what it writes: left out of every fingerprint
    # (pipeline/graph.py), so changing one reuses the committed output.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("num_encoders", "num_cpus_per_encoder", "num_gpus_per_encoder", "num_cpus_per_decoder",
                          "max_shards_per_write", "log_every_s")

    # Encoder actors, each holding the teacher's VAE and text encoders (one GPU each where there are GPUs).
    num_encoders: int = Field(1, ge=1)
    # Images per encoder call (every scale's two latents and the prompt embeddings of these images).
    batch_size: int = Field(32, ge=1)
    num_cpus_per_encoder: float = Field(1.0, gt=0)
    # null: 1 when the Ray cluster has GPUs, else 0. An encoder runs on cuda exactly when it has a
    # GPU; teacher.dtype, teacher.load_t5 and teacher.max_sequence_length decide what it encodes.
    num_gpus_per_encoder: float | None = Field(None, ge=0)
    # CPUs of each read / decode task, and images per decode call.
    num_cpus_per_decoder: float = Field(1.0, gt=0)
    decode_batch_size: int = Field(16, ge=1)
    # Which point of the VAE posterior becomes the latent: "mode" (deterministic: the same image
    # always caches the same latent, reproducible and testable against a direct encode) or
    # "sample" (as diffusers' SD3 training scripts do; one draw frozen in the cache, seeded per
    # key and scale by `seed`).
    posterior: Literal["mode", "sample"] = "mode"
    seed: int = 0
    # dtype of the stored tensors; null: the teacher's dtype (teacher.dtype). bfloat16 is stored as
    # its raw 2-byte pattern.
    storage_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # Fail the stage when rejected samples exceed this fraction of all samples read.
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    # New shards per Ray Data execution; each finished round is committed (a killed run keeps it).
    max_shards_per_write: int = Field(64, ge=1)
    # Seconds between progress lines / MLflow metrics while encoding.
    log_every_s: float = Field(30.0, gt=0)


# ----------------------------------------------------------------------------- stage


def run(ctx: StageContext) -> None:
    import mlflow
    import ray

    from pipeline.data import shard_urls
    from pipeline.teacher import bundle_location, resolve_pretrained, text_settings

    cfg: Config = ctx.config
    teacher = ctx.sections["teacher"]
    scales = list(ctx.sections["swd"].schedule.scales)
    mlc = mlflow.MlflowClient(ctx.tracking_uri)

    location = bundle_location(ctx.inputs["teacher"])
    directory = resolve_pretrained(location, teacher.local_files_only)
    text = text_settings(directory, teacher.load_t5, teacher.max_sequence_length)
    gpus = cfg.num_gpus_per_encoder
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    if teacher.dtype == "float16" and gpus == 0:
        raise ValueError("teacher.dtype 'float16': the cache encoders run on the CPU here (no GPU in the Ray "
                         "cluster, or cache.num_gpus_per_encoder=0), where float16 is not supported; use "
                         "float32 or bfloat16, or give the encoders GPUs")
    spec = EncoderSpec(location=str(directory), dtype=teacher.dtype, device="cuda" if gpus > 0 else "cpu",
                       load_t5=teacher.load_t5, max_sequence_length=text["max_sequence_length"],
                       local_files_only=teacher.local_files_only,
                       posterior=cfg.posterior, seed=cfg.seed, storage_dtype=cfg.storage_dtype or teacher.dtype,
                       scales=scales, vae_scale_factor=vae_scale_factor(directory))
    identity = encoder_identity(directory, spec)
    shared = Path(ctx.shared_dir)

    # the synthesize stage's listing (image shards + generated ones) when it ran, else the shards stage's
    listing_dir = ctx.inputs.get("synthesize") or ctx.inputs["shards"]
    shards = [stat_shard(url) for url in shard_urls(listing_dir, "train")]
    for s in shards:
        if s.error is None:
            s.key = shard_key(s, identity, spec)
    done = {s.key for s in shards if s.key and (shared / s.key / SHARD_FILE).is_file()}
    new = [s for s in shards if s.key and s.key not in done]
    print(f"[cache] {len(shards)} train shard(s): {len(done)} cached, {len(new)} to encode, "
          f"{sum(s.error is not None for s in shards)} unreadable; scales {scales} "
          f"(pixels {[s * spec.vae_scale_factor for s in scales]}), encoders {cfg.num_encoders} x "
          f"({cfg.num_cpus_per_encoder} CPU, {gpus} GPU) on {spec.device}, {spec.dtype}", flush=True)

    started = time.monotonic()
    encoded_rows = 0
    failed: dict[str, dict] = {}  # shard key -> reject entry (unreadable while encoding; not committed)
    steady: list[float] = []
    for first in range(0, len(new), cfg.max_shards_per_write):
        batch = new[first:first + cfg.max_shards_per_write]
        rows, unreadable, rate = encode_shards(batch, spec, cfg, gpus, shared, Path(ctx.scratch_dir),
                                               ctx.tracking_uri, ctx.run_id, started, encoded_rows)
        encoded_rows += rows
        failed.update(unreadable)
        steady += [rate] if rate else []
    encode_s = time.monotonic() - started

    listing, rejects = assemble(shards, done, failed, shared)
    total_rows = sum(e["rows"] for e in listing)
    by_reason = {r: sum(1 for e in rejects if e["reason"] == r) for r in REASONS}
    bad_fraction = samples.bad_fraction(total_rows, rejects, len(listing))

    write_jsonl(ctx.output_dir / REJECTS_FILE, rejects)
    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": identity,
        "scales": scales,
        "vae_scale_factor": spec.vae_scale_factor,
        # what the prompt embeddings are made of: distill refuses a cache whose text differs from its teacher's
        "text": {**text, "encoder_digest": identity["digest"]},
        "pixel_sides": [s * spec.vae_scale_factor for s in scales],
        "columns": tensor_names(len(scales)),
        "tensor_columns": "<name> (bytes, little-endian), <name>_shape (list<int32>), <name>_dtype (string)",
        "num_rows": total_rows,
        "num_rejects": len(rejects),
        "rejects_by_reason": {r: n for r, n in by_reason.items() if n},
        "bad_fraction": round(bad_fraction, 6),
        "shards": listing,
        "fingerprint": hashlib.sha256(json.dumps(sorted(e["shard_key"] for e in listing)).encode()).hexdigest()[:16],
        "stage_fingerprint": ctx.fingerprint,
    }
    (ctx.output_dir / CACHE_FILE).write_text(json.dumps(manifest, indent=1) + "\n")

    reused = sum(e["reused"] for e in listing)
    metrics = {"rows": total_rows, "rejects": len(rejects), "bad_fraction": bad_fraction,
               "shards": len(shards), "shards_encoded": len(listing) - reused, "shards_reused": reused,
               "rows_encoded": encoded_rows, "encode_s": encode_s,
               **{f"rejects_{r}": n for r, n in by_reason.items()}}
    if encoded_rows:
        metrics["rows_per_s"] = encoded_rows / encode_s  # end to end, start-up included
    if steady:
        metrics["rows_per_s_steady"] = min(steady)
    _log_metrics(mlc, ctx.run_id, metrics)
    mlc.log_artifact(ctx.run_id, str(ctx.output_dir / REJECTS_FILE))
    mlc.log_artifact(ctx.run_id, str(ctx.output_dir / CACHE_FILE))
    ctx.summary.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
                        if not k.startswith("rejects_") or v})
    print(f"[cache] {total_rows} rows in {len(listing)} shard(s) ({reused} reused); "
          + (f"encoded {encoded_rows} rows at {encoded_rows / encode_s:.1f} rows/s; " if encoded_rows else "")
          + f"{len(rejects)} rejects" + (f" {manifest['rejects_by_reason']}" if rejects else ""), flush=True)

    if total_rows == 0:
        raise RuntimeError(f"cache: no usable sample in {len(shards)} train shard(s); rejects by reason "
                           f"{manifest['rejects_by_reason']} (rejected keys logged to MLflow as {REJECTS_FILE})")
    if bad_fraction > cfg.max_bad_fraction:
        raise RuntimeError(
            f"cache: {bad_fraction:.2%} of the train samples were rejected, more than cache.max_bad_fraction="
            f"{cfg.max_bad_fraction} ({len(rejects)} rejects: {manifest['rejects_by_reason']}; rejected keys in "
            f"{REJECTS_FILE}, logged to MLflow run {ctx.run_id}). Fix or drop the bad shards, or raise "
            f"cache.max_bad_fraction; encoded shards stay cached and are not encoded again")


def assemble(shards: list["Shard"], reused: set[str], failed: dict[str, dict], shared: Path
             ) -> tuple[list[dict], list[dict]]:
    """The output's shard list (committed shards, reused and new alike, in input order) and every
    reject entry (the shards' own, plus one per shard that could not be read)."""
    listing, rejects = [], []
    for s in shards:
        record_file = shared / s.key / SHARD_FILE if s.key else None
        if record_file is None or s.key in failed or not record_file.is_file():
            rejects.append(failed.get(s.key) or {"url": s.url, "key": s.url, "reason": "unreadable_shard",
                                                 "detail": s.error or "not committed"})
            continue
        record = json.loads(record_file.read_text())
        listing.append({"url": s.url, "shard_key": s.key, "dir": str(shared / s.key / DATA_DIR),
                        "rows": record["rows"], "rejects": len(record["rejects"]), "reused": s.key in reused})
        rejects += record["rejects"]
    return listing, rejects


# ----------------------------------------------------------------------------- shard keys


@dataclass
class EncoderSpec:
    """What the encoder actors need to know, and what decides the bytes they produce."""
    location: str
    dtype: str
    device: str
    load_t5: bool | str
    local_files_only: bool
    posterior: str
    seed: int
    storage_dtype: str
    scales: list[int]
    vae_scale_factor: int
    max_sequence_length: int | None = None  # T5 tokens (pipeline.teacher.text_settings; None: the teacher's)

    @property
    def pixel_sides(self) -> list[int]:
        return [s * self.vae_scale_factor for s in self.scales]


@dataclass
class Shard:
    url: str
    size_bytes: int | None = None
    mtime_ns: int | None = None
    error: str | None = None  # why it could not be looked at
    key: str | None = None


def encoder_identity(directory: str | Path, spec: EncoderSpec) -> dict:
    """Bundle location and a digest of every file the encoders read (the transformer is not one of
    them), plus the settings that change their output."""
    return {"location": str(directory), "digest": encoder_digest(directory),
            "dtype": spec.dtype, "load_t5": spec.load_t5, "max_sequence_length": spec.max_sequence_length,
            "posterior": spec.posterior,
            "seed": spec.seed if spec.posterior == "sample" else None, "storage_dtype": spec.storage_dtype}


def stat_shard(url: str) -> Shard:
    """Size and modification time of a local path or pyarrow-filesystem URI."""
    try:
        if "://" not in url:
            st = os.stat(url)
            return Shard(url, st.st_size, st.st_mtime_ns)
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            return Shard(url, error=f"not a file ({info.type})")
        return Shard(url, info.size, info.mtime_ns)
    except (OSError, ValueError) as e:
        return Shard(url, error=f"{type(e).__name__}: {e}")


def shard_key(shard: Shard, identity: dict, spec: EncoderSpec) -> str:
    payload = {"format": FORMAT_VERSION, "url": shard.url, "size": shard.size_bytes, "mtime_ns": shard.mtime_ns,
               "encoder": identity, "scales": spec.scales, "vae_scale_factor": spec.vae_scale_factor}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- one round of Ray Data


def encode_shards(shards: list[Shard], spec: EncoderSpec, cfg: Config, gpus: float, shared: Path, scratch: Path,
                  tracking_uri: str, run_id: str, started: float, rows_before: int
                  ) -> tuple[int, dict[str, dict], float | None]:
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
        with _Progress(tally, tracking_uri, run_id, started, rows_before, cfg.log_every_s):
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
        n = _commit_shard(s, part, shared, entries)
        rows += n
    shutil.rmtree(out, ignore_errors=True)
    return rows, failed, steady


# Idle OpenMP threads sleep instead of spinning (shared CPUs); no tokenizer thread pools in actors.
ENCODER_ENV = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}}


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
                          num_cpus=cfg.num_cpus_per_encoder, num_gpus=gpus, runtime_env=ENCODER_ENV)


def decode_memory_bytes(spec: EncoderSpec, batch_size: int) -> int:
    """Working set of one decode call: per image, a float32 crop at twice the largest scale's pixel
    size (images are usually larger than the largest scale) and every scale's two float32 images."""
    largest = max(spec.pixel_sides)
    prev = [spec.pixel_sides[max(i - 1, 0)] for i in range(len(spec.scales))]
    per_image = 3 * 4 * ((2 * largest) ** 2 + sum(p * p for p in spec.pixel_sides) + sum(p * p for p in prev))
    return batch_size * per_image + (768 << 20)  # + the worker itself (Python, torch, PIL: ~550 MiB measured)


def _commit_shard(shard: Shard, part: Path, shared: Path, rejects: list[dict]) -> int:
    """Move one shard's Parquet files into `shared/<key>/data/` and write its `shard.json` last."""
    import pyarrow.parquet as pq

    final = shared / shard.key
    if (final / SHARD_FILE).is_file():  # committed meanwhile by a concurrent run: keep that one
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


def _log_metrics(mlc, run_id: str, values: dict, step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlc.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


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

    def __init__(self, tally, tracking_uri: str, run_id: str, started: float, rows_before: int, every_s: float):
        self.tally, self.uri, self.run_id = tally, tracking_uri, run_id
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
        import mlflow
        import ray

        mlc = mlflow.MlflowClient(self.uri)
        while not self.stop.wait(self.every_s):
            try:
                encoded, rejects = ray.get(self.tally.progress.remote(), timeout=10)
                elapsed = time.monotonic() - self.started
                rows = self.rows_before + encoded
                print(f"[cache] encoded {rows} rows, {rows / elapsed:.1f} rows/s, {rejects} rejects "
                      f"({elapsed:.0f} s)", flush=True)
                _log_metrics(mlc, self.run_id, {"progress_rows": rows, "progress_rows_per_s": rows / elapsed,
                                                "progress_rejects": rejects}, step=int(elapsed))
            except Exception as e:  # progress is best effort; the round itself reports errors
                print(f"[cache] progress unavailable: {type(e).__name__}: {e}", flush=True)


# ----------------------------------------------------------------------------- step 2: read

READ_ROWS_PER_BLOCK = 64


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


# ----------------------------------------------------------------------------- step 3: decode and downsample


def image_tensor(data: bytes):
    """Image bytes -> upright (EXIF orientation) RGB, centre-cropped to a square
    (`pipeline.samples.square_image`), as float32 [1, 3, S, S] in [-1, 1] (raises for bytes that
    are not an image)."""
    import numpy as np
    import torch

    image = samples.square_image(data)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)
    return pixels.float() / 127.5 - 1.0


def pixel_columns(num_scales: int) -> list[str]:
    return [f"pixels_{i}" for i in range(num_scales)] + [f"pixels_im1_{i}" for i in range(num_scales)]


def decode_images(batch, spec: EncoderSpec, tally=None) -> dict:
    """Ray Data map_batches (CPU): image bytes -> I_i and I_im1 of every scale (SWD.md section 4).

    I_i = area(image -> pixels of s[i]); I_im1 = area(I_i -> pixels of s[i-1]), s[-1] := s[0]. Pixels
    leave in the encoder's dtype (what the VAE would cast them to anyway)."""
    import numpy as np
    import ray
    import torch

    from pipeline.swd.inputs import scale_images

    n_scales = len(spec.scales)
    largest = max(spec.pixel_sides)
    out: dict[str, list] = {"key": [], "shard_key": [], "prompt": [], **{c: [] for c in pixel_columns(n_scales)}}
    rejects: dict[str, list[dict]] = {}
    rows = batch.to_pylist()
    with torch.no_grad():
        for row in rows:
            try:
                image = image_tensor(row["image"])
            except Exception as e:  # PIL raises many types for bytes that are not an image
                rejects.setdefault(row["shard_key"], []).append(
                    {"url": "", "key": row["key"], "reason": "not_image",
                     "detail": f"{row['image_ext']}: {type(e).__name__}: {e}"[:300]})
                continue
            if image.shape[-1] < largest:
                rejects.setdefault(row["shard_key"], []).append(
                    {"url": "", "key": row["key"], "reason": "too_small",
                     "detail": f"{image.shape[-1]} px square after the centre crop < {largest} px (largest scale)"})
                continue
            for i in range(n_scales):
                image_i, image_im1 = scale_images(image, spec.scales, i, spec.vae_scale_factor)
                out[f"pixels_{i}"].append(to_numpy(image_i[0], spec.dtype))
                out[f"pixels_im1_{i}"].append(to_numpy(image_im1[0], spec.dtype))
            for k in ("key", "shard_key", "prompt"):
                out[k].append(row[k])
    for shard_key, entries in rejects.items():
        if tally is not None:
            ray.get(tally.reject.remote(shard_key, entries))
    dtype = transport_dtype(spec.dtype)
    result = {k: np.array(out[k], dtype=object) for k in ("key", "shard_key", "prompt")}
    for i in range(n_scales):
        prev = spec.pixel_sides[max(i - 1, 0)]
        for name, side in ((f"pixels_{i}", spec.pixel_sides[i]), (f"pixels_im1_{i}", prev)):
            result[name] = np.stack(out[name]) if out[name] else np.zeros((0, 3, side, side), dtype)
    return result


# ----------------------------------------------------------------------------- step 4: encoders


class TeacherEncoder:
    """Encoder actor: loads the teacher's VAE and text encoders once, encodes batches of decoded images."""

    def __init__(self, spec: EncoderSpec, tally=None):
        import torch

        from pipeline.teacher import load_bundle

        self.spec, self.tally = spec, tally
        self.bundle = load_bundle(spec.location, spec.dtype, spec.device, spec.local_files_only, spec.load_t5,
                                  spec.max_sequence_length)
        self.storage = getattr(torch, spec.storage_dtype)

    def __call__(self, batch: dict):
        """A decoded batch (numpy) -> a pyarrow table of cache rows."""
        keys = [str(k) for k in batch["key"]]
        tensors = self.forward(batch) if keys else {}
        if self.tally is not None and keys:
            self.tally.encoded.remote(len(keys))
        return rows_table(keys, [str(p) for p in batch["prompt"]], [str(s) for s in batch["shard_key"]],
                          {k: v.to(self.storage) for k, v in tensors.items()}, tensor_names(len(self.spec.scales)))

    def forward(self, batch: dict) -> dict:
        """The encoders alone: z_i and z_im1_i of every scale i, prompt_embeds, pooled_prompt_embeds."""
        import torch

        keys = [str(k) for k in batch["key"]]
        tensors = {}
        with torch.inference_mode():
            for i in range(len(self.spec.scales)):
                tensors[f"z_{i}"] = self.latents(batch[f"pixels_{i}"], keys, f"z_{i}")
                if self.spec.scales[max(i - 1, 0)] == self.spec.scales[i]:
                    tensors[f"z_im1_{i}"] = tensors[f"z_{i}"]  # I_im1 == I_i: area to the same size is the identity
                else:
                    tensors[f"z_im1_{i}"] = self.latents(batch[f"pixels_im1_{i}"], keys, f"z_im1_{i}")
            prompt_embeds, pooled = self.bundle.encode_prompt([str(p) for p in batch["prompt"]])
        tensors["prompt_embeds"], tensors["pooled_prompt_embeds"] = prompt_embeds, pooled
        return tensors

    def latents(self, pixels, keys: list[str], name: str):
        """(E(pixels) - shift_factor) * scaling_factor, as the SD3 pipelines normalise latents."""
        import torch

        x = from_numpy(pixels, self.spec.dtype)
        if self.spec.posterior == "mode":
            return self.bundle.encode_images(x)  # (latent_dist.mode() - shift) * scaling
        vae = self.bundle.vae
        generators = [torch.Generator(vae.device).manual_seed(_seed(self.spec.seed, key, name)) for key in keys]
        z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.sample(generator=generators)
        return (z - self.bundle.shift_factor) * self.bundle.scaling_factor


def _seed(seed: int, key: str, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------- reading the cache


def write_jsonl(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
