"""Benchmark: the scale-wise (SwD) 4- and 6-step students vs the teacher (28 Euler steps with CFG)
vs the full-resolution 4-step student, transformer only (random-init weights, random text
embeddings; no VAE, no text encoders), measured side by side in one run, beside a FLOP model.

    python bench/bench_sampler.py --threads 1                                   # CPU: tiny teacher shape, latent 16x16x4, batch 32
    python bench/bench_sampler.py --model sd35-medium --num-layers 2 --threads 2  # CPU: SD3.5-M shape at 1024 px, 2 of 24 blocks
    python bench/bench_sampler.py --model sd35-medium --device cuda --resolution 1024  # GPU: SD3.5-M at full depth

Reports time per image of each sampler, the speed-ups, each sampler's time in units of one
measured full-resolution forward, and the FLOP model's (`pipeline.bench_models.transformer_flops`:
per-token matmuls of image and text tokens plus joint attention over both) predictions beside them.

SD3.5-M shape on CPU: real width (24 heads x 64 = 1536), 333 text tokens (256 T5 + 77 CLIP),
4096 image tokens at full scale (latent 128, patch 2), the published 4- and 6-step scales; depth
reduced (default 2 blocks: block 0 with dual attention as in MMDiT-X, block 1 the context-pre-only
last block). Depth multiplies every forward alike, so it cancels out of the ratios up to the mix of
block kinds (the FLOP model is printed at the measured depth and at full depth). float32 by
default on CPU (bf16 ran slower here: its CPU attention kernel is slower than fp32's). The teacher
is measured for `--teacher-measured-steps` steps (default 1 in this mode) and scaled linearly to
`--teacher-steps`: every teacher step is the same fixed-shape forward of 2B.

On the CPU every sampler is timed in this process's CPU seconds (OpenMP threads wait passively), so
the ratios hold on a shared, busy machine; wall-clock figures are printed beside them. On a GPU, wall.

Goals: issue 4 (tiny): >= 25x faster than the teacher, >= 2.0x faster than full-resolution 4 steps,
<= 2.3 full-resolution forwards. Issue 15 (SD3.5-M shape): measured ratios >= 0.9 of the FLOP
model's, 4-step SwD >= 1.8x faster than full-resolution 4 steps, <= 2.3 full-resolution forwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, so process CPU time counts work only (set before torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.bench_models import (MODELS, TEXT_TOKENS, build_transformer, random_text_cond,  # noqa: E402
                                   reduced_depth, schedule_flops)
from pipeline.swd.sampler import TextCond, sample_scalewise, sample_teacher, velocity  # noqa: E402
from pipeline.swd.schedules import (PRESETS, boundaries_to_sigmas, check_scales_for_patch,  # noqa: E402
                                    relative_cost, teacher_sigmas)

DEFAULTS = {  # model -> (SwD presets, VAE factor, default resolution px, default batch)
    "tiny": (["tiny-4step", "sd35-medium-6step"], 4, 64, 32),
    "sd35-medium": (["sd35-medium-4step", "sd35-medium-6step"], 8, 1024, 1),
}
GOALS = {  # model -> {result key: (op, goal, source)}
    "tiny": {"speedup_vs_teacher": (">=", 25.0, "issue 4"), "speedup_vs_fullres": (">=", 2.0, "issue 4"),
             "fullres_forwards": ("<=", 2.3, "issue 4")},
    "sd35-medium": {"speedup_vs_teacher": (">=", 25.0, "issue 4"), "speedup_vs_fullres": (">=", 1.8, "issue 15"),
                    "fullres_forwards": ("<=", 2.3, "issue 15")},
}
MODEL_RATIO_GOAL = 0.9  # issue 15: measured speed-up >= 0.9 x the FLOP model's
CPU_SD35_LAYERS = 2
NAMES = {"speedup_vs_teacher": "speed-up vs teacher", "speedup_vs_fullres": "speed-up vs full-res",
         "fullres_forwards": "full-res forwards per sample"}
PAPER_MS = {"swd6": 190.0}  # SWD.md section 5: SD3.5-M SwD 6 steps 0.19 s/image (hardware not stated)
PAPER_ABLATION_MS = {"swd": 170.0, "fullres": 380.0}  # SWD.md section 5, v1 ablation (Medium)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(DEFAULTS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (latent side = px / VAE factor)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None,
                   help=f"joint blocks (default: the model's; {CPU_SD35_LAYERS} for sd35-medium on CPU)")
    p.add_argument("--preset", choices=sorted(PRESETS), nargs="+", default=None,
                   help="SwD schedules, scaled to the latent side; the first is 'swd' and sets the full-res baseline's steps")
    p.add_argument("--teacher-steps", type=int, default=28)
    p.add_argument("--teacher-measured-steps", type=int, default=None,
                   help="teacher steps actually run, scaled linearly to --teacher-steps "
                        "(default: all of them; 1 for sd35-medium on CPU)")
    p.add_argument("--guidance-scale", type=float, default=7.0)
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs of every sampler (default 1; 0 for sd35-medium on CPU, where one forward "
                        "per shape warms up instead)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed repeats (default 5; 3 for sd35-medium on CPU)")
    p.add_argument("--per-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="also time one forward at each SwD scale (default on; off for sd35-medium on CPU)")
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


def flop_predictions(config: dict, students: dict, latent_side: int, text_tokens: int, teacher_steps: int,
                     guidance: bool = True) -> dict:
    """The FLOP model's figures for each student: cost in full-resolution forwards, speed-up vs the
    full-resolution student with the first student's step count, and vs the teacher (steps x 2B with
    CFG). `students`: label -> scales."""
    first = next(iter(students.values()))
    fullres = float(len(first))
    teacher = teacher_steps * (2 if guidance else 1)
    out = {"fullres_forwards": {"fullres": fullres, "teacher": float(teacher)}}
    for label, scales in students.items():
        cost = schedule_flops(config, scales, text_tokens, latent_side)
        out["fullres_forwards"][label] = cost
        out[label] = {"fullres_forwards": cost, "speedup_vs_fullres": fullres / cost,
                      "speedup_vs_teacher": teacher / cost}
    return out


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall s, this process's CPU s) of one call. On a shared CPU the CPU seconds leave out the time
    the process waited for a core, so their ratios hold on a busy machine; on a GPU wall time counts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets, vae_factor, default_px, default_batch = DEFAULTS[args.model]
    presets = args.preset or presets
    device = torch.device(args.device)
    cpu_sd35 = args.model == "sd35-medium" and device.type == "cpu"
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    batch = args.batch_size or default_batch
    full_config = MODELS[args.model]
    config = reduced_depth(full_config, args.num_layers or (CPU_SD35_LAYERS if cpu_sd35 else None))
    text_tokens = TEXT_TOKENS[args.model]
    repeats = args.repeats or (3 if cpu_sd35 else 5)
    warmup = args.warmup if args.warmup is not None else (0 if cpu_sd35 else 1)
    per_scale = args.per_scale if args.per_scale is not None else not cpu_sd35
    teacher_measured = min(args.teacher_steps, args.teacher_measured_steps or (1 if cpu_sd35 else args.teacher_steps))
    latent_side = (args.resolution or default_px) // vae_factor

    students: dict[str, tuple[str, list[int], list[float]]] = {}
    for i, preset in enumerate(presets):
        scales, sigmas = scaled_schedule(preset, latent_side, config["patch_size"])
        label = "swd" if i == 0 else f"swd{len(scales)}"
        while label in students:
            label += "'"
        students[label] = (preset, scales, sigmas)
    first_scales, first_sigmas = students["swd"][1], students["swd"][2]
    grid = teacher_sigmas(args.teacher_steps, 3.0)[:teacher_measured + 1]  # the first steps of the 28-step grid

    model = build_transformer(config, dtype=dtype, device=device)
    cond = TextCond(*random_text_cond(args.model, batch, seed=1, dtype=dtype, device=device))
    uncond = TextCond(*random_text_cond(args.model, 1, seed=2, dtype=dtype, device=device))
    gen = torch.Generator(device=device)

    def student(scales, sigmas):
        def run():
            sample_scalewise(model, cond, scales, sigmas, generator=gen.manual_seed(0))
        return run

    def teacher():
        sample_teacher(model, cond, uncond, grid, latent_side, guidance_scale=args.guidance_scale,
                       generator=gen.manual_seed(0))

    def forward_at(side, b=batch, c=cond):
        x = torch.randn(b, config["in_channels"], side, side, device=device, generator=gen.manual_seed(1))

        def forward():
            with torch.no_grad():
                velocity(model, x, 1.0, c)
        return forward

    runs = {label: student(scales, sigmas) for label, (_, scales, sigmas) in students.items()}
    runs |= {"teacher": teacher, "fullres": student([latent_side] * len(first_scales), first_sigmas),
             "forward": forward_at(latent_side)}
    all_sides = sorted({s for _, scales, _ in students.values() for s in scales} - {latent_side})
    if per_scale:
        for side in all_sides:
            runs[f"forward@{side}"] = forward_at(side)
    # One untimed forward per shape the samplers use (first-call allocation), then whole-sampler warmups.
    for side in all_sides:
        forward_at(side)()
    forward_at(latent_side)()
    if args.guidance_scale != 1.0:
        forward_at(latent_side, 2 * batch, cond.cat(TextCond(*(t.expand_as(c) for t, c in zip(uncond, cond)))))()
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits every sampler alike
        for name, fn in runs.items():
            wall_s, cpu_s = timed(fn, device)
            wall[name].append(wall_s)
            cpu[name].append(cpu_s)
    teacher_scale = args.teacher_steps / teacher_measured
    for times in (wall, cpu):
        times["teacher"] = [t * teacher_scale for t in times["teacher"]]
    # The figures (and goals) come from CPU seconds on the CPU, from wall seconds on a GPU; both are reported.
    times = cpu if device.type == "cpu" else wall
    median = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    median_wall = {name: statistics.median(t) for name, t in wall.items()}

    predicted = flop_predictions(config, {k: v[1] for k, v in students.items()}, latent_side, text_tokens,
                                 args.teacher_steps, args.guidance_scale != 1.0)
    predicted_full_depth = flop_predictions(full_config, {k: v[1] for k, v in students.items()}, latent_side,
                                            text_tokens, args.teacher_steps, args.guidance_scale != 1.0)

    def figures(stat: dict, label: str) -> dict:
        return {"speedup_vs_teacher": stat["teacher"] / stat[label], "speedup_vs_fullres": stat["fullres"] / stat[label],
                "fullres_forwards": stat[label] / stat["forward"]}

    per_student = {}
    for label, (preset, scales, sigmas) in students.items():
        m = figures(median, label)
        per_student[label] = {
            "preset": preset, "scales": scales, "sigmas": [round(s, 4) for s in sigmas],
            **m, "from_min": figures(best, label), "predicted": predicted[label],
            "predicted_full_depth": predicted_full_depth[label],
            "measured_over_predicted": {k: m[k] / predicted[label][k] for k in ("speedup_vs_teacher", "speedup_vs_fullres")},
            "token_cost_fullres_forwards": relative_cost(scales, latent_side),
            "token_cost_with_text_fullres_forwards": _cost_with_text(scales, latent_side, config["patch_size"], text_tokens),
        }
    sw = per_student["swd"]
    result = {
        "model": args.model, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "num_layers": config["num_layers"], "full_num_layers": full_config["num_layers"],
        "dual_attention_layers": list(config.get("dual_attention_layers", [])),
        "width": config["num_attention_heads"] * config["attention_head_dim"], "heads": config["num_attention_heads"],
        "text_tokens": text_tokens, "image_tokens_full": (latent_side // config["patch_size"]) ** 2,
        "latent_side": latent_side, "batch_size": batch, "scales": first_scales,
        "sigmas": sw["sigmas"], "teacher_steps": args.teacher_steps, "teacher_measured_steps": teacher_measured,
        "guidance_scale": args.guidance_scale,
        "torch_threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup,
        "clock": "process CPU time" if device.type == "cpu" else "wall",
        "ms_per_image": {name: 1000 * t / batch for name, t in median.items()},
        "wall_ms_per_image": {name: 1000 * t / batch for name, t in median_wall.items()},
        "wall": {label: figures(median_wall, label) for label in students},
        "ms_per_image_min": {name: 1000 * t / batch for name, t in best.items()},
        "measured_fullres_forwards": {name: median[name] / median["forward"] for name in [*students, "fullres", "teacher"]},
        "students": per_student,
        "speedup_vs_teacher": sw["speedup_vs_teacher"], "speedup_vs_fullres": sw["speedup_vs_fullres"],
        "fullres_forwards": sw["fullres_forwards"], "from_min": sw["from_min"],
        "flop_model": predicted, "flop_model_full_depth": predicted_full_depth,
        "token_cost_fullres_forwards": sw["token_cost_fullres_forwards"],
        "token_cost_with_text_fullres_forwards": sw["token_cost_with_text_fullres_forwards"],
    }
    if per_scale:
        # SwD's forwards alone, one per scale (min over repeats), in full-resolution forwards: the
        # structural cost without sampler overhead, robust to a busy machine.
        fwd = lambda side: "forward" if side == latent_side else f"forward@{side}"  # noqa: E731
        result["forward_ms_per_image_min"] = {side: result["ms_per_image_min"][fwd(side)]
                                              for side in sorted({*all_sides, latent_side})}
        result["swd_forwards_only_fullres_forwards"] = sum(best[fwd(s)] for s in first_scales) / best["forward"]
    result["goals"] = goals(result)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def goals(r: dict) -> list[dict]:
    """Each goal with its measured value and whether it is met."""
    out = []
    sw = r["students"]["swd"]
    for key, (op, goal, source) in GOALS[r["model"]].items():
        out.append({"name": f"SwD {len(sw['scales'])}-step {NAMES[key]}", "student": "swd", "key": key,
                    "value": sw[key], "op": op, "goal": goal, "source": source})
    for label, s in r["students"].items():
        for key, ratio in s["measured_over_predicted"].items():
            out.append({"name": f"SwD {len(s['scales'])}-step {NAMES[key]}, measured / FLOP model", "student": label,
                        "key": None, "value": ratio, "op": ">=", "goal": MODEL_RATIO_GOAL, "source": "issue 15"})
    for g in out:
        g["met"] = g["value"] >= g["goal"] if g["op"] == ">=" else g["value"] <= g["goal"]
    return out


def print_report(r: dict) -> None:
    ms, ms_min, fw = r["ms_per_image"], r["ms_per_image_min"], r["measured_fullres_forwards"]
    depth = (f"{r['num_layers']} of {r['full_num_layers']} blocks (reduced; dual attention in {r['dual_attention_layers']})"
             if r["num_layers"] != r["full_num_layers"] else f"full depth, {r['num_layers']} blocks")
    print(f"\n{r['model']} on {r['device']} ({r['dtype']}, {r['torch_threads']} threads), width {r['width']} "
          f"({r['heads']} heads), {depth}")
    print(f"latent {r['latent_side']}x{r['latent_side']} = {r['image_tokens_full']} image tokens at full scale + "
          f"{r['text_tokens']} text tokens, batch {r['batch_size']}, median of {r['repeats']} interleaved repeats, "
          f"timed in {r['clock']}")
    if r["teacher_measured_steps"] != r["teacher_steps"]:
        print(f"teacher: {r['teacher_measured_steps']} of {r['teacher_steps']} steps measured, time scaled "
              f"x{r['teacher_steps'] / r['teacher_measured_steps']:g} (each step is the same fixed-shape 2B forward)")
    pred = r["flop_model"]
    print(f"\n{'sampler':<44}{'ms/image':>11}{'(min)':>10}{'fwd/sample':>12}{'FLOP model':>12}"
          f"{'speed-up':>13}{'FLOP model':>12}{'meas/model':>12}")
    print(f"{'':<44}{'':>11}{'':>10}{'measured':>12}{'fwd/sample':>12}{'vs full-res':>13}{'speed-up':>12}")
    rows = [(f"SwD {len(s['scales'])} steps, scales {s['scales']}", k) for k, s in r["students"].items()]
    rows += [(f"teacher {r['teacher_steps']} steps + CFG (2B)", "teacher"),
             (f"full-resolution {len(r['scales'])} steps", "fullres"), ("one full-resolution forward", "forward")]
    for name, key in rows:
        measured_fw = fw.get(key, 1.0)
        model_fw = pred["fullres_forwards"].get(key, 1.0)
        speedup = ms["fullres"] / ms[key]
        model_speedup = pred["fullres_forwards"]["fullres"] / model_fw
        print(f"{name:<44}{ms[key]:>11.1f}{ms_min[key]:>10.1f}{measured_fw:>12.2f}{model_fw:>12.2f}"
              f"{speedup:>12.2f}x{model_speedup:>11.2f}x{speedup / model_speedup:>12.2f}")
    for label, s in r["students"].items():
        print(f"SwD {len(s['scales'])} steps vs teacher: {s['speedup_vs_teacher']:.1f}x measured, "
              f"{s['predicted']['speedup_vs_teacher']:.1f}x FLOP model "
              f"(meas/model {s['measured_over_predicted']['speedup_vs_teacher']:.2f})")
    print(f"\n{'goal':<58}{'value':>8}{'(min)':>8}   goal")
    for g in r["goals"]:
        from_min = r["students"][g["student"]]["from_min"][g["key"]] if g["key"] else None
        print(f"{g['name']:<58}{g['value']:>8.2f}{'' if from_min is None else f'{from_min:8.2f}':>8}   "
              f"{g['op']} {g['goal']:<5} ({g['source']}) {'met' if g['met'] else 'MISSED'}")
    print("\nFLOP model (pipeline.bench_models.transformer_flops): per-token matmuls of image and text tokens + "
          "attention 4 L^2 d, at the measured depth;")
    for label, s in r["students"].items():
        print(f"  SwD {len(s['scales'])} steps: {s['predicted']['fullres_forwards']:.3f} full-res forwards here, "
              f"{s['predicted_full_depth']['fullres_forwards']:.3f} at full depth ({r['full_num_layers']} blocks); "
              f"image tokens only (schedules.relative_cost): {s['token_cost_fullres_forwards']:.3f}; "
              f"image + text tokens, linear: {s['token_cost_with_text_fullres_forwards']:.3f}")
    if "swd_forwards_only_fullres_forwards" in r:
        print(f"SwD forwards alone, one per scale (min): {r['swd_forwards_only_fullres_forwards']:.2f} full-res forwards "
              f"(min ms/image per side: {({k: round(v, 2) for k, v in r['forward_ms_per_image_min'].items()})})")
    if r["device"].startswith("cuda") and r["num_layers"] == r["full_num_layers"] and r["model"] == "sd35-medium":
        for key, paper in [*PAPER_MS.items(), *PAPER_ABLATION_MS.items()]:
            if key in ms:
                print(f"absolute: {key} {ms[key]:.0f} ms/image (paper: {paper:.0f} ms; paper hardware not stated)")
    for label, w in r["wall"].items():
        print(f"wall clock instead: {label} {w['fullres_forwards']:.2f} full-res forwards, {w['speedup_vs_fullres']:.2f}x "
              f"vs full-res, {w['speedup_vs_teacher']:.1f}x vs teacher ({r['wall_ms_per_image'][label]:.1f} ms/image)")
    print(f"ratios from medians of {r['clock']}; the (min) column is the fastest repeat")


if __name__ == "__main__":
    main()
