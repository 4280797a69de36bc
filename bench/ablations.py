"""The paper's ablation table in miniature: each SwD design choice switched off in turn, run through the
pipeline's own stage graph, judged against SwD full by the evaluate stage's 95% intervals.

    python bench/ablations.py [--budget quick|tiny|config] [--num-steps N] [--max-prompts N]
                              [--variants swd_full,no_mmd,...] [--workdir DIR] [--config FILE ...]
                              [--experiment swd-ablations] [--no-grid] [key.sub=value ...]

Steps:
1. Each variant is the resolved pipeline config (pipeline.yaml, each `--config FILE`, the budget's keys,
   trailing `key.sub=value` overrides, then the variant's own overrides, `VARIANTS` below), validated
   together before anything starts (exit 2 naming every problem).
2. Each variant runs through `pipeline/run.py`'s stage graph (`graph.plan` + `run.run_stages`) with every
   stage but `register` (an ablation student is never a champion candidate). Shared stages (shards,
   teacher, cache) are fingerprint-cached after the first variant; a loss variant re-runs distill and
   evaluate; a sampling variant (`evaluate.student_*`) re-runs evaluate only, on the SwD-full student.
3. The table (`<workdir>/ablations/ablations.md`, its path printed): per variant FD and adherence with
   their 95% intervals (`{gen}_fd_ci95_low/high`, `{gen}_adherence_ci95_low/high` of the evaluate
   record, "n/a" where absent), latency, distill seconds per step, the paper's figure (SWD.md) and
   direction, what the miniature shows against SwD full, and whether it agrees (`judge`).
4. MLflow (experiment `--experiment`): one parent run for the bench; each variant's pipeline run is
   its child (its stages one level further down), holding the variant's `ablation_*` metrics and its
   overrides as params, so the runs table compares variants; the table and the ablation grid
   (`ablation_grid.png`, `pipeline.image_grid.ablation_grid`: each variant's generator run here on the
   first `evaluate.grid_prompts` eval prompts with one seed, one column per variant) are artifacts of
   the parent.

Agreement (`judge`): a difference is real only when the intervals say so. With a paired interval of
the difference (variant and SwD full in one evaluate record, e.g. the full-resolution baseline), real
when it excludes 0; otherwise real when the two intervals do not overlap (conservative). "agrees": the
real difference has the paper's direction; "disagrees": a real difference the other way (or, for a
"same quality" claim, any real difference); "within noise": no real difference; "n/a": no intervals.
Timings have no interval: a ratio counts as real beyond +-`TIME_TOLERANCE` (the box is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as pipeline/run.py (before torch and Ray load)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stages  # noqa: E402
from pipeline import graph, tracking  # noqa: E402
from pipeline import run as pipeline_run  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.eval_record import read_record  # noqa: E402
from pipeline.run_log import RunLog  # noqa: E402

EXPERIMENT = "swd-ablations"
TABLE_FILE = "ablations.md"
GRID_FILE = "ablation_grid.png"
RESULTS_FILE = "ablations.json"
VERDICTS = ("agrees", "disagrees", "within noise", "n/a")
TIME_TOLERANCE = 0.2  # a timing ratio within 1 +- 0.2 is "within noise" on a shared CPU box

# Budgets: keys every variant gets (before the command line's own key=value overrides).
# quick: the README's run (every variant; its wall time there); tiny: the test's; config: as configured.
BUDGETS = {
    "quick": ["distill.num_steps=30", "evaluate.max_prompts=48", "evaluate.batch_size=16", "evaluate.latency_repeats=2"],
    "tiny": ["distill.num_steps=2", "distill.checkpoint_every_steps=2", "distill.sample_every_steps=2",
             "distill.batch_size_per_worker=2", "distill.fake_updates_per_step=1", "distill.sample_num_prompts=2",
             "swd.student.lora_rank=4", "swd.fake.lora_rank=4",
             "evaluate.max_prompts=8", "evaluate.batch_size=4", "evaluate.latency_warmup_batches=0",
             "evaluate.latency_repeats=1", "evaluate.grid_prompts=2", "evaluate.teacher_sampler.num_steps=2",
             "evaluate.bootstrap_resamples=50"],
    "config": [],
}


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: tuple[str, ...]
    paper: str        # the paper's figure (SWD.md)
    expected: str     # the paper's direction: what `judge` checks (see CLAIMS)
    generator: str = "student"  # whose metrics of the evaluate record are this variant's

    @property
    def sampling_only(self) -> bool:  # re-runs evaluate only, on the SwD-full student
        return all(o.startswith("evaluate.student_") for o in self.overrides) and bool(self.overrides)


# expected -> (the paper's direction in words, the quantity judged)
CLAIMS = {
    "reference": ("reference", "-"),
    "fd_higher": ("FD higher (worse)", "FD"),
    "same_quality_slower": ("same quality (FD, adherence), slower", "FD, adherence, latency"),
    "cheaper_training": ("cheaper per training step", "distill s/step"),
}

VARIANTS = (
    Variant("swd_full", "SwD full (default)", (), "FID 13.6 (v1 ablations' base; 14.7 in the upsampling one)",
            "reference"),
    Variant("full_resolution", "full-resolution baseline, same losses and steps", ("evaluate.baseline=true",),
            "same PickScore/CLIP/IR/GenEval, ~2.2x slower (0.38 vs 0.17 s Medium, 0.92 vs 0.41 s Large)",
            "same_quality_slower", generator="baseline"),
    Variant("no_mmd", "no MMD", ("swd.loss.mmd_weight=0",), "FID 13.6 -> 19.5", "fd_higher"),
    Variant("mmd_pooled", "MMD pooled over the batch", ("swd.loss.mmd_pooling=batch",), "FID 13.6 -> 16.4",
            "fd_higher"),
    Variant("mmd_no_noise", "MMD without noise", ("swd.loss.mmd_noise=false",), "FID 13.6 -> 16.6", "fd_higher"),
    # SWD.md: no fake network, teacher features; how SDXL-SwD was trained; no FID figure given
    Variant("mmd_only", "MMD-only mode", ("swd.loss.mode=mmd_only", "swd.loss.mmd_features=teacher"),
            "~7x cheaper per step (SDXL-SwD's recipe); no quality figure", "cheaper_training"),
    Variant("nearest", "nearest-neighbour upsampling (sampler)", ("evaluate.student_upsample=nearest",),
            "aliasing in the first public release, fixed by bicubic (no figure)", "fd_higher"),
    Variant("noisy_upsampling", "upsampling the noisy latent (sampler)", ("evaluate.student_upsample_source=noisy",),
            "FID 122+ vs 14.7", "fd_higher"),
)
BY_NAME = {v.name: v for v in VARIANTS}
# Run order: SwD full first (everything else compares with it, the sampling variants reuse its student),
# then the sampling variants (evaluate only), then the distill variants.
RUN_ORDER = ("swd_full", "nearest", "noisy_upsampling", "full_resolution", "no_mmd", "mmd_pooled", "mmd_no_noise",
             "mmd_only")


# ----------------------------------------------------------------------------- judgement (pure)


def interval(metrics: dict, key: str) -> tuple[float, float] | None:
    """(low, high) of `key`'s 95% interval in an evaluate record's metrics, None when absent."""
    lo, hi = metrics.get(f"{key}_ci95_low"), metrics.get(f"{key}_ci95_high")
    return None if lo is None or hi is None else (float(lo), float(hi))


def paired_interval(metrics: dict, a: str, b: str, metric: str) -> tuple[float, float] | None:
    """The 95% interval of `a - b` on `metric` (e.g. baseline - student FD) in one record; either order."""
    direct = interval(metrics, f"{a}_minus_{b}_{metric}")
    if direct is not None:
        return direct
    swapped = interval(metrics, f"{b}_minus_{a}_{metric}")
    return None if swapped is None else (-swapped[1], -swapped[0])


def direction(variant_ci=None, reference_ci=None, diff_ci=None) -> str | None:
    """Variant vs reference: "higher", "lower", "within noise", or None without intervals. A paired
    interval of the difference wins (real when it excludes 0); else real when the intervals do not overlap."""
    if diff_ci is not None:
        lo, hi = diff_ci
        return "higher" if lo > 0 else "lower" if hi < 0 else "within noise"
    if variant_ci is None or reference_ci is None:
        return None
    if variant_ci[0] > reference_ci[1]:
        return "higher"
    if variant_ci[1] < reference_ci[0]:
        return "lower"
    return "within noise"


def ratio_direction(ratio: float | None, tolerance: float = TIME_TOLERANCE) -> str | None:
    """A timing ratio (variant / reference) as a direction; within 1 +- tolerance is noise."""
    if ratio is None:
        return None
    return "higher" if ratio > 1 + tolerance else "lower" if ratio < 1 - tolerance else "within noise"


def agreement(expected: str, observed: str | None) -> str:
    """expected "higher" | "lower" | "same" vs an observed direction -> one of VERDICTS."""
    if observed is None:
        return "n/a"
    if expected == "same":
        return "agrees" if observed == "within noise" else "disagrees"
    if observed == "within noise":
        return "within noise"
    return "agrees" if observed == expected else "disagrees"


def combine(verdicts: list[str]) -> str:
    """Several parts of one claim: n/a if any part is, disagrees if any part does, agrees if all do."""
    if "n/a" in verdicts:
        return "n/a"
    if "disagrees" in verdicts:
        return "disagrees"
    return "agrees" if all(v == "agrees" for v in verdicts) else "within noise"


def judge(expected: str, observed: dict[str, str | None]) -> str:
    """A row's verdict from its observed directions vs SwD full (`observed`: fd, adherence, latency,
    distill_s_per_step -> direction or None)."""
    if expected == "reference":
        return "reference"
    if expected == "fd_higher":
        return agreement("higher", observed.get("fd"))
    if expected == "same_quality_slower":
        return combine([agreement("same", observed.get("fd")), agreement("same", observed.get("adherence")),
                        agreement("higher", observed.get("latency"))])
    if expected == "cheaper_training":
        return agreement("lower", observed.get("distill_s_per_step"))
    raise ValueError(f"expected: {expected!r} is not a claim; valid: {', '.join(CLAIMS)}")


# ----------------------------------------------------------------------------- rows


@dataclass
class Result:
    """One variant's outcome: its evaluate record's metrics, distill summary and MLflow run."""
    variant: Variant
    status: str = "done"  # done | failed: <why>
    metrics: dict = field(default_factory=dict)
    distill_summary: dict = field(default_factory=dict)
    run_id: str | None = None
    evaluate_dir: str | None = None
    distill_dir: str | None = None


def values(result: Result) -> dict[str, float | None]:
    """The variant's own figures under generator-free names (what its MLflow run holds as ablation_*)."""
    m, g = result.metrics, result.variant.generator
    out = {"fd": m.get(f"{g}_fd"), "adherence": m.get(f"{g}_adherence"), "latency_s": m.get(f"{g}_latency_s")}
    for metric in ("fd", "adherence"):
        ci = interval(m, f"{g}_{metric}")
        out[f"{metric}_ci95_low"], out[f"{metric}_ci95_high"] = ci if ci else (None, None)
    s = result.distill_summary
    out["distill_s_per_step"] = s["train_s"] / s["steps"] if s.get("train_s") and s.get("steps") else None
    return out


def observe(result: Result, reference: Result | None) -> tuple[dict[str, str | None], dict[str, float | None]]:
    """Directions vs SwD full (fd, adherence, latency, distill_s_per_step) and the point differences /
    ratios behind them. A variant evaluated in one record with the student (the baseline) is compared
    pairwise inside that record, latency from the same timing task."""
    v, g = values(result), result.variant.generator
    m = result.metrics
    same_record = g != "student"  # the baseline's record also holds the (SwD-full) student
    ref_m = m if same_record else (reference.metrics if reference else {})
    ref = {"fd": ref_m.get("student_fd"), "adherence": ref_m.get("student_adherence"),
           "latency_s": ref_m.get("student_latency_s")}
    ref_distill = values(reference)["distill_s_per_step"] if reference else None
    obs, delta = {}, {}
    for metric in ("fd", "adherence"):
        diff_ci = paired_interval(m, g, "student", metric) if same_record else None
        obs[metric] = direction(interval(m, f"{g}_{metric}"), interval(ref_m, f"student_{metric}"), diff_ci)
        delta[metric] = v[metric] - ref[metric] if v[metric] is not None and ref[metric] is not None else None
    if same_record and m.get("speedup_vs_baseline"):  # student and baseline timed in one task
        delta["latency"] = float(m["speedup_vs_baseline"])
    elif v["latency_s"] and ref["latency_s"]:
        delta["latency"] = v["latency_s"] / ref["latency_s"]
    else:
        delta["latency"] = None
    obs["latency"] = ratio_direction(delta["latency"])
    d = v["distill_s_per_step"]
    delta["distill_s_per_step"] = d / ref_distill if d and ref_distill and not result.variant.sampling_only else None
    obs["distill_s_per_step"] = ratio_direction(delta["distill_s_per_step"])
    return obs, delta


def _num(x, fmt="{:.4g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _with_ci(value, low, high, fmt="{:.4g}") -> str:
    ci = "n/a" if low is None or high is None else f"{fmt.format(low)}, {fmt.format(high)}"
    return f"{_num(value, fmt)} [{ci}]"


def _signed(x, fmt="{:+.3g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def row(result: Result, reference: Result | None) -> dict[str, str]:
    """One table row (column -> cell)."""
    var = result.variant
    claim, _ = CLAIMS[var.expected]
    base = {"variant": var.label, "overrides": " ".join(f"`{o}`" for o in var.overrides) or "(none)",
            "paper": var.paper, "paper direction": claim}
    if result.status != "done":
        return {**base, "FD [95% CI]": "n/a", "adherence [95% CI]": "n/a", "latency ms/img": "n/a",
                "distill s/step": "n/a", "miniature vs SwD full": result.status, "agrees?": "n/a"}
    v = values(result)
    obs, delta = observe(result, reference)
    if var.expected == "reference":
        seen = "-"
    else:
        parts = [f"FD {_signed(delta['fd'])} ({obs['fd'] or 'no CI'})",
                 f"adherence {_signed(delta['adherence'])} ({obs['adherence'] or 'no CI'})"]
        if var.expected == "same_quality_slower":
            parts.append(f"SwD {_num(delta['latency'], '{:.2f}')}x faster ({obs['latency'] or 'n/a'})")
        if var.expected == "cheaper_training":
            parts.append(f"s/step {_num(delta['distill_s_per_step'], '{:.2f}')}x of SwD full "
                         f"({obs['distill_s_per_step'] or 'n/a'})")
        seen = "; ".join(parts)
    distill = _num(v["distill_s_per_step"], "{:.2f}") + (" (SwD full's)" if var.sampling_only else "")
    return {**base, "FD [95% CI]": _with_ci(v["fd"], v["fd_ci95_low"], v["fd_ci95_high"], "{:.1f}"),
            "adherence [95% CI]": _with_ci(v["adherence"], v["adherence_ci95_low"], v["adherence_ci95_high"], "{:.3f}"),
            "latency ms/img": _num(v["latency_s"] * 1000 if v["latency_s"] is not None else None, "{:.2f}"),
            "distill s/step": distill, "miniature vs SwD full": seen,
            "agrees?": judge(var.expected, obs)}


COLUMNS = ("variant", "overrides", "FD [95% CI]", "adherence [95% CI]", "latency ms/img", "distill s/step",
           "paper", "paper direction", "miniature vs SwD full", "agrees?")


def table_markdown(results: list[Result], header: dict[str, str]) -> str:
    """The markdown page: what ran, the table, how to read it."""
    reference = next((r for r in results if r.variant.expected == "reference" and r.status == "done"), None)
    lines = ["# SwD ablations in miniature", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        cells = row(r, reference)
        lines.append("| " + " | ".join(cells[c].replace("|", "\\|") for c in COLUMNS) + " |")
    lines += ["", "FD: Frechet distance of the evaluate stage (lower is better); adherence: the shapes oracle's "
              "all-attributes-right rate (higher is better); [95% CI]: the evaluate stage's bootstrap interval over "
              "eval prompts (n/a: the record has none). Agreement: a difference is real when the paired interval of "
              "the difference excludes 0 (variant and SwD full in one record), else when the two intervals do not "
              "overlap; agrees / disagrees: a real difference in / against the paper's direction (for a "
              "'same quality' claim any real difference disagrees); within noise: no real difference. "
              f"Timings have no interval: a ratio within 1 +- {TIME_TOLERANCE} is noise. Sampling variants reuse "
              "SwD full's student; the paper's figures are FID at 1024 px (SWD.md section 5), ours FD on the "
              "embedded shapes miniature, so only directions compare.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- ablation grid


def grid_images(cfg, results: list[Result], num_prompts: int, seed: int) -> tuple[dict, list[str]]:
    """Each done variant's generator on the first `num_prompts` eval prompts with one seed (the same
    starting noise wherever the first scale matches), in this process: {variant: uint8 [rows, H, W, 3]}."""
    from pipeline.data import shard_urls
    from pipeline.generate import Generator, GeneratorSpec
    from pipeline.teacher import bundle_location, load_bundle, resolve_pretrained
    from stages.evaluate.eval_set import read_eval_samples

    t = cfg.teacher
    shards_dir = graph.stage_dir(cfg.workdir, "shards") / _fingerprint_of(cfg, "shards")
    teacher_dir = graph.stage_dir(cfg.workdir, "teacher") / _fingerprint_of(cfg, "teacher")
    samples, _ = read_eval_samples(shard_urls(shards_dir, "eval"), num_prompts, cfg.evaluate.max_bad_fraction)
    prompts = [s["prompt"] for s in samples]
    location = str(resolve_pretrained(bundle_location(teacher_dir), t.local_files_only))
    bundle = load_bundle(location, t.dtype, "cpu", t.local_files_only, t.load_t5, t.max_sequence_length)
    images = {}
    for r in results:
        if r.status != "done" or not r.distill_dir:
            continue
        ev = json.loads((Path(r.evaluate_dir) / graph.MANIFEST).read_text())["sections"]["evaluate"]
        spec = GeneratorSpec(name=r.variant.name, location=location, dtype=t.dtype, device="cpu", load_t5=t.load_t5,
                             local_files_only=t.local_files_only, max_sequence_length=t.max_sequence_length,
                             num_threads=None, student_dir=r.distill_dir,
                             upsample=ev.get("student_upsample", "bicubic"),
                             upsample_source=ev.get("student_upsample_source", "clean"))
        images[r.variant.name] = Generator(spec, bundle=bundle)(prompts, seed)
    return images, prompts


def _fingerprint_of(cfg, stage: str) -> str:
    return next(p.fingerprint for p in graph.plan(cfg, stages.default_stages()) if p.name == stage)


# ----------------------------------------------------------------------------- running


def variant_overrides(variant: Variant, common: list[str], experiment: str) -> list[str]:
    """Every key=value a variant runs with: budget and command line first, the variant's own last."""
    return [*common, f"tracking.experiment={experiment}", *variant.overrides]


def load_variants(names: list[str], configs: list[str], common: list[str], experiment: str) -> dict:
    """{variant: resolved config}; every problem of every variant at once (ConfigError)."""
    cfgs, problems = {}, []
    for name in names:
        try:
            cfg = stages.load_config(configs, variant_overrides(BY_NAME[name], common, experiment))
            pipeline_run.check_environment(cfg)
            cfgs[name] = cfg
        except ConfigError as e:
            problems += [f"variant {name}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return cfgs


def run_variant(variant: Variant, cfg, configs: list[str], common: list[str], experiment: str, uri: str,
                parent_id: str) -> Result:
    """One variant through the stage graph (all stages but register), its run nested under the bench's."""
    stage_list = stages.default_stages()
    names = {s.name for s in stage_list} - {"register"}
    planned = graph.plan(cfg, stage_list, only=names)
    argv = [a for f in configs for a in ("--config", f)] + variant_overrides(variant, common, experiment)
    key = uuid.uuid4().hex
    tags = {"mlflow.parentRunId": parent_id, "ablation.variant": variant.name, "ablation.key": key}
    if any(p.action == "run" for p in planned):
        pipeline_run.init_ray(cfg)
    print(f"[ablations] {variant.name}: {' '.join(variant.overrides) or '(defaults)'}", flush=True)
    started = time.monotonic()
    rc = pipeline_run.run_stages(cfg, planned, uri, argv, tags=tags)
    mlc = tracking.client(uri)
    exp = mlc.get_experiment_by_name(experiment)
    found = mlc.search_runs([exp.experiment_id], filter_string=f"tags.`ablation.key` = '{key}'")
    result = Result(variant, run_id=found[0].info.run_id if found else None)
    by_name = {p.name: p for p in planned}
    if rc != 0:
        result.status = f"failed (exit {rc}; see the run's stage log)"
        return result
    result.evaluate_dir = str(by_name["evaluate"].output_dir)
    result.metrics = read_record(result.evaluate_dir)["metrics"]
    distill = by_name["distill_baseline" if variant.generator == "baseline" else "distill"]
    result.distill_dir = str(distill.output_dir)
    result.distill_summary = graph.read_manifest(distill.output_dir).get("summary") or {}
    if result.run_id:
        log = RunLog.of(mlc, result.run_id)
        log.metrics({f"ablation_{k}": v for k, v in values(result).items() if v is not None})
        log.metrics({"ablation_wall_s": time.monotonic() - started})
        log.params({"ablation.variant": variant.name, "ablation.overrides": " ".join(variant.overrides) or "(none)"})
        mlc.set_tag(result.run_id, "mlflow.runName", f"{variant.name} ({found[0].info.run_name})")
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    names = _variant_names(args.variants)
    if isinstance(names, str):
        print(f"error: {names}", file=sys.stderr)
        return pipeline_run.EXIT_CONFIG
    common = [*BUDGETS[args.budget],
              *([f"distill.num_steps={args.num_steps}"] if args.num_steps else []),
              *([f"evaluate.max_prompts={args.max_prompts}"] if args.max_prompts else []),
              *([f"workdir={args.workdir}"] if args.workdir else []), *args.overrides]
    try:
        cfgs = load_variants(names, args.config, common, args.experiment)
        uri = tracking.reachable_uri(cfgs[names[0]])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return pipeline_run.EXIT_CONFIG
    except tracking.TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return pipeline_run.EXIT_TRACKING
    first = cfgs[names[0]]
    out_dir = Path(first.workdir) / "ablations"
    out_dir.mkdir(parents=True, exist_ok=True)
    mlc = tracking.client(uri)
    exp_id = tracking.ensure_experiment(mlc, args.experiment, tracking.artifact_location(first, uri))
    parent = mlc.create_run(exp_id, run_name=f"ablations {args.budget} ({len(names)} variants)", tags={
        "mlflow.source.name": "bench/ablations.py", "mlflow.source.git.commit": tracking.git_commit(),
        "pipeline.kind": "ablations", "ablations.argv": " ".join(sys.argv[1:] if argv is None else argv)[:5000]}).info.run_id
    RunLog.of(mlc, parent).params({"budget": args.budget, "common_overrides": " ".join(common) or "(none)",
                                   "variants": ",".join(names)})
    print(f"[ablations] MLflow parent run {parent} (experiment {args.experiment!r}, {uri}); variants: "
          f"{', '.join(names)}", flush=True)
    started, commit = time.monotonic(), tracking.git_commit()  # the code the run started on
    results = []
    table = out_dir / TABLE_FILE

    def write_table(done: bool) -> float:  # after every variant, so a long run shows its rows as they come
        wall_s = time.monotonic() - started
        header = {"command": "python bench/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "commit": f"{commit} (+ uncommitted changes)" if _dirty() else commit, "budget": f"{args.budget}: {' '.join(common) or '(config as is)'}",
                  "wall time": f"{wall_s / 60:.1f} min" + ("" if done else f" so far ({len(results)} of {len(names)})"),
                  "MLflow parent run": f"{parent} (experiment {args.experiment})"}
        table.write_text(table_markdown(results, header))
        reference = next((x for x in results if x.variant.name == "swd_full"), None)
        (out_dir / RESULTS_FILE).write_text(json.dumps([
            {"variant": r.variant.name, "status": r.status, "run_id": r.run_id, "evaluate_dir": r.evaluate_dir,
             "values": values(r) if r.status == "done" else None, "row": row(r, reference)}
            for r in results], indent=1) + "\n")
        return wall_s

    try:
        for name in names:
            results.append(run_variant(BY_NAME[name], cfgs[name], args.config, common, args.experiment, uri, parent))
            write_table(done=False)
    except BaseException:
        tracking.finish(mlc, parent, "KILLED")
        raise
    wall_s = write_table(done=True)
    log = RunLog.of(mlc, parent)
    log.metrics({"ablations_wall_s": wall_s})
    log.artifact(table)
    log.artifact(out_dir / RESULTS_FILE)
    if not args.no_grid and any(r.status == "done" for r in results):
        from pipeline.image_grid import ablation_grid

        images, prompts = grid_images(first, results, first.evaluate.grid_prompts, first.evaluate.seed)
        ablation_grid(images, prompts, path=out_dir / GRID_FILE)
        log.artifact(out_dir / GRID_FILE)
        print(f"[ablations] grid: {out_dir / GRID_FILE}", flush=True)
    failed = [r.variant.name for r in results if r.status != "done"]
    tracking.finish(mlc, parent, "FAILED" if failed else "FINISHED")
    print(table.read_text(), flush=True)
    print(f"[ablations] table: {table} ({wall_s / 60:.1f} min)" + (f"; failed: {', '.join(failed)}" if failed else ""),
          flush=True)
    return pipeline_run.EXIT_STAGE_FAILED if failed else 0


def _dirty() -> bool:
    """Whether the work tree differs from its commit (the table then says so beside the commit)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent.parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def _variant_names(spec: str | None) -> list[str] | str:
    """The variants to run in RUN_ORDER, SwD full always (every row compares with it); an error string
    naming unknown ones."""
    if not spec:
        return list(RUN_ORDER)
    asked = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in asked if n not in BY_NAME]
    if unknown:
        return f"--variants: unknown {', '.join(unknown)}; valid: {', '.join(RUN_ORDER)}"
    return [n for n in RUN_ORDER if n in asked or n == "swd_full"]


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/ablations.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="quick",
                        help="keys every variant gets: quick (the README run), tiny (tests), config (as configured)")
    parser.add_argument("--num-steps", type=int, help="distill.num_steps of every distill variant")
    parser.add_argument("--max-prompts", type=int, help="evaluate.max_prompts of every variant")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(RUN_ORDER)} (swd_full always runs)")
    parser.add_argument("--workdir", help="the pipeline's workdir (stage outputs; the table under <workdir>/ablations)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML layered on top of pipeline.yaml, as pipeline/run.py (repeatable)")
    parser.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment of the bench's runs")
    parser.add_argument("--no-grid", action="store_true", help="skip the ablation grid image")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every variant")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
