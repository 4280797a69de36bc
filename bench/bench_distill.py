"""Overhead of the distill stage's machinery: a 1-worker Ray Train + DeepSpeed run of the stage's
training loop against a bare single-process PyTorch loop with the same networks, losses, optimiser
settings and batches (tiny bundle, a synthetic latent cache), side by side in one run.

    python bench/bench_distill.py [--steps 24] [--warmup 6] [--zero-stage 2] [--json out.json]
    python bench/bench_distill.py --bytes   # bytes distill reads per step: tiny default and SD3.5-M

`--bytes` prints what one worker reads from the cache per generator step (batch x (1 + fake updates)
rows): before, every batch carried every scale's columns; now a step reads its scale's dataset only
(`checks.dataset_columns`), averaged over the `cycle` schedule. The tiny default's figures are the
Parquet column chunks of a synthetic cache (bytes on disk, compressed, and uncompressed); SD3.5-Medium's
(4-step: latent sides 64, 80, 96, 128 x 16 channels; 333 text tokens x 4096, CLIP 77 x 2048; pooled
2048; bf16) are computed from the cache layout (`latent_cache` format 2: z_im1_0 not stored, CLIP
block at its own width), without the ~100 bytes of _shape / _dtype columns per row.

Both run with one torch thread (a worker holds one CPU; the other feeds Ray Data) and passive OpenMP
waits. Steps/s is steady state: wall time from the end of step `warmup` to the end of the last step
(the Ray run's from the timestamps of its MLflow progress metric, logged every `warmup` steps), so
start-up (Ray Train workers, model load, Ray Data start, DeepSpeed init) is reported separately. The
bare loop runs before and after the Ray run; its figure is the mean of the two (the CPU is shared).
The synthetic cache holds one epoch for the whole run by default (`--rows`), as the embedded
default's 4096-row cache covers ~85 steps: each new epoch restarts Ray Data's read, which with a
192-row cache (a new epoch every 4 steps) halved the Ray run's steps/s (ratio 0.53).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the stage's workers run (before torch loads)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline import tiny  # noqa: E402
from stages import load_config  # noqa: E402
from pipeline import latent_cache  # noqa: E402
from stages import distill  # noqa: E402
from stages.distill import checks, worker  # noqa: E402
from stages.distill.metrics import PROGRESS_METRIC  # noqa: E402


def bare_loop(bundle_dir: Path, cache_dir: Path, cfg, swd, steps: int, warmup: int) -> dict:
    """The stage's step (SWD.md section 4) in plain PyTorch: torch AdamW, clip_grad_norm_, no Ray, no DeepSpeed."""
    import pyarrow.parquet as pq

    from pipeline.swd import (TextCond, build_networks, choose_scale_index, fake_loss, frozen, generator_loss,
                              training_inputs, x0_hat)
    from pipeline.teacher import load_bundle

    torch.set_num_threads(1)
    started = time.monotonic()
    bundle = load_bundle(bundle_dir)
    with torch.no_grad():
        uncond = TextCond(*bundle.encode_prompt([""]))
    nets = build_networks(bundle.transformer, swd)
    adamw = dict(betas=cfg.betas, eps=1e-8, weight_decay=cfg.weight_decay)
    opt_s = torch.optim.AdamW(nets.student_parameters(), lr=cfg.lr, **adamw)
    opt_f = torch.optim.AdamW(nets.fake_parameters(), lr=cfg.fake_lr, **adamw) if nets.fake is not None else None
    table = pq.read_table(cache_dir / "data")
    columns = checks.cache_columns(swd.schedule.scales, json.loads((cache_dir / latent_cache.CACHE_FILE).read_text())["scales"])
    batch_size, position = cfg.batch_size_per_worker, [0]

    def next_batch():
        if position[0] + batch_size > table.num_rows:
            position[0] = 0
        batch = latent_cache.decode_batch(table.slice(position[0], batch_size))
        position[0] += batch_size
        return batch

    def inputs(batch, i, g):
        z_col, zim1_col = columns[i]
        cond = TextCond(batch["prompt_embeds"].float(), batch["pooled_prompt_embeds"].float())
        s = swd.schedule
        return training_inputs(batch[zim1_col].float(), i, s.scales, s.sigmas, generator=g), batch[z_col].float(), cond

    def generator(step, k):
        return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + step) * 1009 + k) * 4099)

    def step_fn(step):
        s = swd.schedule
        i = choose_scale_index(step - 1, len(s.scales), swd.scale_index, generator(step, 99))
        if nets.fake is not None:
            for k in range(cfg.fake_updates_per_step):
                g = generator(step, k)
                inp, z, cond = inputs(next_batch(), i, g)
                with torch.no_grad():
                    x = x0_hat(nets.student, inp.x_in, inp.sigma, cond)
                loss, _ = fake_loss(nets.fake, x, z, cond, swd, generator=g)
                if torch.isfinite(loss):
                    opt_f.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(nets.fake_parameters(), cfg.grad_clip)
                    opt_f.step()
        g = generator(step, 100)
        inp, z, cond = inputs(next_batch(), i, g)
        x = x0_hat(nets.student, inp.x_in, inp.sigma, cond)
        with frozen(nets.fake):  # through the backward and the step, as the distill stage does
            loss, _ = generator_loss(nets, x, z, cond, uncond, swd, generator=g)
            if torch.isfinite(loss):
                opt_s.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(nets.student_parameters(), cfg.grad_clip)
                opt_s.step()

    setup_s = time.monotonic() - started
    for step in range(1, warmup + 1):
        step_fn(step)
    t0, cpu0 = time.monotonic(), time.process_time()
    for step in range(warmup + 1, warmup + steps + 1):
        step_fn(step)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    return {"steps_per_s": steps / wall, "s_per_step": wall / steps, "cpu_s_per_step": cpu / steps, "setup_s": setup_s}


def ray_loop(bundle_dir: Path, cache_dir: Path, root: Path, cfg, swd, teacher, steps: int, warmup: int) -> dict:
    """The distill stage's `fit` with one worker; steady steps/s from its MLflow progress timestamps."""
    import mlflow
    import ray

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlc = mlflow.MlflowClient(uri)
    run_id = mlc.create_run(mlc.create_experiment("bench", (root / "art").as_uri())).info.run_id
    manifest = json.loads((cache_dir / latent_cache.CACHE_FILE).read_text())
    spec = worker.LoopSpec(
        distill=cfg.model_dump(mode="json"), swd=swd.model_dump(mode="json"), location=str(bundle_dir),
        load_t5=teacher.load_t5, columns=checks.cache_columns(swd.schedule.scales, manifest["scales"]),
        sample_prompts=checks.sample_prompts(cache_dir, cfg.sample_num_prompts), tracking_uri=uri, run_id=run_id,
        uncond={k: t.float().numpy() for k, t in zip(checks.TEXT_COLUMNS, latent_cache.read_uncond(cache_dir))},
        vae_scale_factor=4)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    try:
        started = time.monotonic()
        distill.fit(spec, cache_dir, str(root / "ray_train"), "bench", cfg)
        total_s = time.monotonic() - started
    finally:
        ray.shutdown()
    stamps = {int(m.step): m.timestamp for m in mlc.get_metric_history(run_id, PROGRESS_METRIC)}
    wall = (stamps[warmup + steps] - stamps[warmup]) / 1000
    # CPU time of the worker process per step (training thread, data decode, Ray's threads), past the warm-up.
    cpu = [m.value for m in mlc.get_metric_history(run_id, "cpu_s_per_step") if m.step > warmup]
    return {"steps_per_s": steps / wall, "s_per_step": wall / steps, "cpu_s_per_step": sum(cpu) / len(cpu),
            "fit_total_s": total_s, "startup_and_end_s": total_s - wall * (warmup + steps) / steps}


def read_bytes(columns: list, row_bytes: dict[str, float], rows_per_step: int) -> dict:
    """Bytes one worker reads per generator step, `row_bytes` per stored column name: "before" (one
    dataset of every column any step uses) and "after" (per scale index its own dataset; the mean over
    the cycle and each scale's), with the share saved."""
    def per_row(names):
        return sum(row_bytes[n] for n in names if n in row_bytes)

    union = sorted({c for pair in columns for c in pair})
    before = per_row(checks.dataset_columns(union))
    after = [per_row(checks.dataset_columns(pair)) for pair in columns]
    mean = sum(after) / len(after)
    return {"rows_per_step": rows_per_step, "before_per_row": before, "after_per_row_by_scale": after,
            "after_per_row": mean, "before_per_step": before * rows_per_step, "after_per_step": mean * rows_per_step,
            "saved": 1 - mean / before}


def parquet_column_bytes(cache_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Per column of the cache's Parquet files: (bytes on disk, uncompressed bytes) per row."""
    import pyarrow.parquet as pq

    disk, raw, rows = {}, {}, 0
    for f in sorted((cache_dir / "data").glob("*.parquet")):
        meta = pq.ParquetFile(f).metadata
        rows += meta.num_rows
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                name = col.path_in_schema.split(".")[0]
                disk[name] = disk.get(name, 0) + col.total_compressed_size
                raw[name] = raw.get(name, 0) + col.total_uncompressed_size
    return {k: v / rows for k, v in disk.items()}, {k: v / rows for k, v in raw.items()}


def sd35_medium_column_bytes(scales=(64, 80, 96, 128), channels=16, clip=(77, 2048), t5=(256, 4096), pooled=2048,
                             element=2) -> dict[str, float]:
    """Tensor bytes per row of each stored column of an SD3.5-Medium cache (bf16; format 2)."""
    out = {f"z_{i}": channels * s * s * element for i, s in enumerate(scales)}
    out.update({f"z_im1_{i}": channels * scales[i - 1] ** 2 * element for i in range(1, len(scales))
                if scales[i - 1] != scales[i]})
    out["prompt_embeds"] = (clip[0] * clip[1] + t5[0] * t5[1]) * element
    out["pooled_prompt_embeds"] = pooled * element
    return out


def bytes_report(cfg, swd) -> dict:
    """`--bytes`: bytes read per step, tiny default (measured from Parquet) and SD3.5-Medium 4-step (computed)."""
    rows_per_step = cfg.batch_size_per_worker * (1 + cfg.fake_updates_per_step)
    with tempfile.TemporaryDirectory(prefix="bench-distill-bytes-") as tmp:
        root = Path(tmp)
        bundle_dir = tiny.build_bundle(root / "bundle")
        cache_dir = tiny.synthetic_cache(root / "cache", bundle_dir, 64, swd.schedule.scales)
        scales = json.loads((cache_dir / latent_cache.CACHE_FILE).read_text())["scales"]
        disk, raw = parquet_column_bytes(cache_dir)
    columns = checks.cache_columns(swd.schedule.scales, scales)
    sd35 = [64, 80, 96, 128]
    sd35_rows = 8 * (1 + 5)  # cluster/profiles/sd35-medium-4step.yaml: batch 8, 5 fake updates
    out = {"tiny_disk": read_bytes(columns, disk, rows_per_step), "tiny_uncompressed": read_bytes(columns, raw, rows_per_step),
           "sd35_medium_4step": read_bytes(checks.cache_columns(sd35, sd35), sd35_medium_column_bytes(sd35), sd35_rows)}
    for name, r in out.items():
        unit, scale = ("MB", 1e6) if name.startswith("sd35") else ("kB", 1e3)
        print(f"[bench] {name}: {r['rows_per_step']} rows/step/worker; per row {r['before_per_row'] / scale:.3f} -> "
              f"{r['after_per_row'] / scale:.3f} {unit} (by scale: "
              f"{', '.join(f'{b / scale:.3f}' for b in r['after_per_row_by_scale'])}); per step "
              f"{r['before_per_step'] / scale:.1f} -> {r['after_per_step'] / scale:.1f} {unit} "
              f"({100 * r['saved']:.1f}% less)", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="timed generator steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=6, help="untimed generator steps first (and the log interval)")
    parser.add_argument("--zero-stage", type=int, default=None, help="DeepSpeed ZeRO stage (default: pipeline.yaml's)")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows of the synthetic cache (default: one epoch spans the run, as the embedded "
                             "default's 4096-row cache spans ~85 steps; Ray Data restarts its read every epoch)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--bytes", action="store_true", help="only report the bytes distill reads per step")
    parser.add_argument("overrides", nargs="*", help="config overrides (key.sub=value), e.g. distill.batch_size_per_worker=4")
    args = parser.parse_args()
    if args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (the Ray run logs every --warmup steps)")
    overrides = ["distill.num_workers=1", "distill.use_gpu=false", "distill.num_cpus_per_worker=1",
                 f"distill.num_steps={args.warmup + args.steps}", f"distill.log_every_steps={args.warmup}",
                 f"distill.checkpoint_every_steps={10 ** 6}", f"distill.sample_every_steps={10 ** 6}", "distill.shuffle_buffer_rows=0",
                 *([f"distill.zero_stage={args.zero_stage}"] if args.zero_stage is not None else []), *args.overrides]
    full = load_config(overrides=overrides)
    cfg, swd, teacher = full.distill, full.swd, full.teacher
    if args.bytes:
        result = bytes_report(load_config(overrides=args.overrides).distill, swd)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1) + "\n")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        root = Path(tmp)
        bundle_dir = tiny.build_bundle(root / "bundle")
        rows = args.rows or cfg.batch_size_per_worker * (1 + cfg.fake_updates_per_step) * (args.warmup + args.steps + 2)
        cache_dir = tiny.synthetic_cache(root / "cache", bundle_dir, rows, swd.schedule.scales)
        print(f"[bench] {swd.loss.mode} SwD, scales {swd.schedule.scales}, batch {cfg.batch_size_per_worker}, "
              f"{cfg.fake_updates_per_step} fake updates per step, LoRA rank {swd.student.lora_rank}, ZeRO-{cfg.zero_stage}, "
              f"{args.warmup} warm-up + {args.steps} timed steps", flush=True)
        bare_1 = bare_loop(bundle_dir, cache_dir, cfg, swd, args.steps, args.warmup)
        print(f"[bench] bare PyTorch (1st): {bare_1['steps_per_s']:.3f} steps/s, {bare_1['cpu_s_per_step']:.2f} CPU s/step",
              flush=True)
        ray_run = ray_loop(bundle_dir, cache_dir, root, cfg, swd, teacher, args.steps, args.warmup)
        print(f"[bench] Ray Train + DeepSpeed:  {ray_run['steps_per_s']:.3f} steps/s, {ray_run['cpu_s_per_step']:.2f} CPU "
              f"s/step (fit {ray_run['fit_total_s']:.0f} s in all)", flush=True)
        bare_2 = bare_loop(bundle_dir, cache_dir, cfg, swd, args.steps, args.warmup)
        print(f"[bench] bare PyTorch (2nd): {bare_2['steps_per_s']:.3f} steps/s, {bare_2['cpu_s_per_step']:.2f} CPU s/step",
              flush=True)
    bare = (bare_1["steps_per_s"] + bare_2["steps_per_s"]) / 2
    bare_cpu = (bare_1["cpu_s_per_step"] + bare_2["cpu_s_per_step"]) / 2
    result = {"bare_steps_per_s": bare, "bare_runs": [bare_1, bare_2], "ray_deepspeed": ray_run,
              "ratio": ray_run["steps_per_s"] / bare, "cpu_ratio": bare_cpu / ray_run["cpu_s_per_step"],
              "zero_stage": cfg.zero_stage,
              "batch_size": cfg.batch_size_per_worker, "fake_updates_per_step": cfg.fake_updates_per_step,
              "load_average": os.getloadavg()}
    print(f"[bench] steps/s ratio Ray Train + DeepSpeed / bare = {result['ratio']:.3f} (target >= 0.9); by CPU time "
          f"per step ({ray_run['cpu_s_per_step']:.2f} s vs {bare_cpu:.2f} s) {result['cpu_ratio']:.3f}; load average "
          f"{result['load_average'][0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
