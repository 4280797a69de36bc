"""`cache` stage: per-scale teacher latents and text embeddings of the train shards, in Parquet.

Steps (SWD.md section 4, "Training inputs"; DESIGN.md "Data formats"):
1. Key every train shard by content (stages/cache/shard_keys.py): url, size and mtime, the encoder
   identity (bundle location and a digest of its VAE / text-encoder / tokenizer files, dtype,
   posterior), the scales and the cache format version. A shard whose key is already committed
   under the stage's shared dir is reused as it is, so adding shards encodes only the new ones.
2. Read the new shards with Ray Data, one map task per shard (stages/cache/rounds.py `read_shard`):
   the tolerant WebDataset tar reader every stage shares (`pipeline.samples.iter_shard`:
   WebDataset's key rule, the caption rule) keeps the image bytes undecoded and turns every tar
   fault (truncated, corrupt, members of a sample not contiguous, unreadable shard) into a counted
   reject instead of an exception. Why not `ray.data.read_webdataset`: in its read task a truncated
   member raises `tarfile.ReadError` and non-contiguous members raise `ValueError`, which fails the
   whole Dataset (`DataContext.max_errored_blocks` would instead drop the whole block, good samples
   included), and a corrupt header mid-file silently ends the shard.
3. Decode on CPU (`map_batches`, stages/cache/encoder.py `decode_images`): image -> upright RGB ->
   centre-crop to a square (`pipeline.samples.square_image`, the image decoder of every stage), kept
   as uint8 (3 S^2 bytes a row through the object store). Bytes that are not an image and images
   smaller than the largest scale are rejects; captions were checked by the reader (missing, empty,
   not UTF-8).
4. Encode (`map_batches` with the callable class `TeacherEncoder` on an `ActorPoolStrategy` pool,
   one GPU per actor where the cluster has GPUs): each actor loads the teacher's VAE and text
   encoders once, not its transformer (`pipeline.teacher.load_bundle(components=("vae", "text"))`);
   I_i = area(image -> pixels of s[i]), I_im1 = area(I_i -> pixels of s[i-1]) with s[-1] := s[0]
   (`pipeline.swd.inputs.scale_images`, on the actor's CPU); z_i = (E(I_i) - shift) * scaling, the
   same for z_im1 where s[i-1] != s[i] (elsewhere z_im1_i == z_i, not stored; posterior mode by
   default, see `Config.posterior`); prompt_embeds and pooled_prompt_embeds from
   `TeacherBundle.encode_prompt` (== StableDiffusion3Pipeline), prompt_embeds stored packed: the
   CLIP tokens at their own width, the T5 tokens only when there is a T5 encoder
   (`pipeline.latent_cache.TextLayout`). The prompt "" is encoded once per encoder identity (a Ray
   task with an encoder's resources, text encoders only; kept in the shared dir).
5. `write_parquet` partitioned by shard key into the scratch dir; each shard's directory is then
   moved into the shared dir and committed by its `shard.json` (rows, rejects). Up to
   `max_shards_per_write` shards per Ray Data execution (one round, stages/cache/rounds.py
   `encode_shards`), so a killed run keeps finished rounds.
6. Output: `cache.json` (encoder identity, scales, stored columns and the implied ones, the text
   layout, rows, per-shard parquet dirs, `text`: T5 loaded, T5 tokens and the encoder files' digest,
   which distill checks against its teacher, fingerprint), `uncond.safetensors` (prompt_embeds and
   pooled_prompt_embeds of "", `pipeline.latent_cache.read_uncond`) and `rejects.jsonl`; rows/s and rejects by reason go to the stage's MLflow run (the
   graph logs both files). The stage fails, after committing the shards and logging
   `rejects.jsonl`, when the rejected fraction exceeds `max_bad_fraction` or no sample is usable.

Reading the cache (the `distill` stage): `pipeline.latent_cache.read_cache(cache_dir)` ->
`ray.data.Dataset` (`ray.data.read_parquet` over the listed shard dirs); `decode_batch` /
`decode_row` turn rows back into torch tensors (`z` / `z_im1`: one [B, C, s_i, s_i] tensor per
scale index i, the implied z_im1_i filled from z_i; prompt_embeds as the encoders made it);
`read_uncond(cache_dir)` gives the embedding of "".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from pipeline import samples
from pipeline.config import Section
from pipeline.context import StageContext
from pipeline.latent_cache import CACHE_FILE, FORMAT_VERSION, UNCOND_FILE, implied_columns, stored_columns, \
    vae_scale_factor
from pipeline.resources import actor_device, check_actor_dtype, gpus_per_actor, worker_runtime_env
from pipeline.samples import REASONS
from stages.cache.rounds import encode_shards
from stages.cache.shard_keys import DATA_DIR, SHARD_FILE, EncoderSpec, Shard, encoder_identity, is_committed, \
    shard_key, stat_shard

VERSION = "3"
SECTIONS = ("cache", "swd", "teacher")
# Of swd, the cache depends on the schedule's latent sides only (not the losses, networks or sigmas).
FINGERPRINT_VIEWS = {"swd": lambda swd: {"schedule.scales": list(swd.schedule.scales)}}
REJECTS_FILE = "rejects.jsonl"
OUTPUTS = (CACHE_FILE, REJECTS_FILE, UNCOND_FILE)

# Why a sample or a shard was skipped (counted per reason, listed in rejects.jsonl): REASONS, from
# pipeline.samples (the reasons of every stage).


class Config(Section):
    # Keys that change how the stage runs, not what it writes: left out of every fingerprint
    # (pipeline/graph.py), so changing one reuses the committed output.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("num_encoders", "num_cpus_per_encoder", "num_gpus_per_encoder",
                                                     "num_cpus_per_decoder", "max_shards_per_write", "log_every_s")

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


def run(ctx: StageContext) -> None:
    from pipeline.data import shard_urls
    from pipeline.teacher import bundle_location, resolve_pretrained, text_settings

    cfg: Config = ctx.config
    teacher = ctx.sections["teacher"]
    scales = list(ctx.sections["swd"].schedule.scales)

    location = bundle_location(ctx.inputs["teacher"])
    directory = resolve_pretrained(location, teacher.local_files_only)
    text = text_settings(directory, teacher.load_t5, teacher.max_sequence_length)
    gpus = gpus_per_actor(cfg.num_gpus_per_encoder)
    check_actor_dtype(teacher.dtype, gpus, "cache encoders", "cache.num_gpus_per_encoder")
    spec = EncoderSpec(location=str(directory), dtype=teacher.dtype, device=actor_device(gpus),
                       load_t5=teacher.load_t5, max_sequence_length=text["max_sequence_length"],
                       local_files_only=teacher.local_files_only,
                       posterior=cfg.posterior, seed=cfg.seed, storage_dtype=cfg.storage_dtype or teacher.dtype,
                       scales=scales, vae_scale_factor=vae_scale_factor(directory))
    identity = encoder_identity(directory, spec)
    shared = Path(ctx.shared_dir)

    uncond = write_uncond(spec, identity, cfg, gpus, shared, ctx.output_dir / UNCOND_FILE)

    # step 1: the synthesize stage's listing (image shards + generated ones) when it ran, else the shards stage's
    listing_dir = ctx.inputs.get("synthesize") or ctx.inputs["shards"]
    shards = [stat_shard(url) for url in shard_urls(listing_dir, "train")]
    for s in shards:
        if s.error is None:
            s.key = shard_key(s, identity, spec)
    done = {s.key for s in shards if s.key and is_committed(shared, s.key)}
    new = [s for s in shards if s.key and s.key not in done]
    print(f"[cache] {len(shards)} train shard(s): {len(done)} cached, {len(new)} to encode, "
          f"{sum(s.error is not None for s in shards)} unreadable; scales {scales} "
          f"(pixels {spec.pixel_sides}), encoders {cfg.num_encoders} x "
          f"({cfg.num_cpus_per_encoder} CPU, {gpus} GPU) on {spec.device}, {spec.dtype}", flush=True)

    # steps 2-5, one round of Ray Data per `max_shards_per_write` new shards
    started = time.monotonic()
    encoded_rows = 0
    failed: dict[str, dict] = {}  # shard key -> reject entry (unreadable while encoding; not committed)
    steady: list[float] = []
    for first in range(0, len(new), cfg.max_shards_per_write):
        batch = new[first:first + cfg.max_shards_per_write]
        rows, unreadable, rate = encode_shards(batch, spec, cfg, gpus, shared, Path(ctx.scratch_dir), ctx.log,
                                               started, encoded_rows)
        encoded_rows += rows
        failed.update(unreadable)
        steady += [rate] if rate else []
    encode_s = time.monotonic() - started

    # step 6
    listing, rejects = assemble(shards, done, failed, shared)
    total_rows = sum(e["rows"] for e in listing)
    by_reason = {r: sum(1 for e in rejects if e["reason"] == r) for r in REASONS}
    bad_fraction = samples.bad_fraction(total_rows, rejects, len(listing))

    _write_jsonl(ctx.output_dir / REJECTS_FILE, rejects)
    manifest = {
        "format_version": FORMAT_VERSION,
        "encoder": identity,
        "scales": scales,
        "vae_scale_factor": spec.vae_scale_factor,
        # what the prompt embeddings are made of: distill refuses a cache whose text differs from its teacher's
        "text": {**text, "encoder_digest": identity["digest"]},
        "pixel_sides": spec.pixel_sides,
        "columns": stored_columns(scales),
        "tensor_columns": "<name> (bytes, little-endian), <name>_shape (list<int32>), <name>_dtype (string)",
        # not stored: equal to their source (I_im1 == I_i where s[i-1] == s[i]); decode_batch fills them
        "implied_columns": implied_columns(scales),
        # prompt_embeds stored packed: the CLIP block [clip_tokens, clip_width], then the T5 block
        # [t5_tokens, width] only when t5; _shape [clip_tokens + t5_tokens, width, clip_tokens, clip_width]
        "text_layout": uncond["text_layout"],
        "uncond": {k: v for k, v in uncond.items() if k != "text_layout"},
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
    ctx.log.metrics(metrics)
    ctx.summary.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
                        if not k.startswith("rejects_") or v})
    print(f"[cache] {total_rows} rows in {len(listing)} shard(s) ({reused} reused); "
          + (f"encoded {encoded_rows} rows at {encoded_rows / encode_s:.1f} rows/s; " if encoded_rows else "")
          + f"{len(rejects)} rejects" + (f" {manifest['rejects_by_reason']}" if rejects else ""), flush=True)

    if total_rows == 0 or bad_fraction > cfg.max_bad_fraction:
        # a failed stage commits nothing and the graph logs no outputs: the rejected keys go to MLflow here
        ctx.log.artifact(ctx.output_dir / REJECTS_FILE)
    if total_rows == 0:
        raise RuntimeError(f"cache: no usable sample in {len(shards)} train shard(s); rejects by reason "
                           f"{manifest['rejects_by_reason']} (rejected keys logged to MLflow as {REJECTS_FILE})")
    if bad_fraction > cfg.max_bad_fraction:
        raise RuntimeError(
            f"cache: {bad_fraction:.2%} of the train samples were rejected, more than cache.max_bad_fraction="
            f"{cfg.max_bad_fraction} ({len(rejects)} rejects: {manifest['rejects_by_reason']}; rejected keys in "
            f"{REJECTS_FILE}, logged to MLflow run {ctx.run_id}). Fix or drop the bad shards, or raise "
            f"cache.max_bad_fraction; encoded shards stay cached and are not encoded again")


def assemble(shards: list[Shard], reused: set[str], failed: dict[str, dict], shared: Path
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


def write_uncond(spec: EncoderSpec, identity: dict, cfg: Config, gpus: float, shared: Path, out: Path) -> dict:
    """The prompt "" encoded once per encoder identity (a Ray task with an encoder's resources, text
    encoders only), kept as `<shared>/uncond-<digest>.safetensors` and copied to `out`. Returns the
    manifest's record of it (file, dtype, shapes) with the text layout."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    text_identity = {k: identity[k] for k in ("location", "digest", "dtype", "load_t5", "max_sequence_length")}
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, text_identity], sort_keys=True).encode()).hexdigest()[:16]
    kept = shared / f"uncond-{digest}.safetensors"
    if not kept.is_file():
        import ray

        from stages.cache.encoder import encode_uncond

        task = ray.remote(num_cpus=cfg.num_cpus_per_encoder, num_gpus=gpus, runtime_env=worker_runtime_env())
        result = ray.get(task(encode_uncond).remote(spec))
        shared.mkdir(parents=True, exist_ok=True)
        tmp = shared / f".tmp-uncond-{digest}-{uuid.uuid4().hex[:8]}"
        save_file({k: result[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}, str(tmp),
                  metadata={"prompt": "", "text_layout": json.dumps(result["text_layout"], sort_keys=True)})
        os.replace(tmp, kept)
    shutil.copyfile(kept, out)
    with safe_open(str(out), "pt") as f:
        layout = json.loads(f.metadata()["text_layout"])
    tensors = load_file(str(out))
    return {"file": UNCOND_FILE, "prompt": "", "dtype": str(tensors["prompt_embeds"].dtype).removeprefix("torch."),
            **{f"{k}_shape": list(v.shape) for k, v in tensors.items()}, "text_layout": layout}


# ----------------------------------------------------------------------------- private helpers


def _write_jsonl(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
