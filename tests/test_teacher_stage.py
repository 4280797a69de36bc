"""The `teacher` stage: trains a tiny bundle on tiny shards, or records a pretrained teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import shapes, teacher, tiny
from pipeline.context import StageContext
from stages import teacher as stage

TINY_BUDGET = dict(vae_num_steps=3, vae_batch_size=4, num_steps=4, batch_size=4, warmup_steps=1,
                   log_every_steps=2, checkpoint_every_steps=2, sample_num_steps=2, grid_prompts=2,
                   grid_samples_per_prompt=2, eval_num_prompts=4, num_layers=1)


def _shards(root: Path, counts=(("train", 24), ("eval", 8))) -> Path:
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


def _context(tmp_path: Path, cfg: stage.Config, shards: Path | None = None) -> StageContext:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    for d in ("out", "scratch", "shared"):
        (tmp_path / d).mkdir()
    return StageContext(name="teacher", config=cfg, sections={"teacher": cfg},
                        inputs={"shards": shards or tmp_path / "no-shards"}, output_dir=tmp_path / "out",
                        scratch_dir=tmp_path / "scratch", shared_dir=tmp_path / "shared", tracking_uri=uri,
                        run_id=run.info.run_id, fingerprint="test")


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
    client = mlflow.MlflowClient(ctx.tracking_uri)
    assert [m.step for m in client.get_metric_history(ctx.run_id, "loss")] == [2, 4]
    assert [m.step for m in client.get_metric_history(ctx.run_id, "vae_mse")] == [2, 3]
    assert client.get_metric_history(ctx.run_id, "oracle_all_three")
    assert {a.path for a in client.list_artifacts(ctx.run_id)} >= {stage.GRID_FILE, stage.TEACHER_FILE}
    assert ctx.summary["source"] == "trained" and "oracle_all_three" in ctx.summary
    # what the shared reader read of the train shards, counted on the run and in teacher.json
    assert client.get_run(ctx.run_id).data.metrics["train_shards_read"] == 1
    assert client.get_run(ctx.run_id).data.metrics["train_rejects"] == 0
    assert record["train_rejects"] == 0 and record["train_rejects_by_reason"] == {} and record["bad_train_shards"] == []
    # A rerun into the same scratch resumes: the VAE and the transformer checkpoint are reused.
    assert (ctx.scratch_dir / "vae.safetensors").is_file() and (ctx.scratch_dir / "flow.safetensors").is_file()


def test_bad_train_shards_are_counted_and_fail_training_only_above_one_percent(tmp_path):
    """The teacher reads its train shards as every stage does (pipeline.samples): one shard that
    vanished among 200 is counted, not fatal, at the 1% limit; a tar of random bytes beside 24
    good samples (4% bad) fails, naming it; upright pixels, dotted keys, a non-UTF-8 caption counted."""
    from test_cache import image_bytes, write_tar
    from test_samples import DOTTED, exif_jpeg, random_tar, tricky_image_shard, upright_square

    png = image_bytes(64, 64, 0)
    urls = [str(write_tar(tmp_path / f"t-{i:03d}.tar", [(f"s{i}.png", png), (f"s{i}.txt", b"a red circle")]))
            for i in range(199)]
    urls.insert(100, str(tmp_path / "vanished.tar"))
    images, prompts, attrs, reads = stage._read_shards(urls, 64)
    assert images.shape == (199, 3, 64, 64) and len(prompts) == 199 and attrs == [None] * 199
    assert [(e["url"], e["reason"]) for e in reads.rejects] == [(urls[100], "unreadable_shard")]
    assert reads.bad_fraction == pytest.approx(1 / 200)

    shards = _shards(tmp_path / "shards", counts=(("train", 24),))
    junk = str(random_tar(tmp_path / "junk.tar"))
    with pytest.raises(ValueError, match=r"teacher: 4\.00% of the train samples are bad, more than the allowed 0\.01 "
                                         r".*junk\.tar \(1 rejected sample\(s\)\)"):
        stage._read_shards([str(shards / "train" / "train-000000.tar"), junk], 64)

    tricky = str(tricky_image_shard(tmp_path / "tricky.tar"))
    images, prompts, _, reads = stage._read_shards([tricky], 64, max_bad_fraction=0.5)
    assert prompts == ["a red circle", "a blue square"]
    assert [s["key"] for s in reads.samples] == [f"{DOTTED}000001", f"{DOTTED}000003"]
    assert [(e["key"], e["reason"]) for e in reads.rejects] == [(f"{DOTTED}000002", "bad_caption")]
    assert (images[0].permute(1, 2, 0).numpy() == upright_square(exif_jpeg())).all()


def test_checkpoint_round_trip_restores_weights_ema_and_optimizer(tmp_path):
    import torch

    def fresh():
        m = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        return m, opt

    m, opt = fresh()
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    ema = [p.detach().clone() + 1 for p in m.parameters()]
    stage._save_checkpoint(tmp_path / "c.safetensors", {"m": m}, ema, opt, 7)
    m2, opt2 = fresh()
    ema2 = [torch.zeros_like(e) for e in ema]
    assert stage._load_checkpoint(tmp_path / "c.safetensors", {"m": m2}, ema2, opt2) == 7
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema, ema2))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert stage._load_checkpoint(tmp_path / "none.safetensors", {"m": m2}, ema2, opt2) == 0


def test_pretrained_teacher_is_recorded_not_trained(tmp_path):
    bundle_dir = tiny.build_bundle(tmp_path / "sd3-tiny")
    ctx = _context(tmp_path, stage.Config(pretrained=str(bundle_dir)))
    stage.run(ctx)
    assert teacher.bundle_location(ctx.output_dir) == str(bundle_dir.resolve())
    assert not (ctx.output_dir / stage.BUNDLE_DIR).exists()
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
