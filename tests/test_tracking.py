"""MLflow records of a pipeline run, checked through MlflowClient against a real `mlflow server`
on loopback with a SQLite backend."""

from __future__ import annotations

import yaml
from mlflow import MlflowClient

from conftest import SMALL_DATA
from pipeline.run import main


def stage_runs(mlc: MlflowClient, exp_id: str, parent_id: str) -> dict[str, object]:
    runs = mlc.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["stage"]: r for r in runs}


def test_parent_and_child_runs_params_artifacts_and_cache_hits(mlflow_server, workdir, ray_local, tmp_path):
    args = [f"workdir={workdir}", f"tracking.uri={mlflow_server}", "tracking.experiment=tracking-test",
            *SMALL_DATA, "--only", "shards"]
    assert main(args) == 0
    mlc = MlflowClient(mlflow_server)
    exp = mlc.get_experiment_by_name("tracking-test")
    parents = mlc.search_runs([exp.experiment_id], filter_string="tags.`pipeline.kind` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["data.generator.num_train_samples"] == "64"
    assert parent.data.tags["mlflow.source.git.commit"]
    # the resolved config is an artifact and round-trips
    path = mlc.download_artifacts(parent.info.run_id, "resolved_config.yaml", str(tmp_path))
    assert yaml.safe_load(open(path))["data"]["generator"]["num_eval_samples"] == 16

    children = stage_runs(mlc, exp.experiment_id, parent.info.run_id)
    assert set(children) == {"shards"}  # --only shards: teacher not run, no child run
    shards = children["shards"]
    assert shards.info.status == "FINISHED"
    assert shards.data.tags["cache_hit"] == "false"
    assert shards.data.params["data.generator.seed"] == "0"
    assert shards.data.metrics["train_shards"] == 2
    assert shards.data.metrics["stage_wall_s"] > 0

    # same command again: a new parent, the stage a cache hit pointing at the first run
    assert main(args) == 0
    parents = mlc.search_runs([exp.experiment_id], filter_string="tags.`pipeline.kind` = 'pipeline'",
                              order_by=["attributes.start_time DESC"])
    assert len(parents) == 2
    again = stage_runs(mlc, exp.experiment_id, parents[0].info.run_id)["shards"]
    assert again.data.tags["cache_hit"] == "true"
    assert again.data.tags["source_run_id"] == shards.info.run_id
    assert again.data.tags["fingerprint"] == shards.data.tags["fingerprint"]
