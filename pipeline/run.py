"""Entry point: `python pipeline/run.py [--config FILE ...] [--dry-run] [--only STAGES] [--schedule-slot SLOT]
[--force STAGES] [key.sub=value ...]`; `python pipeline/run.py compare [--last N]` compares recent
runs (pipeline/compare.py); `python pipeline/run.py link [--config FILE ...]` prints the link to the
experiment's runs table in the MLflow UI; `python pipeline/run.py plan [--config FILE ...] [--gpu G]`
says what a run will cost before it starts (per-GPU peak memory per phase, bytes, time; pipeline/plan.py).

The one module of `pipeline/` that imports `stages/`: it takes the stage list and the config tree
from `stages/__init__.py` and hands them to the graph.

Steps: load and validate the config (all problems at once, exit 2) -> check the environment
(shards, workdir; exit 2) -> plan the stage graph -> (--dry-run: print config and plan, stop) ->
check MLflow is reachable (exit 3) -> join or start Ray -> run each stage under one MLflow parent
run, skipping stages whose fingerprint is already committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the project, not sibling modules by name
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse
import json
import os
import time
import traceback

import stages
from pipeline import config as config_mod
from pipeline import graph, schedule, tracking
from pipeline.config import REPO_ROOT, ConfigError
from pipeline.data import ShardError, expand_shards
from pipeline.run_log import RunLog
from pipeline.student_export import init_student_problems
from stages import PipelineConfig, synthesize
from stages.evaluate import protocol as evaluate_files

EXIT_CONFIG = 2
EXIT_TRACKING = 3
EXIT_STAGE_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Idle OpenMP threads sleep instead of spinning (5x faster torch steps on shared CPU cores); set
    # before Ray starts so local workers inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if argv[:1] == ["compare"]:  # `compare [--last N]`: recent runs' config differences and metrics
        from pipeline import compare

        return compare.main(argv[1:], stages.load_config)
    if argv[:1] == ["link"]:
        return link(argv[1:])
    if argv[:1] == ["plan"]:  # `plan [--config FILE ...] [--gpu G] [--mfu F]`: memory, bytes, time before a run
        from pipeline import plan

        return plan.main(argv[1:], stages.load_config)
    args = _parse_args(argv)
    stage_list = stages.default_stages()
    try:
        cfg = stages.load_config(args.config, args.overrides)
        check_environment(cfg)
        planned = graph.plan(cfg, stage_list, only=_names(args.only), force=_names(args.force))
        slot = schedule.resolve_slot(args.schedule_slot, cfg.schedule.slot_s) if args.schedule_slot else None
    except (ConfigError, graph.PlanError, schedule.ScheduleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    if args.dry_run:
        print("# resolved config")
        print(config_mod.to_yaml(cfg))
        print("# stage plan (workdir: %s)" % cfg.workdir)
        print(graph.describe_plan(planned))
        if slot is not None:
            print(schedule.describe(cfg, slot))
        return 0

    try:
        uri = tracking.reachable_uri(cfg)
    except tracking.TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_TRACKING

    if slot is not None:  # scheduled retraining: idempotent slot, lease, new shards, warm start
        return schedule.run_scheduled(cfg, slot, uri, argv, init_ray=init_ray, run_stages=run_stages,
                                      plan=lambda c: graph.plan(c, stage_list, only=_names(args.only), force=_names(args.force)))
    if any(p.action == "run" for p in planned):  # a fully cached rerun needs no Ray
        init_ray(cfg)
    return run_stages(cfg, planned, uri, argv)


def run_stages(cfg: PipelineConfig, planned: list[graph.PlannedStage], uri: str, argv: list[str],
               tags: dict[str, str] | None = None) -> int:
    mlc = tracking.client(uri)
    exp_id = tracking.ensure_experiment(mlc, cfg.tracking.experiment, tracking.artifact_location(cfg, uri))
    parent = tracking.start_parent_run(mlc, exp_id, cfg, argv, [p.name for p in planned], tags)  # e.g. schedule.slot
    print(f"[pipeline] MLflow run {parent} (experiment {cfg.tracking.experiment!r}, {uri})", flush=True)
    outputs: dict[str, Path] = {}
    start = time.monotonic()
    for p in planned:
        if p.action in ("excluded", "disabled"):
            print(f"[pipeline] {p.name}: not run ({'--only' if p.action == 'excluded' else 'disabled by config'})", flush=True)
            continue
        inputs = {i: outputs[i] for i in p.spec.inputs if i in outputs}  # a disabled optional input is absent
        params = config_mod.flatten(p.spec.sections(cfg))
        if p.action == "cached":
            manifest = graph.read_manifest(p.output_dir)
            run_id = tracking.start_stage_run(mlc, exp_id, parent, p.name, p.fingerprint, params,
                                              cache_hit_of={**manifest, "output_dir": str(p.output_dir)})
            tracking.finish(mlc, run_id, "FINISHED")
            _mirror_parent_metrics(mlc, parent, manifest)
            print(f"[pipeline] {p.name}: cached ({p.fingerprint}, produced by run {manifest.get('run_id')})", flush=True)
            outputs[p.name] = p.output_dir
            continue
        run_id = tracking.start_stage_run(mlc, exp_id, parent, p.name, p.fingerprint, params)
        print(f"[pipeline] {p.name}: running ({p.fingerprint}) -> {p.output_dir}", flush=True)
        try:
            manifest = graph.execute_stage(p, cfg, inputs, uri, run_id)
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            tracking.finish(mlc, run_id, status)
            tracking.finish(mlc, parent, status)
            if isinstance(e, KeyboardInterrupt):
                raise
            traceback.print_exc()
            print(f"error: stage {p.name} failed: {e}", file=sys.stderr)
            return EXIT_STAGE_FAILED
        mlc.log_metric(run_id, "stage_wall_s", manifest["wall_s"])
        tracking.finish(mlc, run_id, "FINISHED")
        _mirror_parent_metrics(mlc, parent, manifest)
        print(f"[pipeline] {p.name}: done in {manifest['wall_s']:.1f} s", flush=True)
        outputs[p.name] = p.output_dir
    mlc.log_metric(parent, "pipeline_wall_s", time.monotonic() - start)
    tracking.finish(mlc, parent, "FINISHED")
    print(f"[pipeline] finished in {time.monotonic() - start:.1f} s; MLflow run {parent}", flush=True)
    return 0


def _mirror_parent_metrics(mlc, parent: str, manifest: dict) -> None:
    """A stage's `summary["parent_metrics"]` (the evaluate stage's canonical metrics) go onto the
    parent run, for a fresh and a cached stage alike, so the MLflow UI compares pipeline runs."""
    values = (manifest.get("summary") or {}).get("parent_metrics") or {}
    RunLog.of(mlc, parent).metrics(values)


def check_environment(cfg: PipelineConfig) -> None:
    """Problems that need the filesystem, collected together: the teacher, shards, the workdir."""
    problems: list[str] = teacher_problems(cfg)
    given = {s: getattr(cfg.data, f"{s}_shards") for s in ("train", "eval")}
    if given["train"] is not None and given["eval"] is None:
        problems.append("data.train_shards / data.eval_shards: give both or neither (generated eval "
                        "prompts would not match your training data)")
    if given["eval"] is not None and given["train"] is None and cfg.data.prompts is None:
        problems.append("data.eval_shards: given without training data; also give data.train_shards or "
                        "data.prompts, or neither")
    problems += synthesize.prompt_file_problems(cfg.data)
    problems += evaluate_files.file_problems(cfg.evaluate)  # the evaluation protocol's files, before any Ray work
    for split, spec in given.items():
        if spec is not None:
            try:
                expand_shards(spec, f"data.{split}_shards")
            except (ShardError, OSError) as e:
                problems.append(str(e))
    try:
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        probe = cfg.workdir / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        problems.append(f"workdir: {str(cfg.workdir)!r} is not writable ({e.strerror}); choose another with workdir=PATH")
    # A warm-start student: the directory, its LoRA adapter, and that adapter's LoRA config vs swd.student.
    problems += init_student_problems(cfg.distill.init_student, cfg.swd.student)
    if problems:
        raise ConfigError(problems)


def teacher_problems(cfg: PipelineConfig) -> list[str]:
    """The teacher exists, and the SwD schedule fits it (patch size, latent side, blocks)."""
    from pipeline.swd.config import check_against_teacher
    from pipeline.teacher import TeacherError, resolve_pretrained, text_settings

    t = cfg.teacher
    where = t.pretrained or "embedded tiny teacher"
    if t.pretrained is None and t.init_bundle:  # the teacher stage continues this bundle's own transformer
        transformer = Path(os.path.expanduser(t.init_bundle)) / "transformer" / "config.json"
        if not transformer.is_file():
            return [f"teacher.init_bundle {t.init_bundle!r}: no transformer/config.json there, so it is not a "
                    f"diffusers bundle to continue from; give a tiny teacher bundle (a teacher stage's bundle/ "
                    f"directory, e.g. assets/tiny-teacher) or null to train from scratch"]
        shape = json.loads(transformer.read_text())
        where = f"embedded tiny teacher continued from teacher.init_bundle {t.init_bundle}"
    elif t.pretrained is None:
        # The teacher stage resizes every image to tiny.PIXEL_SIDE: its transformer's side is tiny.LATENT_SIDE.
        from pipeline import tiny

        side = tiny.LATENT_SIDE
        shape = {"patch_size": t.patch_size, "sample_size": side, "num_layers": t.num_layers}
        where = (f"embedded tiny teacher, trained on {tiny.PIXEL_SIDE} px images (latent side {side}) "
                 f"whatever data.generator.image_side_px is")
    else:
        try:
            directory = resolve_pretrained(t.pretrained, t.local_files_only)
        except TeacherError as e:
            return [str(e)]
        shape = json.loads((directory / "transformer" / "config.json").read_text())
    problems = []
    if t.pretrained is not None:
        try:  # T5 asked for and present, its length within the tokenizer's limit
            text_settings(directory, t.load_t5, t.max_sequence_length)
        except TeacherError as e:
            problems.append(str(e))
    try:
        check_against_teacher(cfg.swd, shape["patch_size"], shape["sample_size"], shape["num_layers"])
    except ValueError as e:
        problems += [f"{line} (teacher: {where})" for line in str(e).splitlines()]
    return problems


def init_ray(cfg: PipelineConfig) -> None:
    """Join the configured or `ray job submit` cluster, else start a fresh local one (never the
    stale cluster a killed run may have left in /tmp/ray)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Workers import the project from the repo root (a `--working-dir` upload already does this).
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}}
    if address:
        ray.init(address=address, runtime_env=None if "RAY_JOB_ID" in os.environ else env)
        return
    gib = 1024 ** 3
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
             object_store_memory=int(cfg.ray.object_store_memory_gib * gib) if cfg.ray.object_store_memory_gib else None,
             include_dashboard=False, runtime_env=env, log_to_driver=True)


def link(argv: list[str]) -> int:
    """`link [--config FILE ...] [key.sub=value ...]`: print the link to the runs table of the
    configured experiment (config resolved as a run resolves it)."""
    parser = argparse.ArgumentParser(prog="pipeline/run.py link",
                                     description="Print the link to the runs table of the configured experiment.")
    parser.add_argument("--config", action="append", default=[], metavar="FILE")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    try:
        cfg = stages.load_config(args.config, args.overrides)
        uri = tracking.tracking_uri(cfg)
        if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
            raise tracking.TrackingError(f"{uri} does not exist yet: run the pipeline first")
        tracking.check_reachable(uri, cfg.tracking.connect_timeout_s)
    except (ConfigError, tracking.TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exp = tracking.client(uri).get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        print(f"error: no experiment {cfg.tracking.experiment!r} in {uri} yet: run the pipeline first", file=sys.stderr)
        return 1
    print(tracking.runs_page_url(uri, exp.experiment_id))
    return 0


def _names(values: list[str]) -> set[str]:
    return {n.strip() for v in values for n in v.split(",") if n.strip()}


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="YAML layered on top of pipeline.yaml (repeatable; later wins)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and stage plan, do nothing")
    parser.add_argument("--only", action="append", default=[], metavar="STAGES",
                        help="comma-separated stages to run (their inputs must be committed)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGES",
                        help="comma-separated stages to re-run even if cached")
    parser.add_argument("--schedule-slot", metavar="SLOT",
                        help="scheduled retraining: 'auto' (the current slot) or a slot name; a slot already done "
                             "does nothing, an overlapping run does not train (pipeline/schedule.py)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides; values are YAML (10, 1e-4, [64,80], null)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
