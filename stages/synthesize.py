"""`synthesize` stage: teacher-generated training images for prompts that have none.

SwD trains on images the teacher generated (SWD.md section 5), and users usually have prompts, not
images. This stage runs when the data is the user's (`data.train_shards` or `data.prompts` set);
with the generated shapes dataset it is disabled and the cache reads the `shards` stage directly.

Steps:
1. Prompts. Each train shard is judged by its first sample (`shard_kind`, WebDataset's key rule of
   `pipeline.samples`): a `txt` and no image member makes it a prompt-only shard, whose prompts are
   read here with the tolerant tar reader and caption rule every stage shares
   (`pipeline.samples.read_shards`: tar faults, empty and non-UTF-8 captions are counted rejects);
   an image shard passes through unchanged. A shard whose first sample cannot be read is counted
   and reported (its rejects as the cache counts them) and passes through too: the cache reads
   every image shard and judges it with the rest under `cache.max_bad_fraction` (one policy, and
   no guess here at how many samples an unread image shard holds). The stage fails, naming the bad
   shards, only when the bad fraction of the prompt-only shards it reads
   (`pipeline.samples.bad_fraction`) exceeds `max_bad_fraction`. The prompt file `data.prompts` (`.txt`: one
   prompt per line; `.parquet` / `.csv`: the column `data.prompt_column`) adds more. Empty prompts
   of the file are skipped and counted; a prompt longer than the teacher's CLIP token limit is
   truncated by the text encoders (counted, and flagged in its json) or skipped (`long_prompts`).
   No prompt at all is an error.
2. Plan. `images_per_prompt` samples per prompt, each with its own seed derived from
   (`seed`, prompt, image index): the same prompt and seed give the same image wherever it sits.
   Samples go in fixed chunks of `prompts_per_shard` prompts per source; each output shard is
   named by a digest of its samples, the sampler settings and the teacher stage's fingerprint, under
   the stage's shared dir, so a shard that is there is done: a killed run regenerates only the
   missing shards, and adding prompts generates only the new chunks.
3. Generate with Ray Data: the missing samples through `map_batches` with the callable class
   `SynthesizeActor` on an `ActorPoolStrategy` pool (one GPU per actor where the cluster has GPUs);
   each actor loads the teacher once and runs its own sampler (`pipeline.swd.sampler.sample_teacher`:
   Euler on the teacher's shifted grid, classifier-free guidance), one noise tensor per sample.
4. The driver writes each shard (`png`, `txt`, `json` with seed and sampler settings, members of a
   sample contiguous) as soon as all of its samples are back: to a temporary name, then renamed.
5. Output: `shards.json` in the `shards` stage's format (train: the image shards as given, then the
   generated shards; eval unchanged), `synthesize.json` (counts, settings, per-source shards, the
   unreadable shards and the bad fraction), `skipped.jsonl` (skipped prompts and every reject of
   the shards read) and `samples.png`; images/s, rejects and progress go to the stage's MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from pipeline import samples
from pipeline.config import Section
from pipeline.context import StageContext
from pipeline.data import PROMPT_FILE_FORMATS, PromptFileError, open_binary, read_prompt_values
from pipeline.resources import actor_count, actor_device, check_actor_dtype, gpus_per_actor, worker_runtime_env
from pipeline.teacher import TeacherSampler

VERSION = "2"
SECTIONS = ("synthesize", "data", "teacher")
SUMMARY_FILE = "synthesize.json"
SKIPPED_FILE = "skipped.jsonl"
GRID_FILE = "samples.png"
OUTPUTS = ("shards.json", SUMMARY_FILE, SKIPPED_FILE, GRID_FILE)
FORMAT_VERSION = 1  # of the generated shards' members; part of every shard name


class SynthesizeError(ValueError):
    """Prompts that cannot be used: names the source and what was expected."""


class Config(Section):
    # Keys that change how the stage runs, not what it writes: left out of every fingerprint
    # (pipeline/graph.py), so changing one reuses the committed output.
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("num_actors", "num_cpus_per_actor")
    # the sampler's keys were flat keys of this section before the block: fingerprints stay
    FORMER_KEYS: ClassVar[dict[str, dict[str, str]]] = {"teacher_sampler": {"num_steps": "num_steps", "guidance_scale": "guidance_scale"}}

    images_per_prompt: int = Field(1, ge=1)
    # The teacher's sampler for training images (more guidance than for evaluation: sharper targets).
    teacher_sampler: TeacherSampler = TeacherSampler(guidance_scale=4.0)
    image_side_px: int | None = Field(None, ge=16)  # null: the teacher's native resolution
    seed: int = 0
    prompts_per_shard: int = Field(256, ge=1)
    long_prompts: Literal["truncate", "skip"] = "truncate"
    batch_size: int = Field(16, ge=1)  # prompts per sampler call
    # null: one actor per GPU of the Ray cluster (its GPUs / num_gpus_per_actor), 1 on a CPU-only cluster
    num_actors: int | None = Field(None, ge=1)
    num_cpus_per_actor: float = Field(2.0, gt=0)
    num_gpus_per_actor: float | None = Field(None, ge=0)  # null: 1 when the Ray cluster has GPUs
    # Fail the stage when more than this fraction of the prompts read from prompt-only train shards is
    # bad (bad tar member, empty or non-UTF-8 caption), as cache.max_bad_fraction does for the samples
    # it encodes. Below it, each bad shard is counted and reported and the run carries on; a shard that
    # cannot be read at all is reported and left to the cache, which judges it with the image shards.
    max_bad_fraction: float = Field(0.01, ge=0, le=1)


def enabled(cfg) -> bool:
    """Only the user's data can hold prompt-only samples or a prompt file."""
    return cfg.data.train_shards is not None or cfg.data.prompts is not None


def external_fingerprint(sections: dict) -> list | None:
    """A local prompt file's size and mtime join the fingerprint (the shard listing covers the shards)."""
    data = sections["data"]
    if data.prompts is None or "://" in data.prompts:
        return None
    p = Path(os.path.expanduser(data.prompts))
    return [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else [str(p), "missing"]


# ----------------------------------------------------------------------------- stage


def run(ctx: StageContext) -> None:
    from pipeline.data import SHARDS_FILE, shard_urls
    from pipeline.teacher import bundle_location, resolve_pretrained

    cfg: Config = ctx.config
    data, teacher = ctx.sections["data"], ctx.sections["teacher"]
    started = time.monotonic()

    # 1. prompts
    directory = resolve_pretrained(bundle_location(ctx.inputs["teacher"]), teacher.local_files_only)
    limit = TokenLimit(directory)
    listing = json.loads((Path(ctx.inputs["shards"]) / SHARDS_FILE).read_text())
    train_urls = shard_urls(ctx.inputs["shards"], "train")
    passthrough, sources, skipped = [], [], []
    read_rejects: list[dict] = []  # of the train shards: unreadable shards, bad tar members, bad captions
    unreadable: list[str] = []  # not even a first sample could be read: passed on to the cache, which judges it
    shard_prompts = counted = 0  # prompts of the prompt-only shards; prompt-only shards read whole
    for url, entry in zip(train_urls, listing["train"]):
        kind, rejects = shard_kind(url)
        if kind == "prompts":
            prompts, rejects = read_prompt_shard(url)
            if any(e["reason"] == "unreadable_shard" for e in rejects):
                kind = "unreadable"
            else:
                sources.append(PromptSource(url, prompts))
                shard_prompts += len(prompts)
        elif kind == "images":
            passthrough.append({**entry, "url": url})
        read_rejects += rejects
        if kind == "unreadable":
            unreadable.append(url)
            passthrough.append({**entry, "url": url})
        counted += kind == "prompts"
    skipped += [{"source": e["url"], "key": e["key"], "reason": e["reason"], "detail": e["detail"]}
                for e in read_rejects]
    prompt_rejects = [e for e in read_rejects if e["url"] not in unreadable]
    bad_fraction = samples.bad_fraction(shard_prompts, prompt_rejects, counted)
    read_metrics = {"train_shards": len(train_urls), "unreadable_shards": len(unreadable),
                    "rejects": len(read_rejects), "bad_fraction": bad_fraction,
                    **{f"rejects_{r}": n for r, n in samples.by_reason(read_rejects).items()}}
    if read_rejects:
        print(f"[synthesize] {len(read_rejects)} reject(s) in the train shards "
              f"{samples.by_reason(read_rejects)}, {len(unreadable)} unreadable shard(s)"
              + (f" ({', '.join(unreadable[:5])}{', ...' if len(unreadable) > 5 else ''}) passed on to the cache, "
                 f"which judges them under cache.max_bad_fraction" if unreadable else "")
              + f"; bad fraction of the prompt-only shards {bad_fraction:.2%}", flush=True)
    problem = samples.bad_data_problem("synthesize", "prompts read from prompt-only train shards", bad_fraction,
                                       cfg.max_bad_fraction, prompt_rejects, "synthesize.max_bad_fraction")
    if problem:
        ctx.log.metrics(read_metrics)
        raise SynthesizeError(problem)
    if data.prompts is not None:
        sources.append(PromptSource(data.prompts, read_prompt_file(data.prompts, data.prompt_column)))
    for source in sources:
        source.prompts, dropped = check_prompts(source, limit, cfg.long_prompts)
        skipped += dropped
    usable = sum(len(s.prompts) for s in sources)
    if sources and usable == 0:
        raise SynthesizeError(f"synthesize: none of the {len(skipped)} prompt(s) in "
                              f"{', '.join(s.name for s in sources)} is usable (reasons: {_by_reason(skipped)}); "
                              f"see {SKIPPED_FILE}")

    # 2. plan
    gpus = gpus_per_actor(cfg.num_gpus_per_actor, wanted=bool(sources))
    device = actor_device(gpus)
    check_actor_dtype(teacher.dtype, gpus, "synthesize actors", "synthesize.num_gpus_per_actor")
    num_actors = actor_count(cfg.num_actors, gpus)
    native = native_side(directory)
    side_px = cfg.image_side_px or native["image_side_px"]
    check_side(side_px, native)
    teacher_sampler = cfg.teacher_sampler
    sampler = {"num_steps": teacher_sampler.num_steps, "guidance_scale": teacher_sampler.guidance_scale,
               "image_side_px": side_px, "shift": native["shift"],
               "teacher_fingerprint": Path(ctx.inputs["teacher"]).name}
    shared = Path(ctx.shared_dir)
    shards = plan_shards(sources, cfg, sampler, shared)
    missing = [s for s in shards if not s.path.is_file()]
    print(f"[synthesize] {usable} prompt(s) from {len(sources)} source(s), {len(skipped)} skipped; "
          f"{len(shards)} shard(s) of {cfg.images_per_prompt} image(s)/prompt at {side_px} px: "
          f"{len(shards) - len(missing)} done, {len(missing)} to generate; {len(passthrough)} image shard(s) "
          f"pass through; {num_actors} actor(s) x ({cfg.num_cpus_per_actor} CPU, {gpus} GPU) on {device}",
          flush=True)

    # 3-4. generate and write
    spec = None
    if missing:
        from pipeline.generate import GeneratorSpec

        spec = GeneratorSpec(name="teacher", location=str(directory), dtype=teacher.dtype, device=device,
                             load_t5=teacher.load_t5, max_sequence_length=teacher.max_sequence_length,
                             local_files_only=teacher.local_files_only,
                             num_threads=max(1, int(cfg.num_cpus_per_actor)),
                             teacher_num_steps=teacher_sampler.num_steps, guidance_scale=teacher_sampler.guidance_scale,
                             latent_side=side_px // native["vae_scale_factor"])
    generated_s, images = generate_shards(missing, spec, cfg, gpus, num_actors, sampler, ctx.log)
    rate = images / generated_s if images and generated_s > 0 else None  # steady images/s

    # 5. outputs
    entries = [{"url": str(s.path), "size_bytes": s.path.stat().st_size, "samples": len(s.samples),
                "source": s.source} for s in shards]
    (ctx.output_dir / SHARDS_FILE).write_text(json.dumps(
        {"train": passthrough + entries, "eval": [{**e, "url": u} for e, u in
                                                  zip(listing["eval"], shard_urls(ctx.inputs["shards"], "eval"))]},
        indent=1))
    with open(ctx.output_dir / SKIPPED_FILE, "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in skipped)
    truncated = sum(1 for s in sources for p in s.prompts if p.truncated)
    summary = {"sources": [s.name for s in sources], "prompts": usable, "skipped": len(skipped),
               "skipped_by_reason": _by_reason(skipped), "truncated": truncated,
               "images": sum(len(s.samples) for s in shards), "shards": len(shards),
               "shards_generated": len(missing), "shards_reused": len(shards) - len(missing),
               "image_shards_passed_through": len(passthrough), "sampler": sampler,
               "images_per_s": round(rate, 3) if rate else None,
               "train_shards": len(train_urls), "unreadable_shards": unreadable,
               "rejects_by_reason": samples.by_reason(read_rejects), "bad_fraction": round(bad_fraction, 6)}
    (ctx.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    save_sample_grid(ctx.output_dir / GRID_FILE, shards)
    metrics = {k: float(summary[k]) for k in ("prompts", "skipped", "truncated", "images", "shards",
                                              "shards_generated", "shards_reused")}
    metrics.update({k: float(v) for k, v in read_metrics.items()})
    metrics["synthesize_wall_s"] = time.monotonic() - started
    if rate:
        metrics["images_per_s"] = rate
    ctx.log.metrics(metrics)
    ctx.summary.update({k: summary[k] for k in ("prompts", "skipped", "truncated", "images", "shards_generated",
                                                "shards_reused", "bad_fraction")})
    ctx.summary["unreadable_shards"] = len(unreadable)
    print(f"[synthesize] {summary['images']} image(s) in {len(shards)} shard(s) ({len(missing)} generated"
          + (f", {rate:.2f} images/s" if rate else "") + f"); {len(skipped)} prompt(s) skipped "
          f"{summary['skipped_by_reason'] or ''}, {truncated} truncated", flush=True)


def _by_reason(skipped: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in skipped:
        out[s["reason"]] = out.get(s["reason"], 0) + 1
    return out


# ----------------------------------------------------------------------------- step 1: prompts


@dataclass
class Prompt:
    key: str  # the sample key in a prompt-only shard, or the line / row number in a prompt file
    text: str
    truncated: bool = False


@dataclass
class PromptSource:
    name: str  # a shard url or the prompt file
    prompts: list[Prompt]


def shard_kind(url: str) -> tuple[str, list[dict]]:
    """("prompts", []) when a shard's first sample has a caption and no image, ("images", []) when
    not, ("unreadable", rejects) when not even its first sample can be read.

    Streams the shard up to its second sample only (an image shard is the cache's to read, so a
    remote one is not downloaded here), splitting member names by WebDataset's key rule
    (`pipeline.samples.split_member`). When the stream breaks before the first sample is known
    whole, the tolerant reader (`pipeline.samples.scan_tar`) looks at the shard as the cache would:
    its first sample decides; a shard where it finds none is unreadable, and its rejects are the
    reader's (as the cache counts them: bytes that are not a tar are one `corrupt_tar`, a shard that
    cannot be opened one `unreadable_shard`)."""
    members: set[str] = set()
    try:
        with open_binary(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            first = None
            for info in tar:
                split = samples.split_member(info.name)
                if not info.isfile() or split is None:
                    continue
                if first is None:
                    first = split[0]
                if split[0] != first:
                    break
                members.add(split[1])
    except Exception as e:  # tarfile, OSError, EOFError: whatever a stream of bad bytes raises
        unreadable = {"url": url, "key": url, "reason": "unreadable_shard", "detail": f"{type(e).__name__}: {e}"}
        try:
            with samples.local_file(url) as (f, size):
                scan = samples.scan_tar(f, size)
        except Exception:  # cannot even be opened: the stream's error says why
            return "unreadable", [unreadable]
        runs = [r for r in scan.runs if r.members]
        if not runs:
            return "unreadable", samples.judge_runs(scan, url)[1] or [unreadable]
        members = set(runs[0].members)
    has_caption, has_image = samples.CAPTION_EXT in members, bool(members & set(samples.IMAGE_EXTS))
    return ("prompts" if has_caption and not has_image else "images"), []


def read_prompt_shard(url: str) -> tuple[list[Prompt], list[dict]]:
    """The caption of every sample of a prompt-only shard (other members ignored) and the rejects,
    by the reader and caption rule every stage shares (`pipeline.samples.read_shards`): tar faults,
    missing, empty and non-UTF-8 captions are rejects; a shard that cannot be read gives no prompt
    and one `unreadable_shard` reject."""
    reads = samples.read_shards([url], require_image=False)
    return [Prompt(s["key"], s["prompt"]) for s in reads.samples], reads.rejects


def read_prompt_file(spec: str, column: str) -> list[Prompt]:
    """Prompts of `data.prompts` (`pipeline.data.read_prompt_values`: .txt one per line, blank lines count
    as empty prompts, or the `column` of a .parquet / .csv file). Keys are `p<row>` (0-based)."""
    try:
        values = read_prompt_values(spec, column, "data.prompts", "data.prompt_column")
    except PromptFileError as e:
        raise SynthesizeError(str(e)) from None
    prompts = [Prompt(f"p{i:08d}", v) for i, v in enumerate(values)]
    if not any(p.text for p in prompts):
        raise SynthesizeError(f"data.prompts: {spec!r} holds no prompt ({len(prompts)} empty line(s)/row(s)); "
                              f"give a file with one prompt per line, or a {column!r} column")
    return prompts


class TokenLimit:
    """The teacher's CLIP tokenizers: how many tokens a prompt takes, and their limit."""

    def __init__(self, directory: Path):
        from transformers import CLIPTokenizer

        self.tokenizers = [CLIPTokenizer.from_pretrained(directory, subfolder=sub, local_files_only=True)
                           for sub in ("tokenizer", "tokenizer_2") if (directory / sub).is_dir()]
        self.max_tokens = min(t.model_max_length for t in self.tokenizers)

    def tokens(self, text: str) -> int:
        return max(len(t(text, truncation=False)["input_ids"]) for t in self.tokenizers)


def check_prompts(source: PromptSource, limit: TokenLimit, long_prompts: str) -> tuple[list[Prompt], list[dict]]:
    """(usable prompts, skipped entries): empty ones skipped; long ones flagged or skipped."""
    keep, skipped = [], []
    for p in source.prompts:
        if not p.text:
            skipped.append({"source": source.name, "key": p.key, "reason": "empty_prompt"})
            continue
        n = limit.tokens(p.text)
        if n > limit.max_tokens:
            if long_prompts == "skip":
                skipped.append({"source": source.name, "key": p.key, "reason": "too_long",
                                "detail": f"{n} tokens > {limit.max_tokens}"})
                continue
            p.truncated = True  # the text encoders keep the first max_tokens tokens
        keep.append(p)
    return keep, skipped


# ----------------------------------------------------------------------------- step 2: plan


def native_side(directory: Path) -> dict:
    """The teacher's native image side, VAE factor, patch size and sampler shift, from its configs."""
    vae = json.loads((directory / "vae" / "config.json").read_text())
    transformer = json.loads((directory / "transformer" / "config.json").read_text())
    scheduler = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return {"vae_scale_factor": factor, "patch_size": transformer["patch_size"],
            "image_side_px": transformer["sample_size"] * factor, "shift": float(scheduler.get("shift", 1.0))}


def check_side(side_px: int, native: dict) -> None:
    step = native["vae_scale_factor"] * native["patch_size"]
    if side_px % step:
        raise SynthesizeError(f"synthesize.image_side_px: {side_px} is not a multiple of {step} (VAE factor "
                              f"{native['vae_scale_factor']} x patch size {native['patch_size']}); the teacher's "
                              f"native side is {native['image_side_px']}")


def sample_seed(seed: int, prompt: str, image_index: int) -> int:
    digest = hashlib.sha256(json.dumps(["synthesize", seed, prompt, image_index]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class PlannedShard:
    path: Path
    source: str
    samples: list[dict]  # {key, prompt, seed, image_index, truncated}


def plan_shards(sources: list[PromptSource], cfg: Config, sampler: dict, shared: Path) -> list[PlannedShard]:
    shards = []
    for source in sources:
        tag = hashlib.sha256(source.name.encode()).hexdigest()[:8]
        for first in range(0, len(source.prompts), cfg.prompts_per_shard):
            chunk = [{"key": f"{tag}_{p.key}_{j}", "prompt": p.text, "image_index": j,
                      "seed": sample_seed(cfg.seed, p.text, j), "truncated": p.truncated}
                     for p in source.prompts[first:first + cfg.prompts_per_shard]
                     for j in range(cfg.images_per_prompt)]
            name = hashlib.sha256(json.dumps([FORMAT_VERSION, sampler, chunk], sort_keys=True).encode())
            shards.append(PlannedShard(shared / f"synth-{name.hexdigest()[:20]}.tar", source.name, chunk))
    return shards


# ----------------------------------------------------------------------------- steps 3-4: generate and write




class SynthesizeActor:
    """Ray Data callable class: the teacher loaded once; a batch of samples -> PNG images."""

    def __init__(self, spec):
        from pipeline.generate import Generator

        self.generator = Generator(spec)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from pipeline.generate import encode_png

        images = generate_images(self.generator, [str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]])
        return {"shard": batch["shard"], "slot": batch["slot"],
                "png": np.asarray([encode_png(im) for im in images], dtype=object)}


def generate_images(generator, prompts: list[str], seeds: list[int]):
    """uint8 [B, H, W, 3] from the teacher's sampler, each image from the noise of its own seed."""
    import torch

    side = generator.scales[-1]
    channels = int(generator.transformer.config.in_channels)
    noise = torch.stack([torch.randn(channels, side, side, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(generator.bundle.device)
    return generator.decode(generator.sample(generator.encode(prompts), 0, noise=noise))


def generate_shards(missing: list[PlannedShard], spec, cfg: Config, gpus: float, num_actors: int, sampler: dict,
                    log) -> tuple[float, int]:
    """Generate every sample of the missing shards; write each shard once all its samples are back.
    Returns (seconds from the first batch back to the last, images generated in between)."""
    if not missing:
        return 0.0, 0
    import ray

    rows = [{"shard": i, "slot": j, "prompt": s["prompt"], "seed": s["seed"]}
            for i, shard in enumerate(missing) for j, s in enumerate(shard.samples)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // cfg.batch_size)))
    ds = ds.map_batches(SynthesizeActor, batch_size=cfg.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"spec": spec},
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                        num_cpus=cfg.num_cpus_per_actor, num_gpus=gpus, runtime_env=worker_runtime_env())
    pending: dict[int, dict[int, bytes]] = {}
    done = images = 0
    started, arrivals = time.monotonic(), []  # (time, images so far) per batch back
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        now = time.monotonic()
        for shard, slot, png in zip(batch["shard"], batch["slot"], batch["png"]):
            pending.setdefault(int(shard), {})[int(slot)] = png
            images += 1
        for i in [i for i, got in pending.items() if len(got) == len(missing[i].samples)]:
            write_shard(missing[i], pending.pop(i), sampler)
            done += 1
            rate = images / (now - started)  # actor start-up included
            print(f"[synthesize] shard {done}/{len(missing)} written ({images}/{len(rows)} images, "
                  f"{rate:.2f} images/s)", flush=True)
            log.metrics({"shards_written": done, "images_per_s_running": rate}, step=images)
        arrivals.append((now, images))
    if pending:
        raise SynthesizeError(f"synthesize: {len(pending)} shard(s) did not get all their images back from Ray Data")
    # steady state: from the first batch back (actor start-up and model load before it) to the last
    (t0, n0), (t1, n1) = arrivals[0], arrivals[-1]
    return t1 - t0, n1 - n0


def write_shard(shard: PlannedShard, pngs: dict[int, bytes], sampler: dict) -> None:
    import webdataset as wds

    tmp = shard.path.with_name(f".{shard.path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with wds.TarWriter(str(tmp)) as sink:  # each sample's members together, in order
        for slot, sample in enumerate(shard.samples):
            meta = {"seed": sample["seed"], "image_index": sample["image_index"], "source": shard.source,
                    "prompt_truncated": sample["truncated"], "sampler": sampler}
            sink.write({"__key__": sample["key"], "png": pngs[slot], "txt": sample["prompt"],
                        "json": json.dumps(meta).encode()})
    os.replace(tmp, shard.path)


def save_sample_grid(path: Path, shards: list[PlannedShard], count: int = 16) -> None:
    """The first `count` generated images, 8 per row (a blank tile when there are none)."""
    import numpy as np
    from PIL import Image

    images = []
    for shard in shards:
        for sample, _ in samples.iter_shard(str(shard.path)):  # the shared reader and image decoder
            if sample is not None:
                images.append(samples.decode_image(sample["image"]))
            if len(images) >= count:
                break
        if len(images) >= count:
            break
    if not images:
        Image.new("RGB", (64, 64)).save(path)
        return
    side = images[0].shape[0]
    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    canvas = np.zeros((rows * side, cols * side, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] = im
    Image.fromarray(canvas).save(path)


def prompt_file_problems(data) -> list[str]:
    """Config-time checks of a local `data.prompts` (a URI is read by the stage): it exists, its
    format is known and it holds at least one prompt."""
    if data.prompts is None or "://" in data.prompts:
        return []
    path = Path(os.path.expanduser(data.prompts))
    if not path.is_file():
        return [f"data.prompts: {data.prompts!r} does not exist (looked for {path.resolve()}); give a prompt "
                f"file ({', '.join(PROMPT_FILE_FORMATS)})"]
    try:
        read_prompt_file(str(path), data.prompt_column)
    except SynthesizeError as e:
        return [str(e)]
    return []
