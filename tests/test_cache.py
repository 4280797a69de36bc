"""The `cache` stage: latents and text embeddings equal a direct encode, incremental re-runs,
every kind of bad input, and the tolerant tar reader on its own."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from helpers.context import pretrained_teacher_stages, stage_context
from helpers.shards import good_shard, image_bytes, sample, write_tar
from pipeline import graph, latent_cache, samples
from pipeline.context import StageContext
from pipeline.data import SHARDS_FILE
from pipeline.run import run_stages
from pipeline.swd.config import SwdConfig
from pipeline.swd.inputs import scale_images
from stages import cache, default_stages, load_config
from stages import teacher as teacher_stage
from stages.cache import encoder, rounds, shard_keys


# ----------------------------------------------------------------------------- hand-made shards


def offsets(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return {m.name: m for m in tar.getmembers()}


def bad_shards(root: Path) -> dict[str, dict]:
    """One shard per kind of bad input: {name: {"path", "good": keys kept, "rejects": {key: reason}}}.

    Keys of samples lost after a truncation are not known to the reader, so not listed."""
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict] = {}

    path = good_shard(root / "truncated.tar", "t", 6, seed=100)
    cut = offsets(path)["t0003.png"]
    data = path.read_bytes()[: cut.offset_data + cut.size // 2]  # inside sample 3's image
    path.write_bytes(data)
    out["truncated"] = {"path": path, "good": ["t0000", "t0001", "t0002"], "rejects": {"t0003": "truncated_tar"}}

    path = good_shard(root / "corrupt.tar", "c", 6, seed=200)
    header = offsets(path)["c0002.png"].offset
    data = bytearray(path.read_bytes())
    data[header:header + 512] = np.random.default_rng(0).integers(1, 256, 512, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    out["corrupt"] = {"path": path, "good": ["c0000", "c0001", "c0003", "c0004", "c0005"],
                      "rejects": {"c0002": "corrupt_tar"}}

    half_png = image_bytes(64, 64, 301)
    members = (sample("n0000", 300) + [("n0001.png", b"this is not an image"), ("n0001.txt", b"a red circle")]
               + [("n0002.png", half_png[: len(half_png) // 2]), ("n0002.txt", b"a red square")]
               + sample("n0003", 303))
    out["not_image"] = {"path": write_tar(root / "not_image.tar", members), "good": ["n0000", "n0003"],
                        "rejects": {"n0001": "not_image", "n0002": "not_image"}}

    members = sample("s0000", 400, 32, 32) + sample("s0001", 401, 48, 80) + sample("s0002", 402, 64, 96)
    out["too_small"] = {"path": write_tar(root / "too_small.tar", members), "good": ["s0002"],
                        "rejects": {"s0000": "too_small", "s0001": "too_small"}}

    members = ([m for m in sample("p0000", 500) if not m[0].endswith(".txt")]
               + [(n, b"   \n" if n.endswith(".txt") else d) for n, d in sample("p0001", 501)]
               + [(n, b"\xff\xfe\xfa" if n.endswith(".txt") else d) for n, d in sample("p0002", 502)]
               + sample("p0003", 503))
    out["captions"] = {"path": write_tar(root / "captions.tar", members), "good": ["p0003"],
                       "rejects": {"p0000": "missing_caption", "p0001": "empty_caption", "p0002": "bad_caption"}}

    a, b, c = sample("q0000", 600), sample("q0001", 601), sample("q0002", 602)
    members = [a[0], b[0], a[1], a[2], b[1], b[2]] + c  # q0000 and q0001 interleaved
    out["non_contiguous"] = {"path": write_tar(root / "non_contiguous.tar", members), "good": ["q0002"],
                             "rejects": {"q0000": "non_contiguous", "q0001": "non_contiguous"}}
    return out


# ----------------------------------------------------------------------------- the stage

SCALING, SHIFT = 0.8, 0.05  # not 1 / 0, so the test sees them applied
# tiny-4step: four distinct latent sides (SwdConfig's default), so every scale's column is checked
FAST = ["cache.batch_size=8", "cache.decode_batch_size=8", "swd.preset=tiny-4step"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_bundle) -> Path:
    """The session's tiny bundle with a VAE scaling and shift that are not 1 / 0 (a copy: the
    session one stays as it is)."""
    directory = tmp_path_factory.mktemp("bundle") / "tiny"
    shutil.copytree(tiny_bundle, directory)
    vae_config = directory / "vae" / "config.json"
    config = json.loads(vae_config.read_text())
    config.update(scaling_factor=SCALING, shift_factor=SHIFT)
    vae_config.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def loaded(bundle):
    from pipeline.teacher import load_bundle

    return load_bundle(bundle, "float32", "cpu")


def run_graph(root: Path, bundle: Path, *overrides: str) -> graph.PlannedStage:
    wd = root / "wd"
    cfg = load_config(overrides=[f"workdir={wd}", f"data.train_shards={root}/shards/train-*.tar",
                                 f"data.eval_shards={root}/shards/eval-000.tar", f"teacher.pretrained={bundle}",
                                 *FAST, *overrides])
    planned = graph.plan(cfg, pretrained_teacher_stages())
    assert run_stages(cfg, planned, f"sqlite:///{wd / 'mlflow.db'}", []) == 0
    return planned[-1]


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory, ray_local, bundle) -> Path:
    root = tmp_path_factory.mktemp("cache")
    (root / "shards").mkdir()
    good_shard(root / "shards" / "train-000.tar", "a", 10, seed=0)
    good_shard(root / "shards" / "train-001.tar", "b", 10, seed=50)
    good_shard(root / "shards" / "eval-000.tar", "e", 4, seed=90)
    return root


@pytest.fixture(scope="module")
def first_run(pipeline_root, bundle) -> graph.PlannedStage:
    return run_graph(pipeline_root, bundle)


def expected_pixels(data: bytes, scales, factor: int):
    """SWD.md section 4 written out independently: RGB, centre crop, [-1, 1], then scale_images."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    x = torch.tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    return [scale_images(x, scales, i, factor) for i in range(len(scales))]


def shard_samples(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_cached_latents_and_embeddings_equal_a_direct_encode(first_run, pipeline_root, loaded):
    manifest = latent_cache.read_manifest(first_run.output_dir)
    scales = SwdConfig().schedule.scales
    assert manifest["num_rows"] == 20 and manifest["num_rejects"] == 0
    assert manifest["scales"] == scales and manifest["vae_scale_factor"] == 4
    assert manifest["encoder"]["location"] == str(Path(loaded.location))
    assert [Path(e["dir"]).is_dir() for e in manifest["shards"]] == [True, True]
    # the graph logs the declared outputs on the stage's run
    run_id = graph.read_manifest(first_run.output_dir)["run_id"]
    logged = mlflow.MlflowClient(f"sqlite:///{pipeline_root / 'wd' / 'mlflow.db'}").list_artifacts(run_id)
    assert sorted(a.path for a in logged) == sorted(cache.OUTPUTS)

    # one Ray Data read, as the distill stage reads it: numpy batches
    numpy_batches = list(latent_cache.read_cache(first_run.output_dir).iter_batches(batch_size=8, batch_format="numpy"))
    rows = [{k: v[b] for k, v in nb.items()} for nb in numpy_batches for b in range(len(nb["key"]))]
    assert len(rows) == 20
    row = rows[0]
    assert row["z_0_dtype"] == "float32" and list(row["z_0_shape"]) == [4, scales[0], scales[0]]
    assert list(row["z_im1_2_shape"]) == [4, scales[1], scales[1]]  # previous scale's side
    assert len(row["z_3"]) == 4 * 4 * scales[3] ** 2  # raw float32 bytes
    # format 2: z_im1_0 (== z_0) is not stored; the tiny bundle's CLIP block is its whole width, no T5
    assert manifest["format_version"] == latent_cache.FORMAT_VERSION == 2
    assert manifest["columns"] == latent_cache.stored_columns(scales) and "z_im1_0" not in manifest["columns"]
    assert manifest["implied_columns"] == {"z_im1_0": "z_0"} and "z_im1_0" not in row
    assert manifest["text_layout"] == {"clip_tokens": 16, "clip_width": 128, "t5_tokens": 0, "width": 128, "t5": False}
    assert list(row["prompt_embeds_shape"]) == [16, 128, 16, 128] and len(row["prompt_embeds"]) == 16 * 128 * 4

    batch = latent_cache.decode_batch({k: [r[k] for r in rows] for k in rows[0]})
    samples = {**shard_samples(pipeline_root / "shards" / "train-000.tar"),
               **shard_samples(pipeline_root / "shards" / "train-001.tar")}
    assert sorted(batch["key"]) == sorted(samples)
    with torch.no_grad():
        for b, key in enumerate(batch["key"]):
            assert batch["prompt"][b] == samples[key]["txt"].decode()
            for i, (image_i, image_im1) in enumerate(expected_pixels(samples[key]["png"], scales, 4)):
                direct = (loaded.vae.encode(image_i).latent_dist.mode() - SHIFT) * SCALING
                torch.testing.assert_close(batch["z"][i][b], direct[0], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(batch["z_im1"][i][b], loaded.encode_images(image_im1)[0],
                                           atol=1e-4, rtol=1e-4)
        prompt_embeds, pooled = loaded.encode_prompt(batch["prompt"])
    torch.testing.assert_close(batch["prompt_embeds"], prompt_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["pooled_prompt_embeds"], pooled, atol=1e-5, rtol=1e-5)
    # s[-1] := s[0]: the previous-scale latent of scale 0 is the scale-0 latent itself
    assert batch["z_im1"][0] is batch["z"][0] and batch["z_im1_0"] is batch["z_0"]

    # the prompt "" once, as the encoders make it (a Ray task, text encoders only)
    uncond = latent_cache.read_uncond(first_run.output_dir)
    with torch.no_grad():
        direct = loaded.encode_prompt([""])
    assert [t.shape for t in uncond] == [t.shape for t in direct] and uncond[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(uncond, direct))
    assert manifest["uncond"] == {"file": latent_cache.UNCOND_FILE, "prompt": "", "dtype": "float32",
                                  "prompt_embeds_shape": [1, 16, 128], "pooled_prompt_embeds_shape": [1, 128]}

    # every batch format a Ray Data consumer can ask for decodes the same (pyarrow and pandas read
    # straight from one shard's Parquet files), and so does a single row
    import pyarrow.parquet as pq

    by_key = {k: b for b, k in enumerate(batch["key"])}
    table = pq.read_table(manifest["shards"][0]["dir"])
    for got in (latent_cache.decode_batch(numpy_batches[0]), latent_cache.decode_batch(table), latent_cache.decode_batch(table.to_pandas())):
        rows_of = [by_key[k] for k in got["key"]]
        assert got["prompt_embeds"].shape == (len(rows_of), *batch["prompt_embeds"].shape[1:])
        for i in range(len(scales)):
            assert torch.equal(got["z"][i], batch["z"][i][rows_of])
            assert torch.equal(got["z_im1"][i], batch["z_im1"][i][rows_of])
    one = latent_cache.decode_row(rows[3])
    assert torch.equal(one["z_2"], batch["z"][2][by_key[one["key"]]]) and one["z_2"].shape == (4, 12, 12)


def test_adding_a_shard_encodes_only_that_shard(first_run, pipeline_root, bundle):
    before = latent_cache.read_manifest(first_run.output_dir)
    records = {e["shard_key"]: Path(e["dir"]).parent / shard_keys.SHARD_FILE for e in before["shards"]}
    stamps = {k: p.stat().st_mtime_ns for k, p in records.items()}

    good_shard(pipeline_root / "shards" / "train-002.tar", "c", 6, seed=70)
    out = run_graph(pipeline_root, bundle)
    summary = graph.read_manifest(out.output_dir)["summary"]
    assert summary["shards_encoded"] == 1 and summary["shards_reused"] == 2
    assert summary["rows_encoded"] == 6 and summary["rows"] == 26
    manifest = latent_cache.read_manifest(out.output_dir)
    assert [e["reused"] for e in manifest["shards"]] == [True, True, False]
    assert {k: p.stat().st_mtime_ns for k, p in records.items()} == stamps  # untouched
    assert latent_cache.read_cache(out.output_dir).count() == 26
    assert (out.output_dir / latent_cache.UNCOND_FILE).read_bytes() == \
        (first_run.output_dir / latent_cache.UNCOND_FILE).read_bytes()  # encoded once, kept in the shared dir

    # the same command again: the whole stage is cached
    assert run_graph(pipeline_root, bundle).action == "cached"


def test_shard_key_changes_with_what_changes_the_bytes(bundle, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(bundle, directory)
    spec = shard_keys.EncoderSpec(location=str(directory), dtype="float32", device="cpu", load_t5="auto",
                             local_files_only=True, posterior="mode", seed=0, storage_dtype="float32",
                             scales=[8, 10, 12, 16], vae_scale_factor=4)
    shard = shard_keys.Shard("/data/train-000.tar", 1000, 5)

    def key(shard=shard, **changes):
        s = shard_keys.EncoderSpec(**{**spec.__dict__, **changes})
        return shard_keys.shard_key(shard, shard_keys.encoder_identity(directory, s), s)

    base = key()
    assert key() == base and key(device="cuda") == base and key(seed=1) == base  # seed only matters for sample
    for changed in (dict(storage_dtype="bfloat16"), dict(dtype="bfloat16"), dict(posterior="sample"),
                    dict(scales=[8, 16]), dict(load_t5=False), dict(shard=shard_keys.Shard(shard.url, 1001, 5))):
        assert key(**changed) != base, changed
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # the transformer is not an encoder
    assert key() == base
    vae = directory / "vae" / "config.json"
    vae.write_text(vae.read_text() + " ")
    assert key() != base


# ----------------------------------------------------------------------------- bad input


def _context(root: Path, bundle: Path, shards: list[str], cfg: cache.Config) -> StageContext:
    """A fresh output dir and MLflow run per call; one shared dir for all (so shards are reused)."""
    (root / "shards-out").mkdir(parents=True, exist_ok=True)
    (root / "shards-out" / SHARDS_FILE).write_text(json.dumps({"train": [{"url": u} for u in shards], "eval": []}))
    (root / "teacher-out").mkdir(exist_ok=True)
    (root / "teacher-out" / teacher_stage.TEACHER_FILE).write_text(
        json.dumps({"source": "pretrained", "location": str(bundle)}))
    (root / "shared").mkdir(exist_ok=True)
    sections = {"cache": cfg, "swd": SwdConfig(), "teacher": teacher_stage.Config(pretrained=str(bundle))}
    ctx = stage_context("cache", sections, root / f"ctx-{len(list(root.glob('ctx-*')))}",
                        inputs={"shards": root / "shards-out", "teacher": root / "teacher-out"},
                        uri=f"sqlite:///{root / 'mlflow.db'}")
    return dataclasses.replace(ctx, shared_dir=root / "shared")


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory, ray_local, bundle):
    root = tmp_path_factory.mktemp("bad")
    kinds = bad_shards(root / "tars")
    good = good_shard(root / "tars" / "good.tar", "g", 6, seed=700)
    missing = good_shard(root / "tars" / "deleted.tar", "d", 2, seed=800)
    missing.unlink()  # listed by the shards stage, gone by the time the cache reads it
    directory = root / "tars" / "a-directory.tar"
    directory.mkdir()  # can be looked at, not read
    urls = [str(good)] + [str(k["path"]) for k in kinds.values()] + [str(missing), str(directory)]
    ctx = _context(root, bundle, urls, cache.Config(batch_size=8, decode_batch_size=8, max_bad_fraction=1.0))
    cache.run(ctx)
    return root, kinds, urls, ctx


def test_bad_input_is_skipped_counted_and_good_samples_kept(bad_root):
    root, kinds, urls, ctx = bad_root
    manifest = latent_cache.read_manifest(ctx.output_dir)
    expected = {key: reason for k in kinds.values() for key, reason in k["rejects"].items()}
    expected[urls[-2]] = expected[urls[-1]] = "unreadable_shard"
    rejects = [json.loads(line) for line in (ctx.output_dir / cache.REJECTS_FILE).read_text().splitlines()]
    assert {e["key"]: e["reason"] for e in rejects} == expected
    assert all(e["url"] in urls for e in rejects)
    reasons = {}
    for reason in expected.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    assert manifest["rejects_by_reason"] == reasons
    assert set(reasons) == {"truncated_tar", "corrupt_tar", "not_image", "too_small", "missing_caption",
                            "empty_caption", "bad_caption", "non_contiguous", "unreadable_shard"}

    good_keys = sorted([f"g{i:04d}" for i in range(6)] + [key for k in kinds.values() for key in k["good"]])
    keys = sorted(r["key"] for r in latent_cache.read_cache(ctx.output_dir, columns=["key"]).take_all())
    assert keys == good_keys and manifest["num_rows"] == len(good_keys)
    # unreadable shards are not cached (tried again next run); the readable ones are
    assert len(manifest["shards"]) == len(urls) - 2

    run = mlflow.MlflowClient(ctx.tracking_uri).get_run(ctx.run_id)
    assert run.data.metrics["rejects_not_image"] == 2 and run.data.metrics["rows"] == len(good_keys)
    assert run.data.metrics["rejects"] == len(expected) and run.data.metrics["rows_per_s"] > 0


def test_too_many_rejects_fail_with_a_clear_error_and_keep_the_encoded_shards(bad_root, bundle):
    root, kinds, urls, ctx = bad_root
    readable_again = urls[:-1]  # all but the directory: every shard is cached or unreadable, no Ray work
    strict = _context(root, bundle, readable_again, cache.Config(batch_size=8, max_bad_fraction=0.05))
    with pytest.raises(RuntimeError, match=r"cache: \d+\.\d+% of the train samples were rejected, more than "
                                           r"cache.max_bad_fraction=0.05 \(12 rejects: .*'not_image': 2.*"
                                           r"rejects.jsonl"):
        cache.run(strict)
    rejects = (strict.output_dir / cache.REJECTS_FILE).read_text()  # written before failing
    assert rejects.count("\n") == 12
    # a failed stage commits nothing (the graph logs no outputs): the stage logs the rejects itself
    logged = [a.path for a in mlflow.MlflowClient(strict.tracking_uri).list_artifacts(strict.run_id)]
    assert logged == [cache.REJECTS_FILE]
    assert strict.summary["shards_reused"] == len(urls) - 2 and strict.summary["rows_encoded"] == 0
    # every shard reused and the prompt "" from the shared dir: no Ray work at all
    assert (strict.output_dir / latent_cache.UNCOND_FILE).read_bytes() == \
        (ctx.output_dir / latent_cache.UNCOND_FILE).read_bytes()
    assert len(list((root / "shared").glob("uncond-*.safetensors"))) == 1


def test_nothing_usable_fails_even_when_rejects_are_allowed(bad_root, bundle):
    root, kinds, urls, ctx = bad_root
    ctx = _context(root, bundle, [urls[-2]], cache.Config(max_bad_fraction=1.0))  # the deleted shard only
    with pytest.raises(RuntimeError, match=r"cache: no usable sample in 1 train shard\(s\); rejects by reason "
                                           r"\{'unreadable_shard': 1\}"):
        cache.run(ctx)


# ----------------------------------------------------------------------------- without Ray


def test_rejected_fraction_weighs_an_unreadable_shard_as_an_average_shard():
    bad = [{"reason": "not_image"}] * 2
    assert samples.bad_fraction(98, bad, 2) == pytest.approx(0.02)
    # 2 readable shards of 50 samples each; the unreadable third counts 50
    assert samples.bad_fraction(98, bad + [{"reason": "unreadable_shard"}], 2) == pytest.approx(52 / 150)
    assert samples.bad_fraction(0, [{"reason": "unreadable_shard"}], 0) == 1.0


def test_tar_reader_keeps_every_good_sample_of_each_bad_shard(tmp_path):
    for name, spec in bad_shards(tmp_path).items():
        rows, rejects = [], []
        for r, j in rounds.read_shard(str(spec["path"]), "k"):
            rows += r
            rejects += j
        # image problems are found by the decoder, not the reader
        image_problems = {k for k, v in spec["rejects"].items() if v in ("not_image", "too_small")}
        assert sorted(r["key"] for r in rows) == sorted(spec["good"] + sorted(image_problems)), name
        assert {e["key"]: e["reason"] for e in rejects} == {k: v for k, v in spec["rejects"].items()
                                                          if k not in image_problems}, name
        assert all(isinstance(r["image"], bytes) and r["prompt"] for r in rows)  # bytes stay undecoded


def test_tar_faults_at_the_end_and_between_archives(tmp_path):
    path = good_shard(tmp_path / "g.tar", "g", 3)
    data = path.read_bytes()
    with open(path, "rb") as f:
        scan = samples.scan_tar(f, len(data))
    end = max(r.end for r in scan.runs)

    def judge(content: bytes):
        p = tmp_path / "x.tar"
        p.write_bytes(content)
        with open(p, "rb") as f:
            good, rejects = samples.judge_runs(samples.scan_tar(f, len(content)), "x")
        return [r.key for r in good], [(e["key"], e["reason"]) for e in rejects]

    assert judge(data) == (["g0000", "g0001", "g0002"], [])
    assert judge(data[:end]) == (["g0000", "g0001", "g0002"], [(f"x@{end}", "truncated_tar")])  # no end blocks
    assert judge(data[:end + 100]) == (["g0000", "g0001", "g0002"], [])  # cut inside the end blocks: nothing lost
    assert judge(data[:end] + b"junk" * 256) == (["g0000", "g0001", "g0002"], [(f"x@{end}", "corrupt_tar")])
    assert judge(data + good_shard(tmp_path / "h.tar", "h", 1).read_bytes())[0] == ["g0000", "g0001", "g0002", "h0000"]
    assert judge(b"not a tar at all" * 100) == ([], [("x@0", "corrupt_tar")])
    assert list(rounds.read_shard(str(tmp_path / "missing.tar"), "k"))[0][1][0]["reason"] == "unreadable_shard"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_bytes_round_trip(dtype):
    x = torch.randn(3, 4, 5, 5).to(dtype)
    data, shape, name = latent_cache.tensor_bytes(x)
    assert shape == [4, 5, 5] and name == str(dtype).removeprefix("torch.")
    assert len(data) == 3 and len(data[0]) == 4 * 5 * 5 * x.element_size()
    back = torch.stack([latent_cache.decode_tensor(d, shape, name) for d in data])
    assert back.dtype == dtype and torch.equal(back.view(torch.int16 if x.element_size() == 2 else torch.int32),
                                               x.view(torch.int16 if x.element_size() == 2 else torch.int32))
    with pytest.raises(ValueError, match="cache tensor dtype 'int8' is not one of"):
        latent_cache.decode_tensor(b"\0", [1], "int8")


def test_posterior_sample_is_seeded_per_key_not_per_batch(bundle):
    scales = SwdConfig().schedule.scales
    spec = shard_keys.EncoderSpec(location=str(bundle), dtype="float32", device="cpu", load_t5="auto", local_files_only=True,
                             posterior="sample", seed=0, storage_dtype="float32", scales=scales, vae_scale_factor=4)
    sampler = encoder.TeacherEncoder(spec)
    pixels = [scale_images(encoder.image_tensor(_png(seed)), scales, 3, 4)[0] for seed in range(3)]
    batch = torch.cat(pixels)
    both = sampler.latents(batch, ["a", "b", "c"], "z_3")
    alone = sampler.latents(batch[1:2], ["b"], "z_3")
    torch.testing.assert_close(both[1], alone[0])
    assert not torch.equal(sampler.latents(batch[1:2], ["zz"], "z_3")[0], alone[0])
    # (mean + std * eps - shift) * scaling, eps from a generator seeded by (seed, key, column)
    vae = sampler.bundle.vae
    with torch.no_grad():
        dist = vae.encode(batch[1:2]).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(encoder.sample_seed(0, "b", "z_3")))
    torch.testing.assert_close(alone, (dist.mean + dist.std * eps - SHIFT) * SCALING)


def test_bfloat16_teacher_sees_the_bf16_pixels_and_matches_float32(bundle, tmp_path):
    """teacher.dtype=bfloat16 (the GPU setting): decoded images travel as uint8 crops, the encoders
    see exactly the bf16 pixels a direct encode would, results match float32 to bf16 precision."""
    import pyarrow as pa

    path = good_shard(tmp_path / "g.tar", "g", 3)
    rows = [r for chunk, _ in rounds.read_shard(str(path), "k") for r in chunk]
    table = pa.Table.from_pylist(rows, schema=rounds.sample_schema())
    scales = SwdConfig().schedule.scales
    out = {}
    for dtype in ("float32", "bfloat16"):
        spec = shard_keys.EncoderSpec(location=str(bundle), dtype=dtype, device="cpu", load_t5="auto", local_files_only=True,
                                 posterior="mode", seed=0, storage_dtype=dtype, scales=scales, vae_scale_factor=4)
        decoded = encoder.decode_images(table, spec)
        assert decoded["image"].dtype == np.uint8 and decoded["image"].shape == (3, 64, 64, 3)
        actor = encoder.TeacherEncoder(spec)
        out[dtype] = actor.forward(decoded)
        pixels = dict(actor.scaled_pixels(decoded["image"]))
        assert pixels["z_2"].dtype == getattr(torch, dtype)
        expected = [expected_pixels(r["image"], scales, 4)[2][0] for r in rows]
        assert torch.equal(pixels["z_2"], torch.cat(expected).to(getattr(torch, dtype)))
        assert "z_im1_0" not in pixels and "z_im1_0" not in out[dtype]
    for name, value in out["bfloat16"].items():
        assert value.dtype == torch.bfloat16
        torch.testing.assert_close(value.float(), out["float32"][name], atol=0.1, rtol=0.05)


def test_images_are_upright_rgb_centre_crops():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)  # h 40, w 64
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 clockwise to display
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", exif=exif)
    upright = np.rot90(pixels, k=-1)  # h 64, w 40 -> centre crop rows 12..52
    x = encoder.image_tensor(out.getvalue())
    expected = torch.from_numpy(upright[12:52].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert x.shape == (1, 3, 40, 40) and torch.equal(x, expected)
    grey = io.BytesIO()
    Image.fromarray(pixels[:, :, 0]).convert("LA").save(grey, format="PNG")  # grey + alpha -> RGB
    assert encoder.image_tensor(grey.getvalue()).shape == (1, 3, 40, 40)


def _png(seed: int) -> bytes:
    return image_bytes(64, 64, seed)


def test_config_is_in_the_tree_and_graph():
    cfg = load_config(overrides=["cache.max_bad_fraction=0.2", "cache.posterior=sample"])
    assert isinstance(cfg.cache, cache.Config) and cfg.cache.max_bad_fraction == 0.2
    assert [s.inputs for s in default_stages() if s.name == "cache"] == [("shards", "teacher", "synthesize")]
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"cache.posterior: 'median' is invalid: Input should be 'mode' or 'sample'"):
        load_config(overrides=["cache.posterior=median"])
    with pytest.raises(ConfigError, match=r"cache.max_bad_fraction: 2 is invalid"):
        load_config(overrides=["cache.max_bad_fraction=2"])
