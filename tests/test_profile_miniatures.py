"""A miniature of every shipped cluster profile, end to end as a user runs it before booking GPUs:
`python pipeline/run.py --config cluster/profiles/<profile>.yaml --config cluster/miniature.yaml`
(the README's laptop command) on the SD3.5-structured miniature teacher (assets/sd35-miniature: T5,
16-channel latents, dual attention), with a real local Ray, 2 CPU DeepSpeed workers (gloo) and a real
MLflow server: shards -> cache -> distill -> evaluate -> register. The exported student loads in stock
diffusers with the T5 encoder present and generates what our sampler does. The overlay may set only
size and hardware keys (stages/__init__.py MINIATURE_KEYS)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import mlflow
import pytest
import yaml

from conftest import REPO_ROOT
from pipeline.config import ConfigError, flatten, miniature_problems
from stages import MINIATURE_KEYS, load_config
from helpers.stock_diffusers import check_export_in_stock_diffusers

OVERLAY = REPO_ROOT / "cluster" / "miniature.yaml"
PROFILES = sorted(p.stem for p in (REPO_ROOT / "cluster" / "profiles").glob("*.yaml"))
STAGES = ("shards", "cache", "distill", "evaluate", "register")
# What a miniature must keep of its profile: everything but the size and hardware keys.
KEPT = ("distill.zero_stage", "distill.gradient_checkpointing", "distill.fake_updates_per_step",
        "distill.lr", "distill.fake_lr", "distill.precision", "teacher.load_t5", "teacher.dtype",
        "teacher.max_sequence_length", "cache.storage_dtype", "swd.stop_at_feature_block", "swd.student",
        "swd.fake", "swd.loss", "swd.grid", "swd.scale_index", "evaluate.teacher_sampler")


def test_the_overlay_sets_only_size_and_hardware_keys():
    layer = yaml.safe_load(OVERLAY.read_text())
    assert miniature_problems(layer, OVERLAY, MINIATURE_KEYS) == []
    assert len(flatten(layer)) > 10  # it does shrink something
    for profile in PROFILES:
        full = flatten(load_config([REPO_ROOT / "cluster" / "profiles" / f"{profile}.yaml"]))
        mini = flatten(load_config([REPO_ROOT / "cluster" / "profiles" / f"{profile}.yaml", OVERLAY]))
        kept = [k for k in full if k.startswith(KEPT)]
        assert kept and {k: mini[k] for k in kept} == {k: full[k] for k in kept}, profile
        # The same number of scales on the miniature's 8x smaller latents.
        cfg = load_config([REPO_ROOT / "cluster" / "profiles" / f"{profile}.yaml", OVERLAY])
        full_cfg = load_config([REPO_ROOT / "cluster" / "profiles" / f"{profile}.yaml"])
        assert [s * 8 for s in cfg.swd.schedule.scales] == full_cfg.swd.schedule.scales
        assert cfg.swd.schedule.sigmas == full_cfg.swd.schedule.sigmas


def test_an_overlay_key_outside_the_allow_list_is_a_config_error(tmp_path):
    bad = tmp_path / "miniature.yaml"
    bad.write_text(OVERLAY.read_text() + "\nswd:\n  loss:\n    guidance_scale: 1.0\n")
    with pytest.raises(ConfigError, match=r"swd.loss.guidance_scale: a miniature overlay .* may set only size and "
                                          r"hardware keys, and swd.loss.guidance_scale is not one"):
        load_config([REPO_ROOT / "cluster" / "profiles" / "sd35-medium-4step.yaml", bad])
    assert "distill.zero_stage" not in MINIATURE_KEYS and "swd.stop_at_feature_block" not in MINIATURE_KEYS


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("profile", PROFILES)
def test_profile_miniature_runs_end_to_end(profile, tmp_path, mlflow_server):
    workdir = tmp_path / "workdir"
    experiment = f"miniature-{profile}-{uuid.uuid4().hex[:6]}"
    cmd = [sys.executable, "pipeline/run.py", "--config", f"cluster/profiles/{profile}.yaml",
           "--config", "cluster/miniature.yaml", f"workdir={workdir}", f"tracking.uri={mlflow_server}",
           f"tracking.experiment={experiment}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=840)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for stage in STAGES:
        assert f"[pipeline] {stage}: done" in log, stage

    cfg = load_config([REPO_ROOT / "cluster" / "profiles" / f"{profile}.yaml", OVERLAY], [f"workdir={workdir}"])
    out = {stage: next((workdir / stage).glob("[0-9a-f]*")) for stage in STAGES}
    # The cache holds T5 prompt embeddings to the T5 tokenizer's limit (32 tokens in the miniature).
    manifest = json.loads((out["cache"] / "cache.json").read_text())
    assert manifest["text"]["t5"] is True and manifest["text"]["max_sequence_length"] == 32
    assert manifest["scales"] == cfg.swd.schedule.scales
    # distill ran the profile's ZeRO stage on 2 workers, every loss finite, the LoRA in fp32 (bf16-mixed).
    summary = json.loads((out["distill"] / "distill.json").read_text())
    assert (summary["zero_stage"], summary["num_workers"], summary["steps"]) == (cfg.distill.zero_stage, 2, 6)
    assert summary["nonfinite_generator"] == 0 and summary["nonfinite_fake"] == 0
    from safetensors.torch import load_file

    lora = load_file(str(out["distill"] / "student" / "pytorch_lora_weights.safetensors"))
    assert lora and all(str(v.dtype) == "torch.float32" for v in lora.values())
    assert not any("add_q_proj" in k or "to_add_out" in k for k in lora)  # the released LoRA targets
    # evaluate and register: metrics, a model version in the registry of the real MLflow server.
    metrics = json.loads((out["evaluate"] / "metrics.json").read_text())["metrics"]
    assert all(metrics[k] == metrics[k] for k in ("student_fd", "teacher_fd", "student_latency_s"))  # not NaN
    client = mlflow.MlflowClient(mlflow_server)
    versions = client.search_model_versions(f"name='{cfg.register.model_name}'")
    assert versions, f"no version of {cfg.register.model_name} registered"

    # The export in stock diffusers, T5 loaded, generates what our sampler does.
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(REPO_ROOT / "assets" / "sd35-miniature", use_safetensors=True,
                                                    local_files_only=True, dtype=torch.float32)
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3.model_max_length == 32
    pipe.set_progress_bar_config(disable=True)
    latents = check_export_in_stock_diffusers(pipe, out["distill"], ["a red circle in the top left",
                                                                     "a large blue square on a white background"],
                                              max_sequence_length=32, lora_effect_atol=0.0)
    assert latents.shape[1] == 16
