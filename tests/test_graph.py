"""The stage graph: fingerprints, skip on rerun, re-run only what a config change affects,
--force/--only, and a killed or failed stage never leaves a committed output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT
import stages
from pipeline import graph
from stages import load_config
from pipeline.run import run_stages
from helpers.toy_stages import toy_graph


@pytest.fixture
def toy_env(tmp_path, monkeypatch):
    log = tmp_path / "ran.log"
    log.touch()
    monkeypatch.setenv("TOY_LOG", str(log))
    return log


def run_toy(workdir, log, *overrides, only=(), force=()):
    cfg = load_config(overrides=[f"workdir={workdir}", *overrides])
    before = log.read_text().split()
    planned = graph.plan(cfg, toy_graph(), only=set(only), force=set(force))
    rc = run_stages(cfg, planned, f"sqlite:///{workdir / 'mlflow.db'}", [])
    return rc, log.read_text().split()[len(before):], planned


def test_rerun_is_a_noop(workdir, toy_env):
    rc, ran, _ = run_toy(workdir, toy_env)
    assert rc == 0 and ran == ["a", "b", "c"]
    rc, ran, planned = run_toy(workdir, toy_env)
    assert rc == 0 and ran == []
    assert [p.action for p in planned] == ["cached"] * 3
    out = planned[1].output_dir
    assert (out / "out.txt").read_text() == "ab"
    manifest = graph.read_manifest(out)
    assert manifest["fingerprint"] == planned[1].fingerprint and manifest["summary"] == {"chars": 2}


def test_the_graph_logs_every_declared_output_on_the_stage_run(workdir, toy_env):
    import mlflow

    rc, _, planned = run_toy(workdir, toy_env)
    assert rc == 0
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for p in planned:
        run_id = graph.read_manifest(p.output_dir)["run_id"]
        # the declared output, not the scratch file the stage also wrote
        assert [a.path for a in client.list_artifacts(run_id)] == ["out.txt"], p.name


def test_config_change_reruns_that_stage_and_downstream_only(workdir, toy_env):
    run_toy(workdir, toy_env)
    _, ran, _ = run_toy(workdir, toy_env, "tracking.experiment=other")  # b's section
    assert ran == ["b"]
    _, ran, _ = run_toy(workdir, toy_env, "data.generator.seed=3")  # a's section: a and b downstream
    assert ran == ["a", "b"]
    _, ran, _ = run_toy(workdir, toy_env, "data.generator.seed=3")
    assert ran == []


def test_force_and_only(workdir, toy_env):
    run_toy(workdir, toy_env)
    _, ran, _ = run_toy(workdir, toy_env, force=["a"])
    assert ran == ["a"]  # same fingerprint: downstream stays cached
    _, ran, planned = run_toy(workdir, toy_env, "ray.num_cpus=1", only=["c"])
    assert ran == ["c"]
    with pytest.raises(graph.PlanError, match="stage b needs the output of a, which is not committed"):
        graph.plan(load_config(overrides=[f"workdir={workdir}", "data.generator.seed=9"]), toy_graph(), only={"b"})
    with pytest.raises(graph.PlanError, match="unknown stage"):
        graph.plan(load_config(overrides=[f"workdir={workdir}"]), toy_graph(), force={"zzz"})


def test_failed_stage_leaves_no_committed_output(workdir, toy_env, monkeypatch):
    monkeypatch.setenv("TOY_FAIL", "b")
    rc, ran, planned = run_toy(workdir, toy_env)
    assert rc == 1 and ran == ["a", "b"]
    b = planned[1]
    assert not b.output_dir.exists()
    assert not list((workdir / "b").glob(".tmp-*"))
    monkeypatch.delenv("TOY_FAIL")
    rc, ran, _ = run_toy(workdir, toy_env)
    assert rc == 0 and ran == ["b", "c"]  # c never started after b failed


def test_sigkilled_stage_is_never_mistaken_for_finished(workdir, toy_env, tmp_path):
    ready = tmp_path / "ready"
    env = {**os.environ, "TOY_READY": str(ready), "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "helpers" / "toy_stages.py"), f"workdir={workdir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # b was half-written in a temp dir: the plan must want to run it again
    cfg = load_config(overrides=[f"workdir={workdir}"])
    planned = {p.name: p for p in graph.plan(cfg, toy_graph())}
    assert planned["a"].action == "cached"
    assert planned["b"].action == "run"
    assert list((workdir / "b").glob(".tmp-*")), "the killed run's temp dir is still there"
    # a killed commit (renamed, no manifest yet) is not finished either
    planned["b"].output_dir.mkdir(parents=True)
    (planned["b"].output_dir / "out.txt").write_text("stale")
    assert graph.plan(cfg, toy_graph())[1].action == "run"
    rc, ran, _ = run_toy(workdir, toy_env)
    assert rc == 0 and "b" in ran
    assert (planned["b"].output_dir / "out.txt").read_text() == "ab"
    assert not list((workdir / "b").glob(".tmp-*"))


def toy_process(workdir, tmp_path, name: str, **env) -> tuple[subprocess.Popen, Path]:
    """The toy graph (slow stage b) in its own process, as a second user or a cron would start it."""
    ready = tmp_path / f"ready-{name}"
    env = {**os.environ, "TOY_READY": str(ready), "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}",
           **{k.upper(): str(v) for k, v in env.items()}}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "helpers" / "toy_stages.py"), f"workdir={workdir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, ready


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_a_failed_or_killed_forced_run_keeps_the_committed_output(workdir, toy_env, tmp_path, monkeypatch):
    run_toy(workdir, toy_env)
    b = graph.plan(load_config(overrides=[f"workdir={workdir}"]), toy_graph())[1]
    committed = graph.read_manifest(b.output_dir)
    monkeypatch.setenv("TOY_FAIL", "b")
    rc, ran, _ = run_toy(workdir, toy_env, force=["b"])
    assert rc == 1 and ran == ["b"]
    assert graph.read_manifest(b.output_dir) == committed and (b.output_dir / "out.txt").read_text() == "ab"
    monkeypatch.delenv("TOY_FAIL")
    # SIGKILLed in the middle of a forced re-run: the old output is still the committed one.
    proc, ready = toy_process(workdir, tmp_path, "forced", toy_force="b")
    wait_for(ready, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert graph.read_manifest(b.output_dir) == committed
    assert graph.plan(load_config(overrides=[f"workdir={workdir}"]), toy_graph())[1].action == "cached"
    # Killed between the two renames of a forced commit: the old output is put back, then replaced.
    old = workdir / "b" / f".replaced-{b.fingerprint}-killed"
    os.rename(b.output_dir, old)
    rc, ran, _ = run_toy(workdir, toy_env, force=["b"])
    assert rc == 0 and ran == ["b"] and graph.read_manifest(b.output_dir)["run_id"] != committed["run_id"]
    assert not list((workdir / "b").glob(".replaced-*")) and not list((workdir / "b").glob(".tmp-*"))


def test_two_runs_of_one_fingerprint_serialise_and_the_second_reuses_the_output(workdir, toy_env, tmp_path,
                                                                                 mlflow_server):
    """Started together: whichever reaches stage b second waits on its lock (b takes 8 s), then reuses
    the committed output; every stage runs once and both runs succeed."""
    procs = [toy_process(workdir, tmp_path, name, toy_sleep_s=8, toy_tracking_uri=mlflow_server)[0]
             for name in ("first", "second")]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(toy_env.read_text().split()) == ["a", "b", "c"], "a stage ran twice"
    waited = [o for o in outs if "is running this fingerprint" in o]
    assert waited and "b: committed by another run while this one waited for the lock; reusing it" in waited[0]


def test_stage_variant_and_disabled_stage(workdir, toy_env):
    """A variant reuses a stage module with replaced sections (like the full-resolution baseline
    distill); a stage disabled by config is not run and its consumers get no such input."""
    from helpers.toy_stages import _make

    def variant_graph():
        a = _make("a", ("data",))
        return toy_graph() + [
            graph.StageSpec("a_variant", a, configure=lambda cfg: {"data": cfg.data.model_copy(
                update={"generator": cfg.data.generator.model_copy(update={"seed": cfg.data.generator.seed + 100})})},
                enabled=lambda cfg: cfg.ray.num_cpus == 1),
            graph.StageSpec("d", _make("d", ("register",)), inputs=("a", "a_variant")),
        ]

    cfg = load_config(overrides=[f"workdir={workdir}"])
    planned = {p.name: p for p in graph.plan(cfg, variant_graph())}
    assert planned["a_variant"].action == "disabled"
    assert run_stages(cfg, list(planned.values()), f"sqlite:///{workdir / 'mlflow.db'}", []) == 0
    assert (planned["d"].output_dir / "out.txt").read_text() == "ad"  # only a's output came in
    cfg1 = load_config(overrides=[f"workdir={workdir}", "ray.num_cpus=1"])
    planned1 = {p.name: p for p in graph.plan(cfg1, variant_graph())}
    assert planned1["a_variant"].action == "run"
    assert planned1["a"].action == "cached"  # the variant's replaced section is its own
    assert planned1["a_variant"].fingerprint != planned1["a"].fingerprint
    assert planned1["d"].action == "run"  # a new input: a new fingerprint
    assert run_stages(cfg1, list(planned1.values()), f"sqlite:///{workdir / 'mlflow.db'}", []) == 0
    assert graph.read_manifest(planned1["a_variant"].output_dir)["sections"]["data"]["generator"]["seed"] == 100


def test_the_baseline_variant_is_full_resolution_and_never_warm_started():
    from stages import load_config

    cfg = load_config(overrides=["evaluate.baseline=true", "distill.init_student=/somewhere/champion"])
    (spec,) = [s for s in stages.default_stages() if s.name == "distill_baseline"]
    sections = spec.sections(cfg)
    assert sections["distill"].init_student is None and cfg.distill.init_student == "/somewhere/champion"
    scales = sections["swd"].schedule.scales
    assert len(set(scales)) == 1 and scales[-1] == cfg.swd.schedule.scales[-1]
    assert spec.enabled(cfg) and not spec.enabled(load_config())


def test_fingerprints_leave_out_operational_keys_and_a_pretrained_teachers_training_knobs(workdir):
    def fingerprints(*overrides):
        cfg = load_config(overrides=[f"workdir={workdir}", *overrides])
        return {p.name: p.fingerprint for p in graph.plan(cfg, stages.default_stages())}

    base = fingerprints()  # the default names a pretrained teacher (assets/tiny-teacher)
    operational = ["distill.log_every_steps=3", "distill.sample_every_steps=7", "distill.max_failures=9",
                   "distill.num_checkpoints_to_keep=5", "distill.storage_path=/tmp/elsewhere",
                   "distill.checkpoint_every_steps=11", "cache.num_encoders=3", "cache.log_every_s=5",
                   "evaluate.num_actors=2", "synthesize.num_actors=2", "teacher.num_cpus=1"]
    assert fingerprints(*operational) == base
    assert fingerprints("teacher.num_steps=7", "teacher.lr=0.5", "teacher.num_layers=2") == base  # not trained
    lr = fingerprints("distill.lr=0.001")
    assert lr["distill"] != base["distill"] and lr["cache"] == base["cache"] and lr["evaluate"] != base["evaluate"]
    trained = fingerprints("teacher.pretrained=null")
    assert fingerprints("teacher.pretrained=null", "teacher.num_steps=7")["teacher"] != trained["teacher"]
    assert fingerprints("teacher.pretrained=null", "teacher.log_every_steps=7") == trained


def test_the_cache_reruns_for_the_schedule_sides_only_not_for_swd_losses_or_networks(workdir):
    """The cache depends on swd only through the schedule's latent sides (FINGERPRINT_VIEWS): an ablation of
    a loss, a network or the sigmas re-runs distill and what follows, never the cache's VAE and text encoders."""
    def fingerprints(*overrides):
        cfg = load_config(overrides=[f"workdir={workdir}", *overrides])
        return {p.name: p.fingerprint for p in graph.plan(cfg, stages.default_stages())}

    base = fingerprints()
    for override in ("swd.loss.guidance_scale=5.0", "swd.loss.mmd_weight=0", "swd.loss.mode=mmd_only",
                     "swd.student.lora_rank=8", "swd.feature_block=2", "swd.scale_index=random"):
        changed = fingerprints(override)
        assert changed["cache"] == base["cache"] and changed["distill"] != base["distill"], override
    resized = fingerprints("swd.preset=null", "swd.scales=[8,12,16,16]", "swd.boundaries=[0,7,14,21]")
    assert resized["cache"] != base["cache"]
    spec = next(s for s in stages.default_stages() if s.name == "cache")
    assert "swd.* except schedule.scales" in graph.not_in_fingerprint(spec, load_config())
