"""A two-node Ray cluster on one machine (two `ray start` processes on loopback, token auth on): the
distill stage trains with one Ray Train worker on each node; the worker node is removed mid-run
(its `ray start` process and everything under it SIGKILLed) and a replacement node joins, as an
autoscaler would bring one; the run completes from its last checkpoint with the exact step count
and MLflow holds every step once. Only the processes this test started are stopped."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from conftest import REPO_ROOT, free_port

pytest.importorskip("deepspeed")

# test_distill's small settings: LoRA rank 4, batch 2, one fake update per step.
FAST = ["swd.student.lora_rank=4", "swd.fake.lora_rank=4", "swd.student.lora_alpha=4", "swd.fake.lora_alpha=4",
        "distill.batch_size_per_worker=2", "distill.fake_updates_per_step=1", "distill.log_every_steps=1",
        "distill.sample_every_steps=2", "distill.checkpoint_every_steps=2", "distill.shuffle_buffer_rows=0",
        "distill.lr=1e-3", "distill.fake_lr=1e-3", "distill.zero_stage=2"]
# One worker per node: 2 CPUs each; the head has 3 (one left for Ray Data), the worker node 2, so
# the two 2-CPU bundles cannot share a node.
TWO_NODES = ["distill.num_workers=2", "distill.num_cpus_per_worker=2", "distill.num_steps=6", "distill.max_failures=2",
             # The full-resolution schedule: one cache dataset (the per-scale streams and their resume are
             # test_distill's); here every restart re-opens one Ray Data stream, not four, on one free CPU.
             "swd.preset=null", "swd.scales=[16,16,16,16]", "swd.boundaries=[0,7,14,18]"]
HEAD_CPUS, WORKER_CPUS = 3, 2

DRIVER = """
import json, os, sys, time, uuid
from pathlib import Path
sys.path.insert(0, {repo!r})
import mlflow, ray
from stages import load_config
from pipeline.context import StageContext
from stages import distill

ray.init(address={address!r}, runtime_env={{"env_vars": {{"PYTHONPATH": {repo!r}}}}})
deadline = time.monotonic() + 300
while len([n for n in ray.nodes() if n["Alive"]]) < 2:
    assert time.monotonic() < deadline, "the worker node never joined"
    time.sleep(1)
root = Path({root!r})
cfg = load_config(overrides={overrides!r})
uri = f"sqlite:///{{root / 'mlflow.db'}}"
mlc = mlflow.MlflowClient(uri)
exp = mlc.create_experiment("two-node", (root / "art").as_uri())
run_id = mlc.create_run(exp).info.run_id
(root / "run_id").write_text(run_id)
out, scratch = root / "out", root / "scratch"
out.mkdir(); scratch.mkdir()
ctx = StageContext(name="distill", config=cfg.distill, sections={{"distill": cfg.distill, "swd": cfg.swd, "teacher": cfg.teacher}},
                   inputs={inputs!r}, output_dir=out, scratch_dir=scratch, shared_dir=root, tracking_uri=uri,
                   run_id=run_id, fingerprint="twonode")
os.environ[distill.HOOKS_ENV] = json.dumps({hooks!r})
distill.run(ctx)
print("DRIVER DONE", json.dumps(ctx.summary), flush=True)
"""


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    for pid in reversed(descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def sweep(temp_dir: Path) -> None:
    """Anything left that names this test's own temp dir on its command line."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if str(temp_dir).encode() in (d / "cmdline").read_bytes():
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.fixture
def cluster(tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="r2n", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONUNBUFFERED="1",
               OMP_WAIT_POLICY="PASSIVE")
    port = free_port()
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        log = open(temp_dir / f"node{len(procs)}.log", "w")
        proc = subprocess.Popen(["ray", "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
                                 "--object-store-memory", str(200 * 1024 ** 2), "--disable-usage-stats",
                                 "--dashboard-agent-listen-port", str(free_port()), *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    head = start("--head", "--port", str(port), "--num-cpus", str(HEAD_CPUS), "--include-dashboard", "false",
                 "--ray-client-server-port", str(free_port()))

    def add_worker() -> subprocess.Popen:
        return start("--address", f"127.0.0.1:{port}", "--num-cpus", str(WORKER_CPUS))

    deadline = time.monotonic() + 120
    while not (temp_dir / "ray_current_cluster").exists():  # the head has written its address
        assert head.poll() is None and time.monotonic() < deadline, (temp_dir / "node0.log").read_text()[-3000:]
        time.sleep(0.5)
    try:
        yield {"address": f"127.0.0.1:{port}", "env": env, "head": head, "add_worker": add_worker, "temp_dir": temp_dir}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                kill_tree(proc)
        sweep(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    from pipeline import tiny

    root = tmp_path_factory.mktemp("two-node-inputs")
    bundle = tiny.build_bundle(root / "bundle")
    teacher = root / "teacher"
    teacher.mkdir()
    (teacher / "teacher.json").write_text(json.dumps({"source": "pretrained", "location": str(bundle)}))
    return {"cache": str(tiny.synthetic_cache(root / "cache", bundle, 24, [8, 10, 12, 16])), "teacher": str(teacher)}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_distill_across_two_nodes_survives_losing_one(cluster, inputs, tmp_path):
    worker = cluster["add_worker"]()
    pid_dir, dumps = tmp_path / "pids", tmp_path / "dumps"
    hooks = {"pid_dir": str(pid_dir), "dump_dir": str(dumps), "step_delay_s": 1.0}
    script = DRIVER.format(repo=str(REPO_ROOT), address=cluster["address"], root=str(tmp_path),
                           overrides=[*FAST, *TWO_NODES], inputs=inputs, hooks=hooks)
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-c", script], env=cluster["env"], cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    placed: dict[int, str] = {}
    try:
        # Ray Train's controller registers a reported checkpoint when it next polls the workers: kill
        # only once it has, or the restart has no checkpoint and starts from step 0.
        snapshot = tmp_path / "scratch" / "ray_train" / "distill-twonode" / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 900
        while True:  # both ranks running, one on each node, past the registered step-2 checkpoint
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "distill never reached step 3 on both ranks"
            steps = [pid_dir / f"rank{r}.step" for r in (0, 1)]
            registered = snapshot.is_file() and "checkpoint_step" in snapshot.read_text()
            if registered and all(s.is_file() and s.read_text().strip() and int(s.read_text()) >= 3 for s in steps):
                break
            time.sleep(0.05)
        on_worker = set(descendants(worker.pid))
        for rank in (0, 1):
            pid = int((pid_dir / f"rank{rank}.pid").read_text())
            placed[rank] = "worker" if pid in on_worker else "head"
        assert sorted(placed.values()) == ["head", "worker"], placed
        killed = next(r for r, node in placed.items() if node == "worker")
        killed_pid = int((pid_dir / f"rank{killed}.pid").read_text())
        kill_tree(worker)  # the node is gone: raylet, object store, the Train worker on it
        cluster["add_worker"]()  # and a new one joins (what an autoscaler does)
        driver.wait(timeout=900)
    finally:
        if driver.poll() is None:
            kill_tree(driver)
        log.close()
    out = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0 and "DRIVER DONE" in out, out[-6000:]
    summary = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert summary["steps"] == 6 and summary["attempts"] >= 2, summary
    assert int((pid_dir / f"rank{killed}.pid").read_text()) != killed_pid  # a new worker process took over
    # It resumed from a checkpoint, not from scratch: the weights it loaded are the ones saved there.
    loaded = sorted(dumps.glob("loaded_step*.safetensors"))
    assert loaded, sorted(p.name for p in dumps.iterdir())
    from safetensors.torch import load_file

    step = loaded[-1].name.removeprefix("loaded_step").removesuffix(".safetensors")
    saved, got = load_file(dumps / f"saved_step{step}.safetensors"), load_file(loaded[-1])
    assert int(step) in (2, 4) and saved.keys() == got.keys()
    assert all((saved[k] == got[k]).all() for k in saved)
    mlc = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "run_id").read_text()
    steps = [m.step for m in mlc.get_metric_history(run_id, "progress")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for key in mlc.get_run(run_id).data.metrics:
        logged = [m.step for m in mlc.get_metric_history(run_id, key)]
        assert len(logged) == len(set(logged)), f"{key} logged a step twice: {sorted(logged)}"
