"""Golden losses of the distill training loop: 4 generator steps with a fixed seed on the tiny bundle and
a synthetic latent cache, every loss term per step compared with `tests/distill_golden.json` (rtol 1e-4,
as torchtitan keeps loss curves). A refactor of the loop must keep these numbers.

The worker loop runs in this process as Ray Train runs it on one worker: a single-rank gloo process
group, DeepSpeed engines, the stage's MLflow logging (a SQLite store), the final checkpoint and export;
only the five `ray.train` calls the worker makes (context, device, checkpoint, dataset shard, report) are
served locally, each scale's shard reading that scale's columns of the cache's Parquet rows in order (as
`shuffle_buffer_rows=0` does).

When a change is *meant* to change the losses, re-record (and say why in the commit):

    python tests/test_distill_golden.py --record
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import types
from pathlib import Path
from unittest import mock

import pytest

GOLDEN_FILE = Path(__file__).with_name("distill_golden.json")
NUM_STEPS = 4
CACHE_ROWS = 24
SCALES = [8, 10, 12, 16]
RTOL = 1e-4
# Small and quick: LoRA rank 4, batch 2, two fake updates per step (their mean is logged), one log per step;
# the sample grid, checkpoint and export at the last step.
OVERRIDES = ["swd.student.lora_rank=4", "swd.fake.lora_rank=4", "swd.student.lora_alpha=4", "swd.fake.lora_alpha=4",
             "distill.batch_size_per_worker=2", "distill.fake_updates_per_step=2", f"distill.num_steps={NUM_STEPS}",
             "distill.log_every_steps=1", f"distill.sample_every_steps={NUM_STEPS}",
             f"distill.checkpoint_every_steps={NUM_STEPS}", "distill.shuffle_buffer_rows=0", "distill.sample_num_prompts=2",
             "distill.lr=1e-3", "distill.fake_lr=1e-3", "distill.seed=3",
             # the loss weights it was recorded with (the embedded default's have moved since)
             "swd.loss.guidance_scale=7.0", "swd.loss.mmd_weight=1.0", "swd.preset=tiny-4step"]


class LocalShard:
    """`ray.train.get_dataset_shard(name)` of one worker: the cache's rows in order, in full batches."""

    def __init__(self, cache_dir: Path, columns: list[str]):
        import pyarrow as pa
        import pyarrow.dataset as pads

        dirs = [e["dir"] for e in read_manifest(cache_dir)["shards"] if e["rows"]]
        self.table = pa.concat_tables([pads.dataset(d, format="parquet").to_table(columns=columns) for d in dirs])

    def iter_torch_batches(self, batch_size: int, drop_last: bool, collate_fn, **_shuffle):
        for start in range(0, self.table.num_rows - batch_size + 1, batch_size):
            yield collate_fn(self.table.slice(start, batch_size))


@contextlib.contextmanager
def single_worker(shards: dict[str, LocalShard], reports: list):
    """One Ray Train worker in this process: rank 0 of a world of 1, a gloo process group, the CPU."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_rank=lambda: 0)
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))
        stack.enter_context(mock.patch.object(ray.train, "get_context", lambda: context))
        stack.enter_context(mock.patch.object(ray.train.torch, "get_device", lambda: torch.device("cpu")))
        stack.enter_context(mock.patch.object(ray.train, "get_checkpoint", lambda: None))
        stack.enter_context(mock.patch.object(ray.train, "get_dataset_shard", lambda name: shards[name]))
        stack.enter_context(mock.patch.object(ray.train, "report",
                                              lambda metrics, checkpoint=None, **kw: reports.append(metrics)))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
            torch.set_num_threads(threads)


def new_api():
    """This tree's distill worker (the pre-refactor tree had the same calls under other names)."""
    from pipeline.latent_cache import read_uncond
    from stages import load_config
    from stages.distill import checks, worker

    def shards(cache_dir: Path, columns: list) -> dict[str, LocalShard]:  # one dataset per scale (checks)
        return {name: LocalShard(cache_dir, checks.dataset_columns(pair))
                for name, pair in dict(zip(checks.scale_datasets(columns), columns)).items()}

    def spec_extra(cache_dir: Path) -> dict:  # the cache's "" embedding, as the driver hands it over
        return {"uncond": {k: t.float().numpy() for k, t in zip(checks.TEXT_COLUMNS, read_uncond(cache_dir))}}

    return types.SimpleNamespace(cache_columns=checks.cache_columns, sample_prompts=checks.sample_prompts,
                                 LoopSpec=worker.LoopSpec, train_loop=worker.train_loop, spec_extra=spec_extra,
                                 shards=shards, load_config=load_config, overrides=OVERRIDES)


def read_manifest(cache_dir: Path) -> dict:
    return json.loads((Path(cache_dir) / "cache.json").read_text())


def golden_losses(bundle_dir: Path, root: Path, api=None) -> dict[str, list[float]]:
    """Run the loop; every `loss/*` metric it logged, per step 1..NUM_STEPS."""
    import mlflow

    from pipeline import tiny

    api = api or new_api()
    full = api.load_config(overrides=api.overrides)
    cfg, swd, teacher = full.distill, full.swd, full.teacher
    cache_dir = tiny.synthetic_cache(root / "cache", bundle_dir, CACHE_ROWS, SCALES)
    manifest = read_manifest(cache_dir)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("golden", (root / "art").as_uri())).info.run_id
    columns = api.cache_columns(swd.schedule.scales, manifest["scales"])
    spec = api.LoopSpec(distill=cfg.model_dump(mode="json"), swd=swd.model_dump(mode="json"),
                        location=str(bundle_dir), load_t5=teacher.load_t5, columns=columns,
                        sample_prompts=api.sample_prompts(cache_dir, cfg.sample_num_prompts), tracking_uri=uri,
                        run_id=run_id, vae_scale_factor=manifest["vae_scale_factor"],
                        max_sequence_length=manifest["text"]["max_sequence_length"], **api.spec_extra(cache_dir))
    reports: list[dict] = []
    with single_worker(api.shards(cache_dir, columns), reports):
        result = api.train_loop(dict(spec.__dict__))
    assert result["step"] == NUM_STEPS and [r["step"] for r in reports] == [NUM_STEPS], (result, reports)
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("loss/"))
    losses = {k: {int(m.step): m.value for m in client.get_metric_history(run_id, k)} for k in keys}
    return {k: [by_step[s] for s in range(1, NUM_STEPS + 1)] for k, by_step in losses.items()}


def test_distill_losses_match_the_recorded_curve(tmp_path, tiny_bundle):
    from pipeline import teacher

    golden = json.loads(GOLDEN_FILE.read_text())
    loaded, load_bundle = [], teacher.load_bundle

    def recording(*args, components=teacher.COMPONENTS, **kwargs):
        loaded.append(tuple(components))
        return load_bundle(*args, components=components, **kwargs)

    with mock.patch.object(teacher, "load_bundle", recording):
        losses = golden_losses(tiny_bundle, tmp_path)
    # The worker (rank 0) loads no text encoder (the cache holds the "" embedding); the VAE decodes the grid.
    assert loaded[-1] == ("transformer", "vae"), loaded
    assert {"loss/generator_total", "loss/fake_total"} <= set(losses)
    assert sorted(losses) == sorted(golden["losses"]), "the loop logs other loss terms than were recorded"
    for key, expected in golden["losses"].items():
        assert losses[key] == pytest.approx(expected, rel=RTOL), (
            f"{key}: {losses[key]} != recorded {expected}; if the change is meant to change the losses, "
            f"re-record: python tests/test_distill_golden.py --record")


def record(api=None) -> dict:
    import tempfile

    from pipeline import tiny

    with tempfile.TemporaryDirectory(prefix="distill-golden-") as tmp:
        bundle = tiny.build_bundle(Path(tmp) / "bundle")  # as conftest's tiny_bundle (seed 0)
        losses = golden_losses(bundle, Path(tmp) / "run", api)
    golden = {"num_steps": NUM_STEPS, "overrides": OVERRIDES, "losses": losses}
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1) + "\n")
    return golden


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_distill_golden.py --record  (writes tests/distill_golden.json)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    print(json.dumps(record()["losses"], indent=1))
