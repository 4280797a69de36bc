"""Device check (issue 15, item 4): a few distill steps of the SD3.5-Medium profile on one GPU, ZeRO-2
and ZeRO-3 in turn, measured beside the plan's estimates, then the sampler figures of item 3.
A few minutes on one H100 / H200 (under ~8 min with the defaults); one markdown table at the end.

    python bench/device_check.py                                   # GPU: full depth (24 blocks), 1024 px, batch 8
    python bench/device_check.py --json device_check.json          # the same, figures also written as JSON
    python bench/device_check.py --device cpu --num-layers 2 --resolution 128 --batch-size 1 --steps 1   # CPU smoke

What runs, per ZeRO stage (a fresh process each: `--zero-stage N`, under `--stage-timeout`, default 180 s):
- the config: `cluster/profiles/sd35-medium-4step.yaml` through `stages.load_config` with
  `distill.num_workers=1` and `distill.zero_stage=N` (plus `--batch-size`; `--resolution` below 1024
  sets `swd.latent_side_divisor`; `--num-layers` below 24 sets `swd.feature_block` to 11 * N // 24).
  So the profile's own swd / distill settings: LoRA rank 64 on the released targets for student and
  fake network, MMD features from the fake network, `stop_at_feature_block`, gradient checkpointing,
  bf16-mixed, 5 fake updates per generator step, batch 8, the 4-step schedule (latent sides 64..128).
- the networks: an SD3.5-M-shaped random-init transformer (`pipeline.bench_models.build_transformer`,
  bf16, built on the device) stands in for the teacher bundle; random text conditioning of 333 tokens
  x 4096 (+ pooled 2048; `random_text_cond`) and random latents stand in for the cache's rows.
- the code: the distill worker itself (`stages.distill.worker.Trainer`), in this process as rank 0 of a
  one-rank process group (nccl on cuda, gloo on cpu). `Trainer.build` runs unchanged (dtype, seed,
  `pipeline.swd.build_networks`, fp32 LoRA / GAN head for bf16-mixed, gradient checkpointing, one
  `deepspeed.initialize` per network with `worker.ds_config`); only `pipeline.teacher.load_bundle` is
  replaced (returns the random-init transformer) and Ray Train's context / device are stubbed, as
  tests/test_distill_golden.py does. Each generator step is `Trainer.fake_updates` (5 fake updates,
  `fake_loss`, the fake engine's backward / step) then `Trainer.generator_update` (`generator_loss`
  inside `frozen(fake)` through the backward and the step, the early exit at the feature block), the
  same two methods `Trainer.train` calls; their batches come from a stub of `Trainer.streams` (the
  Ray Data iterators). `Trainer.train`'s MLflow metrics, sample grid and checkpoints are not run.
- every step trains at one scale index (`--scale-index`, default the largest: latent 128 at 1024 px,
  where the plan's memory figures are); `--warmup` untimed steps (default 1; 0 on cpu), then `--steps`
  timed (default 3). s/step: the median over the timed steps of one generator step with its fake updates.
- memory: `torch.cuda.max_memory_allocated`, reset before the fake updates and before the generator
  step, the max over all steps (the first step allocates AdamW's state); `max_memory_reserved` too.
  The plan's phase peaks include a fixed 1.5 GiB reserve (CUDA context, workspaces, allocator slack)
  that `max_memory_allocated` does not count: the ratio is measured / (plan peak - reserve). On CPU
  memory is not measured (n/a).
- the plan: `pipeline.plan.plan(cfg, --gpu, --mfu)` for the same config (num_workers=1: the profile's
  per-GPU figures assume its 8 workers); with `--num-layers` the plan uses the same reduced depth. Its
  s/step is its FLOP model at the trained scale (`Model.distill_step_flops`) at `--gpu`'s bf16 peak x
  `--mfu` (default H100, 0.4: the H200's bf16 peak is the same); the implied MFU is also printed.
- an out-of-memory error is a figure ("OOM at X GiB": the allocated peak when it failed, with the
  attempted allocation), a stage past its limit is "timeout", and the steps done before either are
  kept (the child writes its figures after every step).

ZeRO buckets: `worker.ds_config` sizes each engine's buckets to its trainable parameter count
(`pipeline.resources.bucket_elements`). This script's CPU smoke run found that the fake engine's odd
count (the GAN head: 78,261,125 for the Medium profile) failed DeepSpeed's ZeRO-1/2 alignment assert;
`bucket_elements` now aligns it. `--round-buckets` (off by default) would round any odd size left
and list it under the table.

Then `bench/bench_sampler.py --model sd35-medium --device <device> --resolution <px>` (full depth on
cuda, `--num-layers` when given; `--repeats 1` on cpu) runs as a subprocess under its own limit; its output is printed and
its figures (ms per image, speed-ups beside the FLOP model, the 6-step student beside the paper's
0.19 s) join the table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PROFILE = REPO_ROOT / "cluster" / "profiles" / "sd35-medium-4step.yaml"
SAMPLER = REPO_ROOT / "bench" / "bench_sampler.py"
MODEL = "sd35-medium"
FULL_DEPTH, PROFILE_FEATURE_BLOCK, FULL_PX = 24, 11, 1024
GIB = 1024 ** 3
TAG = "[device_check]"


def say(*parts) -> None:
    print(TAG, *parts, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--num-layers", type=int, default=None, help=f"joint blocks (default: full depth, {FULL_DEPTH})")
    p.add_argument("--resolution", type=int, default=FULL_PX, help="image side in px (1024, 512, 256, 128 or 64)")
    p.add_argument("--batch-size", type=int, default=None, help="distill batch per GPU (default: the profile's, 8)")
    p.add_argument("--steps", type=int, default=3, help="timed generator steps (each with its 5 fake updates)")
    p.add_argument("--warmup", type=int, default=None, help="untimed generator steps first (default 1 on cuda, 0 on cpu)")
    p.add_argument("--scale-index", type=int, default=-1, help="the scale index every step trains (default: the largest)")
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[0, 1, 2, 3], help="ZeRO stages, in turn")
    p.add_argument("--gpu", default="h100", help="the plan's GPU (pipeline.plan.GPUS)")
    p.add_argument("--mfu", type=float, default=0.4, help="the plan's model FLOP utilisation")
    p.add_argument("--stage-timeout", type=int, default=None, help="seconds per ZeRO stage's process (default 180; 300 on cpu)")
    p.add_argument("--sampler-timeout", type=int, default=None, help="seconds for bench_sampler.py (default 120; 240 on cpu)")
    p.add_argument("--no-sampler", action="store_true", help="skip bench_sampler.py")
    p.add_argument("--round-buckets", action=argparse.BooleanOptionalAction, default=False,
                   help="round an odd ZeRO bucket size of worker.ds_config up to even, and say so (off: "
                        "pipeline.resources.bucket_elements aligns them)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--zero-stage", type=int, default=None, help=argparse.SUPPRESS)   # child mode: one stage
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)      # child mode: its figures
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.warmup = (1 if cuda else 0) if args.warmup is None else args.warmup
    args.stage_timeout = args.stage_timeout or (180 if cuda else 300)
    args.sampler_timeout = args.sampler_timeout or (120 if cuda else 240)
    if FULL_PX % args.resolution or 16 % (FULL_PX // args.resolution):
        p.error(f"--resolution {args.resolution}: must be 1024 / d with d dividing 16 (the profile's latent sides "
                "64, 80, 96, 128 divided by d)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def depth(args) -> int:
    return args.num_layers or FULL_DEPTH


def overrides(args, zero_stage: int) -> list[str]:
    """The profile's config for this check: one worker, this ZeRO stage, and the size options."""
    out = ["distill.num_workers=1", f"distill.zero_stage={zero_stage}",
           f"distill.use_gpu={'true' if args.device == 'cuda' else 'false'}"]
    if args.batch_size:
        out.append(f"distill.batch_size_per_worker={args.batch_size}")
    if args.resolution != FULL_PX:
        out.append(f"swd.latent_side_divisor={FULL_PX // args.resolution}")
    if depth(args) != FULL_DEPTH:
        out.append(f"swd.feature_block={PROFILE_FEATURE_BLOCK * depth(args) // FULL_DEPTH}")
    return out


def load(args, zero_stage: int):
    from stages import load_config

    return load_config([PROFILE], overrides(args, zero_stage))


def model_config(args) -> dict:
    from pipeline.bench_models import reduced_depth

    return reduced_depth(MODEL, args.num_layers)


# ----------------------------------------------------------------------------- one ZeRO stage (child process)


def run_stage(args) -> dict:
    """One ZeRO stage in this process: the distill worker's build and step methods on a random-init
    SD3.5-M; figures written to `args.result` after the build and after every step."""
    import types
    from contextlib import ExitStack
    from unittest import mock

    import torch
    import torch.distributed as dist

    out: dict = {"zero_stage": args.zero_stage, "device": args.device, "status": "started", "steps": []}

    def save() -> None:
        if args.result:
            tmp = args.result.with_suffix(".tmp")
            tmp.write_text(json.dumps(out, indent=1))
            tmp.replace(args.result)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        out.update(status="error", error="--device cuda: torch sees no CUDA device")
        save()
        return out
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        out["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / GIB, 1)}

    def gib(n: int) -> float:
        return round(n / GIB, 3)

    def peaks() -> dict:
        return {"allocated_gib": gib(torch.cuda.max_memory_allocated()),
                "reserved_gib": gib(torch.cuda.max_memory_reserved())} if cuda else {}

    def reset() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    import ray.train
    import ray.train.torch

    from pipeline.bench_models import build_transformer, random_text_cond
    from stages.distill import checks, worker

    full = load(args, args.zero_stage)
    cfg, swd = full.distill, full.swd
    scales = list(swd.schedule.scales)
    i = args.scale_index % len(scales)
    config = model_config(args)
    batch = cfg.batch_size_per_worker
    embeds, pooled = random_text_cond(MODEL, batch, seed=1)
    u_embeds, u_pooled = random_text_cond(MODEL, 1, seed=2)
    text = {k: t.float().numpy() for k, t in zip(checks.TEXT_COLUMNS, (u_embeds, u_pooled))}
    columns = checks.cache_columns(scales, scales)
    spec = worker.LoopSpec(distill=cfg.model_dump(mode="json"), swd=swd.model_dump(mode="json"),
                           location=f"<random-init {MODEL}, {config['num_layers']} blocks>", load_t5=True,
                           columns=columns, sample_prompts=text, uncond=text, tracking_uri="", run_id="",
                           vae_scale_factor=8)
    out.update(scales=scales, scale_index=i, latent_side=scales[i], batch_size=batch, num_layers=config["num_layers"],
               fake_updates_per_step=cfg.fake_updates_per_step, precision=cfg.precision,
               overrides=overrides(args, args.zero_stage))

    def load_bundle(location, dtype="float32", device="cpu", *_, **__):  # stands in for the teacher bundle
        model = build_transformer(config, seed=0, dtype=getattr(torch, dtype), device=device)
        return types.SimpleNamespace(transformer=model, decode_latents=None)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_rank=lambda: 0)
    step = 0
    phase = "build"
    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(ray.train, "get_context", lambda: context))
        stack.enter_context(mock.patch.object(ray.train.torch, "get_device", lambda: device))
        stack.enter_context(mock.patch("pipeline.teacher.load_bundle", load_bundle))
        if args.round_buckets:
            out["bucket_rounding"] = []
            stack.enter_context(mock.patch.object(worker, "ds_config",
                                                  _even_buckets(worker.ds_config, out["bucket_rounding"])))
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
        stack.callback(dist.destroy_process_group)
        try:
            started = time.monotonic()
            reset()
            trainer = worker.Trainer(spec)
            trainer.build(warm_start=False)
            sync()
            if cuda:  # the random init is built in fp32 then cast (a real bundle loads bf16): drop the cached blocks
                torch.cuda.empty_cache()
            out["build_s"] = round(time.monotonic() - started, 1)
            out["trainable"] = {"student": sum(p.numel() for p in trainer.nets.student_parameters()),
                                "fake": sum(p.numel() for p in trainer.nets.fake_parameters())}
            if cuda:
                out["after_build"] = {"allocated_gib": gib(torch.cuda.memory_allocated()), **peaks()}
            # The Ray Data iterators of Trainer.train: one fixed random batch per scale dataset (on the device).
            g = torch.Generator().manual_seed(3)
            streams = {}
            for name, (z_col, zim1_col), j in zip(checks.scale_datasets(columns), columns, range(len(scales))):
                side, prev = scales[j], scales[max(j - 1, 0)]
                rows = {z_col: torch.randn(batch, config["in_channels"], side, side, generator=g),
                        zim1_col: torch.randn(batch, config["in_channels"], prev, prev, generator=g),
                        "prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
                rows = {k: v.to(device, torch.bfloat16) for k, v in rows.items()}
                streams.setdefault(name, _Repeat(rows))
            trainer.streams = streams
            out["status"] = "built"
            save()
            say(f"ZeRO-{args.zero_stage}: built in {out['build_s']} s on {device}"
                + (f" ({out['gpu']['name']}); allocated {out['after_build']['allocated_gib']:.2f} GiB" if cuda else ""))
            def measured(name: str, update, step: int, parts: dict):
                """One phase of a step: (its result, seconds, peak memory), the phase named for an OOM report."""
                nonlocal phase
                phase = name
                reset()
                t0 = time.monotonic()
                ok = update(step, i, parts)
                sync()
                return ok, time.monotonic() - t0, peaks()

            for step in range(1, args.warmup + args.steps + 1):
                parts: dict = {"scale_index": float(i)}
                fake_ok, fake_s, fake_peak = measured("fake update", trainer.fake_updates, step, parts)
                generator_ok, generator_s, generator_peak = measured("generator step", trainer.generator_update, step, parts)
                record = {"step": step, "timed": step > args.warmup, "fake_s": round(fake_s, 3),
                          "generator_s": round(generator_s, 3), "step_s": round(fake_s + generator_s, 3), "fake_ok": fake_ok,
                          "generator_ok": generator_ok, "fake_peak": fake_peak, "generator_peak": generator_peak,
                          "losses": {k: float(v) for k, v in parts.items() if k != "scale_index"}}
                out["steps"].append(record)
                out["status"] = f"step {step}"
                summarise(out)
                save()
                say(f"ZeRO-{args.zero_stage} step {step}{'' if record['timed'] else ' (warm-up)'}: "
                    f"{record['step_s']:.2f} s (fake updates {record['fake_s']:.2f} s, generator {record['generator_s']:.2f} s)"
                    + (f"; peak allocated fake {fake_peak['allocated_gib']:.2f} GiB, generator "
                       f"{record['generator_peak']['allocated_gib']:.2f} GiB" if cuda else "")
                    + ("" if fake_ok and generator_ok else "; a loss was non-finite (skipped)"))
            out["status"] = "ok"
        except torch.cuda.OutOfMemoryError as e:  # (torch.OutOfMemoryError on torch >= 2.5)
            at = torch.cuda.max_memory_allocated() if cuda else 0
            message = str(e).splitlines()[0] if str(e) else "out of memory"
            out.update(status="oom", oom={"phase": phase, "step": step, "allocated_gib": gib(at),
                                          "message": message[:300]})
            say(f"ZeRO-{args.zero_stage}: OOM in the {phase} of step {step} at {gib(at):.2f} GiB allocated: {message[:200]}")
        except Exception as e:  # a figure, not a crash: the parent reports it
            import traceback

            out.update(status="error", error=f"{type(e).__name__} in the {phase} of step {step}: {str(e)[:500]}",
                       traceback=traceback.format_exc()[-3000:])
            say(f"ZeRO-{args.zero_stage}: {out['error']}")
        summarise(out)
        save()
    return out


def _even_buckets(ds_config, log: list):
    """`worker.ds_config` with odd ZeRO bucket sizes rounded up to even (`--round-buckets`), each noted in `log`."""
    def wrapped(*a, **k):
        config = ds_config(*a, **k)
        zero = config["zero_optimization"]
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if key in zero and int(zero[key]) % 2:
                log.append(f"{key} {int(zero[key])} -> {int(zero[key]) + 1}")
                zero[key] = int(zero[key]) + 1
        return config
    return wrapped


class _Repeat:
    """`Trainer.streams`' item shape, (epoch, batches taken in the epoch, batch), the same batch forever."""

    def __init__(self, batch: dict):
        self.batch, self.n = batch, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        return 0, self.n, self.batch


def summarise(out: dict) -> None:
    """Median s/step of the timed steps; the max peaks over every step."""
    steps = out.get("steps", [])
    timed = [s for s in steps if s["timed"]]
    out["s_per_step"] = statistics.median(s["step_s"] for s in timed) if timed else None
    out["fake_s"] = statistics.median(s["fake_s"] for s in timed) if timed else None
    out["generator_s"] = statistics.median(s["generator_s"] for s in timed) if timed else None
    out["timed_steps"] = len(timed)
    for key in ("fake_peak", "generator_peak"):
        values = [s[key] for s in steps if s.get(key)]
        out[key] = ({k: max(v[k] for v in values) for k in values[0]} if values else None)


# ----------------------------------------------------------------------------- the plan (parent, CPU only)


def plan_figures(args, zero_stage: int) -> dict:
    """The plan for the same config and depth: phase peaks, s/step at the trained scale, FLOPs."""
    import dataclasses
    from unittest import mock

    from pipeline import plan as P

    cfg = load(args, zero_stage)
    shapes = P.teacher_shapes(cfg.teacher)
    if depth(args) != int(shapes.transformer["num_layers"]):
        from pipeline.bench_models import reduced_depth

        shapes = dataclasses.replace(shapes, transformer=reduced_depth(shapes.transformer, depth(args)))
    with mock.patch.object(P, "teacher_shapes", lambda teacher: shapes):
        p = P.plan(cfg, args.gpu, args.mfu)
    m = P.Model(cfg, shapes)
    scales = list(cfg.swd.schedule.scales)
    side = scales[args.scale_index % len(scales)]
    flops = m.distill_step_flops(side)
    peak = P.GPUS[args.gpu]["peak_flops"]
    return {"gpu": args.gpu, "mfu": args.mfu, "reserve_gib": P.RESERVE_GIB,
            "fake_gib": p["memory"]["distill fake update"]["peak_gib"],
            "generator_gib": p["memory"]["distill generator step"]["peak_gib"],
            "fake_lines": p["memory"]["distill fake update"]["lines"],
            "generator_lines": p["memory"]["distill generator step"]["lines"],
            "latent_side": side, "flops_per_step": flops, "peak_flops": peak,
            "s_per_step": flops / (peak * args.mfu), "s_per_step_mean_over_scales": p["time"]["distill"]["s_per_step"]}


# ----------------------------------------------------------------------------- subprocesses (parent)


def run_child(cmd: list[str], timeout: int, label: str, echo_all: bool = False) -> dict:
    """Run `cmd` in its own process group under `timeout` s; echo its `[device_check]` lines (every
    line with `echo_all`); return rc, timed_out, wall seconds, the output and its tail."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if echo_all or line.startswith(TAG):
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        say(f"{label}: past its {timeout} s limit; stopping it")
        _kill(proc)
        rc = proc.wait()
    reader.join(timeout=10)
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.monotonic() - started, 1),
            "output": "\n".join(lines), "tail": "\n".join(lines[-25:])}


def _kill(proc) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def child_args(args, zero_stage: int, result: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--resolution", str(args.resolution),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--scale-index", str(args.scale_index),
           "--zero-stage", str(zero_stage), "--result", str(result)]
    if args.num_layers:
        cmd += ["--num-layers", str(args.num_layers)]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    cmd.append("--round-buckets" if args.round_buckets else "--no-round-buckets")
    return cmd


def sampler_args(args, result: Path) -> list[str]:
    cmd = [sys.executable, str(SAMPLER), "--model", MODEL, "--device", args.device,
           "--resolution", str(args.resolution), "--json", str(result)]
    if args.num_layers:
        cmd += ["--num-layers", str(args.num_layers)]
    if args.device == "cpu":  # the smoke run: one repeat (on cuda bench_sampler's defaults)
        cmd += ["--repeats", "1"]
    return cmd


# ----------------------------------------------------------------------------- the report


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def stage_rows(z: int, m: dict, plan: dict | None, cuda: bool) -> list[list[str]]:
    """Table rows of one ZeRO stage: the two peaks and s/step, beside the plan."""
    rows = []
    status = m.get("status")
    problem = None
    if status == "oom":
        o = m["oom"]
        problem = f"OOM at {o['allocated_gib']:.1f} GiB ({o['phase']}, step {o['step']})"
    elif status == "timeout":
        problem = f"timeout after {m.get('wall_s')} s ({m.get('timed_steps', 0)} timed steps done)"
    elif status not in ("ok",):
        problem = f"failed: {m.get('error') or status}"[:160]
    for key, what in (("fake", "fake update"), ("generator", "generator step")):
        name = f"ZeRO-{z} {what}: peak allocated GiB"
        planned = plan[f"{key}_gib"] if plan else None
        tensors = planned - plan["reserve_gib"] if plan else None
        plan_text = f"{planned:.2f} ({tensors:.2f} + {plan['reserve_gib']} reserve)" if plan else "n/a (plan failed)"
        measured = (m.get(f"{key}_peak") or {}).get("allocated_gib") if cuda else None
        if not cuda:
            rows.append([name, "n/a (CPU)", plan_text, "n/a"])
            continue
        if measured is None:
            rows.append([name, problem or "n/a", plan_text, "n/a"])
            continue
        reserved = m[f"{key}_peak"].get("reserved_gib")
        text = f"{measured:.2f} (reserved {reserved:.2f})"
        oom_here = status == "oom" and m["oom"]["phase"] == what
        rows.append([name, text + (f"; then {problem}" if oom_here else ""), plan_text, _ratio(measured, tensors)])
    s = m.get("s_per_step")
    n = m.get("timed_steps", 0)
    name = f"ZeRO-{z} s/step (1 generator + {m.get('fake_updates_per_step', 5)} fake updates, latent {m.get('latent_side', '?')})"
    plan_text = (f"{plan['s_per_step']:.3g} ({plan['gpu']} at MFU {plan['mfu']}; mean over scales "
                 f"{plan['s_per_step_mean_over_scales']:.3g})") if plan else "n/a (plan failed)"
    if s is None:
        rows.append([name, problem or "n/a", plan_text, "n/a"])
    else:
        extra = f"median of {n}; fake {m['fake_s']:.2f} + generator {m['generator_s']:.2f}"
        if cuda and plan:
            extra += f"; implied MFU {plan['flops_per_step'] / (s * plan['peak_flops']):.2f}"
        if problem and status != "ok":
            extra += f"; then {problem}"
        rows.append([name, f"{s:.2f} ({extra})", plan_text, _ratio(s, plan["s_per_step"]) if cuda and plan else "n/a (CPU)"])
    return rows


def sampler_rows(r: dict | None, run: dict | None) -> list[list[str]]:
    if r is None:
        if run is None:
            return []
        why = "timeout" if run["timed_out"] else f"failed (rc {run['rc']})"
        return [["sampler (bench_sampler.py)", why, "-", "-"]]
    ms, st = r["ms_per_image"], r["students"]
    depth_note = "" if r["num_layers"] == r["full_num_layers"] else f", {r['num_layers']} of {r['full_num_layers']} blocks"
    rows = []
    for label, s in st.items():
        steps = len(s["scales"])
        rows.append([f"sampler: SwD {steps}-step ms/image ({r['device']}{depth_note})", f"{ms[label]:.1f}",
                     "paper 190 (6-step)" if label == "swd6" else "-",
                     _ratio(ms[label], 190.0) if label == "swd6" and not depth_note and r["device"].startswith("cuda") else "-"])
        rows.append([f"sampler: SwD {steps}-step speed-up vs full-res {len(r['scales'])} steps",
                     f"{s['speedup_vs_fullres']:.2f}x", f"{s['predicted']['speedup_vs_fullres']:.2f}x (FLOP model)",
                     f"{s['measured_over_predicted']['speedup_vs_fullres']:.2f} (goal >= 0.9)"])
    sw = st["swd"]
    rows.append([f"sampler: SwD {len(sw['scales'])}-step full-res forwards per sample", f"{sw['fullres_forwards']:.2f}",
                 f"{sw['predicted']['fullres_forwards']:.2f} (FLOP model)", _ratio(sw["fullres_forwards"],
                                                                                 sw["predicted"]["fullres_forwards"])])
    rows.append([f"sampler: teacher {r['teacher_steps']} steps + CFG ms/image", f"{ms['teacher']:.1f}", "-", "-"])
    rows.append([f"sampler: SwD {len(sw['scales'])}-step speed-up vs teacher", f"{sw['speedup_vs_teacher']:.1f}x",
                 f"{sw['predicted']['speedup_vs_teacher']:.1f}x (FLOP model)",
                 f"{sw['measured_over_predicted']['speedup_vs_teacher']:.2f}"])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.zero_stage is not None:
        out = run_stage(args)
        if not args.result:
            print(json.dumps(out, indent=1))
        return 0
    started = time.monotonic()
    cuda = args.device == "cuda"
    say(f"SD3.5-M ({depth(args)} of {FULL_DEPTH} blocks) at {args.resolution} px, profile {PROFILE.relative_to(REPO_ROOT)}, "
        f"ZeRO stages {args.stages}, {args.warmup} warm-up + {args.steps} timed steps each, on {args.device}")
    result: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                             if k not in ("zero_stage", "result")}, "stages": {}, "plan": {}}
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        for z in args.stages:
            try:
                result["plan"][z] = plan_figures(args, z)
            except Exception as e:  # the plan is a comparison, not a reason to skip the measurement
                result["plan"][z] = None
                say(f"plan for ZeRO-{z} failed: {type(e).__name__}: {e}")
        for z in args.stages:
            path = Path(tmp) / f"zero{z}.json"
            run = run_child(child_args(args, z, path), args.stage_timeout, f"ZeRO-{z}")
            m = json.loads(path.read_text()) if path.is_file() else {"status": "no result"}
            if run["timed_out"]:
                m["status"] = "timeout"
            elif m.get("status") not in ("ok", "oom", "error"):
                m["status"] = "error"
                m.setdefault("error", f"the process ended with rc {run['rc']}")
            m["wall_s"], m["rc"] = run["wall_s"], run["rc"]
            if m["status"] not in ("ok", "oom"):
                m["output_tail"] = run["tail"]
                say(f"ZeRO-{z} {m['status']}; its last output lines:\n" + run["tail"])
            result["stages"][z] = m
        sampler, sampler_run = None, None
        if not args.no_sampler:
            path = Path(tmp) / "sampler.json"
            say("bench/bench_sampler.py: " + " ".join(sampler_args(args, path)[1:]))
            sampler_run = run_child(sampler_args(args, path), args.sampler_timeout, "bench_sampler.py", echo_all=True)
            sampler = json.loads(path.read_text()) if path.is_file() and sampler_run["rc"] == 0 else None
            result["sampler"] = sampler
            result["sampler_run"] = {k: sampler_run[k] for k in ("rc", "timed_out", "wall_s")}
            if sampler is None:
                result["sampler_run"]["tail"] = sampler_run["tail"]
                print(sampler_run["tail"])
    rows = []
    for z in args.stages:
        rows += stage_rows(z, result["stages"][z], result["plan"].get(z), cuda)
    rows += sampler_rows(sampler, sampler_run)
    from pipeline.compare import format_table

    gpu = next((m["gpu"] for m in result["stages"].values() if m.get("gpu")), None)
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(f"\n## device check: SD3.5-M-shaped random init ({depth(args)} blocks), {args.resolution} px, batch "
          f"{next((m.get('batch_size') for m in result['stages'].values() if m.get('batch_size')), '?')}, on "
          f"{gpu['name'] + ' (' + str(gpu['memory_gib']) + ' GiB)' if gpu else args.device}; {result['wall_s']:.0f} s in all\n")
    print(format_table(["figure", "measured", "plan / model", "measured / plan"], rows))
    rounded = sorted({r for m in result["stages"].values() for r in m.get("bucket_rounding") or []})
    if rounded:
        print("\nZeRO buckets rounded up to even (--round-buckets; pipeline.resources.bucket_elements gave odd "
              "sizes, which DeepSpeed's ZeRO-1/2 rejects): " + "; ".join(rounded))
    print("\nplan: pipeline.plan.plan(sd35-medium-4step, num_workers=1); memory ratio = max_memory_allocated / "
          "(plan peak - its 1.5 GiB reserve); s/step ratio against the plan's FLOP time at the trained scale.")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
