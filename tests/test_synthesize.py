"""The `synthesize` stage: prompt-only shards and prompt files become teacher-generated shards the
cache stage reads; images are deterministic per (prompt, seed); a killed run regenerates only the
missing shards; bad prompts and prompt files are refused or counted."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from conftest import REPO_ROOT
from pipeline import graph, tiny
from stages import default_stages, load_config
from pipeline.run import run_stages
from stages import synthesize
from stages import teacher as teacher_stage
from pipeline.generate import Generator, GeneratorSpec, decode_png
from helpers.shards import good_shard, image_bytes, write_tar

FAST = ["synthesize.teacher_sampler.num_steps=2", "synthesize.batch_size=4", "synthesize.prompts_per_shard=3",
        "cache.batch_size=8", "cache.decode_batch_size=8"]
WORDS = ["a red circle on a black background", "a large blue square in the top left on a white background",
         "a small green triangle on a black background", "a yellow circle in the bottom right on a white background",
         "a purple square on a black background"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny.build_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


def stages(upto: str = "cache"):
    """The default stages up to `upto`; the teacher spec relaxes OUTPUTS to what a pretrained teacher
    writes (bundle/ and samples.png come only from training)."""
    t = teacher_stage
    module = types.SimpleNamespace(VERSION=t.VERSION, SECTIONS=t.SECTIONS, OUTPUTS=(t.TEACHER_FILE,), run=t.run,
                                   external_fingerprint=t.external_fingerprint)
    names = [s.name for s in default_stages()]
    keep = names[:names.index(upto) + 1]
    return [graph.StageSpec(s.name, module, s.inputs) if s.name == "teacher" else s
            for s in default_stages() if s.name in keep]


def prompt_shard(path: Path, prompts: list[str], prefix: str = "q") -> Path:
    members = []
    for i, p in enumerate(prompts):
        members += [(f"{prefix}{i:04d}.txt", p.encode()), (f"{prefix}{i:04d}.json", b"{}")]
    return write_tar(path, members)


def run_graph(root: Path, bundle: Path, *overrides: str, upto: str = "cache") -> dict[str, Path]:
    wd = root / "wd"
    cfg = load_config(overrides=[f"workdir={wd}", f"teacher.pretrained={bundle}", "tracking.experiment=synth",
                                 *FAST, *overrides])
    planned = graph.plan(cfg, stages(upto))
    assert run_stages(cfg, planned, f"sqlite:///{wd / 'mlflow.db'}", []) == 0
    return {p.name: p.output_dir for p in planned if p.action != "disabled"}


def samples_of(url: str) -> list[dict]:
    return list(wds.WebDataset(url, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, ray_local, bundle):
    """Prompt-only shard + image shard + a .txt prompt file (with an empty line and a long prompt)."""
    root = tmp_path_factory.mktemp("synth")
    (root / "shards").mkdir()
    prompt_shard(root / "shards" / "train-000.tar", WORDS[:4])
    good_shard(root / "shards" / "train-001.tar", "img", 5, seed=3)
    good_shard(root / "shards" / "eval-000.tar", "e", 4, seed=90)
    long_prompt = " ".join(["red"] * 40)  # over the tiny tokenizer's limit
    (root / "prompts.txt").write_text(f"{WORDS[4]}\n\n{long_prompt}\n{WORDS[0]}\n")
    out = run_graph(root, bundle, f"data.train_shards={root}/shards/train-*.tar",
                    f"data.eval_shards={root}/shards/eval-000.tar", f"data.prompts={root}/prompts.txt")
    return root, out


def test_prompt_only_shards_and_a_prompt_file_become_shards_the_cache_reads(mixed_run):
    root, out = mixed_run
    summary = json.loads((out["synthesize"] / synthesize.SUMMARY_FILE).read_text())
    # 4 prompts from the shard, 3 usable lines of the file (the empty line skipped, the long one truncated)
    assert summary["prompts"] == 7 and summary["images"] == 7
    assert summary["skipped_by_reason"] == {"empty_prompt": 1} and summary["truncated"] == 1
    assert summary["image_shards_passed_through"] == 1
    assert summary["shards"] == 2 + 1  # ceil(4 / 3) for the shard, ceil(3 / 3) for the file
    skipped = [json.loads(line) for line in (out["synthesize"] / synthesize.SKIPPED_FILE).read_text().splitlines()]
    assert skipped == [{"source": f"{root}/prompts.txt", "key": "p00000001", "reason": "empty_prompt"}]

    listing = json.loads((out["synthesize"] / "shards.json").read_text())
    assert listing["train"][0]["url"] == str(root / "shards" / "train-001.tar")  # the image shard, as given
    generated = [e["url"] for e in listing["train"][1:]]
    assert all(Path(u).parent.name == "shared" and Path(u).name.startswith("synth-") for u in generated)
    got = [s for u in generated for s in samples_of(u)]
    assert sorted(s["txt"].decode() for s in got) == sorted(WORDS[:4] + [WORDS[4], " ".join(["red"] * 40), WORDS[0]])
    for s in got:
        meta = json.loads(s["json"])
        assert meta["sampler"]["num_steps"] == 2 and meta["sampler"]["guidance_scale"] == 4.0
        assert meta["seed"] == synthesize.sample_seed(0, s["txt"].decode(), 0)
        assert decode_png(s["png"]).shape == (64, 64, 3)
        assert meta["prompt_truncated"] == (len(s["txt"]) > 100)

    cache = json.loads((out["cache"] / "cache.json").read_text())
    assert cache["num_rows"] == 7 + 5 and cache["num_rejects"] == 0  # every generated sample and the image shard


def test_the_same_prompt_and_seed_give_the_same_image(mixed_run, bundle):
    _, out = mixed_run
    listing = json.loads((out["synthesize"] / "shards.json").read_text())
    stored = {s["txt"].decode(): decode_png(s["png"]) for e in listing["train"][1:] for s in samples_of(e["url"])}
    spec = GeneratorSpec(name="teacher", location=str(bundle), dtype="float32", device="cpu", load_t5=False,
                         local_files_only=True, teacher_num_steps=2, guidance_scale=4.0, latent_side=16)
    gen = Generator(spec)
    # another batch, another order, another batch size: each image depends on its prompt and seed only
    prompts = [WORDS[2], WORDS[0]]
    images = synthesize.generate_images(gen, prompts, [synthesize.sample_seed(0, p, 0) for p in prompts])
    for p, im in zip(prompts, images):
        assert np.abs(im.astype(int) - stored[p].astype(int)).max() <= 1  # uint8 rounding of float noise
    # a different seed gives a different image
    other = synthesize.generate_images(gen, [WORDS[0]], [synthesize.sample_seed(1, WORDS[0], 0)])
    assert np.abs(other[0].astype(int) - stored[WORDS[0]].astype(int)).mean() > 5


def test_a_prompt_file_alone_trains_on_generated_images(tmp_path, ray_local, bundle):
    """A CSV prompt file and no shards: the shards stage writes only the eval split."""
    with open(tmp_path / "prompts.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        w.writerows([[i, p] for i, p in enumerate(WORDS[:3])])
    out = run_graph(tmp_path, bundle, f"data.prompts={tmp_path}/prompts.csv", "data.prompt_column=caption",
                    "data.generator.num_eval_samples=8", "data.generator.samples_per_shard=8")
    listing = json.loads((out["shards"] / "shards.json").read_text())
    assert listing["train"] == [] and len(listing["eval"]) == 1
    assert json.loads((out["cache"] / "cache.json").read_text())["num_rows"] == 3


def test_a_killed_run_regenerates_only_the_missing_shards(tmp_path, ray_local, bundle):
    """A driver SIGKILLed mid-stage (a real process joined to this session's Ray) leaves whole shards
    only; the rerun generates exactly the ones that are missing and leaves the others untouched."""
    prompts = [WORDS[i % 5] + f" number {i}" for i in range(12)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    overrides = [f"workdir={tmp_path / 'wd'}", f"teacher.pretrained={bundle}", "tracking.experiment=synth",
                 f"data.prompts={tmp_path}/prompts.txt", "data.generator.num_eval_samples=4",
                 "synthesize.teacher_sampler.num_steps=28", "synthesize.batch_size=1", "synthesize.prompts_per_shard=1"]
    address = ray_local.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "pipeline" / "run.py"), *overrides,
                             f"ray.address={address}", "--only", "shards,teacher,synthesize"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    shared = tmp_path / "wd" / "synthesize" / "shared"
    deadline = time.monotonic() + 300
    while len(list(shared.glob("synth-*.tar"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    log = proc.communicate()[0].decode(errors="replace")
    before = {p.name: p.stat().st_mtime_ns for p in shared.glob("synth-*.tar")}
    assert 2 <= len(before) < 12, f"the kill came too late or never: {len(before)} shards\n{log[-3000:]}"

    cfg = load_config(overrides=overrides)
    planned = graph.plan(cfg, stages("synthesize"))
    assert run_stages(cfg, planned, f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}", []) == 0
    summary = json.loads((planned[-1].output_dir / synthesize.SUMMARY_FILE).read_text())
    assert summary["shards_reused"] == len(before) and summary["shards_generated"] == 12 - len(before)
    assert {p.name: p.stat().st_mtime_ns for p in shared.glob("synth-*.tar") if p.name in before} == before
    assert len(list(shared.glob("synth-*.tar"))) == 12
    assert not list(shared.glob(".*.tmp"))  # the killed write's temporary file was not taken as a shard... or left
    # the regenerated shards hold the same images the killed run would have written
    got = sorted(s["txt"].decode() for p in shared.glob("synth-*.tar") for s in samples_of(str(p)))
    assert got == sorted(prompts)


# ----------------------------------------------------------------------------- bad input


def test_prompt_file_problems_are_config_errors(tmp_path):
    data = lambda **kw: load_config(overrides=[f"data.{k}={v}" for k, v in kw.items()]).data  # noqa: E731
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    (tmp_path / "p.csv").write_text("id,text\n1,a red circle\n")
    (tmp_path / "p.json").write_text("[]")
    assert "does not exist" in synthesize.prompt_file_problems(data(prompts=tmp_path / "nope.txt"))[0]
    assert "holds no prompt" in synthesize.prompt_file_problems(data(prompts=tmp_path / "empty.txt"))[0]
    problem = synthesize.prompt_file_problems(data(prompts=tmp_path / "p.csv"))[0]
    assert "data.prompt_column: 'prompt' is not a column" in problem and "['id', 'text']" in problem
    assert synthesize.prompt_file_problems(data(prompts=tmp_path / "p.csv", prompt_column="text")) == []
    assert "unknown format '.json'" in synthesize.prompt_file_problems(data(prompts=tmp_path / "p.json"))[0]
    pq.write_table(pa.table({"prompt": ["a", None, " "]}), tmp_path / "p.parquet")
    assert [p.text for p in synthesize.read_prompt_file(str(tmp_path / "p.parquet"), "prompt")] == ["a", "", ""]


def test_an_empty_prompt_file_exits_2_before_any_work(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    out = subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / "run.py"), f"workdir={tmp_path / 'wd'}",
                          f"data.prompts={tmp_path}/empty.txt"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "data.prompts:" in out.stderr and "holds no prompt" in out.stderr
    assert not (tmp_path / "wd" / "mlflow.db").exists()


def test_long_prompts_are_truncated_or_skipped_and_counted(bundle):
    limit = synthesize.TokenLimit(bundle)
    long_prompt = " ".join(["red"] * (limit.max_tokens + 5))
    source = lambda: synthesize.PromptSource("f", [synthesize.Prompt("p0", WORDS[0]),  # noqa: E731
                                                   synthesize.Prompt("p1", long_prompt),
                                                   synthesize.Prompt("p2", "")])
    keep, skipped = synthesize.check_prompts(source(), limit, "truncate")
    assert [p.key for p in keep] == ["p0", "p1"] and keep[1].truncated and not keep[0].truncated
    assert [s["reason"] for s in skipped] == ["empty_prompt"]
    keep, skipped = synthesize.check_prompts(source(), limit, "skip")
    assert [p.key for p in keep] == ["p0"]
    assert [s["reason"] for s in skipped] == ["too_long", "empty_prompt"]
    assert f"> {limit.max_tokens}" in skipped[0]["detail"]


def test_nothing_usable_fails_with_the_reasons(tmp_path, ray_local, bundle):
    (tmp_path / "shards").mkdir()
    prompt_shard(tmp_path / "shards" / "train-000.tar", ["", "  "])
    good_shard(tmp_path / "shards" / "eval-000.tar", "e", 4, seed=90)
    wd = tmp_path / "wd"
    cfg = load_config(overrides=[f"workdir={wd}", f"teacher.pretrained={bundle}", *FAST,
                                 f"data.train_shards={tmp_path}/shards/train-000.tar",
                                 f"data.eval_shards={tmp_path}/shards/eval-000.tar"])
    planned = graph.plan(cfg, stages("synthesize"))
    assert run_stages(cfg, planned, f"sqlite:///{wd / 'mlflow.db'}", []) == 1
    assert not any(p.output_dir.exists() for p in planned if p.name == "synthesize")


def test_image_side_must_fit_the_teacher(bundle):
    native = synthesize.native_side(bundle)
    assert native["image_side_px"] == 64 and native["vae_scale_factor"] == 4
    with pytest.raises(synthesize.SynthesizeError, match="synthesize.image_side_px: 36 is not a multiple of 8"):
        synthesize.check_side(36, native)


def test_stage_is_in_the_graph_only_for_user_data():
    names = lambda cfg: [p.name for p in graph.plan(cfg, default_stages()) if p.action != "disabled"]  # noqa: E731
    assert "synthesize" not in names(load_config())
    assert "synthesize" in names(load_config(overrides=["data.prompts=x.txt"]))
    assert "synthesize" in default_stages()[[s.name for s in default_stages()].index("cache")].inputs


def test_a_bad_train_shard_is_judged_as_the_cache_reads_it(tmp_path):
    """shard_kind and read_prompt_shard count what is wrong (the shared tolerant reader) instead of raising."""
    from test_samples import random_tar

    bad = random_tar(tmp_path / "train-000.tar")
    kind, rejects = synthesize.shard_kind(str(bad))
    assert kind == "unreadable" and [(e["key"], e["reason"]) for e in rejects] == [(f"{bad}@0", "corrupt_tar")]
    kind, rejects = synthesize.shard_kind(str(tmp_path / "gone.tar"))
    assert kind == "unreadable" and rejects[0]["reason"] == "unreadable_shard"
    assert "No such file" in rejects[0]["detail"]
    cut = prompt_shard(tmp_path / "cut.tar", WORDS)
    cut.write_bytes(cut.read_bytes()[:700])  # inside the second member
    assert synthesize.shard_kind(str(cut)) == ("prompts", [])
    prompts, rejects = synthesize.read_prompt_shard(str(cut))
    assert [p.text for p in prompts] == WORDS[:1]  # the sample before the cut is kept, as the cache keeps it
    assert [e["reason"] for e in rejects] == ["truncated_tar"]
    assert synthesize.shard_kind(str(prompt_shard(tmp_path / "ok.tar", WORDS[:1]))) == ("prompts", [])
    assert synthesize.shard_kind(str(good_shard(tmp_path / "img.tar", "i", 2))) == ("images", [])


def test_a_random_bytes_shard_among_200_is_counted_and_fails_the_stage_only_above_the_fraction(
        tmp_path, ray_local, bundle, capfd):
    """198 good image shards, a prompt-only shard with a non-UTF-8 caption under dotted directories,
    and a tar of random bytes. The random tar is counted and reported and passed on to the cache (which
    judges it with the image shards: one corrupt_tar sample among them); synthesize judges the prompts
    it reads, and fails only when their bad fraction exceeds synthesize.max_bad_fraction, naming the shard."""
    from test_samples import DOTTED, random_tar, tricky_prompt_shard

    from pipeline.samples import read_shards

    shards = tmp_path / "shards"
    shards.mkdir()
    png = image_bytes(64, 64, 0)
    for i in range(198):
        write_tar(shards / f"train-{i:03d}.tar", [(f"g{i:04d}.png", png), (f"g{i:04d}.txt", b"a red circle")])
    prompts = tricky_prompt_shard(shards / "train-198.tar")  # 2 good prompts, 1 bad_caption
    bad = random_tar(shards / "train-199.tar")
    good_shard(tmp_path / "eval-000.tar", "e", 2, seed=90)
    data = [f"data.train_shards={shards}/train-*.tar", f"data.eval_shards={tmp_path}/eval-000.tar"]

    out = run_graph(tmp_path, bundle, *data, "synthesize.max_bad_fraction=0.5", upto="synthesize")
    summary = json.loads((out["synthesize"] / synthesize.SUMMARY_FILE).read_text())
    assert summary["train_shards"] == 200 and summary["unreadable_shards"] == [str(bad)]
    assert summary["rejects_by_reason"] == {"corrupt_tar": 1, "bad_caption": 1}
    assert summary["bad_fraction"] == pytest.approx(1 / 3, abs=1e-6)  # of the prompt-only shard's 3 samples
    assert summary["prompts"] == 2 and summary["images"] == 2 and summary["image_shards_passed_through"] == 199
    skipped = [json.loads(line) for line in (out["synthesize"] / synthesize.SKIPPED_FILE).read_text().splitlines()]
    assert {(e["source"], e["key"], e["reason"]) for e in skipped} == {
        (str(prompts), f"{DOTTED}000002", "bad_caption"), (str(bad), f"{bad}@0", "corrupt_tar")}
    listing = json.loads((out["synthesize"] / "shards.json").read_text())
    train = [e["url"] for e in listing["train"]]
    assert str(bad) in train and len(train) == 199 + 1  # passed on: the cache judges it
    generated = [s["txt"].decode() for e in listing["train"][199:] for s in samples_of(e["url"])]
    assert sorted(generated) == ["a blue square", "a red circle"]
    manifest = graph.read_manifest(out["synthesize"])
    assert manifest["summary"]["unreadable_shards"] == 1
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}").get_run(manifest["run_id"])
    assert run.data.metrics["unreadable_shards"] == 1 and run.data.metrics["rejects_corrupt_tar"] == 1
    assert run.data.metrics["rejects_bad_caption"] == 1
    # The cache's reader judges the random tar among the 199 passed-through shards: one bad sample, 0.5%.
    reads = read_shards(train[:199])
    assert reads.bad_fraction == pytest.approx(1 / 199, abs=1e-6) and reads.bad_fraction < 0.01

    # a limit below the prompts' bad fraction: the stage fails before generating, naming the key and the shard
    capfd.readouterr()
    wd = tmp_path / "wd"
    cfg = load_config(overrides=[f"workdir={wd}", f"teacher.pretrained={bundle}", "tracking.experiment=synth",
                                 *FAST, *data, "synthesize.max_bad_fraction=0.3"])
    assert run_stages(cfg, graph.plan(cfg, stages("synthesize")), f"sqlite:///{wd / 'mlflow.db'}", []) == 1
    err = capfd.readouterr().err
    assert ("synthesize: 33.33% of the prompts read from prompt-only train shards are bad, more than "
            "synthesize.max_bad_fraction=0.3") in err
    assert f"{prompts} (1 rejected sample(s))" in err and str(bad) not in err.split("bad shards:")[1]
