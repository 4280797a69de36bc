"""Config loading, layering, overrides and the messages of invalid configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, parse_override
from stages import load_config


def test_shipped_yaml_validates_and_lists_every_key():
    cfg = load_config()
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    dumped = cfg.model_dump(mode="json")

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    missing = keys(dumped) - keys(raw)
    assert not missing, f"pipeline.yaml does not document: {sorted(missing)}"


@pytest.mark.parametrize("path", sorted([*REPO_ROOT.glob("cluster/profiles/*.yaml"), *REPO_ROOT.glob("configs/*.yaml")]))
def test_every_shipped_profile_validates(path):
    load_config([path])


def test_layering_later_files_and_overrides_win(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("data:\n  generator:\n    seed: 5\n    num_eval_samples: 7\n")
    b = tmp_path / "b.yaml"
    b.write_text("data:\n  generator:\n    seed: 6\n")
    cfg = load_config([a, b], ["data.generator.num_train_samples=11"])
    assert cfg.data.generator.seed == 6  # b over a
    assert cfg.data.generator.num_eval_samples == 7  # a kept where b is silent
    assert cfg.data.generator.num_train_samples == 11  # override over files
    assert cfg.data.generator.image_side_px == 64  # pipeline.yaml underneath


@pytest.mark.parametrize("text, expected", [
    ("a.b=10", ("a.b", 10)),
    ("a.b=1e-4", ("a.b", 1e-4)),
    ("a.b=[64,80]", ("a.b", [64, 80])),
    ("a.b=null", ("a.b", None)),
    ("a.b=s3://bucket/x-{0..3}.tar", ("a.b", "s3://bucket/x-{0..3}.tar")),
    ("a.b=", ("a.b", "")),
])
def test_override_values_are_yaml(text, expected):
    assert parse_override(text) == expected


def test_relative_workdir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(overrides=["workdir=wd"]).workdir == tmp_path / "wd"


INVALID = [
    (["bogus=1"], r"bogus: unknown key; valid keys here: cache, data, distill"),
    (["data.generator.colour=[red]"], r"data\.generator\.colour: unknown key; valid keys here: .*colours"),
    (["tracking.uri_x=http://x"], r"tracking\.uri_x: unknown key"),
    (["data.generator.seed=abc"], r"data\.generator\.seed: 'abc' is invalid: Input should be a valid integer"),
    (["data.generator.num_train_samples=0"], r"data\.generator\.num_train_samples: 0 is invalid: .*greater than or equal to 1"),
    (["data.generator.num_eval_samples=-3"], r"data\.generator\.num_eval_samples: -3 is invalid"),
    (["data.generator.image_side_px=70"], r"image_side_px: 70 is invalid: 70 must be a multiple of 16"),
    (["data.generator.image_side_px=4096"], r"image_side_px: 4096 is invalid: .*less than or equal to 1024"),
    (["data.generator.shapes=[hexagon]"], r"shapes: \['hexagon'\] is invalid: .*drawn from \['circle', 'square', 'triangle'\]"),
    (["data.generator.colours=[]"], r"colours: \[\] is invalid: \[\] must be a non-empty list"),
    (["data.generator.sizes=[small, small]"], r"sizes: \['small', 'small'\] is invalid: .*duplicates"),
    (["data.generator.backgrounds=grey"], r"backgrounds: 'grey' is invalid: Input should be a valid list"),
    (["tracking.connect_timeout_s=100"], r"tracking\.connect_timeout_s: 100 is invalid: .*less than or equal to 30"),
    (["tracking.experiment="], r"tracking\.experiment: '' is invalid: .*at least 1 character"),
    (["ray=5"], r"ray: 5 is invalid: .*valid dictionary"),
    (["ray.num_cpus=0"], r"ray\.num_cpus: 0 is invalid: .*greater than or equal to 1"),
    (["ray.object_store_memory_gib=-1"], r"ray\.object_store_memory_gib: -1 is invalid"),
    (["data.train_shards=5"], r"data\.train_shards: 5 is invalid"),
    (["distill.lr_schedule=cosine"], r"distill\.lr_schedule: 'cosine' is invalid: .*'constant' or 'linear_decay'"),
    (["distill.lr_warmup_steps=0"], r"distill\.lr_warmup_steps: 0 is invalid: .*greater than or equal to 1"),
    (["distill.lr_schedule=linear_decay", "distill.num_steps=10"],
     r"distill\.lr_warmup_steps: 10 leaves no decay in distill\.num_steps=10; give fewer warm-up steps"),
    (["novalue"], r"override 'novalue': expected key\.sub=value"),
    (["a..b=1"], r"override 'a\.\.b=1': expected key\.sub=value"),
    (["data.generator.seed=[1"], r"override 'data\.generator\.seed=\[1': value is not valid YAML"),
]


@pytest.mark.parametrize("overrides, message", INVALID, ids=[o[0] for o, _ in INVALID])
def test_invalid_config_names_key_value_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_every_problem_is_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["bogus=1", "data.generator.seed=abc", "ray.num_cpus=0"])
    assert len(info.value.problems) == 3


def test_missing_and_malformed_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError) as info:
        load_config([tmp_path / "nope.yaml", bad, scalar])
    text = str(info.value)
    assert "nope.yaml' does not exist" in text
    assert "bad.yaml' is not valid YAML" in text
    assert "scalar.yaml' must hold a mapping of sections, got str" in text


def test_shipped_yaml_has_a_comment_for_every_key():
    lines = Path(DEFAULT_CONFIG).read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        # each key line has a comment right above it or is a section header followed by keys
        above = lines[i - 1].strip() if i else ""
        is_section = stripped.endswith(":")
        assert above.startswith("#") or is_section or _sibling_commented(lines, i), f"pipeline.yaml:{i + 1} {stripped!r} has no comment"


def _sibling_commented(lines: list[str], i: int) -> bool:
    """Keys grouped under one comment (e.g. num_train_samples / num_eval_samples)."""
    indent = len(lines[i]) - len(lines[i].lstrip())
    j = i - 1
    while j >= 0 and lines[j].strip() and not lines[j].strip().startswith("#"):
        if len(lines[j]) - len(lines[j].lstrip()) != indent:
            return False
        j -= 1
    return j >= 0 and lines[j].strip().startswith("#")


def test_a_renamed_key_names_its_new_key_in_files_and_overrides(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("distill:\n  log_every: 5\nevaluate:\n  teacher_num_steps: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config([old], ["synthesize.guidance_scale=5", "teacher.sample_num_steps=4"])
    text = str(e.value)
    for old_key, new_key in [("distill.log_every", "distill.log_every_steps"),
                             ("evaluate.teacher_num_steps", "evaluate.teacher_sampler.num_steps"),
                             ("synthesize.guidance_scale", "synthesize.teacher_sampler.guidance_scale"),
                             ("teacher.sample_num_steps", "teacher.sampler.num_steps")]:
        assert f"{old_key}: renamed to {new_key}" in text
    assert "old.yaml" in text


def test_the_quality_config_is_the_default_trained_longer_on_more_eval_prompts():
    """configs/quality.yaml decides the default's quality goals; it must not drift into another recipe."""
    from pipeline.config import flatten

    default = flatten(load_config())
    quality = flatten(load_config([REPO_ROOT / "configs" / "quality.yaml"]))
    changed = {k: quality[k] for k in default if quality[k] != default[k]}
    assert changed == {"data.generator.num_eval_samples": 2048, "distill.num_steps": 600,
                       "evaluate.bootstrap_resamples": 200}
