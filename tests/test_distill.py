"""The `distill` stage: Ray Train (V2) + DeepSpeed on the CPU (gloo) with the tiny bundle and a small
synthetic latent cache. 2-worker runs under ZeRO 0, 2 and 3; resume from a checkpoint with equal
weights; a SIGKILLed worker; the non-finite guard; the export in stock diffusers; the cache check."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
import types
from pathlib import Path

import mlflow
import pytest
import torch

import stages
from helpers.context import stage_context
from helpers.stock_diffusers import check_export_in_stock_diffusers
from pipeline import latent_cache, resources, tiny
from pipeline.config import ConfigError
from pipeline.context import StageContext
from pipeline.student_export import LORA_WEIGHTS, init_student_adapter
from stages import distill, load_config
from stages.distill import checks, faults, worker
from stages.distill.metrics import PROGRESS_METRIC

# Small everywhere: LoRA rank 4, batch 2, one fake update per step, metrics every step.
FAST = ["swd.student.lora_rank=4", "swd.fake.lora_rank=4", "swd.student.lora_alpha=4", "swd.fake.lora_alpha=4",
        "distill.batch_size_per_worker=2", "distill.fake_updates_per_step=1", "distill.log_every_steps=1",
        "distill.sample_every_steps=2", "distill.checkpoint_every_steps=2", "distill.shuffle_buffer_rows=0",
        "distill.lr=1e-3", "distill.fake_lr=1e-3"]
TWO_WORKERS = ["distill.num_workers=2", "distill.num_cpus_per_worker=0.5"]  # one CPU left for Ray Data
BASELINE = ["swd.preset=null", "swd.scales=[16,16,16,16]", "swd.boundaries=[0,7,14,18]"]
LOSS_KEYS = ("loss/generator_total", "loss/dmd", "loss/gan_g", "loss/mmd", "loss/fake_total", "loss/fake_diffusion")
CACHE_ROWS = 24


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_bundle) -> dict[str, Path]:
    """A pretrained-teacher output naming the tiny bundle, and a synthetic cache of its real prompt embeddings."""
    root = tmp_path_factory.mktemp("inputs")
    teacher = root / "teacher"
    teacher.mkdir()
    (teacher / "teacher.json").write_text(json.dumps({"source": "pretrained", "location": str(tiny_bundle)}))
    return {"cache": tiny.synthetic_cache(root / "cache", tiny_bundle, CACHE_ROWS, [8, 10, 12, 16]), "teacher": teacher}


def distill_context(root: Path, inputs: dict[str, Path], overrides: list[str], fingerprint: str = "f") -> StageContext:
    """A context of the distill stage under `root`; contexts with one root and fingerprint share the
    scratch dir (the Ray Train checkpoints), as re-runs of one stage fingerprint do."""
    # the synthetic cache's scales (tiny-4step, 8-10-12-16: four cache streams, the per-scale data path at its
    # widest); later overrides may change the schedule
    cfg = load_config(overrides=["swd.preset=tiny-4step", *overrides])
    ctx = stage_context("distill", {"distill": cfg.distill, "swd": cfg.swd, "teacher": cfg.teacher}, root, inputs)
    ctx.fingerprint = fingerprint
    return ctx


def run_stage(ctx: StageContext, hooks: dict | None = None) -> StageContext:
    os.environ[distill.HOOKS_ENV] = json.dumps(hooks or {})
    try:
        distill.run(ctx)
    finally:
        os.environ.pop(distill.HOOKS_ENV, None)
    return ctx


def history(ctx: StageContext, key: str) -> list:
    return mlflow.MlflowClient(ctx.tracking_uri).get_metric_history(ctx.run_id, key)


def all_metric_keys(ctx: StageContext) -> list[str]:
    return list(mlflow.MlflowClient(ctx.tracking_uri).get_run(ctx.run_id).data.metrics)


def checkpoints(ctx: StageContext) -> list[str]:
    return sorted(p.name for p in (Path(ctx.scratch_dir) / "ray_train" / f"distill-{ctx.fingerprint}").glob("checkpoint_step*"))


def assert_finite_losses(ctx: StageContext, keys=LOSS_KEYS) -> None:
    for key in keys:
        values = [m.value for m in history(ctx, key)]
        assert values and all(math.isfinite(v) for v in values), (key, values)


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- no Ray


def test_cache_columns_map_the_schedule_and_name_what_is_missing():
    assert checks.cache_columns([8, 10, 12, 16], [8, 10, 12, 16]) == [
        ("z_0", "z_0"), ("z_1", "z_im1_1"), ("z_2", "z_im1_2"), ("z_3", "z_im1_3")]
    # The full-resolution baseline reads the largest scale of a scale-wise cache; z_im1 is z itself.
    assert checks.cache_columns([16, 16, 16, 16], [8, 10, 12, 16]) == [("z_3", "z_3")] * 4
    with pytest.raises(ValueError, match=r"holds scales \[8, 10, 12, 16\].*swd scales \[8, 12\].*step 1: side 12 "
                                         r"after 8.*re-run the cache stage"):
        checks.cache_columns([8, 12], [8, 10, 12, 16])


def test_each_scale_index_reads_a_dataset_of_its_own_columns():
    scalewise = checks.cache_columns([8, 10, 12, 16], [8, 10, 12, 16])
    assert checks.scale_datasets(scalewise) == ["scale_0", "scale_1", "scale_2", "scale_3"]
    # The full-resolution baseline reads the same columns at every step: one dataset.
    assert checks.scale_datasets(checks.cache_columns([16, 16, 16, 16], [8, 10, 12, 16])) == ["scale_0"] * 4
    text = ["prompt_embeds", "prompt_embeds_shape", "prompt_embeds_dtype", "pooled_prompt_embeds",
            "pooled_prompt_embeds_shape", "pooled_prompt_embeds_dtype"]
    assert checks.dataset_columns(("z_1", "z_im1_1")) == [
        "z_1", "z_1_shape", "z_1_dtype", "z_im1_1", "z_im1_1_shape", "z_im1_1_dtype", *text]
    assert checks.dataset_columns(("z_0", "z_0")) == ["z_0", "z_0_shape", "z_0_dtype", *text]


def test_fit_gives_the_trainer_one_dataset_per_scale_reading_only_its_columns(tmp_path, ray_local, inputs, monkeypatch):
    import ray.train.torch

    seen = {}

    class Trainer:  # stands in for TorchTrainer: what fit hands it
        def __init__(self, *args, datasets, dataset_config, **kwargs):
            seen.update(datasets)
            # What Ray Train applies to each dataset's shards (DataConfig.configure).
            seen["options"] = [dataset_config._resolve_execution_options(n) for n in datasets]

        def fit(self):
            return "fitted"

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    cfg = load_config(overrides=["swd.preset=tiny-4step", *FAST])
    manifest = json.loads((inputs["cache"] / "cache.json").read_text())
    spec = types.SimpleNamespace(columns=checks.cache_columns(cfg.swd.schedule.scales, manifest["scales"]))
    assert distill.fit(spec, inputs["cache"], str(tmp_path), "n", cfg.distill) == "fitted"
    # Blocks in file order, so one config trains one student (two 40-step runs: equal LoRA tensors).
    assert [o.preserve_order for o in seen.pop("options")] == [True] * 4
    assert sorted(seen) == ["scale_0", "scale_1", "scale_2", "scale_3"]
    for i, name in enumerate(checks.scale_datasets(spec.columns)):
        assert seen[name].schema().names == checks.dataset_columns(spec.columns[i]), name
    batch = latent_cache.decode_batch(seen["scale_2"].take_batch(2, batch_format="pyarrow"))
    assert sorted(k for k in batch if isinstance(batch[k], torch.Tensor)) == [
        "pooled_prompt_embeds", "prompt_embeds", "z_2", "z_im1_2"]


class FakeShard:
    """`get_dataset_shard(name)`: 3 batches an epoch, each naming its dataset and index; records the shuffle seeds."""

    def __init__(self, name: str, seeds: list):
        self.name, self.seeds = name, seeds

    def iter_torch_batches(self, batch_size, drop_last, collate_fn, local_shuffle_buffer_size, local_shuffle_seed):
        self.seeds.append((self.name, local_shuffle_seed))
        for j in range(3):
            yield f"{self.name}/{j}"


def loop_data(monkeypatch, state: dict | None = None):
    """A worker's data side only (no networks): per-scale streams over FakeShards, from `state`'s position."""
    import ray.train

    seeds: list = []
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: FakeShard(name, seeds))
    trainer = worker.Trainer.__new__(worker.Trainer)
    trainer.cfg, trainer.rank = distill.Config(seed=5, batch_size_per_worker=2, shuffle_buffer_rows=0), 0
    trainer.datasets = checks.scale_datasets([("z_0", "z_0"), ("z_1", "z_im1_1")])
    trainer.state = state or {"data": {n: {"epoch": 0, "batches_in_epoch": 0} for n in trainer.datasets}}
    trainer.streams = {n: worker.Prefetch(trainer.batches(n)) for n in trainer.datasets}
    for stream in trainer.streams.values():
        stream.thread.join()  # every scale's first batch fetched
    return trainer, seeds


def test_the_data_position_is_per_scale_moves_when_a_step_takes_a_batch_and_resume_skips_it(monkeypatch):
    trainer, seeds = loop_data(monkeypatch)
    fresh = {"epoch": 0, "batches_in_epoch": 0}
    assert trainer.state["data"] == {"scale_0": fresh, "scale_1": fresh}  # prefetched, not taken: not consumed
    assert [trainer.take(0) for _ in range(4)] == ["scale_0/0", "scale_0/1", "scale_0/2", "scale_0/0"]
    assert trainer.take(1) == "scale_1/0"
    state = json.loads(json.dumps(trainer.state))  # as the checkpoint keeps it
    assert state["data"] == {"scale_0": {"epoch": 1, "batches_in_epoch": 1}, "scale_1": {"epoch": 0, "batches_in_epoch": 1}}
    # Every scale's dataset shuffles with its own seed per epoch (scale_0: seed + 1000 x epoch + rank, as before).
    assert sorted(seeds) == [("scale_0", 5), ("scale_0", 1005), ("scale_1", 1_000_005)]
    resumed, seeds = loop_data(monkeypatch, state)
    assert [resumed.take(0), resumed.take(1), resumed.take(1), resumed.take(1)] == [
        "scale_0/1", "scale_1/1", "scale_1/2", "scale_1/0"]
    assert resumed.state["data"] == {"scale_0": {"epoch": 1, "batches_in_epoch": 2},
                                     "scale_1": {"epoch": 1, "batches_in_epoch": 1}}
    assert sorted(seeds) == [("scale_0", 1005), ("scale_1", 1_000_005), ("scale_1", 1_001_005)]


def test_stage_refuses_a_cache_without_the_schedules_scales(tmp_path, inputs):
    ctx = distill_context(tmp_path, inputs, ["swd.preset=null", "swd.scales=[6,14]", "swd.boundaries=[0,14]"])
    with pytest.raises(ValueError, match=r"lack what swd scales \[6, 14\] need \(step 0: side 6; step 1: side 14"):
        distill.run(ctx)


def test_config_defaults_follow_swd_md_and_bf16_needs_a_gpu():
    cfg = distill.Config()
    ds = worker.ds_config(cfg, cfg.lr, world_size=2, bf16=False)
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 5e-6, "betas": [0.9, 0.999], "eps": 1e-8,
                                                           "weight_decay": 0.01, "torch_adam": True}}
    assert ds["gradient_clipping"] == 10.0 and ds["zero_optimization"]["stage"] == 2
    assert "scheduler" not in ds and cfg.lr_schedule == "constant"  # the released recipe: constant lr
    assert worker.ds_config(cfg, cfg.lr, 2, False, decay_steps=300)["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 300, "warmup_min_lr": 0.0, "warmup_max_lr": 5e-6, "warmup_num_steps": 10,
        "warmup_type": "linear"}}
    # buckets follow the engine's trainable parameters (DeepSpeed's 5e8 default is the ceiling)
    assert worker.ds_config(cfg, cfg.lr, 2, False, trainable_params=40_000_000)["zero_optimization"] == {
        "stage": 2, "reduce_bucket_size": 40_000_000, "allgather_bucket_size": 40_000_000}
    assert resources.bucket_elements(10) == resources.MIN_BUCKET_ELEMENTS
    # the Medium profile's fake engine trains an odd count (GAN head bias): DeepSpeed wants it aligned
    assert resources.bucket_elements(78_261_125) == 78_261_136 and 78_261_136 % 16 == 0
    assert resources.bucket_elements(10**10) == resources.DEFAULT_BUCKET_ELEMENTS
    zero3 = worker.ds_config(cfg.model_copy(update={"zero_stage": 3}), cfg.lr, 2, False, trainable_params=2**21)
    assert zero3["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 2**21}
    assert cfg.fake_updates_per_step == 5
    with pytest.raises(ConfigError, match=r"distill.precision: 'bf16' needs distill.use_gpu=true"):
        load_config(overrides=["distill.precision=bf16"])
    with pytest.raises(ConfigError, match=r"distill.zero_stage: 4 is invalid"):
        load_config(overrides=["distill.zero_stage=4"])


def test_fault_hooks_are_read_once_by_the_driver_and_only_called_in_the_loop(tmp_path, monkeypatch):
    monkeypatch.setenv(distill.HOOKS_ENV, json.dumps({"pid_dir": str(tmp_path / "pids"), "nan_at_steps": [2],
                                                      "fail_at_step": 3}))
    hooks = faults.Faults.from_env()
    monkeypatch.delenv(distill.HOOKS_ENV)  # the workers get the parsed object, never the variable
    hooks.started(rank=1)
    assert (tmp_path / "pids" / "rank1.pid").read_text() == str(os.getpid())
    loss = torch.tensor(1.0)
    assert math.isnan(hooks.poison(loss, step=2, rank=0)) and hooks.poison(loss, step=2, rank=1) == 1.0
    assert hooks.poison(loss, step=1, rank=0) == 1.0
    hooks.after_step(2, rank=1)
    assert (tmp_path / "pids" / "rank1.step").read_text() == "2"
    with pytest.raises(RuntimeError, match="test hook: failing at step 3"):
        hooks.after_step(3, rank=0)
    assert faults.Faults.from_env() == faults.Faults()  # no variable: no faults


# ----------------------------------------------------------------------------- 2 workers, ZeRO stages


@pytest.mark.parametrize("zero_stage,schedule", [(0, BASELINE), (3, [])], ids=["zero0-baseline", "zero3-swd"])
def test_two_workers_finish_with_finite_losses(tmp_path, ray_local, inputs, zero_stage, schedule):
    ctx = distill_context(tmp_path, inputs, [*FAST, *TWO_WORKERS, *schedule, f"distill.zero_stage={zero_stage}",
                                           "distill.num_steps=2"])
    run_stage(ctx)
    summary = json.loads((ctx.output_dir / distill.SUMMARY_FILE).read_text())
    assert summary["steps"] == 2 and summary["zero_stage"] == zero_stage and summary["num_workers"] == 2
    assert_finite_losses(ctx)
    assert (ctx.output_dir / distill.STUDENT_DIR / "pytorch_lora_weights.safetensors").is_file()
    schedule_json = json.loads((ctx.output_dir / distill.SCHEDULE_FILE).read_text())
    assert schedule_json["scales"] == ctx.sections["swd"].schedule.scales
    grids = [a.path for a in mlflow.MlflowClient(ctx.tracking_uri).list_artifacts(ctx.run_id, "samples")]
    assert "samples/samples_step000002.png" in grids


def test_zero3_early_exit_trains_the_same_student_as_full_forwards(tmp_path, ray_local, inputs):
    """ZeRO-3 with gradient checkpointing and the fake network's MMD features: ending feature-only forwards
    after the feature block (swd.stop_at_feature_block) saves work and changes no weight. One worker and
    an ordered stream (`distill.ingest_options`), so both runs read the same batches; ZeRO-3 still
    partitions and gathers every parameter."""
    exports = []
    for stop in (False, True):
        ctx = distill_context(tmp_path / f"stop-{stop}", inputs, [
            *FAST, "distill.zero_stage=3", "distill.num_steps=2", "distill.gradient_checkpointing=true",
            "swd.loss.mmd_features=fake", f"swd.stop_at_feature_block={str(stop).lower()}"])
        run_stage(ctx)
        exports.append(load_safetensors(ctx.output_dir / distill.STUDENT_DIR / "pytorch_lora_weights.safetensors"))
    assert exports[0] and exports[0].keys() == exports[1].keys()
    assert any(v.abs().max() > 0 for k, v in exports[0].items() if "lora_B" in k)  # the student moved off B = 0
    for k in exports[0]:
        torch.testing.assert_close(exports[1][k], exports[0][k], rtol=1e-5, atol=1e-7, msg=k)


# ----------------------------------------------------------------------------- fault tolerance


def test_changing_an_operational_key_resumes_the_interrupted_run(tmp_path, ray_local, inputs):
    """Logging cadence, sample grids, retries and checkpoint retention are not in the fingerprint: a run
    that died at step 3 and is started again with other values resumes from its step-2 checkpoint."""
    from pipeline import graph

    # With the student's lr schedule on: a resumed run continues it (DeepSpeed checkpoints its scheduler).
    base = [*FAST, "distill.num_steps=4", "distill.checkpoint_every_steps=2", "distill.lr_schedule=linear_decay",
            "distill.lr_warmup_steps=3"]
    first = base + ["distill.max_failures=0"]
    second = base + ["distill.max_failures=2", "distill.log_every_steps=2", "distill.sample_every_steps=4",
                     "distill.sample_num_prompts=2", "distill.num_checkpoints_to_keep=3"]
    spec = next(s for s in stages.default_stages() if s.name == "distill")
    fingerprints = [graph.fingerprint(spec, load_config(overrides=o), {"cache": "c", "teacher": "t"})
                    for o in (first, second)]
    assert fingerprints[0] == fingerprints[1]
    changed = graph.fingerprint(spec, load_config(overrides=base + ["distill.lr=2e-3"]), {"cache": "c", "teacher": "t"})
    assert changed != fingerprints[0]  # a key that changes the result still counts
    with pytest.raises(RuntimeError, match=r"test hook: failing at step 3"):
        run_stage(distill_context(tmp_path, inputs, first, fingerprint=fingerprints[0]), hooks={"fail_at_step": 3})
    ctx = run_stage(distill_context(tmp_path, inputs, second, fingerprint=fingerprints[1]))
    summary = json.loads((ctx.output_dir / distill.SUMMARY_FILE).read_text())
    assert summary["steps"] == 4 and summary["attempts"] == 2  # the second attempt, from the checkpoint
    assert [int(m.step) for m in history(ctx, "progress")] == [4]  # log_every=2 after resuming at step 2
    # WarmupDecayLR after 4 scheduler steps: warm-up over 3 is done, lr 1e-3 (a schedule restarted at the
    # step-2 checkpoint would be 2 steps in: 1e-3 / 3); the fake network's lr is constant.
    assert [m.value for m in history(ctx, "lr/student")] == pytest.approx([1e-3])
    assert [m.value for m in history(ctx, "lr/fake")] == pytest.approx([1e-3])


def test_a_worker_failure_names_its_cause_in_the_stage_error(tmp_path, ray_local, inputs):
    """Ray Train's own message is a truncated traceback snippet; the stage's error names the exception."""
    ctx = distill_context(tmp_path, inputs, [*FAST, "distill.num_steps=3", "distill.max_failures=0"])
    with pytest.raises(RuntimeError, match=r"distill: a training worker failed \(after 0 restart\(s\) allowed by "
                                           r"distill.max_failures\): RuntimeError: test hook: failing at step 1 "
                                           r"\(rank 0\)"):
        run_stage(ctx, hooks={"fail_at_step": 1})


def test_a_cache_made_with_other_text_settings_is_refused(tmp_path, inputs):
    ctx = distill_context(tmp_path, inputs, ["teacher.max_sequence_length=5"])
    with pytest.raises(ValueError, match=r"teacher.max_sequence_length: the cache has 0, this config's teacher gives 5;"
                                         r" re-run the cache stage"):
        distill.run(ctx)
    manifest = json.loads((inputs["cache"] / "cache.json").read_text())
    other = tmp_path / "other-cache"
    other.mkdir()
    (other / "cache.json").write_text(json.dumps({**manifest, "text": {**manifest["text"], "encoder_digest": "x"}}))
    ctx = distill_context(tmp_path, {**inputs, "cache": other}, [])
    with pytest.raises(ValueError, match=r"teacher.pretrained \(its text encoder / tokenizer / VAE files\): the cache "
                                         r"has 'x'"):
        distill.run(ctx)


def test_sigkilled_worker_resumes_from_the_last_checkpoint(tmp_path, ray_local, inputs):
    """ZeRO-2, 2 workers: rank 1 is SIGKILLed after step 3; Ray Train restarts the group from the step-2
    checkpoint; the run ends at exactly num_steps and MLflow holds every step once."""
    pid_dir = tmp_path / "pids"
    ctx = distill_context(tmp_path, inputs, [*FAST, *TWO_WORKERS, "distill.zero_stage=2", "distill.num_steps=6",
                                           "distill.max_failures=1"])
    killed: list[int] = []
    # Ray Train's controller registers a reported checkpoint when it next polls the workers (every 2 s):
    # kill once it has, so the restart has the step-2 (or a later) checkpoint to resume from.
    snapshot = Path(ctx.scratch_dir) / "ray_train" / f"distill-{ctx.fingerprint}" / "checkpoint_manager_snapshot.json"

    def killer():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            step_file = pid_dir / "rank1.step"
            registered = snapshot.is_file() and "checkpoint_step" in snapshot.read_text()
            if registered and step_file.is_file() and step_file.read_text().strip() and int(step_file.read_text()) >= 3:
                pid = int((pid_dir / "rank1.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    run_stage(ctx, {"pid_dir": str(pid_dir), "step_delay_s": 0.5})
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert int((pid_dir / "rank1.pid").read_text()) != killed[0]  # a new worker process took over
    summary = json.loads((ctx.output_dir / distill.SUMMARY_FILE).read_text())
    assert summary["steps"] == 6
    assert summary["attempts"] == 2  # the second attempt restored a checkpoint (a fresh start would say 1)
    steps = [m.step for m in history(ctx, PROGRESS_METRIC)]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for key in all_metric_keys(ctx):
        logged = [m.step for m in history(ctx, key)]
        assert len(logged) == len(set(logged)), f"{key} logged a step twice: {sorted(logged)}"
    assert_finite_losses(ctx)


# ----------------------------------------------------------------------------- resume, non-finite guard


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, ray_local, inputs):
    """1 worker, ZeRO-2, mmd_only, warm-started from an exported student (distill.init_student): the first
    run skips NaN losses at steps 3, 5 and 6 (on the loss, before any backward) and stops at step 6 (two in
    a row); the same config run again resumes from the step-4 checkpoint (not from the adapter) and finishes."""
    root = tmp_path_factory.mktemp("resume")
    champion = lora_export(root / "champion" / "student")
    overrides = [*FAST, "swd.loss.mode=mmd_only", "distill.num_steps=8", "distill.max_nonfinite_steps=2",
                 f"distill.init_student={champion.parent}"]
    dumps = root / "dumps"
    first = distill_context(root, inputs, overrides, fingerprint="resume")
    with pytest.raises(RuntimeError) as stopped:
        run_stage(first, {"nan_at_steps": [3, 5, 6], "dump_dir": str(dumps)})
    kept = checkpoints(first)
    os.replace(dumps / "init_student.safetensors", dumps / "first_init_student.safetensors")
    second = run_stage(distill_context(root, inputs, overrides, fingerprint="resume"), {"dump_dir": str(dumps)})
    return {"first": first, "second": second, "kept": kept, "dumps": dumps, "error": str(stopped.value),
            "adapter": champion / LORA_WEIGHTS}


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(resumed):
    assert re.search(r"2 generator steps in a row \(distill.max_nonfinite_steps=2\) had a non-finite loss, last at "
                     r"step 6; none of them reached the weights \(3 generator and 0 fake updates skipped in all\)"
                     r".*The last good checkpoint is kept", resumed["error"]), resumed["error"]
    assert resumed["kept"] == ["checkpoint_step00000002", "checkpoint_step00000004"]
    at_checkpoint = load_safetensors(resumed["dumps"] / "saved_step4.safetensors")
    at_stop = load_safetensors(resumed["dumps"] / "stopped_step6.safetensors")
    for name, value in at_stop.items():  # steps 5 and 6 were skipped: nothing reached the weights
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, at_checkpoint[name], rtol=0, atol=0)
    skipped = {int(m.step): m.value for m in history(resumed["first"], "nonfinite/generator_skipped")}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3}


def test_resume_continues_at_the_checkpointed_step_with_equal_weights(resumed):
    saved = load_safetensors(resumed["dumps"] / "saved_step4.safetensors")
    loaded = load_safetensors(resumed["dumps"] / "loaded_step4.safetensors")
    assert saved.keys() == loaded.keys() and saved
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0)
    first, second = resumed["first"], resumed["second"]
    assert sorted(m.step for m in history(first, PROGRESS_METRIC)) == [1, 2, 3, 4, 5, 6]
    assert sorted(m.step for m in history(second, PROGRESS_METRIC)) == [5, 6, 7, 8]  # what it trained
    summary = json.loads((second.output_dir / distill.SUMMARY_FILE).read_text())
    assert summary["steps"] == 8 and summary["mode"] == "mmd_only"
    # The counters are part of the checkpoint: step 3's skip is in it, the stopped attempt's 5 and 6 are not.
    assert summary["nonfinite_generator"] == 1
    assert_finite_losses(second, ("loss/generator_total", "loss/mmd"))
    final = load_safetensors(resumed["dumps"] / "saved_step8.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


# ----------------------------------------------------------------------------- export


def test_export_generates_with_stock_diffusers(resumed, tiny_bundle):
    from pipeline.teacher import load_bundle

    pipe = load_bundle(tiny_bundle).pipeline  # a stock StableDiffusion3Pipeline (from_pretrained)
    latents = check_export_in_stock_diffusers(pipe, resumed["second"].output_dir,
                                              ["a red circle in the top left on a black background"] * 2,
                                              max_sequence_length=0)
    assert latents.shape == (2, 4, 16, 16)


# ----------------------------------------------------------------------------- warm start (distill.init_student)


def lora_export(directory: Path, lora_rank: int = 4, seed: int = 1) -> Path:
    """A student LoRA exported with `save_student` from the tiny transformer, B random (non-zero)."""
    from pipeline.swd.config import StudentConfig
    from pipeline.student_export import save_student
    from pipeline.swd.networks import build_student

    student, _ = build_student(tiny.build_transformer(), StudentConfig(lora_rank=lora_rank, lora_alpha=lora_rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    directory.mkdir(parents=True)
    save_student(student, directory)
    return directory


def test_init_student_errors_name_the_key_before_any_ray_work(tmp_path, capsys):
    from pipeline.run import check_environment, main

    base = [f"workdir={tmp_path / 'wd'}", "swd.student.lora_rank=4", "swd.student.lora_alpha=4"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    lora_export(tmp_path / "run" / "student")
    cases = {
        str(tmp_path / "missing"): r"distill.init_student: '.*missing' does not exist; give a directory holding a "
                                   r"student exported by this pipeline",
        str(tmp_path / "empty"): r"distill.init_student: '.*empty' holds no student LoRA adapter \(looked for "
                                 r".*empty/pytorch_lora_weights.safetensors, .*empty/student/pytorch_lora_weights"
                                 r".safetensors, .*empty/artifacts/export/student/.*\)",
    }
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_environment(load_config(overrides=[*base, f"distill.init_student={path}"]))
    # A distill output (its student/ export is found), another rank, a full fine-tune.
    check_environment(load_config(overrides=[*base, f"distill.init_student={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match=r"distill.init_student: the adapter '.*run/student/pytorch_lora_weights."
                                          r"safetensors' has lora_rank 4, lora_alpha 4.0; swd.student has lora_rank 8, "
                                          r"lora_alpha 8.0; set swd.student.lora_rank=4 swd.student.lora_alpha=4.0"):
        check_environment(load_config(overrides=[*base, "swd.student.lora_rank=8", "swd.student.lora_alpha=8",
                                                 f"distill.init_student={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match=r"distill.init_student: .* warm-starts a LoRA student, but "
                                          r"swd.student.full_finetune=true"):
        check_environment(load_config(overrides=[*base, "swd.student.full_finetune=true",
                                                 f"distill.init_student={tmp_path / 'run'}"]))
    # The command line: exit 2, no Ray.
    assert main(["--dry-run", *base, f"distill.init_student={tmp_path / 'missing'}"]) == 2
    assert "distill.init_student: " in capsys.readouterr().err


def test_load_student_lora_sets_the_exported_weights_and_refuses_another_rank(tmp_path):
    from pipeline.swd.config import StudentConfig
    from pipeline.student_export import load_student_lora
    from pipeline.swd.networks import build_student, student_lora_state_dict

    path = lora_export(tmp_path / "student") / LORA_WEIGHTS
    assert init_student_adapter(str(tmp_path)) == path.resolve()  # D/student/ of a distill output
    source = {k.removeprefix("transformer."): v for k, v in load_safetensors(path).items()}
    student, _ = build_student(tiny.build_transformer(seed=3), StudentConfig(lora_rank=4, lora_alpha=4))
    assert load_student_lora(student, path) == len(source) > 0
    loaded = student_lora_state_dict(student)
    assert loaded.keys() == source.keys()
    for name, value in source.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    other, _ = build_student(tiny.build_transformer(), StudentConfig(lora_rank=8, lora_alpha=8))
    with pytest.raises(ValueError, match=r"distill.init_student: the adapter '.*' does not fit the student LoRA .*"
                                         r"lora_A.weight: \[4, 128\] in the adapter, \[8, 128\] in the student"):
        load_student_lora(other, path)


def test_init_student_content_joins_the_fingerprint(tmp_path):
    from pipeline import graph

    spec = graph.StageSpec("distill", distill, inputs=("cache", "teacher"))
    lora_export(tmp_path / "a")

    def fp(*overrides):
        return graph.fingerprint(spec, load_config(overrides=list(overrides)), {"cache": "c", "teacher": "t"})

    warm = fp(f"distill.init_student={tmp_path / 'a'}")
    assert warm == fp(f"distill.init_student={tmp_path / 'a'}") != fp()
    (tmp_path / "a" / LORA_WEIGHTS).unlink()
    lora_export(tmp_path / "b", seed=2)
    os.replace(tmp_path / "b" / LORA_WEIGHTS, tmp_path / "a" / LORA_WEIGHTS)  # a new champion
    assert fp(f"distill.init_student={tmp_path / 'a'}") != warm


def test_warm_started_run_starts_from_the_adapter_and_its_checkpoint_wins_on_resume(resumed):
    """The resumed fixture's first run starts from the exported adapter (dumped before step 1); the second
    run resumes from its checkpoint (test_resume_continues_at_the_checkpointed_step_with_equal_weights)
    and does not load the adapter again."""
    source = load_safetensors(resumed["adapter"])
    start = load_safetensors(resumed["dumps"] / "first_init_student.safetensors")
    assert len(start) == len(source) > 0
    for name, value in start.items():  # named_parameters: "<module>.lora_A.student.weight"
        torch.testing.assert_close(value, source["transformer." + name.replace(".student.", ".")], rtol=0, atol=0)
    assert not (resumed["dumps"] / "init_student.safetensors").exists()  # the resumed run did not warm-start
    saved = load_safetensors(resumed["dumps"] / "saved_step4.safetensors")
    assert any(not torch.equal(saved[n], start[n]) for n in saved)  # it trained: the checkpoint is not the adapter
    adapter = str(resumed["adapter"].resolve())
    for ctx in (resumed["first"], resumed["second"]):
        assert mlflow.MlflowClient(ctx.tracking_uri).get_run(ctx.run_id).data.tags["distill.init_student"] == adapter
    assert json.loads((resumed["second"].output_dir / distill.SUMMARY_FILE).read_text())["init_student"] == adapter
