"""MLflow records: one parent run per pipeline invocation, one child run per stage.

Everything goes through `MlflowClient` with explicit run ids (no fluent global state), so Ray
workers can log to a stage's run given only (tracking_uri, run_id).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, flatten, to_yaml
from pipeline.run_log import RunLog



class TrackingError(RuntimeError):
    pass


def tracking_uri(cfg) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite store under the workdir."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.workdir / 'mlflow.db'}"


def artifact_location(cfg, uri: str) -> str | None:
    """Local stores keep artifacts beside the database; a server decides for itself."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (cfg.workdir / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast (within timeout_s) with a clear error instead of MLflow's long retry loop: a server
    that does not answer, or (one authenticated read) refuses the credentials of the environment."""
    if uri.startswith(("http://", "https://")):
        if urllib.parse.urlsplit(uri).username is not None:  # the URI would be in the config, params, logs
            raise TrackingError(
                "tracking.uri (or MLFLOW_TRACKING_URI) carries credentials in the URL, where the resolved config, "
                "the run's params and the logs would show them; remove them from the URL and set "
                f"{' and '.join(CREDENTIAL_ENV_VARS)} in the environment instead")
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered {resp.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {uri} cannot be reached ({reason}); start it, or set "
                f"tracking.uri (or MLFLOW_TRACKING_URI) to a reachable server or to sqlite:///PATH") from None
        check_credentials(uri, timeout_s)
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking.uri {uri}: cannot create {db.parent} ({e.strerror})") from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"tracking.uri {uri}: {db.parent} is not writable")


def reachable_uri(cfg) -> str:
    """The configured tracking URI, checked reachable (and the credentials accepted) within
    `tracking.connect_timeout_s`; TrackingError otherwise."""
    uri = tracking_uri(cfg)
    check_reachable(uri, cfg.tracking.connect_timeout_s)
    return uri


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


# MLflow 3.x shows an experiment either as a GenAI app (traces) or as model training (the runs
# table). The experiment's own setting is the tag the UI's experiment-type picker writes; the
# 3.17 open-source UI decides by the `workflowType` URL parameter instead (else the "GenAI apps &
# agents / Model training" switch it remembers, GenAI by default), so links add RUNS_PAGE_QUERY.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow's "Machine learning" kind
RUNS_PAGE_QUERY = "workflowType=machine_learning"
UI_DEFAULT = "http://127.0.0.1:5000"  # `mlflow ui` / `mlflow server` on a local store


def start_local_server(root: Path, timeout_s: float = 180, app_name: str | None = None,
                       env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on 127.0.0.1 at a free port, SQLite backend and proxied artifacts under
    `root`, in its own process group; returns (process, URI) once /health answers. For tests, the UI
    check and a local look at a workdir's runs. Stop it with `stop_local_server`. `app_name` (e.g.
    "basic-auth") and `env` (added to this process's environment) are for an authenticated server."""
    import socket
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(root)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         *(["--app-name", app_name] if app_name else [])],
        stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
        env={**os.environ, **env} if env else None)
    log.close()  # the child holds its own descriptor
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=3) as resp:
                if resp.status == 200:
                    return proc, uri
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_local_server(proc)
            raise TrackingError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def stop_local_server(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace_s` (shutdown is slow on busy cores)."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def ensure_experiment(mlc, name: str, artifact_uri: str | None) -> str:
    """The experiment's id, created if missing, marked as model training (also when it exists)."""
    from mlflow.exceptions import MlflowException

    exp = mlc.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlc.create_experiment(name, artifact_location=artifact_uri,
                                         tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # two runs started together: the other one created it first
            exp = mlc.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlc.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def runs_page_url(uri: str, experiment_id: str) -> str:
    """The MLflow UI page with the experiment's runs table: the server at `uri` (http), else the
    `mlflow ui` a local store is opened with."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_DEFAULT
    return f"{base}/#/experiments/{experiment_id}/runs?{RUNS_PAGE_QUERY}"


# ----------------------------------------------------------------------------- parent runs
RUN_NAME_MAX_CHARS = 120
_VALUE_OPTIONS = {"--config": None, "--only": "only", "--force": "force", "--schedule-slot": None}
_WHERE_KEYS = ("workdir", "tracking", "ray")  # where a run runs and logs, not what it trains


def config_fingerprint(cfg) -> str:
    """8 hex digits of the resolved config, without where it runs (workdir, tracking, ray)."""
    import hashlib
    import json

    items = {k: str(v) for k, v in flatten(cfg).items() if k.split(".")[0] not in _WHERE_KEYS}
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:8]


def parent_run_name(cfg, argv: list[str], tags: dict[str, str] | None = None) -> str:
    """`<profile stems or "embedded"> [<overrides, shortened>] [slot <slot>] #<config fingerprint>`,
    e.g. `sd35-medium-6step+miniature num_steps=3000 #1a2b3c4d`: tells apart the invocations of one
    experiment in the runs table (argv and every param are on the run too)."""
    profiles, words, i = [], [], 0
    while i < len(argv):
        arg, value = argv[i], None
        opt = arg.split("=", 1)[0]
        if opt in _VALUE_OPTIONS:
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            if opt == "--config" and value:
                profiles.append(Path(value).stem)
            elif _VALUE_OPTIONS[opt] and value:
                words.append(f"{_VALUE_OPTIONS[opt]}={value}")
        elif not arg.startswith("-") and "=" in arg:
            key, val = arg.split("=", 1)
            if key.split(".")[0] not in _WHERE_KEYS:
                val = val if len(val) <= 20 else val[:9] + "\u2026" + val[-10:]
                words.append(f"{key.rsplit('.', 1)[-1]}={val}")
        i += 1
    slot = (tags or {}).get("schedule.slot")
    if slot:
        words.append(f"slot {slot}")
    head = "+".join(profiles) or "embedded"
    tail = f" #{config_fingerprint(cfg)}"
    body = " ".join([head, *words])
    room = RUN_NAME_MAX_CHARS - len(tail)
    if len(body) > room:
        body = body[:room - 1].rstrip() + "\u2026"
    return body + tail


def start_parent_run(mlc, experiment_id: str, cfg, argv: list[str],
                     stage_names: list[str], tags: dict[str, str] | None = None) -> str:
    """The parent run of one invocation; `tags` (e.g. `schedule.slot`) are set on it and a
    schedule slot is part of its name."""
    run = mlc.create_run(experiment_id, run_name=parent_run_name(cfg, argv, tags), tags={
        **(tags or {}),
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": "pipeline/run.py",
        "pipeline.kind": "pipeline",
        "pipeline.argv": " ".join(argv)[:5000],
        "pipeline.stages": ",".join(stage_names),
        "pipeline.config_fingerprint": config_fingerprint(cfg),
    })
    run_id = run.info.run_id
    log_params(mlc, run_id, flatten(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resolved_config.yaml"
        path.write_text(to_yaml(cfg))
        mlc.log_artifact(run_id, str(path))
    return run_id


def start_stage_run(mlc, experiment_id: str, parent_id: str, stage: str, fp: str,
                    params: dict[str, Any], cache_hit_of: dict | None = None) -> str:
    """A child run for one stage; a cache hit points at the run that produced the output."""
    tags = {"mlflow.parentRunId": parent_id, "mlflow.runName": stage, "pipeline.kind": "stage",
            "stage": stage, "fingerprint": fp, "cache_hit": "false"}
    if cache_hit_of is not None:
        tags.update({"cache_hit": "true", "source_run_id": cache_hit_of.get("run_id", ""),
                     "output_dir": cache_hit_of.get("output_dir", "")})
    run_id = mlc.create_run(experiment_id, tags=tags).info.run_id
    log_params(mlc, run_id, params)
    return run_id


def log_params(mlc, run_id: str, params: dict[str, Any]) -> None:
    RunLog.of(mlc, run_id).params(params)


def finish(mlc, run_id: str, status: str) -> None:
    mlc.set_terminated(run_id, status=status)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- credentials
# An authenticated tracking server (cluster/k8s/mlflow.yaml runs MLflow's basic-auth app): the
# pipeline's credential comes from the environment only, the variables MLflow's client reads itself,
# never from a config key, so it is in no resolved config, param, tag or log line.
CREDENTIAL_ENV_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
TOKEN_ENV_VAR = "MLFLOW_TRACKING_TOKEN"
AUTH_PROBE_PATH = "/api/2.0/mlflow/experiments/search?max_results=1"  # a read any user may make


def auth_headers() -> dict[str, str]:
    """The Authorization header MLflow's client would send: basic auth from MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD, else a bearer MLFLOW_TRACKING_TOKEN, else none."""
    import base64

    user, password = (os.environ.get(n) for n in CREDENTIAL_ENV_VARS)
    if bool(user) != bool(password):
        given, missing = CREDENTIAL_ENV_VARS if user else CREDENTIAL_ENV_VARS[::-1]
        raise TrackingError(f"{given} is set but {missing} is not: set both (the tracking server's user and "
                            f"password) or neither")
    if user:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get(TOKEN_ENV_VAR)
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_credentials(uri: str, timeout_s: float) -> None:
    """One authenticated read (`AUTH_PROBE_PATH`) with the environment's credentials: a 401 or 403 is a
    TrackingError naming the environment variables, raised before any stage runs (a server without
    authentication answers 200 whatever is sent)."""
    request = urllib.request.Request(uri.rstrip("/") + AUTH_PROBE_PATH, headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(f"MLflow tracking server {uri} cannot be reached ({getattr(e, 'reason', e)})") from None
    user = os.environ.get(CREDENTIAL_ENV_VARS[0])
    names = " and ".join(CREDENTIAL_ENV_VARS)
    if status == 401:
        who = f"refused user {user!r} (wrong user or password)" if user else "needs credentials and none were given"
        raise TrackingError(f"MLflow tracking server {uri} {who} (HTTP 401): set {names} to the pipeline's "
                            f"service user (cluster/README.md: Secret swd-mlflow-pipeline)")
    if status == 403:
        raise TrackingError(f"MLflow tracking server {uri}: user {user!r} may not read experiments (HTTP 403): set "
                            f"{names} to the pipeline's service user, or grant this user READ "
                            f"(cluster/mlflow_auth_setup.py)")
    raise TrackingError(f"MLflow tracking server {uri} answered HTTP {status} on {AUTH_PROBE_PATH}")
