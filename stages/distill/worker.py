"""The distill worker: Ray Train's per-worker function. `Trainer.train` is the loop (resume; per
generator step: fake updates, generator update, metrics, sample grid, checkpoint; the last checkpoint
holds the export); checkpoints (`checkpoint.Checkpointer`), metrics (`metrics.Metrics`) and fault
injection (`faults.Faults`) are components it calls."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from pipeline.resources import DEFAULT_BUCKET_ELEMENTS, bucket_elements
from stages.distill import Config
from stages.distill.checkpoint import Checkpointer
from stages.distill.checks import TEXT_COLUMNS, scale_datasets
from stages.distill.faults import Faults
from stages.distill.metrics import Metrics, say


@dataclass
class LoopSpec:
    """Everything a worker needs (plain data: it travels as `train_loop_config`)."""
    distill: dict
    swd: dict
    location: str                       # the teacher bundle directory
    load_t5: bool | str                 # teacher.load_t5: true, false or "auto"
    columns: list                       # per scale index: (z column, z_im1 column) in the cache
    sample_prompts: dict                # prompts + their embeddings, for the sample grid
    uncond: dict                        # the "" prompt's embeddings (the cache's `read_uncond`), for CFG
    tracking_uri: str
    run_id: str
    vae_scale_factor: int
    faults: Faults = field(default_factory=Faults)  # test hooks (none in a real run)
    init_student: str | None = None     # warm start: the adapter file (on every worker's file system)
    max_sequence_length: int | None = None  # T5 tokens of the cache's prompt embeddings (the "" prompt's too)


def train_loop(config: dict) -> dict:
    """Ray Train's per-worker function; rank 0's return value reaches the driver (`Result.return_value`)."""
    return Trainer(LoopSpec(**config)).train()


def ds_config(cfg: Config, lr: float, world_size: int, bf16: bool, trainable_params: int = DEFAULT_BUCKET_ELEMENTS,
              decay_steps: int | None = None) -> dict:
    """One engine's DeepSpeed config: AdamW (torch's; no op build), clipping, ZeRO stage, precision,
    buckets sized to the engine's trainable parameters; with `decay_steps`, WarmupDecayLR from lr to 0
    over that many optimizer steps (after cfg.lr_warmup_steps of linear warm-up)."""
    bucket = bucket_elements(trainable_params)
    schedule = {"scheduler": {"type": "WarmupDecayLR", "params": {
        "total_num_steps": decay_steps, "warmup_min_lr": 0.0, "warmup_max_lr": lr,
        "warmup_num_steps": cfg.lr_warmup_steps, "warmup_type": "linear"}}} if decay_steps else {}
    return {
        **schedule,
        "train_micro_batch_size_per_gpu": cfg.batch_size_per_worker,
        "train_batch_size": cfg.batch_size_per_worker * world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(cfg.betas), "eps": 1e-8,
                                                  "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "zero_optimization": {"stage": cfg.zero_stage, "reduce_bucket_size": bucket,
                              **({"allgather_bucket_size": bucket} if cfg.zero_stage in (1, 2) else {})},
        "bf16": {"enabled": bf16},
        # Gradients are averaged over ranks in fp32 unless the engine is a bf16 one (as released).
        "communication_data_type": "bf16" if bf16 else "fp32",
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Trainer:
    """The state of one worker over the run: networks, engines, data position, counters."""

    def __init__(self, spec: LoopSpec):
        import ray.train
        import ray.train.torch
        import torch

        from pipeline.swd.config import SwdConfig

        self.spec, self.faults = spec, spec.faults
        self.cfg = Config(**spec.distill)
        self.swd = SwdConfig(**spec.swd)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.cfg.use_gpu)
        self.mixed = self.cfg.precision == "bf16-mixed"  # bf16 base, fp32 trained weights, fp32 engines
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        # Per scale index the dataset its batches come from (`checks.scale_datasets`, as the driver named them).
        self.datasets = scale_datasets(spec.columns)
        self.state = {"step": 0, "data": {name: {"epoch": 0, "batches_in_epoch": 0} for name in self.datasets},
                      "nonfinite_generator": 0, "nonfinite_fake": 0, "nonfinite_in_a_row": 0, "attempts": 0,
                      "train_s": 0.0, "images": 0}
        self.checkpointer = Checkpointer(self.rank, self.cfg.zero_stage, self.swd.student.full_finetune, self.faults)
        self.faults.started(self.rank)

    # ---------------------------------------------------------------- the run

    def train(self) -> dict:
        """The run from wherever the checkpoint left it; returns how it ended (the last step, and
        `stopped` when the non-finite guard ended it)."""
        cfg, started = self.cfg, time.monotonic()
        checkpoint = self.checkpointer.latest()
        if checkpoint is not None:  # the loop state first: the data position decides what to skip
            self.state.update(self.checkpointer.loop_state(checkpoint))
        # A scale's stream starts one step before its first use (a Ray Data execution starts in seconds to
        # tens of seconds on a busy machine): the first step's while the models load, later ones a step ahead.
        self.streams: dict[str, Prefetch] = {}
        if self.state["step"] < cfg.num_steps:
            self.start_stream(self.scale_index(self.state["step"] + 1))
        self.build(warm_start=checkpoint is None)
        if checkpoint is not None:
            self.checkpointer.restore(checkpoint, self.engines)
        self.state["attempts"] += 1
        self.metrics = Metrics(self.spec.tracking_uri, self.spec.run_id, self.rank, self.world, self.device,
                               cfg.num_steps, self.swd.schedule.scales, resumed_step=self.state["step"])
        self.announce(started, resumed=checkpoint is not None)
        start_step = self.state["step"]
        while self.state["step"] < cfg.num_steps:
            step = self.state["step"] + 1
            t0, cpu0 = time.monotonic(), time.process_time()
            i = self.scale_index(step)
            if step < cfg.num_steps:
                self.start_stream(self.scale_index(step + 1))
            parts: dict[str, float] = {"scale_index": float(i)}
            fake_ok = self.fake_updates(step, i, parts)
            generator_ok = self.generator_update(step, i, parts)
            dt = time.monotonic() - t0
            self.state["step"] = step
            self.state["train_s"] += dt
            self.state["images"] += self.images_per_step
            self.state["nonfinite_in_a_row"] = 0 if fake_ok and generator_ok else self.state["nonfinite_in_a_row"] + 1
            self.metrics.add(parts, dt, time.process_time() - cpu0)
            last = step == cfg.num_steps
            if step % cfg.log_every_steps == 0 or last:
                self.metrics.log(step, self.images_per_step, self.counters())
            if step % cfg.sample_every_steps == 0 or last:
                self.sample(step)
            if self.state["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
                # Not an exception: Ray Train would retry it (max_failures). No checkpoint either: the last
                # one holds the last good weights. Every rank stops here (the skips are collective).
                self.dump_weights(f"stopped_step{step}")
                return {"stopped": "nonfinite", **self.report_metrics(step)}
            if step % cfg.checkpoint_every_steps == 0 or last:
                state = {**self.state, "images_per_s": self.state["images"] / max(self.state["train_s"], 1e-9)}
                self.checkpointer.save(step, self.engines, state, self.report_metrics(step), final=last)
            self.faults.after_step(step, self.rank)
        if start_step >= cfg.num_steps and self.rank == 0:
            say(f"[distill] the checkpoint is already at step {start_step}; nothing left to train")
        return self.report_metrics(self.state["step"])

    def announce(self, started: float, resumed: bool) -> None:
        """Rank 0's start-up lines (and the weight dumps the fault tests compare)."""
        if self.rank != 0:
            return
        say(f"[distill] worker ready in {time.monotonic() - started:.1f} s (teacher, networks, "
            f"{'two engines' if self.fake is not None else 'one engine'}, checkpoint) on {self.device}")
        if resumed:
            say(f"[distill] resumed at step {self.state['step']}/{self.cfg.num_steps} (attempt "
                f"{self.state['attempts']}); MLflow continues after step {self.metrics.last_logged}")
            self.dump_weights(f"loaded_step{self.state['step']}")
        if self.warm_started:
            say(f"[distill] student LoRA warm-started from {self.spec.init_student}")
            self.dump_weights("init_student")

    # ---------------------------------------------------------------- setup

    def build(self, warm_start: bool = True) -> None:
        """Teacher, networks, engines. `warm_start`: the student LoRA from `spec.init_student`, if any
        (off when a checkpoint will be restored: the checkpoint wins)."""
        import deepspeed
        import torch

        from pipeline.student_export import load_student_lora
        from pipeline.swd import TextCond, build_networks
        from pipeline.teacher import load_bundle

        # bf16 engines hold bf16 weights (fp32 master copies of the trained ones in the optimiser):
        # load the teacher in bf16 then, so a large teacher and its fake copy fit before partitioning.
        dtype = "bfloat16" if self.bf16 or self.mixed else "float32"
        # The cache holds every prompt embedding, the "" one included: no text encoder is loaded. The
        # transformer only, and on rank 0 the VAE, which decodes the sample grid.
        components = ("transformer", "vae") if self.rank == 0 else ("transformer",)
        bundle = load_bundle(self.spec.location, dtype, str(self.device), True, self.spec.load_t5,
                             self.spec.max_sequence_length, components=components)
        self.uncond, self.sample_cond = (
            TextCond(*(torch.tensor(texts[k], dtype=torch.float32, device=self.device) for k in TEXT_COLUMNS))
            for texts in (self.spec.uncond, self.spec.sample_prompts))
        self.vae_decode = bundle.decode_latents if self.rank == 0 else None
        torch.manual_seed(self.cfg.seed)  # PEFT draws LoRA A from the global generator: the same on every rank and run
        nets = build_networks(bundle.transformer, self.swd)
        self.warm_started = warm_start and self.spec.init_student is not None
        if self.warm_started:  # before the engines: ZeRO-3 partitions the weights as loaded here
            load_student_lora(nets.student, self.spec.init_student)
        if self.mixed:  # the released precision: trained weights in fp32 over the bf16 base
            for param in nets.student_parameters() + nets.fake_parameters():
                param.data = param.data.float()
        if self.cfg.gradient_checkpointing:
            nets.student.enable_gradient_checkpointing()
            if nets.fake is not None:
                nets.fake.transformer.enable_gradient_checkpointing()
        self.nets = nets
        self.student, *_ = deepspeed.initialize(
            model=nets.student, model_parameters=nets.student_parameters(),
            config=ds_config(self.cfg, self.cfg.lr, self.world, self.bf16,
                             sum(p.numel() for p in nets.student_parameters()),
                             decay_steps=self.cfg.num_steps if self.cfg.lr_schedule == "linear_decay" else None))
        self.fake = None
        if nets.fake is not None:
            self.fake, *_ = deepspeed.initialize(
                model=nets.fake, model_parameters=nets.fake_parameters(),
                config=ds_config(self.cfg, self.cfg.fake_lr, self.world, self.bf16,
                                 sum(p.numel() for p in nets.fake_parameters())))

    @property
    def engines(self) -> dict:
        return {"student": self.student, "fake": self.fake}

    @property
    def images_per_step(self) -> int:
        """Cache rows consumed per generator step (fake updates included), all workers."""
        updates = 1 + (self.cfg.fake_updates_per_step if self.fake is not None else 0)
        return updates * self.cfg.batch_size_per_worker * self.world

    # ---------------------------------------------------------------- data

    def batches(self, name: str):
        """Batches of this worker's shard of one scale's dataset forever, epoch after epoch, each as
        (epoch, batches of that epoch taken with it, batch). A resumed run skips what the checkpoint's
        position of this dataset had consumed (the rows behind a position may differ: Ray Data's split is
        dynamic). The position moves when the step takes a batch (`take`), not when one is fetched: the
        prefetched first batch of a scale not yet trained is not counted."""
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        collate = _collate_fn()
        position = self.state["data"][name]
        epoch, skip = position["epoch"], position["batches_in_epoch"]
        # Each scale's dataset shuffles with its own seed (scale_0's is the one-dataset loop's seed).
        seed = self.cfg.seed + self.rank + 1_000_000 * int(name.removeprefix("scale_"))
        while True:
            yielded = False
            for j, batch in enumerate(shard.iter_torch_batches(
                    batch_size=self.cfg.batch_size_per_worker, drop_last=True, collate_fn=collate,
                    local_shuffle_buffer_size=self.cfg.shuffle_buffer_rows or None,
                    local_shuffle_seed=seed + 1000 * epoch)):
                yielded = True
                if j < skip:
                    continue
                yield epoch, j + 1, batch
            if not yielded:
                raise RuntimeError(f"distill: worker {self.rank} got no full batch of "
                                   f"{self.cfg.batch_size_per_worker} rows from the cache ({name}); it needs at "
                                   f"least batch_size_per_worker x num_workers rows")
            epoch, skip = epoch + 1, 0

    def scale_index(self, step: int) -> int:
        """The scale index generator step `step` (1-based) trains, the same on every rank and run."""
        from pipeline.swd import choose_scale_index

        return choose_scale_index(step - 1, len(self.swd.schedule.scales), self.swd.scale_index,
                                  self.generator(step, 99))

    def start_stream(self, i: int) -> None:
        """Start streaming scale index i's dataset (its first batch fetched in the background), once."""
        name = self.datasets[i]
        if name not in self.streams:
            self.streams[name] = Prefetch(self.batches(name))

    def take(self, i: int) -> dict:
        """The next batch of scale index i's dataset; its position (epoch, batches taken in it) moves on."""
        self.start_stream(i)
        name = self.datasets[i]
        epoch, taken, batch = next(self.streams[name])
        self.state["data"][name] = {"epoch": epoch, "batches_in_epoch": taken}
        return batch

    def inputs(self, batch: dict, i: int, generator):
        import torch

        from pipeline.swd import TextCond, training_inputs

        z_col, zim1_col = self.spec.columns[i]
        z = batch[z_col].to(self.device, torch.float32)
        z_im1 = batch[zim1_col].to(self.device, torch.float32)
        cond = TextCond(batch["prompt_embeds"].to(self.device, torch.float32),
                        batch["pooled_prompt_embeds"].to(self.device, torch.float32))
        s = self.swd.schedule
        return training_inputs(z_im1, i, s.scales, s.sigmas, generator=generator), z, cond

    # ---------------------------------------------------------------- one generator step

    def fake_updates(self, step: int, i: int, parts: dict) -> bool:
        """`fake_updates_per_step` updates of F at scale index i on fresh batches (the student's sample
        without grad: no gradient reaches G); their mean terms into `parts`. False when one was skipped."""
        import torch

        from pipeline.swd import fake_loss, x0_hat

        if self.fake is None:
            return True
        ok, sums = True, {}
        for k in range(self.cfg.fake_updates_per_step):
            g = self.generator(step, k)
            inp, z, cond = self.inputs(self.take(i), i, g)
            with torch.no_grad():
                x = x0_hat(self.student.module, inp.x_in, inp.sigma, cond)
            loss, terms = fake_loss(self.fake, x, z, cond, self.swd, generator=g)
            if self.all_finite(loss):
                self.fake.backward(loss)
                norm = self.grad_norm(self.fake)
                self.fake.step()
                norm = norm if norm is not None else self.fake.get_global_grad_norm()
                terms = {**terms, "grad_norm_fake": math.nan if norm is None else float(norm)}
            else:
                self.state["nonfinite_fake"] += 1
                ok = False
                self.fake.zero_grad()
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + float(v if v is not None else math.nan)
        parts.update({k: v / self.cfg.fake_updates_per_step for k, v in sums.items()})
        return ok

    def generator_update(self, step: int, i: int, parts: dict) -> bool:
        """One update of G with `generator_loss` (F called as `fake_engine.module` with its parameters
        frozen: no gradient reaches F); its terms and grad norm into `parts`. False when skipped."""
        from pipeline.swd import Networks, frozen, generator_loss, x0_hat

        g = self.generator(step, 100)
        inp, z, cond = self.inputs(self.take(i), i, g)
        x = x0_hat(self.student, inp.x_in, inp.sigma, cond)
        networks = Networks(student=self.student.module, fake=None if self.fake is None else self.fake.module,
                            frozen_teacher=self.nets.frozen_teacher)
        # F stays frozen through the backward and the optimiser step: gradient checkpointing recomputes
        # its forward inside the backward, and must see the same flags as the forward did.
        with frozen(networks.fake):
            loss, terms = generator_loss(networks, x, z, cond, self.uncond, self.swd, generator=g)
            loss = self.faults.poison(loss, step, self.rank)
            ok = self.all_finite(loss)
            if ok:
                self.student.backward(loss)
                norm = self.grad_norm(self.student)
                self.student.step()
                norm = norm if norm is not None else self.student.get_global_grad_norm()
                parts["grad_norm_student"] = math.nan if norm is None else float(norm)
            else:
                self.state["nonfinite_generator"] += 1
                self.student.zero_grad()
        parts.update({k: float(v) for k, v in terms.items()})
        return ok

    def generator(self, step: int, k: int):
        """A generator per (seed, step, update, rank): a resumed run draws the same noise."""
        import torch

        g = torch.Generator(self.device)
        g.manual_seed(((self.cfg.seed * 1_000_003 + step) * 1009 + k) * 4099 + self.rank)
        return g

    def all_finite(self, loss) -> bool:
        """True when the loss is finite on every rank (all ranks then agree to step or to skip)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0], device=self.device)
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def grad_norm(self, engine) -> float | None:
        """Global gradient norm before clipping, where DeepSpeed does not compute it (ZeRO-0 in fp32;
        gradients are already averaged over ranks after `backward`)."""
        import torch

        if self.cfg.zero_stage != 0 or self.bf16:
            return None
        grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    # ---------------------------------------------------------------- what the loop reports

    def counters(self) -> dict:
        """The metrics logged with the interval's means: learning rates, skip counts, epoch (the furthest
        of the scale datasets': under `cycle` they differ by at most one)."""
        out = {"lr/student": float(self.student.get_lr()[0]),
               "nonfinite/generator_skipped": self.state["nonfinite_generator"],
               "nonfinite/fake_skipped": self.state["nonfinite_fake"],
               "epoch": max(p["epoch"] for p in self.state["data"].values())}
        if self.fake is not None:
            out["lr/fake"] = float(self.fake.get_lr()[0])
        return out

    def report_metrics(self, step: int) -> dict:
        keys = ("nonfinite_generator", "nonfinite_fake", "nonfinite_in_a_row", "attempts")
        return {"step": step, **{k: self.state[k] for k in keys}}

    def sample(self, step: int) -> None:
        """The sample grid: one row per prompt, one column per scale (each step's clean estimate).
        Under ZeRO-3 every rank runs the sampler (parameters are gathered collectively)."""
        import torch

        from pipeline.swd import sample_scalewise

        if self.rank != 0 and self.cfg.zero_stage != 3:
            return
        s = self.swd.schedule
        g = torch.Generator(self.device).manual_seed(self.cfg.seed + 7)
        with torch.no_grad():
            _, steps = sample_scalewise(self.student.module, self.sample_cond, s.scales, s.sigmas, generator=g,
                                        return_steps=True)
            if self.rank != 0:
                return
            images = [self.vae_decode(x).float().clamp(-1, 1) for x in steps]
        self.metrics.grid(step, images, self.spec.sample_prompts["prompts"])

    def dump_weights(self, name: str) -> None:
        self.faults.dump_weights(name, self.student.module, self.cfg.zero_stage)


class Prefetch:
    """An iterator whose first item is fetched in a background thread from construction on."""

    def __init__(self, iterator):
        import threading

        self.iterator, self.first, self.error = iterator, None, None
        self.thread = threading.Thread(target=self._fetch, daemon=True, name="distill-prefetch")
        self.thread.start()

    def _fetch(self):
        try:
            self.first = next(self.iterator)
        except BaseException as e:  # re-raised in the training thread
            self.error = e

    def __iter__(self):
        return self

    def __next__(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            if self.error is not None:
                raise self.error
            return self.first
        return next(self.iterator)


def _collate_fn():
    """Arrow batch of cache rows -> {column: float tensor} (moved to the device by Ray Train)."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    from pipeline.latent_cache import decode_batch

    class Collate(ArrowBatchCollateFn):
        def __call__(self, batch):
            out = decode_batch(batch)
            return {k: v for k, v in out.items() if k not in ("key", "prompt", "z", "z_im1")}

    return Collate()
