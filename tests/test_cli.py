"""`python pipeline/run.py` as a user runs it: dry run, and bad input refused before any work."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, SMALL_DATA


def run_cli(*args: str, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, str(REPO_ROOT / "pipeline" / "run.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_dry_run_prints_config_and_plan_and_touches_nothing(workdir):
    out = run_cli("--dry-run", f"workdir={workdir}", "data.generator.seed=7", *SMALL_DATA)
    assert out.returncode == 0, out.stderr
    assert "# resolved config" in out.stdout
    assert "seed: 7" in out.stdout
    assert "# stage plan" in out.stdout
    for stage in ("shards", "teacher"):
        assert f"  {stage}" in out.stdout
    assert "would run" in out.stdout
    # nothing ran: no MLflow store, no stage output
    assert not (workdir / "mlflow.db").exists()
    assert not (workdir / "shards").exists()


def test_bad_config_exits_2_with_every_problem_before_any_work(workdir):
    start = time.monotonic()
    out = run_cli(f"workdir={workdir}", "bogus=1", "data.generator.seed=abc", "ray.num_cpus=0")
    assert out.returncode == 2
    for text in ("bogus: unknown key", "data.generator.seed: 'abc' is invalid", "ray.num_cpus: 0 is invalid"):
        assert text in out.stderr
    assert "Started a local Ray" not in out.stderr
    assert not (workdir / "mlflow.db").exists()
    assert time.monotonic() - start < 60


def test_missing_shards_list_what_was_looked_for(tmp_path, workdir):
    out = run_cli(f"workdir={workdir}", f"data.train_shards={tmp_path}/train-{{000..002}}.tar",
                  f"data.eval_shards={tmp_path}/nothing-*.tar")
    assert out.returncode == 2
    assert "data.train_shards: no shard found for" in out.stderr
    assert f"{tmp_path}/train-000.tar" in out.stderr  # what was looked for
    assert "data.eval_shards: no shard found for" in out.stderr


def test_only_one_of_train_and_eval_shards(tmp_path, workdir):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x" * 10)
    out = run_cli(f"workdir={workdir}", f"data.train_shards={shard}")
    assert out.returncode == 2
    assert "give both or neither" in out.stderr


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = run_cli(f"workdir={blocker}/sub")
    assert out.returncode == 2
    assert "workdir:" in out.stderr and "is not writable" in out.stderr


def test_unknown_stage_in_only(workdir):
    out = run_cli("--dry-run", f"workdir={workdir}", "--only", "shards,nope")
    assert out.returncode == 2
    assert "unknown stage(s) nope; stages are: shards, teacher" in out.stderr


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_unreachable_tracking_server_fails_fast(workdir, server):
    """A closed port is refused at once; a port that accepts and never answers hits the timeout."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        if server == "silent":
            sock.listen(8)
        else:
            sock.close()
        start = time.monotonic()
        out = run_cli(f"workdir={workdir}", f"tracking.uri=http://127.0.0.1:{port}",
                      "tracking.connect_timeout_s=3", *SMALL_DATA)
    assert out.returncode == 3
    assert f"MLflow tracking server http://127.0.0.1:{port} cannot be reached" in out.stderr
    assert time.monotonic() - start < 30
    assert not (workdir / "shards").exists()


@pytest.mark.parametrize("overrides, message", [
    (["swd.feature_block=9"], r"swd\.feature_block: 9 is not a block of the teacher, which has 4 blocks"),
    (["swd.preset=null", "swd.scales=[7,16]", "swd.boundaries=[0,14]"], r"swd\.scales: \[7, 16\] has sides \[7\] that are not multiples of the teacher's patch size 2"),
    (["teacher.pretrained=/no/such/teacher"], r"teacher\.pretrained '/no/such/teacher': no such directory"),
])
def test_teacher_and_schedule_mismatch_refused_before_work(workdir, overrides, message):
    import re

    out = run_cli("--dry-run", f"workdir={workdir}", *overrides)
    assert out.returncode == 2
    assert re.search(message, out.stderr), out.stderr


def test_t5_settings_the_teacher_cannot_meet_exit_2_naming_the_key(workdir, tmp_path):
    """T5 asked for from a teacher without one; a T5 length over the tokenizer's limit; a miniature
    overlay that sets a key outside its allow-list: each refused before Ray starts."""
    no_t5 = run_cli(f"workdir={workdir}", "teacher.load_t5=true")  # the shipped tiny teacher has no T5
    assert no_t5.returncode == 2
    assert "teacher.load_t5: true asks for SD3's T5 encoder, but" in no_t5.stderr
    assert "has no text_encoder_3/ and tokenizer_3/" in no_t5.stderr
    profile = ["--config", "cluster/profiles/sd35-medium-4step.yaml", "--config", "cluster/miniature.yaml"]
    too_long = run_cli(*profile, f"workdir={workdir}", "teacher.max_sequence_length=64", cwd=REPO_ROOT)
    assert too_long.returncode == 2
    assert "teacher.max_sequence_length: 64 is over the T5 tokenizer's limit of 32 tokens" in too_long.stderr
    overlay = tmp_path / "miniature.yaml"
    overlay.write_text((REPO_ROOT / "cluster" / "miniature.yaml").read_text() + "\ndistill:\n  zero_stage: 0\n")
    drift = run_cli("--config", "cluster/profiles/sd35-large-4step.yaml", "--config", str(overlay),
                    f"workdir={workdir}", cwd=REPO_ROOT)
    assert drift.returncode == 2 and "distill.zero_stage: a miniature overlay" in drift.stderr
    for out in (no_t5, too_long, drift):
        assert "Started a local Ray" not in out.stderr
    assert not (workdir / "mlflow.db").exists()


def test_the_tiny_teacher_is_checked_at_the_latent_side_it_trains_at(workdir, tmp_path):
    """teacher.pretrained=null trains the embedded tiny teacher on tiny.PIXEL_SIDE images (latent side
    16) whatever data.generator.image_side_px is; with teacher.init_bundle it continues that bundle's
    own transformer. A schedule or feature block the teacher cannot take exits 2 naming the key, before
    Ray, shards or teacher training (not in distill, after them)."""
    from pipeline import tiny

    assert tiny.build_transformer().config.sample_size == 16  # what pipeline/teacher_training.py builds and trains
    tiny_teacher = [f"workdir={workdir}", "teacher.pretrained=null", "data.generator.image_side_px=128", *SMALL_DATA]
    too_big = [*tiny_teacher, "swd.preset=null", "swd.scales=[16,24]", "swd.boundaries=[0,14]"]
    dry = run_cli("--dry-run", *too_big)
    assert dry.returncode == 2, dry.stdout + dry.stderr
    assert ("swd.scales: [16, 24] has sides [24] larger than the teacher's latent side 16; valid sides are "
            "multiples of 2 up to 16") in dry.stderr
    assert "data.generator.image_side_px" in dry.stderr  # says why 128 px images do not make a 32 latent side
    out = run_cli(*too_big)
    assert out.returncode == 2 and "larger than the teacher's latent side 16" in out.stderr
    assert "Started a local Ray" not in out.stderr
    assert not (workdir / "mlflow.db").exists() and not (workdir / "shards").exists()
    assert run_cli("--dry-run", *tiny_teacher).returncode == 0  # the tiny preset (sides up to 16) fits

    bundle = [f"teacher.init_bundle={REPO_ROOT / 'assets' / 'tiny-teacher'}", "teacher.num_layers=8"]
    deeper = run_cli("--dry-run", *tiny_teacher, *bundle, "swd.feature_block=6")
    assert deeper.returncode == 2, deeper.stdout + deeper.stderr
    assert "swd.feature_block: 6 is not a block of the teacher, which has 4 blocks" in deeper.stderr
    missing = run_cli("--dry-run", *tiny_teacher, f"teacher.init_bundle={tmp_path / 'no-bundle'}")
    assert missing.returncode == 2
    assert f"teacher.init_bundle {str(tmp_path / 'no-bundle')!r}: no transformer/config.json" in missing.stderr


def test_dry_run_lists_the_keys_not_in_each_fingerprint(workdir):
    out = run_cli("--dry-run", f"workdir={workdir}")
    assert out.returncode == 0, out.stderr
    assert ("not in fingerprint: distill.checkpoint_every_steps, distill.num_checkpoints_to_keep, distill.max_failures, "
            "distill.storage_path, distill.log_every_steps, distill.sample_every_steps, distill.sample_num_prompts") in out.stdout
    assert "teacher.* except pretrained, local_files_only, load_t5, max_sequence_length, dtype" in out.stdout
