"""The MLflow UI lands where the README says: the pipeline's experiment is marked as model training,
its link opens the runs table (checked in headless Chromium against a real `mlflow server`), and
parent runs are named so that invocations tell apart."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import REPO_ROOT
from pipeline import run, tracking
from stages import load_config

CHECK = REPO_ROOT / "scripts" / "check_mlflow_ui.py"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, MlflowClient(tracking_uri=uri)


def test_experiment_is_marked_model_training_new_and_existing(store, tmp_path):
    uri, mlc = store
    exp_id = tracking.ensure_experiment(mlc, "fresh", (tmp_path / "a").as_uri())
    assert mlc.get_experiment(exp_id).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    # an experiment made before (no kind, as older pipeline versions left it) is marked when found
    old = mlc.create_experiment("older", artifact_location=(tmp_path / "b").as_uri())
    assert tracking.EXPERIMENT_KIND_TAG not in mlc.get_experiment(old).tags
    assert tracking.ensure_experiment(mlc, "older", None) == old
    assert mlc.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracking.runs_page_url("http://mlflow.example:5000/", old) == \
        f"http://mlflow.example:5000/#/experiments/{old}/runs?workflowType=machine_learning"
    assert tracking.runs_page_url(uri, old).startswith(f"http://127.0.0.1:5000/#/experiments/{old}/runs?")


def test_parent_run_names_tell_invocations_apart(store, tmp_path):
    uri, mlc = store
    exp_id = tracking.ensure_experiment(mlc, "names", (tmp_path / "art").as_uri())
    where = [f"workdir={tmp_path / 'wd'}", f"tracking.uri={uri}"]

    def parent(argv: list[str], tags: dict | None = None):
        cfg = load_config([], [a for a in argv if "=" in a and not a.startswith("-")])
        run_id = tracking.start_parent_run(mlc, exp_id, cfg, argv, ["shards"], tags)
        return mlc.get_run(run_id)

    a = parent([*where, "distill.num_steps=10"])
    b = parent([*where, "distill.num_steps=20", "--only", "shards"])
    same = parent([*where, "distill.num_steps=10"])
    names = [r.info.run_name for r in (a, b)]
    assert names[0] != names[1]
    assert names[0].startswith("embedded num_steps=10 #")  # where it runs (workdir, tracking) is left out
    assert names[1].startswith("embedded num_steps=20 only=shards #")
    assert a.data.tags["pipeline.config_fingerprint"] != b.data.tags["pipeline.config_fingerprint"]
    assert same.info.run_name == names[0]  # the same config: the same name, the same fingerprint
    assert a.data.tags["mlflow.runName"] == names[0]

    profile = REPO_ROOT / "cluster" / "profiles" / "sd35-medium-6step.yaml"
    long_value = "/very/long/path/to/a/champion/student/model/dir"
    cfg = load_config([profile], [f"distill.init_student={long_value}"])
    name = tracking.parent_run_name(cfg, ["--config", str(profile), f"distill.init_student={long_value}",
                                          "--schedule-slot", "auto"], {"schedule.slot": "2026-12-01"})
    assert name.startswith("sd35-medium-6step init_student=")
    assert "slot 2026-12-01 #" in name and long_value not in name and len(name) <= tracking.RUN_NAME_MAX_CHARS
    sched = parent([*where, "--schedule-slot", "auto"], {"schedule.slot": "2026-12-01"})
    assert sched.info.run_name.startswith("embedded slot 2026-12-01 #")
    assert sched.data.tags["schedule.slot"] == "2026-12-01"


def test_link_command_prints_the_runs_table_link(store, tmp_path, capsys):
    uri, mlc = store
    assert run.link([f"tracking.uri={uri}", "tracking.experiment=linked"]) == 1  # none yet
    exp_id = tracking.ensure_experiment(mlc, "linked", (tmp_path / "art").as_uri())
    capsys.readouterr()
    assert run.link([f"tracking.uri={uri}", "tracking.experiment=linked"]) == 0
    assert capsys.readouterr().out.strip() == \
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def test_readme_link_opens_runs_table_in_chromium():
    """scripts/check_mlflow_ui.py: a real `mlflow server`, runs recorded through pipeline.tracking,
    the link loaded in headless Chromium; the runs table must show the parent run by name."""
    if not any(shutil.which(b) for b in BROWSERS):
        pytest.skip("no Chromium on PATH: install it (Debian: `apt-get update && apt-get install -y chromium`) "
                    "to check the MLflow UI in a real browser")
    out = subprocess.run([sys.executable, str(CHECK), "--no-compare"], capture_output=True, text=True, timeout=170,
                         cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = r"^\[check\] README link \S+/runs\?workflowType=machine_learning: runs table$"
    assert re.search(line, out.stdout, re.M), out.stdout
