"""Step 5 of `evaluate`: the human-readable outputs. `samples.png` (prompts x image sets),
`progression.png` (the student's clean estimate after each scale) and `report.md` (the comparison
table and how each number was measured)."""

from __future__ import annotations

from pathlib import Path


def save_grid(path: Path, columns: list, labels: list[str], prompts: list[str] | None = None,
              thumbnail_px: int = 192) -> None:
    """Rows = prompts (labelled with them), columns = image sets (uint8 [rows, H, W, 3] each, labelled),
    thumbnails upscaled nearest-neighbour to about `thumbnail_px` (`pipeline.image_grid`)."""
    from pipeline.image_grid import labelled_grid

    labelled_grid(columns, labels, prompts, thumbnail_px).save(path)


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

    def ci(key: str) -> str:
        lo, hi = v.get(f"{key}_ci95_low"), v.get(f"{key}_ci95_high")
        return "-" if lo is None or hi is None else f"[{lo:.4g}, {hi:.4g}]"

    with_ci = any(k.endswith("_ci95_low") for k in v)
    cols = ["generator", "steps (forwards)", "latency s/img", "sampling s/img", "CPU s/img", "speedup (student vs)",
            "CPU-time speedup",
            f"FD ({record['fd_extractor']})"] + (["FD 95% CI"] if with_ci else [])
    if with_adherence:
        cols += ["adherence (all)"] + (["adherence 95% CI"] if with_ci else []) + \
            ["all three", "colour", "position", "shape", "size", "background"]
    if any(k.endswith("_clip_score") for k in v):
        cols += ["CLIP score (torchmetrics)", "CLIP cosine (released)"]
    if any(k.endswith("_pickscore") for k in v):
        cols += ["PickScore", "PickScore cosine (released)"]
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
        row += [ci(f"{name}_fd")] if with_ci else []
        if with_adherence:
            row += [f(f"{name}_adherence", "{:.3f}")] + ([ci(f"{name}_adherence")] if with_ci else []) + \
                [f(f"{name}_adherence_{a}", "{:.3f}") for a in ("all_three", "colour", "position", "shape", "size",
                                                                 "background")]
        if "CLIP score (torchmetrics)" in cols:
            row += [f(f"{name}_clip_score"), f(f"{name}_clip_cosine")]
        if "PickScore" in cols:
            row += [f(f"{name}_pickscore"), f(f"{name}_pickscore_cosine")]
        if "FID (Inception)" in cols:
            row.append(f(f"{name}_fid"))
        lines.append("| " + " | ".join(row) + " |")
    if with_adherence and "data_adherence" in v:
        lines += ["", f"Oracle adherence of the reference images themselves: {f('data_adherence', '{:.3f}')}."]
    lines += published_lines(v, record.get("published") or {})
    lines += gap_sentences(v, record.get("bootstrap") or {})
    lines += protocol_lines(record.get("protocols") or {})
    fd_line = (f"- FD: Frechet distance between Gaussians fitted to {record['fd_extractor']} features (ImageNet "
               f"EfficientNet-Lite0, 1280-d pre-logit global average pool; images resized bicubic to "
               f"{record['fd_image_side_px']} px, (x - 127) / 128) of each generator's images and of the eval "
               f"set's reference images. Not FID: compare only with FDs of the same extractor, reference set and "
               f"sample count.") if not record.get("prompts") else (
        f"- FD: on the prompt set ({record['prompts']}) FD is the FID: pool3 features of pytorch-fid's Inception "
        f"against the reference statistics (the protocol below).")
    lines += ["", "## How each number is measured", fd_line,
              "- CLIP score (torchmetrics): max(100 * mean cos, 0) of the CLIP image and text embeddings; CLIP cosine "
              "(released): the plain cosine, as the released SwD evaluation reports it (ViT-H/14). PickScore: "
              "exp(logit_scale) * cos of the PickScore model, as the PickScore paper; PickScore cosine: the "
              "released code's number.",
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
    first = "" if record.get("prompts") else "data, "
    lines += ["", "## Sample grid prompts (rows of samples.png; columns: " + first + ", ".join(gens) + ")"]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(grid_prompts)]
    return "\n".join(lines) + "\n"


def gap_sentences(v: dict, bootstrap: dict) -> list[str]:
    """One sentence per gap (student - teacher, baseline - student; adherence and FD): the point
    difference, its paired-bootstrap 95% interval, and whether the interval calls it real (excludes 0)."""
    from pipeline.bootstrap import is_real
    from pipeline.eval_record import INTERVAL_PAIRS

    out = []
    for a, b in INTERVAL_PAIRS:
        for metric, better in (("adherence", "higher"), ("fd", "lower")):
            lo, hi = v.get(f"{a}_minus_{b}_{metric}_ci95_low"), v.get(f"{a}_minus_{b}_{metric}_ci95_high")
            if lo is None or hi is None or f"{a}_{metric}" not in v or f"{b}_{metric}" not in v:
                continue
            diff = v[f"{a}_{metric}"] - v[f"{b}_{metric}"]
            verdict = ("real: the interval excludes 0" if is_real(lo, hi) else
                       "not resolved: the interval includes 0, so this evaluation cannot tell them apart")
            out.append(f"- {a} - {b} {metric} ({better} is better): {diff:+.4g}, 95% CI [{lo:+.4g}, {hi:+.4g}]: "
                       f"{verdict}.")
    if not out:
        return []
    return ["", "## Gaps (paired bootstrap over the eval prompts)",
            f"{bootstrap.get('resamples', '?')} resamples of the prompts (seed {bootstrap.get('seed', '?')}); each "
            f"resample scores every generator and the reference set on the same prompt indices; percentile "
            f"intervals. A gap is called real only when its interval excludes 0.", *out]


def published_lines(v: dict, published: dict) -> list[str]:
    """This evaluation's number beside the paper's (`evaluate.published`, SWD.md section 5) per metric."""
    if not published:
        return []
    out = ["", "## Beside the paper (evaluate.published; comparable only under the paper's protocol)",
           "| metric | this evaluation | paper |", "|---|---|---|"]
    for key, paper in published.items():
        out.append(f"| {key} | {format(v[key], '.4g') if key in v else '-'} | {paper:.4g} |")
    return out


def protocol_lines(protocols: dict) -> list[str]:
    """Each Frechet distance's protocol (what `compare` checks before comparing two runs)."""
    if not protocols:
        return []
    out = ["", "## Protocols (compare puts two runs' numbers side by side only under the same protocol id)"]
    for kind, p in protocols.items():
        ref = p["reference"]
        where = (f"reference statistics sha256 {str(ref.get('sha256'))[:16]}" if ref.get("kind") == "stats"
                 else f"the eval set's reference images ({ref.get('eval_set')})")
        out.append(f"- {'FID' if kind == 'fid' else 'FD'}: {p['extractor']}, weights {str(p['weights_sha256'])[:16]}, "
                   f"resize {p['resize_rule']}, images at {p['image_side_px'] or 'the generated side'} px, "
                   f"{p['num_samples']} samples, against {where}; protocol id {p['id']:x}")
    return out
