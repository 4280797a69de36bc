"""The stage graph: fingerprints, skip on rerun, re-run only what a config change affects,
--force/--only, and a killed or failed stage never leaves a committed output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from pipeline import graph
from pipeline.config import load_config
from pipeline.run import run_stages
from toy_stages import toy_graph


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
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "toy_stages.py"), f"workdir={workdir}"],
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
