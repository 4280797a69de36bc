"""MLflow records: one parent run per pipeline invocation, one child run per stage.

Everything goes through `MlflowClient` with explicit run ids (no fluent global state), so Ray
workers can log to a stage's run given only (tracking_uri, run_id).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT, PipelineConfig, flatten, to_yaml

PARAM_VALUE_MAX_CHARS = 6000  # MLflow's limit for one param value


class TrackingError(RuntimeError):
    pass


def tracking_uri(cfg: PipelineConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite store under the workdir."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{cfg.workdir / 'mlflow.db'}"


def artifact_location(cfg: PipelineConfig, uri: str) -> str | None:
    """Local stores keep artifacts beside the database; a server decides for itself."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (cfg.workdir / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast (within timeout_s) with a clear error instead of MLflow's long retry loop."""
    if uri.startswith(("http://", "https://")):
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
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking.uri {uri}: cannot create {db.parent} ({e.strerror})") from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"tracking.uri {uri}: {db.parent} is not writable")


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(mlc, name: str, artifact_uri: str | None) -> str:
    exp = mlc.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlc.create_experiment(name, artifact_location=artifact_uri)


def start_parent_run(mlc, experiment_id: str, cfg: PipelineConfig, argv: list[str],
                     stage_names: list[str]) -> str:
    run = mlc.create_run(experiment_id, tags={
        "mlflow.runName": f"pipeline-{cfg.tracking.experiment}",
        "mlflow.source.git.commit": git_commit(),
        "mlflow.source.name": "pipeline/run.py",
        "pipeline.kind": "pipeline",
        "pipeline.argv": " ".join(argv)[:5000],
        "pipeline.stages": ",".join(stage_names),
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
    from mlflow.entities import Param

    items = [Param(k, str(v)[:PARAM_VALUE_MAX_CHARS]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        mlc.log_batch(run_id, params=items[i:i + 100])


def finish(mlc, run_id: str, status: str) -> None:
    mlc.set_terminated(run_id, status=status)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
