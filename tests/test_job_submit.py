"""`ray job submit` end to end: a real Ray head on loopback (`ray start --head`, token authentication
on, its own ports and temp dir), the embedded default submitted with a small budget exactly as the
README says (`--working-dir . --runtime-env cluster/runtime_env.yaml -- python pipeline/run.py ...`),
SUCCEEDED, and the runs in a real MLflow server. Only the processes this test started are stopped."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import mlflow
import pytest

from conftest import REPO_ROOT, SMALL_DATA, free_port
import stages
from stages import load_config

# The embedded default on a small budget: tiny data, a few teacher and distill steps.
SMALL_BUDGET = [
    *SMALL_DATA,
    "teacher.vae_num_steps=3", "teacher.vae_batch_size=4", "teacher.num_steps=4", "teacher.batch_size=4",
    "teacher.warmup_steps=1", "teacher.num_layers=2", "teacher.num_cpus=1", "teacher.log_every_steps=2",
    "teacher.checkpoint_every_steps=2", "teacher.sampler.num_steps=2", "teacher.grid_prompts=2",
    "teacher.grid_samples_per_prompt=1", "teacher.eval_num_prompts=4",
    "cache.batch_size=16", "cache.decode_batch_size=16",
    "swd.student.lora_rank=4", "swd.student.lora_alpha=4", "swd.fake.lora_rank=4", "swd.fake.lora_alpha=4",
    "distill.num_steps=2", "distill.batch_size_per_worker=2", "distill.fake_updates_per_step=1",
    "distill.checkpoint_every_steps=2", "distill.log_every_steps=1", "distill.sample_every_steps=2", "distill.sample_num_prompts=2",
    "distill.shuffle_buffer_rows=0", "distill.num_cpus_per_worker=1",
    "evaluate.max_prompts=4", "evaluate.batch_size=4", "evaluate.num_cpus_per_actor=1", "evaluate.teacher_sampler.num_steps=2",
    "evaluate.latency_warmup_batches=0", "evaluate.latency_repeats=1", "evaluate.grid_prompts=2",
    "evaluate.fd_image_side_px=32", "register.copy_teacher=false",
]


def descendants(pid: int) -> list[int]:
    """pid and every process under it (Ray's workers are the raylet's children)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                children.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _kill_session(temp_dir: Path, proc: subprocess.Popen) -> None:
    """Stop this test's Ray node and nothing else: every process under its `ray start --block`,
    then any process left whose command line names this test's own temp dir, by pid."""
    tree = descendants(proc.pid)
    for pid in reversed(tree):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit() and int(pid_dir.name) != os.getpid():
            try:
                if str(temp_dir).encode() in (pid_dir / "cmdline").read_bytes():
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on 127.0.0.1, 2 CPUs, its own temp dir and ports, token auth with a fresh token."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rjs", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PYTHONUNBUFFERED="1")
    dashboard = free_port()
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--num-cpus", "2", "--temp-dir", str(temp_dir), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--object-store-memory", str(512 * 1024 ** 2), "--disable-usage-stats"]
    log = open(temp_dir / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 240
        while True:  # the job server answers (any HTTP status: it is up)
            try:
                urllib.request.urlopen(address + "/api/version", timeout=3)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start: {(temp_dir / 'ray-start.log').read_text()[-3000:]}")
            time.sleep(1)
        yield {"address": address, "env": env, "temp_dir": temp_dir, "token": token}
    finally:
        _kill_session(temp_dir, proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, proxied artifacts) of this module's own."""
    from pipeline.tracking import start_local_server, stop_local_server

    proc, uri = start_local_server(tmp_path_factory.mktemp("job-submit-mlflow"))
    try:
        yield uri
    finally:
        stop_local_server(proc)


def ray_cli(head: dict, command: str, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`ray job COMMAND --address HEAD ARGS...` with the cluster's token (or `env`)."""
    return subprocess.run(["ray", "job", command, "--address", head["address"], *args], cwd=REPO_ROOT,
                          env=env or head["env"], capture_output=True, text=True, timeout=timeout)


def _head_logs(head: dict) -> str:
    """For failure messages: the tails of the head's own logs."""
    out = []
    for name in ("ray-start.log", "session_latest/logs/dashboard.log", "session_latest/logs/dashboard.err",
                 "session_latest/logs/gcs_server.err", "session_latest/logs/raylet.err"):
        path = head["temp_dir"] / name
        if path.is_file():
            out.append(f"\n--- {name} ---\n{path.read_text(errors='replace')[-2000:]}")
    return "".join(out)


def test_the_job_server_refuses_a_wrong_token(ray_head):
    wrong = {**ray_head["env"], "RAY_AUTH_TOKEN": "0" * 64}
    out = ray_cli(ray_head, "list", env=wrong)
    assert out.returncode != 0
    assert ray_cli(ray_head, "list").returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ray_job_submit_runs_the_embedded_default(ray_head, mlflow_server, tmp_path):
    experiment = f"job-submit-{uuid.uuid4().hex[:6]}"
    job_id = f"swd-test-{uuid.uuid4().hex[:8]}"
    overrides = [f"workdir={tmp_path / 'wd'}", f"tracking.uri={mlflow_server}", f"tracking.experiment={experiment}",
                 *SMALL_BUDGET]
    cfg = load_config(overrides=overrides)
    stage_names = [s.name for s in stages.default_stages() if s.enabled is None or s.enabled(cfg)]
    argv = ["python", "pipeline/run.py", *overrides]
    out = ray_cli(ray_head, "submit", "--submission-id", job_id, "--no-wait", "--working-dir", ".",
                  "--runtime-env", "cluster/runtime_env.yaml", "--", *argv)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + _head_logs(ray_head)
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head["address"], headers={"Authorization": f"Bearer {ray_head['token']}"})
    deadline = time.monotonic() + 1500
    while (status := jobs.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, f"job {job_id} still {status}: {jobs.get_job_logs(job_id)[-8000:]}"
        time.sleep(5)
    logs = jobs.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n--- logs ---\n{logs[-8000:]}"
    # The driver ran the uploaded copy of the repository, not this checkout.
    assert "[pipeline] finished in" in logs

    mlc = mlflow.MlflowClient(mlflow_server)
    exp = mlc.get_experiment_by_name(experiment)
    runs = mlc.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["pipeline_wall_s"] > 0
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(stage_names)
    assert all(r.info.status == "FINISHED" and r.data.tags["cache_hit"] == "false" for r in children.values())
    if "distill" in children:
        artifacts = {a.path for a in mlc.list_artifacts(children["distill"].info.run_id)}
        assert {"student", "schedule.json"} <= artifacts
    if "register" in children:  # the first student ever registered holds the champion alias
        register = cfg.register
        champion = mlc.get_model_version_by_alias(register.model_name, register.alias)
        assert champion.run_id == children["register"].info.run_id
    for stage in stage_names:  # every stage's output committed in the workdir
        assert list((tmp_path / "wd" / stage).glob("*/manifest.json")), stage
