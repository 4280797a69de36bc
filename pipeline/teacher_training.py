"""Training the embedded tiny teacher (`pipeline/tiny.py`) on WebDataset shards, on the CPU.

`train(cfg, train_urls, eval_urls, output_dir, scratch_dir, tracking_uri, run_id)` runs, in this
process (the `teacher` stage runs it in a Ray task, `scripts/train_tiny_teacher.py` directly):
1. decode the train shards into memory (uint8 images, prompts) with the tolerant tar reader, key
   rule, caption rule and image decoder every stage shares (`pipeline.samples`: upright RGB, centre
   crop, bicubic resize); bad shards and samples are counted (MLflow `train_*`, the result) and fail
   training, naming the shards, only above `pipeline.samples.DEFAULT_MAX_BAD_FRACTION` of the
   samples (the same 1% as `cache.max_bad_fraction`'s default);
2. VAE: reconstruction MSE + per-dimension KL; then measure the latents' mean and std and store them
   as the VAE's `shift_factor` / `1 / scaling_factor` (as SD3 does). With `init_bundle` the bundle's
   trained VAE is kept as it is instead;
3. encode every image once per training side (posterior mean and std; a fresh posterior sample per
   step); smaller sides (`multires_latent_sides`) from area-downsampled pixels, as the cache stage
   makes them, so the teacher also works at SwD's small scales;
4. transformer + both CLIP text encoders jointly, rectified flow (SWD.md section 2):
   x_sigma = (1 - sigma) x0 + sigma eps, velocity target eps - x0, sigma logit-normal (diffusers'
   `compute_density_for_timestep_sampling`), `prompt_dropout` of the prompts replaced by "" so
   classifier-free guidance works, linear LR warm-up (torch `LambdaLR`), an EMA of the weights
   (diffusers' `EMAModel`; the EMA weights are what gets saved); a `multires_fraction` of the steps
   train at a smaller side drawn from `multires_latent_sides` (a scale-wise student asks the teacher
   for scores at every scale: SD3.5 is trained at several resolutions, the tiny teacher must be too);
5. save the bundle with `save_pretrained` (diffusers layout, safetensors) into `output_dir/bundle/`;
6. sample grid (`grid_prompts` eval prompts x `grid_samples_per_prompt`, `sampler`) with the stock
   StableDiffusion3Pipeline into `samples.png`, and oracle scores of `eval_num_prompts` eval samples.

Progress and a resumable checkpoint (safetensors: weights, EMA, optimizer, LR schedule) go to the
scratch dir every `checkpoint_every_steps`; a killed run resumes from the last one (the finished
VAE is kept too). Random draws are seeded per step, so a resumed run equals a straight one. Metrics
go to the MLflow run `run_id`; a step an earlier attempt logged is not logged again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from pipeline.config import Section
from pipeline.run_log import RunLog
from pipeline.samples import DEFAULT_MAX_BAD_FRACTION, bad_data_problem, by_reason, decode_image, read_shards
from pipeline.teacher import TeacherSampler

# Bump when the trainer's numerics change: it joins a trained teacher's fingerprint
# (stages/teacher.py: Config.fingerprint_dump), so outputs of an older trainer are not reused.
# 2: diffusers EMAModel (the first update copies the weights), torch LambdaLR warm-up.
TRAINER_VERSION = "2"
BUNDLE_DIR = "bundle"
GRID_FILE = "samples.png"
PROMPTS_FILE = "samples.txt"  # the grid's row prompts
VAE_FILE, VAE_STATS_FILE = "vae.safetensors", "vae.json"  # the finished VAE, in the scratch dir
FLOW_CHECKPOINT = "flow.safetensors"
LOGGED_FILE = "logged.json"  # last step logged per phase, in the scratch dir


class TrainingConfig(Section):
    """The training knobs of the `teacher` section (they count only when it trains). The defaults are
    the pipeline.yaml budget (under 8 minutes on an idle 2-core CPU); assets/tiny-teacher used
    vae_num_steps=500, num_steps=1500 (assets/README.md). Never in a fingerprint: CPUs and logging /
    checkpoint cadence."""

    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("num_cpus", "log_every_steps", "checkpoint_every_steps")

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
    # ---- samples and oracle scores after training
    sampler: TeacherSampler = TeacherSampler()
    grid_prompts: int = Field(8, ge=0)
    grid_samples_per_prompt: int = Field(4, ge=1)
    eval_num_prompts: int = Field(64, ge=0)  # 0: no oracle scores

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: int) -> int:
        if v not in (1, 2, 4):
            raise ValueError(f"teacher.patch_size {v} is not supported; valid: 1, 2, 4 (16x16 latents)")
        return v

    @model_validator(mode="after")
    def _multires(self) -> "TrainingConfig":
        bad = [s for s in self.multires_latent_sides if not 0 < s < 16 or s % self.patch_size]
        if bad:
            raise ValueError(f"teacher.multires_latent_sides: {bad} invalid: each side must be below the native 16 "
                             f"and a multiple of teacher.patch_size ({self.patch_size})")
        return self


def train(cfg: TrainingConfig, train_urls: list[str], eval_urls: list[str], output_dir: str | Path,
          scratch_dir: str | Path, tracking_uri: str, run_id: str) -> dict:
    """Steps 1-6; the result (train/VAE/flow figures, read counts, oracle scores) for teacher.json."""
    import torch

    from pipeline import tiny

    torch.set_num_threads(cfg.num_cpus)
    scratch, output = Path(scratch_dir), Path(output_dir)
    log = RunLog(tracking_uri, run_id)
    started = time.monotonic()

    images, prompts, _, reads = read_samples(train_urls, tiny.PIXEL_SIDE)
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
    info = {"max_sequence_length": 0, "guidance_scale": cfg.sampler.guidance_scale, "seed": cfg.seed,
            "init_bundle": cfg.init_bundle,
            "vae_num_steps": vae_stats["steps"], "num_steps": flow_stats["steps"], "train_samples": len(prompts)}
    tiny.save_bundle(pipe, output / BUNDLE_DIR, info)
    train_s = time.monotonic() - started

    result: dict = {"train_s": round(train_s, 1), "vae_psnr_db": vae_stats["psnr_db"],
                    "vae_steps": vae_stats["steps"], "steps": flow_stats["steps"],
                    "final_loss": flow_stats["loss"], "vae_shift_factor": shift, "vae_scaling_factor": scale,
                    "train_rejects": len(reads.rejects), "train_unreadable_shards": len(reads.unreadable),
                    "train_bad_fraction": round(reads.bad_fraction, 6),
                    "train_rejects_by_reason": by_reason(reads.rejects),
                    "bad_train_shards": sorted({e["url"] for e in reads.rejects})}
    _, eval_prompts, eval_attrs, _ = read_samples(eval_urls, tiny.PIXEL_SIDE, decode_images=False, split="eval")
    result.update(_samples(pipe, eval_prompts, eval_attrs, cfg, output, log))
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def read_samples(urls: list[str], side: int, decode_images: bool = True, split: str = "train",
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
    """Step 1: every sample of the shards, by the reader every stage shares (`pipeline.samples.read_shards`):
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


# ----------------------------------------------------------------------------- state: progress, checkpoints


class Progress:
    """One training phase's log: a progress line and its MLflow metrics every log. The last step logged
    per phase is kept in the scratch dir (`logged.json`), and a resumed attempt's `RunLog` drops the
    steps at or before it, so no step is logged twice."""

    def __init__(self, phase: str, total_steps: int, batch_size: int, scratch: Path, log: RunLog, first_step: int = 0):
        self.phase, self.total_steps, self.batch_size, self.first_step = phase, total_steps, batch_size, first_step
        self.state_file = scratch / LOGGED_FILE
        self.logged = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        self.log = RunLog(None, log.run_id, after_step=self.logged.get(phase), client=log.client)
        self.start = time.monotonic()

    def over_time(self, time_limit_s: float | None) -> bool:
        return time_limit_s is not None and time.monotonic() - self.start > time_limit_s

    def __call__(self, step: int, values: dict) -> None:
        """`step`: steps done; `values`: the phase's metrics (means since the last log)."""
        per_step_s = (time.monotonic() - self.start) / max(1, step - self.first_step)
        left_s = per_step_s * (self.total_steps - step)
        images_per_s = self.batch_size / per_step_s
        print(f"[teacher] {self.phase} {step}/{self.total_steps} " + " ".join(f"{k} {v:.4f}" for k, v in values.items())
              + f" {images_per_s:.0f} img/s, {left_s / 60:.1f} min left", flush=True)
        self.log.metrics({**values, f"{self.phase}_images_per_s": images_per_s}, step)
        if step > self.logged.get(self.phase, 0):
            self.logged[self.phase] = step
            self.state_file.write_text(json.dumps(self.logged))


@dataclass
class FlowState:
    """What a flow checkpoint holds: the trained modules, their EMA (diffusers `EMAModel`), the
    optimizer and its LR schedule; saved as one safetensors file (tensors, plus JSON metadata for the
    rest), never pickled."""

    modules: dict[str, Any]
    ema: Any  # diffusers.training_utils.EMAModel over the modules' parameters
    optimizer: Any
    scheduler: Any

    def save(self, path: Path, step: int) -> None:
        state = self.ema.state_dict()
        tensors = {f"{name}.{k}": v.detach().clone().contiguous()
                   for name, m in self.modules.items() for k, v in m.state_dict().items()}
        tensors.update({f"ema.{i}": e.detach().clone().contiguous() for i, e in enumerate(state.pop("shadow_params"))})
        opt = self.optimizer.state_dict()
        for i, entry in opt["state"].items():
            tensors.update({f"opt.{i}.{k}": v.clone().contiguous() for k, v in entry.items()})
        _save_tensors(path, tensors, {"step": str(step), "param_groups": json.dumps(opt["param_groups"]),
                                      "ema": json.dumps(state), "scheduler": json.dumps(self.scheduler.state_dict())})

    def load(self, path: Path) -> int:
        """Restore a checkpoint if there is one; the step to continue from (0 without one). The LR schedule
        goes on as saved (its base LR included: the pipeline never resumes across a changed `lr`, which
        is in the fingerprint)."""
        if not path.is_file():
            return 0
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name, m in self.modules.items():
            m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        shadow = [tensors[f"ema.{i}"] for i in range(len(self.ema.shadow_params))]
        self.ema.load_state_dict({**json.loads(meta["ema"]), "shadow_params": shadow})
        opt: dict = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, i, k = key.split(".", 2)
                opt["state"].setdefault(int(i), {})[k] = value
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(json.loads(meta["scheduler"]))
        print(f"[teacher] resumed transformer training at step {meta['step']}", flush=True)
        return int(meta["step"])


def warmup_schedule(optimizer, warmup_steps: int):
    """Linear LR warm-up over `warmup_steps` optimizer steps, then constant (step once per optimizer step)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def warmup_ema(parameters, decay: float):
    """diffusers' EMAModel with its own warm-up: the first update copies the weights, the k-th
    (k >= 2) decays by min(`decay`, k / (9 + k)), so early weights fade fast (trainer 1 used the
    same rule from the first update on)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=decay, min_decay=0.0, update_after_step=0, use_ema_warmup=False, foreach=True)


# ----------------------------------------------------------------------------- the phases


def _pixels(images_uint8):
    return images_uint8.float() / 127.5 - 1.0


def _train_vae(vae, images, cfg: TrainingConfig, scratch: Path, log: RunLog) -> dict:
    """Step 2: reconstruction MSE + kl_weight * KL per latent dimension."""
    import torch
    from safetensors.torch import load_file

    done = scratch / VAE_FILE
    if done.is_file():
        vae.load_state_dict(load_file(done))
        stats = json.loads((scratch / VAE_STATS_FILE).read_text())
        print(f"[teacher] VAE from checkpoint ({stats['steps']} steps)", flush=True)
        return stats
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = warmup_schedule(opt, min(cfg.warmup_steps, cfg.vae_num_steps // 4))
    vae.train().to(memory_format=torch.channels_last)  # ~1.3x faster convolutions on the CPU
    progress = Progress("vae", cfg.vae_num_steps, cfg.vae_batch_size, scratch, log)
    mse_sum, n, step = 0.0, 0, 0
    for step in range(cfg.vae_num_steps):
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
        schedule.step()
        mse_sum, n = mse_sum + float(mse.detach()), n + 1
        last = step + 1 == cfg.vae_num_steps or progress.over_time(cfg.time_limit_s)
        if (step + 1) % cfg.log_every_steps == 0 or last:
            progress(step + 1, {"vae_mse": mse_sum / n, "vae_kl": float(kl.detach())})
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
    (scratch / VAE_STATS_FILE).write_text(json.dumps(stats))
    return stats


def _downsample(images_uint8, side_px: int):
    """Area downsampling in pixel space, as the cache stage does (`pipeline.swd.inputs.area_downsample`)."""
    import torch

    from pipeline.swd.inputs import area_downsample

    out = [area_downsample(images_uint8[i:i + 512].float(), side_px) for i in range(0, len(images_uint8), 512)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)


def _encode_all(vae, images, batch: int = 256):
    """Step 3: posterior mean and std of every image (a fresh sample is drawn per training step)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            dist = vae.encode(_pixels(images[i:i + batch])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _train_flow(pipe, sides: dict, prompts: list[str], cfg: TrainingConfig, scratch: Path, log: RunLog) -> dict:
    """Step 4: rectified flow on the normalised latents, text encoders trained jointly, EMA.
    `sides`: latent side -> (posterior mean, std) of every image; the first is the native side."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
               "text_encoder_2": pipe.text_encoder_2}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state = FlowState(modules, warmup_ema(params, cfg.ema_decay), opt, warmup_schedule(opt, cfg.warmup_steps))
    first = state.load(scratch / FLOW_CHECKPOINT)
    progress = Progress("transformer", cfg.num_steps, cfg.batch_size, scratch, log, first_step=first)
    gen = torch.Generator()
    for m in modules.values():
        m.train()
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    native, *smaller = list(sides)
    loss_sum, n, step, last_loss = 0.0, 0, first - 1, float("nan")
    for step in range(first, cfg.num_steps):
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
        sigma = compute_density_for_timestep_sampling("logit_normal", cfg.batch_size, logit_mean=0.0, logit_std=1.0,
                                                      generator=gen)
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
        state.scheduler.step()
        state.ema.step(params)
        loss_sum, n, last_loss = loss_sum + float(loss), n + 1, float(loss)
        last = step + 1 == cfg.num_steps or progress.over_time(cfg.time_limit_s)
        if (step + 1) % cfg.log_every_steps == 0 or last:
            progress(step + 1, {"loss": loss_sum / n})
            loss_sum, n = 0.0, 0
        if (step + 1) % cfg.checkpoint_every_steps == 0 or last:  # the last one lets a longer run continue
            state.save(scratch / FLOW_CHECKPOINT, step + 1)
        if last:
            break
    state.ema.copy_to(params)  # the EMA weights are the teacher
    for m in modules.values():
        m.eval().requires_grad_(False)
    return {"steps": step + 1, "loss": round(last_loss, 5)}


def _samples(pipe, prompts: list[str], attrs: list, cfg: TrainingConfig, output_dir: Path, log: RunLog) -> dict:
    """Step 6: the sample grid and the oracle scores, stock StableDiffusion3Pipeline with `cfg.sampler`."""
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
        (output_dir / PROMPTS_FILE).write_text("\n".join(rows) + "\n")
    scored = [(p, a) for p, a in zip(prompts, attrs) if a is not None][:cfg.eval_num_prompts]
    if scored:
        started = time.monotonic()
        images = _generate(pipe, [p for p, _ in scored], cfg)
        per_image_s = (time.monotonic() - started) / len(scored)
        scores = oracle.score(list(images), [a for _, a in scored])
        log.metrics({f"oracle_{k}": v for k, v in scores.items()} | {"sample_s_per_image": per_image_s}, 0)
        out["oracle"] = {k: round(v, 4) for k, v in scores.items()}
        out["oracle_num_prompts"] = len(scored)
        print(f"[teacher] oracle on {len(scored)} eval prompts ({cfg.sampler.num_steps} steps, CFG "
              f"{cfg.sampler.guidance_scale}): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    return out


def _generate(pipe, prompts: list[str], cfg: TrainingConfig, batch: int = 32):
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    chunks = []
    for i in range(0, len(prompts), batch):
        result = pipe(prompt=prompts[i:i + batch], num_inference_steps=cfg.sampler.num_steps,
                      guidance_scale=cfg.sampler.guidance_scale, max_sequence_length=0, generator=gen,
                      output_type="np")
        chunks.append(result.images)
    return np.concatenate(chunks)


def _save_tensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors, written to a temporary name and renamed: a kill never leaves half a checkpoint."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
