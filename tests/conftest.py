"""Shared fixtures: a real local Ray, a real `mlflow server` on loopback with a SQLite backend,
and small overrides that keep generated data tiny."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

# Idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning made torch steps ~5x slower.
# Set before Ray starts, so every worker inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parent.parent
# Small generated data for stage tests: 2 train shards, 1 eval shard.
SMALL_DATA = [
    "data.generator.num_train_samples=64",
    "data.generator.num_eval_samples=16",
    "data.generator.samples_per_shard=32",
]


# Integration tests are marked `slow`, so `python -m pytest -m "not slow"` is the inner loop of
# pure-torch, config, graph, format and plan tests; CI and the README run everything. A test is an
# integration test when it starts or joins a real Ray cluster or a real `mlflow server` (these
# fixtures), or lives in a module that drives the pipeline's processes end to end (these modules:
# `pipeline/run.py` as a subprocess, the scheduled runs, a browser on the MLflow UI).
INTEGRATION_FIXTURES = ("ray_local", "mlflow_server", "auth_server")
INTEGRATION_MODULES = ("test_cli", "test_mlflow_ui", "test_registry_auth", "test_schedule")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        if any(name in getattr(item, "fixturenames", ()) for name in INTEGRATION_FIXTURES) or \
                (module is not None and module.__name__.rpartition(".")[2] in INTEGRATION_MODULES):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """One fresh local Ray for the session (never a stale cluster from /tmp/ray)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1 with a SQLite backend; yields its URI."""
    from pipeline.tracking import start_local_server, stop_local_server

    proc, uri = start_local_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    stop_local_server(proc)


@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path / "workdir"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """The random tiny SD3 bundle (pipeline/tiny.py, seed 0) that stage tests share; built once per session.
    Tests must not write into it (copy it first)."""
    from pipeline import tiny

    return tiny.build_bundle(tmp_path_factory.mktemp("tiny-bundle") / "tiny")
