"""`python pipeline/run.py plan`: memory, bytes and time of a run from the config and the teacher's
model configs alone (pipeline/plan.py). Nothing downloads: the profiles' hub teachers are planned from
the public configs shipped under assets/model-configs/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import plan as plan_mod
from stages import load_config

REPO = Path(__file__).resolve().parent.parent
PROFILES = sorted((REPO / "cluster" / "profiles").glob("*.yaml"))
MINIATURE = REPO / "cluster" / "miniature.yaml"


@pytest.fixture(scope="module")
def plans():
    return {p.stem: plan_mod.plan(load_config([p], []), "h100") for p in PROFILES}


def _peak(result, phase="distill generator step"):
    return result["memory"][phase]["peak_gib"]


def test_profiles_exist():
    assert {p.stem for p in PROFILES} >= {"sd35-medium-4step", "sd35-medium-6step", "sd35-large-4step"}


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_fits_its_gpu(profile, plans):
    # every profile's header: "on one node of 8 GPUs (80 GB)", i.e. H100s
    assert "(80 GB)" in profile.read_text().split("\n\n")[0]
    result = plans[profile.stem]
    assert result["fits"], {k: v["peak_gib"] for k, v in result["memory"].items()}
    for name in ("distill fake update", "distill generator step", "cache encoder", "evaluate actor", "synthesize actor"):
        assert 0 < result["memory"][name]["peak_gib"] <= result["gpu"]["limit_gib"]
    assert result["teacher"]["source"].startswith("assets/model-configs/")
    assert result["teacher"]["text_tokens"] == 333   # 77 CLIP + 256 T5 (teacher.max_sequence_length: null)
    assert result["time"]["distill"]["hours"] > 0 and result["time"]["cache"]["hours"] > 0


@pytest.mark.parametrize("configs", [[], *[[p, MINIATURE] for p in PROFILES]],
                         ids=["default", *[f"{p.stem}+miniature" for p in PROFILES]])
def test_default_and_miniatures_plan(configs, capsys):
    assert plan_mod.main([*[a for p in configs for a in ("--config", str(p))], "--json"], load_config) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"]
    assert not result["teacher"]["source"].startswith("assets/model-configs/")  # its own local directory
    assert result["bytes"]["row_bytes"] > 0
    assert result["bytes"]["rows"] is not None   # generated shards: the sample count is known


def test_text_output_and_errors(capsys):
    assert plan_mod.main(["--config", str(PROFILES[0]), "--gpu", "h200", "--mfu", "0.3"], load_config) == 0
    out = capsys.readouterr().out
    for heading in ("## memory per GPU", "## bytes", "## time", "| distill generator step", "H200"):
        assert heading in out
    assert plan_mod.main(["--config", str(PROFILES[0]), "distill.nope=1"], load_config) == 2
    assert "distill.nope" in capsys.readouterr().err
    with pytest.raises(plan_mod.PlanError, match="--mfu"):
        plan_mod.plan(load_config([PROFILES[0]], []), "h100", mfu=0)


def test_a_phase_that_does_not_fit_says_so(capsys):
    code = plan_mod.main(["--config", str(REPO / "cluster/profiles/sd35-large-4step.yaml"), "distill.zero_stage=0",
                          "distill.gradient_checkpointing=false", "distill.batch_size_per_worker=16"], load_config)
    assert code == plan_mod.EXIT_DOES_NOT_FIT
    assert "NO" in capsys.readouterr().out


def _medium(*overrides):
    return plan_mod.plan(load_config([REPO / "cluster/profiles/sd35-medium-4step.yaml"], list(overrides)), "h100")


def test_the_estimate_moves_the_right_way():
    base = _medium()
    no_gc = _medium("distill.gradient_checkpointing=false")
    act = lambda r: sum(v for k, v in r["memory"]["distill generator step"]["lines"].items() if "forward" in k or "MMD" in k)  # noqa: E731
    assert act(no_gc) > 2 * act(base)
    weights = lambda r: sum(v for k, v in r["memory"]["distill generator step"]["lines"].items() if "weights" in k)  # noqa: E731
    assert weights(_medium("distill.zero_stage=3")) < weights(base) / 3
    assert _peak(_medium("swd.loss.mmd_features=teacher")) > _peak(base) + 10
    assert _peak(_medium("swd.stop_at_feature_block=false", "swd.loss.mmd_features=teacher")) > \
        _peak(_medium("swd.loss.mmd_features=teacher"))
    assert _peak(_medium("distill.batch_size_per_worker=4")) < _peak(base)


# The issue's paper estimates (GB) and ours (GiB). Ours measure the saved tensors instead of assuming them,
# count DeepSpeed's full-size reduce buckets and a fixed reserve; the paper figures are rougher. A factor
# of 1.5 either way is what "the same picture" means here: each one would still decide the same GPU.
# Each row also pins the plan's own figure (GiB, within 5%), so a change in the memory model shows here.
PAPER = [(("cluster/profiles/sd35-medium-4step.yaml",), 26, 23.3),
         (("cluster/profiles/sd35-medium-4step.yaml", "swd.loss.mmd_features=teacher"), 63, 52.4),
         (("cluster/profiles/sd35-large-4step.yaml", "swd.loss.mmd_features=teacher", "swd.stop_at_feature_block=false"),
          83, 66.2)]


@pytest.mark.parametrize("args, paper_gb, plan_gib", PAPER, ids=["M-fake", "M-teacher", "L-teacher-no-exit"])
def test_against_the_issues_paper_estimates(args, paper_gb, plan_gib):
    peak = _peak(plan_mod.plan(load_config([REPO / args[0]], list(args[1:])), "h100"))
    # the recorded figures sit within 1.5x of the paper's (23.3/26, 52.4/63, 66.2/83), so pinning them within 5%
    # keeps the plan there too
    assert peak == pytest.approx(plan_gib, rel=0.05), (f"plan {peak:.1f} GiB, recorded {plan_gib} GiB "
                                                       f"(the paper's estimate: {paper_gb} GB)")


def test_cache_bytes_per_row_match_the_layout():
    b = _medium()["bytes"]
    # As stored (pipeline/latent_cache.py): CLIP text 77 x 2048 at its own width + T5 256 x 4096, pooled 2048;
    # z_i at sides 64, 80, 96, 128 and z_im1_i for i > 0 (z_im1_0 is z_0), 16 channels, all bf16.
    assert b["row_text_bytes"] == (77 * 2048 + 256 * 4096 + 2048) * 2
    assert b["row_latent_bytes"] == 16 * 2 * (64**2 + 80**2 + 96**2 + 128**2 + 64**2 + 80**2 + 96**2)
    assert abs(b["row_bytes"] / 1e6 - 4.20) < 0.01      # was the issue's 4.65 MB before the waste went
    assert b["total_bytes"]["200000"] == 200_000 * b["row_bytes"]
    # a step reads one scale's latents and the text: what it uses
    assert b["distill_used_bytes_per_step"] == b["distill_read_bytes_per_step"] < b["row_bytes"] * b["distill_rows_per_step"]


def test_shipped_configs_build_and_match_the_published_sizes():
    from pipeline.bench_models import SD35_MEDIUM

    medium = plan_mod._config(plan_mod.MODEL_CONFIGS / "stabilityai--stable-diffusion-3.5-medium" / "transformer")
    assert medium == SD35_MEDIUM
    large = plan_mod._config(plan_mod.MODEL_CONFIGS / "stabilityai--stable-diffusion-3.5-large" / "transformer")
    assert plan_mod.transformer_counts(medium).total == pytest.approx(2.47e9, rel=0.01)
    assert plan_mod.transformer_counts(large).total == pytest.approx(8.1e9, rel=0.02)
    # the student's LoRA at rank 64 on the released targets: the issue's "at most 211M trainable parameters"
    assert plan_mod.lora_counts(plan_mod.transformer_counts(large), ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                                      "ff.net.2", "ff_context.net.0.proj",
                                                                      "ff_context.net.2"], 64)["params"] < 211e6


def test_flop_model_matches_the_scalewise_cost():
    """The plan's sampling cost equals the bench's FLOP model (pipeline.bench_models.schedule_flops, itself
    checked against torch's FLOP counter in tests/test_swd_bench.py), computed independently."""
    from pipeline.bench_models import schedule_flops
    from pipeline.swd.schedules import PRESETS

    expected = schedule_flops("sd35-medium", PRESETS["sd35-medium-4step"].scales, 333)
    assert _medium()["time"]["student_full_resolution_forwards"] == pytest.approx(expected, rel=0.02)


def test_activation_constants_record_their_command():
    c = plan_mod.constants()
    assert c["command"].startswith("python -m pipeline.plan --measure")
    assert all(abs(v - 1) < 0.02 for v in c["fit_check"]["predicted_over_measured"].values())
    # bf16-mixed LoRA saves an fp32 copy of each adapted layer's input: ~4 bytes per input feature
    assert 3.5 < c["lora_saved_bytes_per_input_feature"]["bf16-mixed"] < 4.5


def test_evaluate_time_includes_the_prompt_set_generation_and_scoring():
    """Issue 17 item 5: the profiles' 5,008-prompt protocol (three scorers per image) is in the plan."""
    from pipeline import plan
    from stages import evaluate

    protocol = evaluate.Config(prompts="coco.csv", inception_weights="w.safetensors", clip_model="c",
                               pickscore_model="p", fid_reference_stats="r.npz")
    assert plan.scoring_flops_per_image(protocol) == plan.INCEPTION_FLOPS + 2 * plan.CLIP_H14_FLOPS
    assert plan.scoring_flops_per_image(evaluate.Config()) == plan.EFFICIENTNET_FLOPS
