"""`teacher` stage: the frozen teacher every later stage distils from.

Steps:
1. If `teacher.pretrained` is set (a local diffusers directory or a hub id), check that it is an
   SD3-family diffusers pipeline (model_index.json naming StableDiffusion3Pipeline, an
   SD3Transformer2DModel, an AutoencoderKL) and record where it lives in `teacher.json`; nothing
   is trained. A local directory's file sizes and modification times join the fingerprint.
2. Otherwise train the embedded tiny bundle (`pipeline/tiny.py`) on the train shards, in one Ray
   task on the CPU:
   a. decode the train shards into memory (uint8 images, prompts) with the tolerant tar reader,
      key rule, caption rule and image decoder every stage shares (`pipeline.samples`: upright
      RGB, centre crop, bicubic resize); bad shards and samples are counted (MLflow `train_*`,
      teacher.json) and fail the stage, naming the shards, only above
      `pipeline.samples.DEFAULT_MAX_BAD_FRACTION` of the samples (the same 1% as
      `cache.max_bad_fraction`'s default);
   b. VAE: reconstruction MSE + per-dimension KL; then measure the latents' mean and std and
      store them as the VAE's `shift_factor` / `1 / scaling_factor` (as SD3 does);
   c. encode every image once per training side (posterior mean and std; a fresh posterior
      sample per step); smaller sides (`multires_latent_sides`) from area-downsampled pixels, as
      the cache stage makes them, so the teacher also works at SwD's small scales;
   d. transformer + both CLIP text encoders jointly, rectified flow (SWD.md section 2):
      x_sigma = (1 - sigma) x0 + sigma eps, velocity target eps - x0, sigma logit-normal,
      `prompt_dropout` of the prompts replaced by "" so classifier-free guidance works, EMA of
      the weights (the EMA weights are what gets saved); a `multires_fraction` of the steps train
      at a smaller side drawn from `multires_latent_sides` (a scale-wise student asks the teacher
      for scores at every scale: SD3.5 is trained at several resolutions, the tiny teacher must be too);
   e. save the bundle with `save_pretrained` (diffusers layout, safetensors) into `bundle/`.
   Progress and a resumable checkpoint (safetensors) go to the scratch dir every
   `checkpoint_every_steps`; a killed run resumes from the last one (the finished VAE is kept
   too). Random draws are seeded per step, so a resumed run equals a straight one. The task runs
   with OMP_WAIT_POLICY=PASSIVE: with spinning OpenMP threads a training step was ~5x slower
   whenever other work shared the two cores.
3. Sample grid (`grid_prompts` eval prompts x `grid_samples_per_prompt`, `sample_num_steps` Euler
   steps, CFG `sample_guidance_scale`) with the stock StableDiffusion3Pipeline, oracle scores of
   `eval_num_prompts` eval samples; both logged to MLflow with the loss curves.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.context import StageContext
from pipeline.samples import (DEFAULT_MAX_BAD_FRACTION, bad_data_problem, by_reason, decode_image,
                              read_shards)

VERSION = "2"
SECTIONS = ("teacher",)
TEACHER_FILE = "teacher.json"
BUNDLE_DIR = "bundle"
GRID_FILE = "samples.png"
# bundle/ and samples.png exist only when the stage trains; teacher.json is always written.
OUTPUTS = (TEACHER_FILE,)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)
    # What a pretrained teacher's fingerprint holds; the training knobs below count only when the stage
    # trains (pretrained null). Never in a fingerprint: CPUs and logging / checkpoint cadence.
    PRETRAINED_KEYS: ClassVar[tuple[str, ...]] = ("pretrained", "local_files_only", "load_t5", "max_sequence_length",
                                                  "dtype")
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("num_cpus", "log_every_steps", "checkpoint_every_steps")

    # Where the teacher lives: a local diffusers directory of an SD3/SD3.5 pipeline (relative paths
    # are relative to the repository root) or a hub id. null: train the embedded tiny teacher.
    pretrained: str | None = None
    local_files_only: bool = True  # never reach the hub when loading a hub id
    # SD3's T5 encoder: true requires one (a teacher without text_encoder_3/ is an error), auto loads it
    # when the teacher has one, false leaves the slot empty (zero T5 embeddings; saves memory).
    load_t5: bool | Literal["auto"] = "auto"
    # T5 tokens of every prompt embedding; null: the T5 tokenizer's model_max_length (the released
    # recipe pads to it), or, for a teacher without T5, the bundle's own value (tiny: 0), else 256.
    # The cache records it; distill refuses a cache made with another.
    max_sequence_length: int | None = Field(None, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    # ---- training the embedded tiny teacher (only when pretrained is null). The defaults are the
    # pipeline.yaml budget (under 8 minutes on an idle 2-core CPU); assets/tiny-teacher used
    # vae_num_steps=500, num_steps=1500 (assets/README.md).
    seed: int = 0
    # Continue training from a trained tiny bundle directory (its VAE kept as it is) instead of from
    # random weights; how assets/tiny-teacher got its multi-resolution phase. null: from scratch.
    init_bundle: str | None = None
    num_cpus: int = Field(2, ge=1)  # CPUs of the Ray task that trains
    time_limit_s: float | None = Field(None, gt=0)  # stop each training phase early past this wall time (null: steps only)
    vae_num_steps: int = Field(200, ge=1)
    vae_batch_size: int = Field(32, ge=1)
    vae_lr: float = Field(2e-3, gt=0)
    vae_kl_weight: float = Field(1e-4, ge=0)
    num_steps: int = Field(500, ge=1)  # transformer steps
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    prompt_dropout: float = Field(0.1, ge=0, lt=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    # Multi-resolution flow training: this fraction of the steps uses a latent side drawn uniformly
    # from multires_latent_sides (smaller than the native 16, multiples of patch_size); [] or 0: none.
    multires_latent_sides: list[int] = [8, 10, 12]
    multires_fraction: float = Field(0.5, ge=0, lt=1)
    patch_size: int = 2
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    head_dim: int = Field(32, ge=8)
    log_every_steps: int = Field(50, ge=1)
    checkpoint_every_steps: int = Field(250, ge=1)
    # ---- samples and oracle scores logged after training
    sample_num_steps: int = Field(28, ge=1)
    sample_guidance_scale: float = Field(3.0, ge=1)
    grid_prompts: int = Field(8, ge=0)
    grid_samples_per_prompt: int = Field(4, ge=1)
    eval_num_prompts: int = Field(64, ge=0)  # 0: no oracle scores

    def fingerprint_dump(self) -> dict:
        """The keys that change this section's results (pipeline/graph.py: section_fingerprint)."""
        dump = self.model_dump(mode="json")
        keep = self.PRETRAINED_KEYS if self.pretrained is not None else [k for k in dump if k not in self.NOT_IN_FINGERPRINT]
        return {k: dump[k] for k in keep}

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: int) -> int:
        if v not in (1, 2, 4):
            raise ValueError(f"teacher.patch_size {v} is not supported; valid: 1, 2, 4 (16x16 latents)")
        return v

    @model_validator(mode="after")
    def _multires(self) -> "Config":
        bad = [s for s in self.multires_latent_sides if not 0 < s < 16 or s % self.patch_size]
        if bad:
            raise ValueError(f"teacher.multires_latent_sides: {bad} invalid: each side must be below the native 16 "
                             f"and a multiple of teacher.patch_size ({self.patch_size})")
        return self


def external_fingerprint(sections: dict) -> list | None:
    """A local pretrained directory's files (path, size, mtime) join the fingerprint."""
    from pipeline.teacher import directory_digest, resolve_pretrained

    cfg: Config = sections["teacher"]
    if cfg.pretrained is None:
        init = Path(os.path.expanduser(cfg.init_bundle)) if cfg.init_bundle else None
        return [str(init), directory_digest(init)] if init and init.is_dir() else None
    directory = resolve_pretrained(cfg.pretrained, cfg.local_files_only)
    return [str(directory), directory_digest(directory)]


def run(ctx: StageContext) -> None:
    import mlflow

    from pipeline.data import shard_urls
    from pipeline.teacher import resolve_pretrained

    cfg: Config = ctx.config
    mlc = mlflow.MlflowClient(ctx.tracking_uri)
    if cfg.pretrained is not None:
        directory = resolve_pretrained(cfg.pretrained, cfg.local_files_only)  # TeacherError if not SD3
        record = {"source": "pretrained", "location": str(directory), "pretrained": cfg.pretrained}
        (ctx.output_dir / TEACHER_FILE).write_text(json.dumps(record, indent=1) + "\n")
        mlc.set_tag(ctx.run_id, "teacher.source", "pretrained")
        mlc.set_tag(ctx.run_id, "teacher.location", str(directory))
        ctx.summary.update(source="pretrained", location=str(directory))
        print(f"[teacher] pretrained teacher at {directory}; nothing to train", flush=True)
        return

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The task writes into this node's output dir, so it runs on this node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # Passive OpenMP waits: spinning threads slow training ~5x when the cores are shared (measured).
    task = ray.remote(num_cpus=cfg.num_cpus, scheduling_strategy=here,
                      runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})(_train)
    result = ray.get(task.remote(cfg.model_dump(), shard_urls(ctx.inputs["shards"], "train"),
                                 shard_urls(ctx.inputs["shards"], "eval"), str(ctx.output_dir),
                                 str(ctx.scratch_dir), ctx.tracking_uri, ctx.run_id))
    record = {"source": "trained", "location": BUNDLE_DIR, **result}
    (ctx.output_dir / TEACHER_FILE).write_text(json.dumps(record, indent=1) + "\n")
    mlc.set_tag(ctx.run_id, "teacher.source", "trained")
    if (ctx.output_dir / GRID_FILE).is_file():
        mlc.log_artifact(ctx.run_id, str(ctx.output_dir / GRID_FILE))
    mlc.log_artifact(ctx.run_id, str(ctx.output_dir / TEACHER_FILE))
    ctx.summary.update(source="trained", **{k: v for k, v in result.items() if not isinstance(v, (dict, list))},
                       **{f"oracle_{k}": v for k, v in result.get("oracle", {}).items()})


# ----------------------------------------------------------------------------- training (in a Ray task)


def _train(cfg_dict: dict, train_urls: list[str], eval_urls: list[str], output_dir: str, scratch_dir: str,
           tracking_uri: str, run_id: str) -> dict:
    import torch

    from pipeline import tiny

    cfg = Config.model_validate(cfg_dict)
    torch.set_num_threads(cfg.num_cpus)
    scratch = Path(scratch_dir)
    log = _Logger(tracking_uri, run_id, scratch / "logged.json")
    started = time.monotonic()

    images, prompts, _, reads = _read_shards(train_urls, tiny.PIXEL_SIDE)
    log.metrics(reads.metrics("train_"), 0)
    print(f"[teacher] {len(prompts)} train samples from {len(train_urls)} shard(s)"
          + (f"; {len(reads.rejects)} reject(s) {by_reason(reads.rejects)}, {len(reads.unreadable)} unreadable "
             f"shard(s)" if reads.rejects else ""), flush=True)
    if cfg.init_bundle:  # continue from a trained tiny bundle: its VAE (and latent statistics) as they are
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(cfg.init_bundle, use_safetensors=True, local_files_only=True,
                                                        text_encoder_3=None, tokenizer_3=None)
        for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(True)
        vae_stats = {"steps": 0, "psnr_db": None}
        mean, std = _encode_all(pipe.vae, images)
        shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    else:
        pipe = tiny.build_pipeline(seed=cfg.seed, patch_size=cfg.patch_size, num_layers=cfg.num_layers,
                                   num_heads=cfg.num_heads, head_dim=cfg.head_dim)
        vae_stats = _train_vae(pipe.vae, images, cfg, scratch, log)
        mean, std = _encode_all(pipe.vae, images)
        shift = float(mean.mean())
        scale = float(1.0 / ((mean - shift).pow(2).mean() + std.pow(2).mean()).sqrt())  # std of posterior samples
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    pipe.set_progress_bar_config(disable=True)
    log.params({"vae_shift_factor": shift, "vae_scaling_factor": scale})

    sides = {int(mean.shape[-1]): (mean, std)}
    if cfg.multires_fraction > 0:
        for side in sorted(set(cfg.multires_latent_sides)):
            sides[side] = _encode_all(pipe.vae, _downsample(images, side * tiny.PIXEL_SIDE // int(mean.shape[-1])))
    flow_stats = _train_flow(pipe, sides, prompts, cfg, scratch, log)
    info = {"max_sequence_length": 0, "guidance_scale": cfg.sample_guidance_scale, "seed": cfg.seed,
            "init_bundle": cfg.init_bundle,
            "vae_num_steps": vae_stats["steps"], "num_steps": flow_stats["steps"], "train_samples": len(prompts)}
    tiny.save_bundle(pipe, Path(output_dir) / BUNDLE_DIR, info)
    train_s = time.monotonic() - started

    result: dict = {"train_s": round(train_s, 1), "vae_psnr_db": vae_stats["psnr_db"],
                    "vae_steps": vae_stats["steps"], "steps": flow_stats["steps"],
                    "final_loss": flow_stats["loss"], "vae_shift_factor": shift, "vae_scaling_factor": scale,
                    "train_rejects": len(reads.rejects), "train_unreadable_shards": len(reads.unreadable),
                    "train_bad_fraction": round(reads.bad_fraction, 6),
                    "train_rejects_by_reason": by_reason(reads.rejects),
                    "bad_train_shards": sorted({e["url"] for e in reads.rejects})}
    _, eval_prompts, eval_attrs, _ = _read_shards(eval_urls, tiny.PIXEL_SIDE, decode_images=False, split="eval")
    result.update(_samples(pipe, eval_prompts, eval_attrs, cfg, Path(output_dir), log))
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def _read_shards(urls: list[str], side: int, decode_images: bool = True, split: str = "train",
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
    """Every sample of the shards, by the reader every stage shares (`pipeline.samples.read_shards`):
    uint8 images [N, 3, side, side] (upright, centre-cropped, resized; None without
    `decode_images`), prompts, json attributes (or None), and what was read (`ShardReads`).
    Raises, naming the bad shards, when more than `max_bad_fraction` of the samples is bad."""
    import numpy as np
    import torch

    reads = read_shards(urls, members=("json",), decode=(lambda data: decode_image(data, side)) if decode_images
                        else None)
    problem = bad_data_problem("teacher", f"{split} samples", reads.bad_fraction, max_bad_fraction, reads.rejects,
                               None, fix=" (the teacher stage has no setting for it; the limit is the default of "
                                         "cache.max_bad_fraction)")
    if problem:
        raise ValueError(problem)
    if not reads.samples:
        raise ValueError(f"no samples in shards {urls[:3]}")
    prompts = [s["prompt"] for s in reads.samples]
    attrs = [json.loads(s["json"]) if s["json"] is not None else None for s in reads.samples]
    tensor = None
    if decode_images:
        tensor = torch.from_numpy(np.stack([s["pixels"] for s in reads.samples])).permute(0, 3, 1, 2).contiguous()
    return tensor, prompts, attrs, reads


def _pixels(images_uint8):
    return images_uint8.float() / 127.5 - 1.0


def _lr_at(step: int, cfg_lr: float, warmup: int) -> float:
    return cfg_lr * min(1.0, (step + 1) / max(1, warmup))


def _train_vae(vae, images, cfg: Config, scratch: Path, log: "_Logger") -> dict:
    """Step 2b: reconstruction MSE + kl_weight * KL per latent dimension."""
    import torch
    from safetensors.torch import load_file

    done = scratch / "vae.safetensors"
    if done.is_file():
        vae.load_state_dict(load_file(done))
        stats = json.loads((scratch / "vae.json").read_text())
        print(f"[teacher] VAE from checkpoint ({stats['steps']} steps)", flush=True)
        return stats
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    warmup = min(cfg.warmup_steps, cfg.vae_num_steps // 4)
    vae.train().to(memory_format=torch.channels_last)  # ~1.3x faster convolutions on the CPU
    start, mse_sum, n, step = time.monotonic(), 0.0, 0, 0
    for step in range(cfg.vae_num_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.vae_lr, warmup)
        x = _pixels(images[torch.randint(len(images), (cfg.vae_batch_size,), generator=gen)])
        x = x.contiguous(memory_format=torch.channels_last)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        mse_sum, n = mse_sum + float(mse.detach()), n + 1
        last = step + 1 == cfg.vae_num_steps or _over_time(start, cfg)
        if (step + 1) % cfg.log_every_steps == 0 or last:
            elapsed = time.monotonic() - start
            log.progress("vae", step + 1, cfg.vae_num_steps, elapsed, cfg.vae_batch_size,
                         {"vae_mse": mse_sum / n, "vae_kl": float(kl.detach())})
            mse_sum, n = 0.0, 0
        if last:
            break
    vae.eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():  # PSNR on a fixed subset, posterior mode
        x = _pixels(images[:256])
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4.0 / torch.nn.functional.mse_loss(recon, x)))
    log.metrics({"vae_psnr_db": psnr}, step + 1)
    stats = {"steps": step + 1, "psnr_db": round(psnr, 2)}
    _save_tensors(done, {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()})
    (scratch / "vae.json").write_text(json.dumps(stats))
    return stats


def _downsample(images_uint8, side_px: int):
    """Area downsampling in pixel space, as the cache stage does (`pipeline.swd.inputs.area_downsample`)."""
    import torch

    from pipeline.swd.inputs import area_downsample

    out = [area_downsample(images_uint8[i:i + 512].float(), side_px) for i in range(0, len(images_uint8), 512)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def _encode_all(vae, images, batch: int = 256):
    """Step 2c: posterior mean and std of every image (a fresh sample is drawn per training step)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            dist = vae.encode(_pixels(images[i:i + batch])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _train_flow(pipe, sides: dict, prompts: list[str], cfg: Config, scratch: Path, log: "_Logger") -> dict:
    """Step 2d: rectified flow on the normalised latents, text encoders trained jointly, EMA.
    `sides`: latent side -> (posterior mean, std) of every image; the first is the native side."""
    import torch

    modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2}
    params = [p for m in modules.values() for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    first = _load_checkpoint(scratch / "flow.safetensors", modules, ema, opt)
    gen = torch.Generator()
    for m in modules.values():
        m.train()
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    native, *smaller = list(sides)
    start, loss_sum, n, step, last_loss = time.monotonic(), 0.0, 0, first - 1, float("nan")
    for step in range(first, cfg.num_steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg.lr, cfg.warmup_steps)
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # per-step draws: a resumed run equals a straight one
        idx = torch.randint(len(prompts), (cfg.batch_size,), generator=gen)
        side = native
        if smaller and float(torch.rand((), generator=gen)) < cfg.multires_fraction:
            side = smaller[int(torch.randint(len(smaller), (), generator=gen))]
        mean, std = sides[side]
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        x0 = (z - shift) * scale
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.prompt_dropout
        batch_prompts = ["" if d else prompts[i] for i, d in zip(idx.tolist(), drop.tolist())]
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(prompt=batch_prompts, prompt_2=None, prompt_3=None,
                                                         device="cpu", do_classifier_free_guidance=False,
                                                         max_sequence_length=0)
        sigma = torch.sigmoid(torch.randn(cfg.batch_size, generator=gen))  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps  # SWD.md section 2
        v = pipe.transformer(hidden_states=x_sigma, encoder_hidden_states=prompt_embeds,
                             pooled_projections=pooled, timestep=1000 * sigma, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, eps - x0)  # velocity target
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights fade fast
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        loss_sum, n, last_loss = loss_sum + float(loss), n + 1, float(loss)
        last = step + 1 == cfg.num_steps or _over_time(start, cfg)
        if (step + 1) % cfg.log_every_steps == 0 or last:
            log.progress("transformer", step + 1, cfg.num_steps, time.monotonic() - start, cfg.batch_size,
                         {"loss": loss_sum / n}, steps_done_before=first)
            loss_sum, n = 0.0, 0
        if (step + 1) % cfg.checkpoint_every_steps == 0 or last:  # the last one lets a longer run continue
            _save_checkpoint(scratch / "flow.safetensors", modules, ema, opt, step + 1)
        if last:
            break
    with torch.no_grad():  # the EMA weights are the teacher
        for p, e in zip(params, ema):
            p.copy_(e)
    for m in modules.values():
        m.eval().requires_grad_(False)
    return {"steps": step + 1, "loss": round(last_loss, 5)}


def _samples(pipe, prompts: list[str], attrs: list, cfg: Config, output_dir: Path, log: "_Logger") -> dict:
    """Step 3: the sample grid and the oracle scores, stock StableDiffusion3Pipeline, 28 steps + CFG."""
    import numpy as np
    from PIL import Image

    from pipeline import oracle

    out: dict = {}
    unique = list(dict.fromkeys(prompts))
    if cfg.grid_prompts:
        rows = unique[:cfg.grid_prompts]
        images = _generate(pipe, [p for p in rows for _ in range(cfg.grid_samples_per_prompt)], cfg)
        side = images.shape[1]
        grid = images.reshape(len(rows), cfg.grid_samples_per_prompt, side, side, 3)
        grid = grid.transpose(0, 2, 1, 3, 4).reshape(len(rows) * side, cfg.grid_samples_per_prompt * side, 3)
        Image.fromarray((grid * 255 + 0.5).clip(0, 255).astype(np.uint8)).save(output_dir / GRID_FILE)
        (output_dir / "samples.txt").write_text("\n".join(rows) + "\n")
    scored = [(p, a) for p, a in zip(prompts, attrs) if a is not None][:cfg.eval_num_prompts]
    if scored:
        started = time.monotonic()
        images = _generate(pipe, [p for p, _ in scored], cfg)
        per_image_s = (time.monotonic() - started) / len(scored)
        scores = oracle.score(list(images), [a for _, a in scored])
        log.metrics({f"oracle_{k}": v for k, v in scores.items()} | {"sample_s_per_image": per_image_s}, 0)
        out["oracle"] = {k: round(v, 4) for k, v in scores.items()}
        out["oracle_num_prompts"] = len(scored)
        print(f"[teacher] oracle on {len(scored)} eval prompts ({cfg.sample_num_steps} steps, CFG "
              f"{cfg.sample_guidance_scale}): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    return out


def _generate(pipe, prompts: list[str], cfg: Config, batch: int = 32):
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    chunks = []
    for i in range(0, len(prompts), batch):
        result = pipe(prompt=prompts[i:i + batch], num_inference_steps=cfg.sample_num_steps,
                      guidance_scale=cfg.sample_guidance_scale, max_sequence_length=0, generator=gen,
                      output_type="np")
        chunks.append(result.images)
    return np.concatenate(chunks)


def _over_time(start: float, cfg: Config) -> bool:
    return cfg.time_limit_s is not None and time.monotonic() - start > cfg.time_limit_s


# ----------------------------------------------------------------------------- checkpoints (safetensors)


def _save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _save_checkpoint(path: Path, modules: dict, ema: list, opt, step: int) -> None:
    tensors = {f"{name}.{k}": v.detach().clone().contiguous()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    tensors.update({f"ema.{i}": e.contiguous() for i, e in enumerate(ema)})
    state = opt.state_dict()
    for i, entry in state["state"].items():
        tensors.update({f"opt.{i}.{k}": v.clone().contiguous() for k, v in entry.items()})
    _save_tensors(path, tensors, {"step": str(step), "param_groups": json.dumps(state["param_groups"])})


def _load_checkpoint(path: Path, modules: dict, ema: list, opt) -> int:
    """Restore a checkpoint if there is one; the step to continue from (0 without one)."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    for i, e in enumerate(ema):
        e.copy_(tensors[f"ema.{i}"])
    state: dict = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state["state"].setdefault(int(i), {})[k] = value
    opt.load_state_dict(state)
    print(f"[teacher] resumed transformer training at step {meta['step']}", flush=True)
    return int(meta["step"])


class _Logger:
    """MLflow metrics of the stage's run, from inside the Ray task; one progress line per log.

    Remembers the last step logged per phase in the scratch dir, so a resumed run never logs a
    step twice.
    """

    def __init__(self, tracking_uri: str, run_id: str, state_file: Path):
        import mlflow

        self.client, self.run_id, self.state_file = mlflow.MlflowClient(tracking_uri), run_id, state_file
        self.logged = json.loads(state_file.read_text()) if state_file.is_file() else {}

    def progress(self, phase: str, step: int, total: int, elapsed_s: float, batch: int, values: dict,
                 steps_done_before: int = 0) -> None:
        per_step = elapsed_s / max(1, step - steps_done_before)
        left = per_step * (total - step)
        print(f"[teacher] {phase} {step}/{total} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
              + f" {batch / per_step:.0f} img/s, {left / 60:.1f} min left", flush=True)
        if step > self.logged.get(phase, 0):
            self.metrics({**values, f"{phase}_images_per_s": batch / per_step}, step)
            self.logged[phase] = step
            self.state_file.write_text(json.dumps(self.logged))

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def params(self, values: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])
