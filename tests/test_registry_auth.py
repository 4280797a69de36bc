"""Only the pipeline moves the champion: a real `mlflow server --app-name basic-auth` on loopback (SQLite
backend), with the auth config of cluster/k8s/mlflow.yaml's ConfigMap and the users and grants that
cluster/mlflow_auth_setup.py makes (as the setup Job does):
- the pipeline's service user runs the register stage under a parent run and moves `champion`, and
  cannot delete a version or the alias;
- a client without credentials gets 401 on writes (and reads);
- the read-only user runs `compare` but gets 403 on setting the alias or writing anything of the pipeline's;
- wrong or missing credentials stop `pipeline/run.py` before any stage (exit 3), naming the variables;
- the service user's password is in no param, tag, artifact, printed line or dry-run output;
- the setup is idempotent and rotates a password.
Known MLflow limit (workspaces off): any authenticated user may create experiments and registered models
of its own; the setup creates the pipeline's first, so nobody else can own those names."""

from __future__ import annotations

import base64
import configparser
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.exceptions import MlflowException

from helpers.exports import make_student_export, make_teacher_output
from pipeline import tracking
from pipeline.config import REPO_ROOT, flatten, to_yaml
from pipeline.context import StageContext
from pipeline.eval_record import METRICS_FILE

MARKER = "MARKER-pw-6c1f9e27d4a8"  # the service user's password; must surface nowhere
ADMIN = ("swd-admin", "admin-pw-0b5e8f31a2c7")
PIPELINE = ("swd-pipeline", MARKER)
READER = ("swd-reader", "reader-pw-93d1c7e2b4f0")
EXPERIMENT, MODEL = "swd-auth-test", "swd-auth-student"
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def load_setup_script():
    spec = importlib.util.spec_from_file_location("mlflow_auth_setup", REPO_ROOT / "cluster" / "mlflow_auth_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_auth_ini() -> str:
    docs = yaml.safe_load_all((REPO_ROOT / "cluster" / "k8s" / "mlflow.yaml").read_text())
    return next(d for d in docs if d["kind"] == "ConfigMap")["data"]["basic_auth.ini"]


def run_setup(uri: str, reader_password: str = READER[1]) -> tuple[int, str]:
    """cluster/mlflow_auth_setup.py setup with the Job's environment (the admin credential in MLflow's
    variables); in this process, which saves an MLflow import. Returns (exit code, everything printed)."""
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1],
           "SWD_PIPELINE_USERNAME": PIPELINE[0], "SWD_PIPELINE_PASSWORD": PIPELINE[1],
           "SWD_READER_USERNAME": READER[0], "SWD_READER_PASSWORD": reader_password}
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        for k, v in env.items():
            mp.setenv(k, v)
        rc = load_setup_script().main(["setup", "--experiment", EXPERIMENT, "--model", MODEL, "--wait-s", "60"])
    return rc, printed.getvalue()


@contextlib.contextmanager
def credentials(user_password: tuple[str, str] | None):
    """MLFLOW_TRACKING_USERNAME / _PASSWORD for the block (None: neither set)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in CREDENTIAL_VARS:
            mp.delenv(name, raising=False)
        if user_password:
            mp.setenv(CREDENTIAL_VARS[0], user_password[0])
            mp.setenv(CREDENTIAL_VARS[1], user_password[1])
        yield


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-auth-server")
    setup = load_setup_script()
    # The shipped config, plus MLflow's credential cache: without it every request re-hashes the password
    # (PBKDF2), ~10x the register stage's time on 2 shared cores. One worker here, so a password change
    # drops the cached entry at once (cluster/k8s/mlflow.yaml leaves the cache off: no staleness window).
    (root / "template.ini").write_text(shipped_auth_ini() + "auth_cache_ttl_seconds = 60\n")
    # As the init container does; the users and grants share the tracking store's database, as on k8s.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(setup.DATABASE_URI_ENV, f"sqlite:///{root / 'mlflow.db'}")
        setup.render_config(str(root / "template.ini"), str(root / "basic_auth.ini"))
    proc, uri = tracking.start_local_server(root, app_name="basic-auth", env={
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "loopback-test-key",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job workers on 2 shared cores
    try:
        rc, printed = run_setup(uri)
        assert rc == 0, printed
        assert MARKER not in printed and f"{PIPELINE[0]!r}: EDIT on registered_model {MODEL!r}" in printed
        yield uri
    finally:
        tracking.stop_local_server(proc)


def evaluation(root: Path, student_fd: float) -> Path:
    root.mkdir(parents=True)
    metrics = {"student_fd": student_fd, "teacher_fd": 10.0, "student_adherence": 0.8, "teacher_adherence": 0.9,
               "student_latency_s": 0.01, "teacher_latency_s": 0.2, "speedup_vs_teacher": 20.0}
    (root / METRICS_FILE).write_text(json.dumps({"metrics": metrics, "eval_set": {"fingerprint": "evalset-a"}}))
    return root


@pytest.fixture(scope="module")
def pipeline_run(auth_server, tmp_path_factory):
    """As the service user, what run_stages does around the register stage: the experiment, a parent run
    with the resolved config, a register child run, twice (the second student better, so `champion`
    moves from version 1 to 2). Returns the parent run ids and everything printed."""
    import stages
    from stages import register

    root = tmp_path_factory.mktemp("auth-pipeline")
    teacher = make_teacher_output(root)
    inputs = {"teacher": teacher, "distill": make_student_export(root / "distill", root / "bundle", [8, 10, 12, 16])}
    argv = [f"tracking.uri={auth_server}", f"tracking.experiment={EXPERIMENT}", f"register.model_name={MODEL}",
            "register.copy_teacher=false", f"workdir={root / 'workdir'}"]  # the teacher by location: less to upload
    cfg = stages.load_config([], argv)
    printed, parents = io.StringIO(), []
    with credentials(PIPELINE), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        tracking.check_reachable(auth_server, 10)
        mlc = tracking.client(auth_server)
        exp_id = tracking.ensure_experiment(mlc, EXPERIMENT, tracking.artifact_location(cfg, auth_server))
        for i, fd in enumerate((20.0, 15.0)):
            parent = tracking.start_parent_run(mlc, exp_id, cfg, argv, ["register"])
            run_id = tracking.start_stage_run(mlc, exp_id, parent, "register", "test",
                                              flatten({"register": cfg.register, "teacher": cfg.teacher}))
            tmp = root / f"register-{i}"
            for d in ("out", "scratch", "shared"):
                (tmp / d).mkdir(parents=True)
            ctx = StageContext(name="register", config=cfg.register,
                               sections={"register": cfg.register, "teacher": cfg.teacher},
                               inputs={**inputs, "evaluate": evaluation(tmp / "evaluate", fd)},
                               output_dir=tmp / "out", scratch_dir=tmp / "scratch", shared_dir=tmp / "shared",
                               tracking_uri=auth_server, run_id=run_id, fingerprint="test")
            register.run(ctx)
            assert ctx.summary["promoted"], ctx.summary
            tracking.finish(mlc, run_id, "FINISHED")
            tracking.finish(mlc, parent, "FINISHED")
            parents.append(parent)
    return {"parents": parents, "printed": printed.getvalue(), "exp_id": exp_id}


def admin_client(uri: str):
    return mlflow.MlflowClient(uri)


def status_of(call) -> int:
    with pytest.raises(MlflowException) as e:
        call()
    return e.value.get_http_status_code()


def test_the_service_user_runs_register_and_moves_champion_but_deletes_nothing(auth_server, pipeline_run):
    with credentials(PIPELINE):
        mlc = mlflow.MlflowClient(auth_server)
        assert mlc.get_model_version_by_alias(MODEL, "champion").version == "2"  # moved from 1
        assert mlc.get_registered_model(MODEL).tags["champion_version"] == "2"
        assert status_of(lambda: mlc.delete_model_version(MODEL, "1")) == 403
        assert status_of(lambda: mlc.delete_registered_model_alias(MODEL, "champion")) == 403
        assert status_of(lambda: mlc.delete_experiment(pipeline_run["exp_id"])) == 403
    with credentials(ADMIN):
        assert {v.version for v in admin_client(auth_server).search_model_versions(f"name='{MODEL}'")} == {"1", "2"}


def raw_request(uri: str, path: str, body: dict | None, auth: tuple[str, str] | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(uri + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_without_credentials_every_write_is_401(auth_server, pipeline_run):
    exp_id, parent = pipeline_run["exp_id"], pipeline_run["parents"][-1]
    writes = [("/api/2.0/mlflow/runs/create", {"experiment_id": exp_id}),
              ("/api/2.0/mlflow/runs/log-metric", {"run_id": parent, "key": "x", "value": 1, "timestamp": 0}),
              ("/api/2.0/mlflow/registered-models/alias", {"name": MODEL, "alias": "champion", "version": "1"}),
              ("/api/2.0/mlflow/model-versions/create", {"name": MODEL, "source": "mlflow-artifacts:/x"}),
              ("/api/2.0/mlflow/experiments/create", {"name": "squatter"})]
    for path, body in writes:
        assert raw_request(auth_server, path, body) == 401, path
        assert raw_request(auth_server, path, body, ("swd-pipeline", "not-the-password")) == 401, path
    assert raw_request(auth_server, tracking.AUTH_PROBE_PATH, None) == 401  # reads too
    with credentials(None):
        mlc = mlflow.MlflowClient(auth_server)
        assert status_of(lambda: mlc.set_registered_model_alias(MODEL, "champion", "1")) == 401
    with credentials(PIPELINE):
        assert mlflow.MlflowClient(auth_server).get_model_version_by_alias(MODEL, "champion").version == "2"


def test_the_read_only_user_compares_but_cannot_move_champion(auth_server, pipeline_run, tmp_path, capsys):
    from pipeline import run

    with credentials(READER):
        rc = run.main(["compare", f"tracking.uri={auth_server}", f"tracking.experiment={EXPERIMENT}",
                       f"workdir={tmp_path}"])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert all(p[:8] in out for p in pipeline_run["parents"])
        mlc = mlflow.MlflowClient(auth_server)
        assert mlc.get_model_version_by_alias(MODEL, "champion").version == "2"  # it can read the registry
        parent = pipeline_run["parents"][-1]
        assert status_of(lambda: mlc.set_registered_model_alias(MODEL, "champion", "1")) == 403
        assert status_of(lambda: mlc.delete_registered_model_alias(MODEL, "champion")) == 403
        assert status_of(lambda: mlc.create_model_version(MODEL, f"runs:/{parent}/student", run_id=parent)) == 403
        assert status_of(lambda: mlc.set_registered_model_tag(MODEL, "champion_version", "1")) == 403
        assert status_of(lambda: mlc.create_run(pipeline_run["exp_id"])) == 403
        assert status_of(lambda: mlc.log_metric(parent, "student_fd", 0.0)) == 403
        assert status_of(lambda: mlc.set_tag(parent, "pipeline.kind", "x")) == 403
    with credentials(PIPELINE):
        assert mlflow.MlflowClient(auth_server).get_model_version_by_alias(MODEL, "champion").version == "2"


def test_wrong_credentials_stop_the_pipeline_before_any_stage(auth_server, pipeline_run, tmp_path, capsys):
    from pipeline import run

    argv = [f"tracking.uri={auth_server}", f"tracking.experiment={EXPERIMENT}", f"workdir={tmp_path / 'w'}"]
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / "run.py"), *argv], cwd=REPO_ROOT,
                          env={**env, CREDENTIAL_VARS[0]: PIPELINE[0], CREDENTIAL_VARS[1]: "wrong-pw-51c0e8"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == run.EXIT_TRACKING == 3, done.stderr[-2000:]
    assert "refused user 'swd-pipeline'" in done.stderr and "HTTP 401" in done.stderr
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in done.stderr
    assert "wrong-pw-51c0e8" not in done.stdout + done.stderr
    assert "[pipeline]" not in done.stdout  # no parent run, no stage
    for who, expected in [(None, "needs credentials and none were given"),
                          ((PIPELINE[0], ""), "MLFLOW_TRACKING_USERNAME is set but MLFLOW_TRACKING_PASSWORD is not")]:
        with credentials(None), pytest.MonkeyPatch.context() as mp:
            if who:
                mp.setenv(CREDENTIAL_VARS[0], who[0])
            assert run.main(argv) == 3
        captured = capsys.readouterr()
        assert expected in captured.err and "[pipeline]" not in captured.out
    with credentials(PIPELINE):  # nothing was logged by those attempts
        runs = mlflow.MlflowClient(auth_server).search_runs([pipeline_run["exp_id"]],
                                                            "tags.`pipeline.kind` = 'pipeline'")
        assert {r.info.run_id for r in runs} == set(pipeline_run["parents"])


def test_no_secret_in_config_params_tags_artifacts_or_output(auth_server, pipeline_run, tmp_path, capsys):
    from pipeline import run

    with credentials(PIPELINE):
        assert run.main(["--dry-run", f"tracking.uri={auth_server}", f"workdir={tmp_path}"]) == 0
        dry = capsys.readouterr()
        assert "# resolved config" in dry.out and MARKER not in dry.out + dry.err
        mlc = mlflow.MlflowClient(auth_server)
        runs = mlc.search_runs([pipeline_run["exp_id"]])
        assert len(runs) == 4  # two parents, two register runs
        for r in runs:
            for key, value in {**r.data.params, **r.data.tags}.items():
                assert MARKER not in key and MARKER not in value, (r.info.run_id, key)
            local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=str(tmp_path / r.info.run_id),
                                                        tracking_uri=auth_server)
            for f in Path(local).rglob("*"):
                if f.is_file():
                    assert MARKER.encode() not in f.read_bytes(), f
        for v in mlc.search_model_versions(f"name='{MODEL}'"):
            assert MARKER not in json.dumps({**v.tags, "d": v.description, "s": v.source})
        parent = pipeline_run["parents"][0]
        resolved = yaml.safe_load((tmp_path / parent / "resolved_config.yaml").read_text())
        assert resolved["tracking"]["uri"] == auth_server  # the URI, never a credential
    assert MARKER not in pipeline_run["printed"]
    assert "[register]" in pipeline_run["printed"]  # the capture did see the stage's output


def test_a_uri_with_credentials_in_it_is_refused_before_anything_is_logged():
    with pytest.raises(tracking.TrackingError, match=r"carries credentials in the URL.*set MLFLOW_TRACKING_USERNAME "
                                                     r"and MLFLOW_TRACKING_PASSWORD in the environment") as e:
        tracking.check_reachable(f"http://swd-pipeline:{MARKER}@127.0.0.1:9", 1)  # never contacted
    assert MARKER not in str(e.value)


def test_the_embedded_default_needs_no_credentials(tmp_path):
    with credentials(None):
        tracking.check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}", 1)  # no server, no user: fine
    with credentials((PIPELINE[0], "")):  # half-set variables matter only for a server
        tracking.check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}", 1)


def test_setup_is_idempotent_and_rotates_a_password(auth_server, pipeline_run):
    rotated = "reader-pw-rotated-7e21a9"
    rc, printed = run_setup(auth_server, reader_password=rotated)
    assert rc == 0, printed
    assert "exists: password set" in printed and rotated not in printed
    with credentials((READER[0], READER[1])), pytest.raises(tracking.TrackingError, match="HTTP 401"):
        tracking.check_reachable(auth_server, 10)
    with credentials((READER[0], rotated)):
        mlc = mlflow.MlflowClient(auth_server)
        assert mlc.get_model_version_by_alias(MODEL, "champion").version == "2"  # READ kept
        assert status_of(lambda: mlc.set_registered_model_alias(MODEL, "champion", "1")) == 403
    with credentials(PIPELINE):  # the pipeline's grants are the same after the second run
        mlc = mlflow.MlflowClient(auth_server)
        assert mlc.get_experiment_by_name(EXPERIMENT).experiment_id == pipeline_run["exp_id"]
        assert status_of(lambda: mlc.delete_model_version(MODEL, "1")) == 403
    assert run_setup(auth_server)[0] == 0  # back to the module's reader password


def test_the_setup_script_matches_the_pipeline_and_the_shipped_config():
    setup = load_setup_script()
    assert (setup.EXPERIMENT_KIND_TAG, setup.EXPERIMENT_KIND) == (tracking.EXPERIMENT_KIND_TAG, tracking.EXPERIMENT_KIND)
    ini = configparser.ConfigParser()
    ini.read_string(shipped_auth_ini())
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert (setup.PIPELINE_PERMISSION, setup.READER_PERMISSION) == ("EDIT", "READ")


def test_render_config_keeps_a_percent_in_the_password(tmp_path, monkeypatch):
    setup = load_setup_script()
    (tmp_path / "t.ini").write_text(shipped_auth_ini())
    monkeypatch.setenv(setup.DATABASE_URI_ENV, "postgresql://mlflow:p%40ss@db:5432/mlflow")
    setup.render_config(str(tmp_path / "t.ini"), str(tmp_path / "out.ini"))
    parsed = configparser.ConfigParser()
    parsed.read(tmp_path / "out.ini")
    assert parsed["mlflow"]["database_uri"] == "postgresql://mlflow:p%40ss@db:5432/mlflow"
    assert (tmp_path / "out.ini").stat().st_mode & 0o077 == 0  # the file holds a password
    monkeypatch.delenv(setup.DATABASE_URI_ENV)
    assert setup.main(["render-config", str(tmp_path / "t.ini"), str(tmp_path / "o2.ini")]) == 2
