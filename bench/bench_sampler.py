"""Benchmark: the 4-step SwD sampler vs the teacher (28 Euler steps with CFG) vs a 4-step
full-resolution sampler, transformer only (random-init weights, random text embeddings; no VAE,
no text encoders), measured side by side in one run.

    python bench/bench_sampler.py                       # CPU: tiny teacher shape, latent 16x16x4, batch 32
    python bench/bench_sampler.py --model sd35-medium --device cuda --resolution 1024

Reports time per image of each sampler, the speed-ups, and SwD's time in units of one
full-resolution forward. Goals (issue 4): >= 25x faster than the teacher, >= 2.0x faster than
full-resolution 4 steps, <= 2.3 full-resolution forwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.bench_models import MODELS, TEXT_TOKENS, build_transformer, random_text_cond  # noqa: E402
from pipeline.swd.sampler import TextCond, sample_scalewise, sample_teacher, velocity  # noqa: E402
from pipeline.swd.schedules import (PRESETS, boundaries_to_sigmas, check_scales_for_patch,  # noqa: E402
                                    relative_cost, teacher_sigmas)

DEFAULTS = {  # model -> (preset, VAE factor, default resolution px, default batch)
    "tiny": ("tiny-4step", 4, 64, 32),
    "sd35-medium": ("sd35-medium-4step", 8, 1024, 1),
}
GOALS = {"speedup_vs_teacher": 25.0, "speedup_vs_fullres": 2.0, "fullres_forwards": 2.3}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(DEFAULTS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (latent side = px / VAE factor)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="SwD schedule; scaled to the latent side")
    p.add_argument("--teacher-steps", type=int, default=28)
    p.add_argument("--guidance-scale", type=float, default=7.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def scaled_schedule(preset: str, latent_side: int, patch_size: int) -> tuple[list[int], list[float]]:
    """The preset's scales scaled to `latent_side` (same ratios, rounded to the patch size)."""
    p = PRESETS[preset]
    factor = latent_side / max(p.scales)
    scales = [max(patch_size, round(s * factor / patch_size) * patch_size) for s in p.scales]
    check_scales_for_patch(scales, patch_size, latent_side)
    return scales, boundaries_to_sigmas(p.boundaries, teacher_sigmas())


def _cost_with_text(scales, latent_side: int, patch_size: int, text_tokens: int) -> float:
    """Token-count cost in full-resolution forwards when every step also carries the text tokens
    (joint attention: the sequence is image tokens + text tokens at every scale)."""
    full = (latent_side // patch_size) ** 2 + text_tokens
    return sum((s // patch_size) ** 2 + text_tokens for s in scales) / full


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, vae_factor, default_px, default_batch = DEFAULTS[args.model]
    preset = args.preset or preset
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    batch = args.batch_size or default_batch
    config = MODELS[args.model]
    latent_side = (args.resolution or default_px) // vae_factor
    scales, sigmas = scaled_schedule(preset, latent_side, config["patch_size"])
    grid = teacher_sigmas(args.teacher_steps, 3.0)

    model = build_transformer(args.model, dtype=dtype, device=device)
    cond = TextCond(*random_text_cond(args.model, batch, seed=1, dtype=dtype, device=device))
    uncond = TextCond(*random_text_cond(args.model, 1, seed=2, dtype=dtype, device=device))
    gen = torch.Generator(device=device)

    def swd():
        sample_scalewise(model, cond, scales, sigmas, generator=gen.manual_seed(0))

    def teacher():
        sample_teacher(model, cond, uncond, grid, latent_side, guidance_scale=args.guidance_scale,
                       generator=gen.manual_seed(0))

    def fullres():
        sample_scalewise(model, cond, [latent_side] * len(scales), sigmas, generator=gen.manual_seed(0))

    def forward_at(side):
        x = torch.randn(batch, config["in_channels"], side, side, device=device, generator=gen.manual_seed(1))

        def forward():
            with torch.no_grad():
                velocity(model, x, 1.0, cond)
        return forward

    runs = {"swd": swd, "teacher": teacher, "fullres": fullres, "forward": forward_at(latent_side)}
    for side in sorted(set(scales) - {latent_side}):
        runs[f"forward@{side}"] = forward_at(side)
    for fn in runs.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every sampler alike
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    median = {name: statistics.median(t) for name, t in times.items()}

    per_image_ms = {name: 1000 * t / batch for name, t in median.items()}
    per_image_ms_min = {name: 1000 * min(t) / batch for name, t in times.items()}
    result = {
        "model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "latent_side": latent_side, "batch_size": batch, "scales": scales,
        "sigmas": [round(s, 4) for s in sigmas], "teacher_steps": args.teacher_steps,
        "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "ms_per_image": per_image_ms,
        "ms_per_image_min": per_image_ms_min,
        "speedup_vs_teacher": median["teacher"] / median["swd"],
        "speedup_vs_fullres": median["fullres"] / median["swd"],
        "fullres_forwards": median["swd"] / median["forward"],
        "token_cost_fullres_forwards": relative_cost(scales, latent_side),
        "token_cost_with_text_fullres_forwards": _cost_with_text(scales, latent_side, config["patch_size"],
                                                                 TEXT_TOKENS[args.model]),
        # SwD's forwards alone, one per scale (min over repeats), in full-resolution forwards: the
        # structural cost without sampler overhead, robust to a busy machine.
        "forward_ms_per_image_min": {side: per_image_ms_min["forward" if side == latent_side else f"forward@{side}"]
                                     for side in sorted(set(scales))},
        "swd_forwards_only_fullres_forwards": sum(
            min(times["forward" if side == latent_side else f"forward@{side}"]) for side in scales)
            / min(times["forward"]),
        "from_min": {"speedup_vs_teacher": min(times["teacher"]) / min(times["swd"]),
                     "speedup_vs_fullres": min(times["fullres"]) / min(times["swd"]),
                     "fullres_forwards": min(times["swd"]) / min(times["forward"])},
    }
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def print_report(r: dict) -> None:
    ms, ms_min = r["ms_per_image"], r["ms_per_image_min"]
    print(f"\n{r['model']} on {r['device']} ({r['dtype']}, {r['torch_threads']} threads), latent "
          f"{r['latent_side']}x{r['latent_side']}, batch {r['batch_size']}, median of {r['repeats']}")
    print(f"{'sampler':<40}{'forwards':>10}{'ms/image':>12}{'(min)':>10}{'vs SwD':>9}")
    rows = [
        (f"SwD 4 steps, scales {r['scales']}", "4", ms["swd"]),
        (f"teacher {r['teacher_steps']} steps + CFG (2B)", f"{r['teacher_steps']}x2B", ms["teacher"]),
        ("full-resolution 4 steps", "4", ms["fullres"]),
        ("one full-resolution forward", "1", ms["forward"]),
    ]
    for (name, forwards, t), t_min in zip(rows, [ms_min[k] for k in ("swd", "teacher", "fullres", "forward")]):
        print(f"{name:<40}{forwards:>10}{t:>12.3f}{t_min:>10.3f}{t / ms['swd']:>8.2f}x")
    checks = [
        ("speed-up vs teacher", "speedup_vs_teacher", ">="),
        ("speed-up vs full-res 4 steps", "speedup_vs_fullres", ">="),
        ("SwD in full-res forwards", "fullres_forwards", "<="),
    ]
    print(f"\n{'':<30}{'median':>8}{'(min)':>8}")
    for name, key, op in checks:
        value, goal = r[key], GOALS[key]
        ok = value >= goal if op == ">=" else value <= goal
        print(f"{name:<30}{value:>8.2f}{r['from_min'][key]:>8.2f}   goal {op} {goal:<5} {'met' if ok else 'MISSED'}")
    print(f"{'(forwards only, per scale)':<30}{r['swd_forwards_only_fullres_forwards']:>8.2f}   full-res forwards "
          f"(min ms/image per side: {({k: round(v, 2) for k, v in r['forward_ms_per_image_min'].items()})})")
    print(f"{'(token-count estimate)':<30}{r['token_cost_fullres_forwards']:>8.2f}   full-res forwards; "
          f"{r['token_cost_with_text_fullres_forwards']:.2f} counting the text tokens every step carries")
    print("ratios from medians; on a shared CPU compare with the (min) column")


if __name__ == "__main__":
    main()
