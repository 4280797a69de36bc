"""Scheduled retraining with the real `shards` -> `teacher` (pretrained tiny bundle) -> `cache` stages:
a slot after new shards were added encodes only those shards (the rest of the cache is reused per
shard), and the slot's records name exactly the new shards."""

from __future__ import annotations

import json

import mlflow

from helpers.context import pretrained_teacher_stages
from helpers.shards import good_shard
from pipeline import graph, schedule
from pipeline.run import run_stages
from stages import load_config

FAST = ["cache.batch_size=8", "cache.decode_batch_size=8"]


def test_a_scheduled_run_encodes_only_the_shards_added_since_the_last_success(tmp_path, ray_local, tiny_bundle):
    data = tmp_path / "shards"
    data.mkdir()
    good_shard(data / "train-000.tar", "a", 6, seed=0)
    good_shard(data / "train-001.tar", "b", 6, seed=50)
    good_shard(data / "eval-000.tar", "e", 3, seed=90)
    wd = tmp_path / "wd"
    uri = f"sqlite:///{wd / 'mlflow.db'}"

    def run_slot(slot: str) -> int:
        cfg = load_config(overrides=[f"workdir={wd}", f"data.train_shards={data}/train-*.tar",
                                     f"data.eval_shards={data}/eval-000.tar", f"teacher.pretrained={tiny_bundle}",
                                     "tracking.experiment=sched-cache", *FAST])
        # the stages up to the cache (synthesize among them, disabled by default)
        plan = lambda c: graph.plan(c, pretrained_teacher_stages("cache"))  # noqa: E731
        return schedule.run_scheduled(cfg, slot, uri, [], plan=plan, init_ray=lambda c: None, run_stages=run_stages)

    def cache_summary() -> dict:
        manifests = sorted((wd / "cache").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
        return json.loads(manifests[-1].read_text())["summary"]

    assert run_slot("d1") == 0
    first = cache_summary()
    assert first["shards_encoded"] == 2 and first["shards_reused"] == 0
    assert run_slot("d2") == 0  # nothing new: recorded, nothing encoded
    assert json.loads((wd / "schedule" / "slots" / "d2.json").read_text())["outcome"] == "no_new_shards"
    assert len(list((wd / "cache").glob("*/manifest.json"))) == 1

    good_shard(data / "train-002.tar", "c", 6, seed=20)
    assert run_slot("d3") == 0
    third = cache_summary()
    assert third["shards_encoded"] == 1 and third["shards_reused"] == 2
    record = json.loads((wd / "schedule" / "slots" / "d3.json").read_text())
    assert [u.rsplit("/", 1)[1] for u in record["new_shards"]] == ["train-002.tar"]
    mlc = mlflow.MlflowClient(uri)
    exp = mlc.get_experiment_by_name("sched-cache")
    (parent,) = mlc.search_runs([exp.experiment_id], filter_string="tags.`schedule.slot` = 'd3'")
    assert parent.data.tags["schedule.new_shards"] == "1" and parent.data.tags["schedule.slot_done"] == "true"
