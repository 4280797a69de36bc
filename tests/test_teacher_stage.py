"""The `teacher` stage: trains a tiny bundle on tiny shards (`pipeline.teacher_training`), or records a
pretrained teacher; the trainer's pieces (reader, warm-up, EMA, checkpoint, progress log) on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.context import stage_context
from helpers.shards import image_bytes, write_tar

from pipeline import graph, shapes, teacher, teacher_training, tiny
from pipeline.run_log import RunLog
from stages import teacher as stage

TINY_BUDGET = dict(vae_num_steps=3, vae_batch_size=4, num_steps=4, batch_size=4, warmup_steps=1,
                   log_every_steps=2, checkpoint_every_steps=2, sampler={"num_steps": 2}, grid_prompts=2,
                   grid_samples_per_prompt=2, eval_num_prompts=4, num_layers=1)


def _shards(root: Path, counts=(("train", 24), ("eval", 8))) -> Path:
    """The shards stage's layout (shards.json + one tar per split) of shapes samples."""
    import webdataset as wds

    listing = {}
    for split, count in counts:
        (root / split).mkdir(parents=True)
        rel = f"{split}/{split}-000000.tar"
        with wds.TarWriter(str(root / rel)) as sink:
            for i in range(count):
                sink.write(shapes.make_sample(0, split, i, 64, shapes.SHAPES, ["red", "blue"], ["large"], ["black"]))
        listing[split] = [{"url": rel}]
    (root / "shards.json").write_text(json.dumps(listing))
    return root


def _context(tmp_path: Path, cfg: stage.Config, shards: Path | None = None):
    return stage_context("teacher", {"teacher": cfg}, tmp_path, inputs={"shards": shards or tmp_path / "no-shards"})


def test_stage_trains_a_bundle_on_a_tiny_budget(tmp_path, ray_local):
    import mlflow

    ctx = _context(tmp_path, stage.Config(**TINY_BUDGET), _shards(tmp_path / "shards"))
    stage.run(ctx)
    for name in stage.OUTPUTS:
        assert (ctx.output_dir / name).exists(), name
    record = json.loads((ctx.output_dir / stage.TEACHER_FILE).read_text())
    assert record["source"] == "trained" and record["steps"] == 4 and record["vae_steps"] == 3
    assert set(record["oracle"]) >= {"colour", "position", "shape", "all_three", "all"}
    b = teacher.load_bundle(teacher.bundle_location(ctx.output_dir))
    assert b.max_sequence_length == 0 and b.shift_factor == pytest.approx(record["vae_shift_factor"])
    assert b.info["guidance_scale"] == stage.Config().sampler.guidance_scale  # the sampler's CFG, recorded
    client = mlflow.MlflowClient(ctx.tracking_uri)
    assert [m.step for m in client.get_metric_history(ctx.run_id, "loss")] == [2, 4]
    assert [m.step for m in client.get_metric_history(ctx.run_id, "transformer_images_per_s")] == [2, 4]
    assert [m.step for m in client.get_metric_history(ctx.run_id, "vae_mse")] == [2, 3]
    assert client.get_metric_history(ctx.run_id, "oracle_all_three")
    # the optional grid is the stage's to log; teacher.json (an OUTPUT) is the graph's
    assert {a.path for a in client.list_artifacts(ctx.run_id)} == {stage.GRID_FILE}
    assert client.get_run(ctx.run_id).data.tags["teacher.source"] == "trained"
    assert ctx.summary["source"] == "trained" and "oracle_all_three" in ctx.summary
    # what the shared reader read of the train shards, counted on the run and in teacher.json
    assert client.get_run(ctx.run_id).data.metrics["train_shards_read"] == 1
    assert client.get_run(ctx.run_id).data.metrics["train_rejects"] == 0
    assert record["train_rejects"] == 0 and record["train_rejects_by_reason"] == {} and record["bad_train_shards"] == []
    # A rerun into the same scratch resumes: the VAE and the transformer checkpoint are reused.
    assert (ctx.scratch_dir / "vae.safetensors").is_file() and (ctx.scratch_dir / "flow.safetensors").is_file()


def test_bad_train_shards_are_counted_and_fail_training_only_above_one_percent(tmp_path):
    """The trainer reads its train shards as every stage does (pipeline.samples; the tricky inputs
    are in test_samples): one shard that vanished among 200 is counted, not fatal, at the 1% limit;
    a tar of random bytes beside 24 good samples (4% bad) fails, naming it."""
    png = image_bytes(64, 64, 0)
    urls = [str(write_tar(tmp_path / f"t-{i:03d}.tar", [(f"s{i}.png", png), (f"s{i}.txt", b"a red circle")]))
            for i in range(199)]
    urls.insert(100, str(tmp_path / "vanished.tar"))
    images, prompts, attrs, reads = teacher_training.read_samples(urls, 64)
    assert images.shape == (199, 3, 64, 64) and len(prompts) == 199 and attrs == [None] * 199
    assert [(e["url"], e["reason"]) for e in reads.rejects] == [(urls[100], "unreadable_shard")]
    assert reads.bad_fraction == pytest.approx(1 / 200)

    shards = _shards(tmp_path / "shards", counts=(("train", 24),))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(bytes(range(256)) * 16)  # not a tar at all
    with pytest.raises(ValueError, match=r"teacher: 4\.00% of the train samples are bad, more than the allowed 0\.01 "
                                         r".*junk\.tar \(1 rejected sample\(s\)\)"):
        teacher_training.read_samples([str(shards / "train" / "train-000000.tar"), str(junk)], 64)


def test_warmup_and_ema_keep_the_first_trainers_rules():
    """LambdaLR gives lr * min(1, (step + 1) / warmup) at each optimizer step (trainer 1 set it by hand);
    EMAModel decays by min(decay, k / (9 + k)) from its second update on (its first copies the weights)."""
    import torch

    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w], lr=0.5)
    schedule = teacher_training.warmup_schedule(opt, 4)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen == pytest.approx([0.5 * min(1.0, (step + 1) / 4) for step in range(6)])
    ema = teacher_training.warmup_ema([w], 0.9)
    assert [ema.get_decay(k) for k in (1, 2, 3, 100)] == pytest.approx([0.0, 2 / 11, 3 / 12, 0.9])
    w.data.fill_(1.0)
    ema.step([w])  # the first update copies
    w.data.fill_(2.0)
    ema.step([w])
    assert torch.allclose(ema.shadow_params[0], torch.full((3,), 1.0 + (1 - 2 / 11)))


def test_checkpoint_round_trip_restores_weights_ema_optimizer_and_schedule(tmp_path):
    import torch
    from safetensors import safe_open

    def fresh():
        m = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        return teacher_training.FlowState({"m": m}, teacher_training.warmup_ema(list(m.parameters()), 0.99), opt,
                                          teacher_training.warmup_schedule(opt, 10))

    a = fresh()
    for _ in range(3):
        a.modules["m"](torch.ones(1, 3)).sum().backward()
        a.optimizer.step()
        a.scheduler.step()
        a.ema.step(a.modules["m"].parameters())
    a.save(tmp_path / "c.safetensors", 3)
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:  # tensors and JSON metadata, nothing pickled
        assert {k.split(".")[0] for k in f.keys()} == {"m", "ema", "opt"}
    b = fresh()
    assert b.load(tmp_path / "c.safetensors") == 3
    m, m2 = a.modules["m"], b.modules["m"]
    assert all(torch.equal(x, y) for x, y in zip(m.parameters(), m2.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(a.ema.shadow_params, b.ema.shadow_params))
    assert b.ema.optimization_step == 3 and b.ema.decay == 0.99
    assert torch.equal(a.optimizer.state_dict()["state"][0]["exp_avg"], b.optimizer.state_dict()["state"][0]["exp_avg"])
    assert b.scheduler.last_epoch == 3 and b.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 4 / 10)
    b.ema.step(m2.parameters())  # the EMA goes on from where it was
    assert b.ema.cur_decay_value == pytest.approx(4 / 13)
    assert fresh().load(tmp_path / "none.safetensors") == 0


def test_a_resumed_phase_does_not_log_a_step_twice(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("p", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    log = RunLog(uri, run_id)
    first = teacher_training.Progress("transformer", 8, 4, tmp_path, log)
    first(2, {"loss": 1.0})
    first(4, {"loss": 0.9})
    resumed = teacher_training.Progress("transformer", 8, 4, tmp_path, log, first_step=2)  # from a step-2 checkpoint
    resumed(4, {"loss": 0.5})
    resumed(6, {"loss": 0.8})
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(2, 1.0), (4, 0.9), (6, 0.8)]
    assert json.loads((tmp_path / teacher_training.LOGGED_FILE).read_text()) == {"transformer": 6}


def test_fingerprints_pretrained_unchanged_trained_names_the_trainer():
    pretrained = stage.Config(pretrained="assets/tiny-teacher")
    assert graph.section_fingerprint(pretrained) == {"pretrained": "assets/tiny-teacher", "local_files_only": True,
                                                     "load_t5": "auto", "max_sequence_length": None,
                                                     "dtype": "float32"}
    # the sampler (and every training knob) counts only when the stage trains
    other = stage.Config(pretrained="assets/tiny-teacher", sampler={"num_steps": 4, "guidance_scale": 5.0}, seed=3)
    assert graph.section_fingerprint(other) == graph.section_fingerprint(pretrained)
    trained = graph.section_fingerprint(stage.Config())
    assert trained["trainer_version"] == teacher_training.TRAINER_VERSION
    assert trained["sampler"] == {"num_steps": 28, "guidance_scale": 3.0}
    assert not set(trained) & {"num_cpus", "log_every_steps", "checkpoint_every_steps"}
    assert graph.section_fingerprint(stage.Config(sampler={"num_steps": 4})) != trained
    assert stage.Config(seed=5, num_cpus=3).training() == teacher_training.TrainingConfig(seed=5, num_cpus=3)


def test_pretrained_teacher_is_recorded_not_trained(tmp_path):
    import mlflow

    bundle_dir = tiny.build_bundle(tmp_path / "sd3-tiny")
    ctx = _context(tmp_path, stage.Config(pretrained=str(bundle_dir)))
    stage.run(ctx)
    assert teacher.bundle_location(ctx.output_dir) == str(bundle_dir.resolve())
    assert not (ctx.output_dir / stage.BUNDLE_DIR).exists()
    tags = mlflow.MlflowClient(ctx.tracking_uri).get_run(ctx.run_id).data.tags
    assert tags["teacher.source"] == "pretrained" and tags["teacher.location"] == str(bundle_dir.resolve())
    fp = stage.external_fingerprint({"teacher": ctx.config})
    assert fp[0] == str(bundle_dir.resolve()) and any(f[0] == "model_index.json" for f in fp[1])


def test_bad_pretrained_fails_with_what_was_expected(tmp_path):
    (tmp_path / "not-sd3").mkdir()
    (tmp_path / "not-sd3" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    ctx = _context(tmp_path, stage.Config(pretrained=str(tmp_path / "not-sd3")))
    with pytest.raises(teacher.TeacherError, match=r"not an SD3-family diffusers directory: pipeline class "
                                                   r"'FluxPipeline'.*transformer is None \(expected SD3Transformer2DModel\)"):
        stage.run(ctx)
    with pytest.raises(teacher.TeacherError, match="no such directory"):
        stage.external_fingerprint({"teacher": stage.Config(pretrained=str(tmp_path / "missing"))})


def test_training_can_continue_from_a_bundle_keeping_its_vae(tmp_path, ray_local):
    import torch

    start = tiny.build_bundle(tmp_path / "start")
    budget = {**TINY_BUDGET, "num_layers": 4, "init_bundle": str(start), "multires_fraction": 0.9}
    ctx = _context(tmp_path, stage.Config(**budget), _shards(tmp_path / "shards"))
    assert stage.external_fingerprint({"teacher": ctx.config})[0] == str(start)
    stage.run(ctx)
    record = json.loads((ctx.output_dir / stage.TEACHER_FILE).read_text())
    assert record["vae_steps"] == 0 and record["steps"] == 4
    before, after = teacher.load_bundle(start), teacher.load_bundle(teacher.bundle_location(ctx.output_dir))
    for a, b in zip(before.vae.state_dict().values(), after.vae.state_dict().values()):
        assert torch.equal(a, b)  # the VAE and its latent statistics are kept
    assert after.shift_factor == before.shift_factor
    moved = [not torch.equal(a, b) for a, b in zip(before.transformer.state_dict().values(),
                                                    after.transformer.state_dict().values())]
    assert any(moved)  # the transformer trained on from the bundle's weights
