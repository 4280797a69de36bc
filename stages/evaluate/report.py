"""Step 5 of `evaluate`: the human-readable outputs. `samples.png` (prompts x image sets),
`progression.png` (the student's clean estimate after each scale) and `report.md` (the comparison
table and how each number was measured)."""

from __future__ import annotations

from pathlib import Path


def save_grid(path: Path, columns: list, labels: list[str]) -> None:
    """Rows = prompts, columns = image sets (uint8 [rows, H, W, 3] each), a label above each column."""
    import numpy as np
    from PIL import Image, ImageDraw

    rows, side = columns[0].shape[0], columns[0].shape[1]
    header = 12
    canvas = Image.new("RGB", (side * len(columns), header + side * rows), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (ims, label) in enumerate(zip(columns, labels)):
        draw.text((c * side + 2, 0), label, fill=(0, 0, 0))
        for r in range(rows):
            canvas.paste(Image.fromarray(np.asarray(ims[r])), (c * side, header + r * side))
    canvas.save(path)


def save_strip(path: Path, strip, side: int) -> None:
    """The student's clean estimate after each scale: rows = prompts, columns = steps."""
    import numpy as np
    from PIL import Image

    if strip is None:
        Image.new("RGB", (side, side)).save(path)
        return
    rows, steps = strip.shape[:2]
    canvas = np.concatenate([np.concatenate(list(strip[r]), axis=1) for r in range(rows)], axis=0)
    Image.fromarray(canvas).save(path)


def report_markdown(record: dict, grid_prompts: list[str], with_adherence: bool) -> str:
    """The Markdown report: the comparison table, how each number was measured, the grid's prompts."""
    v, gens = record["metrics"], record["generators"]
    es = record["eval_set"]

    def f(key: str, fmt: str = "{:.4g}") -> str:
        return fmt.format(v[key]) if key in v else "-"

    cols = ["generator", "steps (forwards)", "latency s/img", "sampling s/img", "CPU s/img", "speedup (student vs)",
            "CPU-time speedup",
            f"FD ({record['fd_extractor']})"]
    if with_adherence:
        cols += ["adherence (all)", "all three", "colour", "position", "shape", "size", "background"]
    if any(k.endswith("_clip_score") for k in v):
        cols.append("CLIP score")
    if any(k.endswith("_fid") for k in v):
        cols.append("FID (Inception)")
    lines = ["# Evaluation: student vs teacher" + (" vs baseline" if "baseline" in gens else ""), "",
             f"{es['num_prompts']} eval prompts (eval set {es['fingerprint']}), seed {es['seed']}, images "
             f"{record['image_side_px']} px, batch {es['batch_size']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, g in gens.items():
        speedup = "1" if name == "student" else f(f"speedup_vs_{name}", "{:.2f}x")
        speedup_cpu = "1" if name == "student" else f(f"speedup_vs_{name}_cpu", "{:.2f}x")
        row = [name, f"{len(g['scales']) if g['kind'] == 'scalewise' else len(g['sigmas']) - 1} ({g['num_forwards']})",
               f(f"{name}_latency_s", "{:.5f}"), f(f"{name}_sampling_latency_s", "{:.5f}"),
               f(f"{name}_latency_cpu_s", "{:.5f}"), speedup, speedup_cpu, f(f"{name}_fd")]
        if with_adherence:
            row += [f(f"{name}_adherence", "{:.3f}")] + [f(f"{name}_adherence_{a}", "{:.3f}") for a in
                                                          ("all_three", "colour", "position", "shape", "size",
                                                           "background")]
        if "CLIP score" in cols:
            row.append(f(f"{name}_clip_score"))
        if "FID (Inception)" in cols:
            row.append(f(f"{name}_fid"))
        lines.append("| " + " | ".join(row) + " |")
    if with_adherence:
        lines += ["", f"Oracle adherence of the reference images themselves: {f('data_adherence', '{:.3f}')}."]
    lines += ["", "## How each number is measured",
              f"- FD: Frechet distance between Gaussians fitted to {record['fd_extractor']} features (ImageNet "
              f"EfficientNet-Lite0, 1280-d pre-logit global average pool; images resized bicubic to "
              f"{record['fd_image_side_px']} px, (x - 127) / 128) of each generator's images and of the eval "
              f"set's reference images. Not FID: compare only with FDs of the same extractor, reference set and "
              f"sample count.",
              "- Adherence: the shapes oracle (pipeline/oracle.py) reads colour, position, shape, size and "
              "background back from each image; 'all' = every attribute of the prompt right.",
              "- Latency: median over timed calls after warm-up, same resources and batch size for every "
              "generator, divided by the batch size; end to end (text encoding + sampling + VAE decode); "
              "'sampling' excludes text encoding and decoding; 'CPU s/img' is the process's CPU time (all "
              "threads) per image, which other load on a shared CPU moves less than wall time.",
              "- Speedup: teacher (or baseline) latency / student latency.", "",
              "## Generators"]
    for name, g in gens.items():
        lines.append(f"- {name}: {g['kind']}, scales {g['scales']}, sigmas {g['sigmas']}, guidance "
                     f"{g['guidance_scale']}; latency batch times {g['times_s']} s")
    lines += ["", "## Sample grid prompts (rows of samples.png; columns: data, " + ", ".join(gens) + ")"]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(grid_prompts)]
    return "\n".join(lines) + "\n"
