"""The generated shards and shard-pattern expansion."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from conftest import SMALL_DATA
import stages
from pipeline import graph
from stages import load_config
from pipeline.data import ShardError, expand_shards, shard_urls
from pipeline.run import run_stages


def generate(workdir, *overrides):
    cfg = load_config(overrides=[f"workdir={workdir}", *SMALL_DATA, *overrides])
    planned = graph.plan(cfg, stages.default_stages(), only={"shards"})
    assert run_stages(cfg, planned, f"sqlite:///{workdir / 'mlflow.db'}", []) == 0
    return planned[0].output_dir


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory, ray_local):
    return generate(tmp_path_factory.mktemp("shards") / "wd")


def members(url: str) -> dict[str, bytes]:
    with tarfile.open(url) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_sizes_and_contiguous_members(shards_dir):
    train, eval_ = shard_urls(shards_dir, "train"), shard_urls(shards_dir, "eval")
    assert len(train) == 2 and len(eval_) == 1
    with tarfile.open(train[0]) as tar:
        names = [m.name for m in tar.getmembers()]
    keys = [n.split(".")[0] for n in names]
    # each sample's members are adjacent: the key changes exactly once per sample
    changes = sum(1 for x, y in zip(keys, keys[1:]) if x != y)
    assert changes == len(set(keys)) - 1 and len(set(keys)) == 32
    assert sorted({n.split(".", 1)[1] for n in names}) == ["json", "png", "txt"]


def test_readable_by_webdataset_and_prompt_matches_attributes(shards_dir):
    import webdataset as wds

    samples = list(wds.WebDataset(shard_urls(shards_dir, "eval"), shardshuffle=False))
    assert len(samples) == 16
    for s in samples:
        attrs = json.loads(s["json"])
        prompt = s["txt"].decode()
        for key in ("shape", "colour", "position", "size", "background"):
            assert attrs[key] in prompt
        img = Image.open(io.BytesIO(s["png"]))
        assert img.size == (64, 64) and img.mode == "RGB"


def test_readable_by_ray_data(shards_dir):
    import ray.data

    ds = ray.data.read_webdataset(shard_urls(shards_dir, "train"), decoder=None)
    rows = ds.take_all()
    assert len(rows) == 64
    assert {"__key__", "png", "txt", "json"} <= set(rows[0])


def test_deterministic_for_a_seed_and_splits_disjoint(shards_dir, tmp_path, ray_local):
    again = generate(tmp_path / "wd")
    for split in ("train", "eval"):
        for a, b in zip(shard_urls(shards_dir, split), shard_urls(again, split)):
            assert members(a) == members(b)
    other = generate(tmp_path / "wd2", "data.generator.seed=1")
    assert members(shard_urls(other, "eval")[0]) != members(shard_urls(shards_dir, "eval")[0])
    train_pngs = {v for u in shard_urls(shards_dir, "train") for k, v in members(u).items() if k.endswith(".png")}
    eval_pngs = {v for u in shard_urls(shards_dir, "eval") for k, v in members(u).items() if k.endswith(".png")}
    assert not train_pngs & eval_pngs


def test_user_shards_are_listed_not_copied(shards_dir, tmp_path, ray_local):
    train = shard_urls(shards_dir, "train")
    pattern = train[0].replace("000000", "00000{0..1}")
    out = generate(tmp_path / "wd", f"data.train_shards={pattern}", f"data.eval_shards={shard_urls(shards_dir, 'eval')[0]}")
    assert shard_urls(out, "train") == train


def test_expand_shards_patterns(tmp_path):
    for name in ("a-000.tar", "a-001.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"x")
    assert [e["url"] for e in expand_shards(str(tmp_path / "a-*.tar"), "k")] == [str(tmp_path / "a-000.tar"), str(tmp_path / "a-001.tar")]
    assert len(expand_shards(str(tmp_path / "a-{000..001}.tar"), "k")) == 2
    assert len(expand_shards([str(tmp_path / "b.tar"), str(tmp_path / "a-*.tar")], "k")) == 3
    # pyarrow filesystem URIs (file:// stands in for s3:// here)
    assert [e["url"] for e in expand_shards(f"file://{tmp_path}/a-*.tar", "k")] == [f"file://{tmp_path}/a-000.tar", f"file://{tmp_path}/a-001.tar"]
    with pytest.raises(ShardError, match=r"k: no shard found for .*a-00\{2\.\.3\}\.tar' \(looked for .*a-002\.tar, .*a-003\.tar\)"):
        expand_shards(str(tmp_path / "a-00{2..3}.tar"), "k")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="k: empty shard file"):
        expand_shards(str(tmp_path / "empty.tar"), "k")
    with pytest.raises(ShardError, match="k: empty list"):
        expand_shards([], "k")
