"""Schedules and SwdConfig: the teacher grid, published sigmas, presets, validation messages."""

import pytest
from pydantic import ValidationError

from pipeline.swd.config import SwdConfig, check_against_teacher, check_feature_block
from pipeline.swd.schedules import (PRESETS, boundaries_to_sigmas, check_scales, check_scales_for_patch,
                                    check_sigmas, relative_cost, teacher_sigmas)


@pytest.mark.parametrize("num_steps,shift", [(28, 3.0), (10, 1.0), (40, 5.0), (1, 3.0)])
def test_grid_matches_diffusers_flow_match_euler(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    grid = teacher_sigmas(num_steps, shift)
    assert len(grid) == num_steps + 1 and grid[-1] == 0.0
    assert grid == pytest.approx(scheduler.sigmas.tolist(), abs=1e-6)


def test_published_sigmas_from_grid():
    grid = teacher_sigmas(28, 3.0)
    assert [round(s, 4) for s in boundaries_to_sigmas([0, 7, 14, 18], grid)] == [1.0, 0.8959, 0.7371, 0.6022, 0.0]
    six = boundaries_to_sigmas([0, 4, 7, 12, 14, 18], grid)
    assert [round(s, 4) for s in six] == [1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022, 0.0]


def test_presets_resolve():
    for name, preset in PRESETS.items():
        cfg = SwdConfig(preset=name)
        assert cfg.schedule.scales == list(preset.scales)
        assert cfg.schedule.boundaries == list(preset.boundaries)
        assert len(cfg.schedule.sigmas) == len(preset.scales) + 1
    assert SwdConfig(preset="sd35-medium-6step").schedule.scales == [32, 48, 64, 80, 96, 128]
    assert SwdConfig().schedule.scales == [8, 10, 12, 16]  # default: the embedded tiny teacher
    # The SwD cost argument of SWD.md section 1: about 2.2 full-resolution forwards.
    assert relative_cost([64, 80, 96, 128]) == pytest.approx(2.2, abs=0.01)


def test_config_round_trips_and_explicit_schedules():
    cfg = SwdConfig(preset=None, scales=[64, 80, 96, 128], boundaries=[0, 7, 14, 18])
    again = SwdConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.schedule == cfg.schedule
    assert cfg.schedule.sigmas == SwdConfig(preset="sd35-medium-4step").schedule.sigmas
    explicit = SwdConfig(preset=None, scales=[8, 16], sigmas=[1, 0.7, 0])
    assert explicit.schedule.sigmas == [1.0, 0.7, 0.0] and explicit.schedule.boundaries is None
    # All scales equal: the full-resolution few-step baseline validates.
    baseline = SwdConfig(preset=None, scales=[128] * 4, boundaries=[0, 7, 14, 18])
    assert baseline.schedule.scales == [128, 128, 128, 128]


@pytest.mark.parametrize("raw,match", [
    ({"preset": None, "scales": [64, 80], "sigmas": [1.0, 0.7, 0.5, 0]},
     r"swd.sigmas: \[1.0, 0.7, 0.5, 0.0\] has 4 entries; it needs len\(swd.scales\) \+ 1 = 3"),
    ({"preset": None, "scales": [64, 80, 96], "sigmas": [1.0, 0.5, 0.7, 0]},
     r"swd.sigmas: \[1.0, 0.5, 0.7, 0.0\] must be strictly decreasing from 1 to 0"),
    ({"preset": None, "scales": [64, 80], "sigmas": [0.9, 0.5, 0]}, r"strictly decreasing from 1 to 0"),
    ({"preset": None, "scales": [64, 80], "sigmas": [1.0, 0.5, 0.1]}, r"strictly decreasing from 1 to 0"),
    ({"preset": None, "scales": [96, 64], "boundaries": [0, 7]}, r"swd.scales: \[96, 64\] must be non-decreasing"),
    ({"preset": None, "scales": [0, 64], "boundaries": [0, 7]}, r"swd.scales: \[0, 64\] must be positive"),
    ({"preset": None, "scales": [64, 80], "boundaries": [0, 28]},
     r"swd.boundaries: \[0, 28\] must be strictly increasing grid indices starting at 0 .* \(valid: 0..27\)"),
    ({"preset": None, "scales": [64, 80], "boundaries": [3, 7]}, r"swd.boundaries: \[3, 7\] must be"),
    ({"preset": None, "scales": [64, 80], "boundaries": [0, 7, 14]}, r"swd.boundaries: \[0, 7, 14\] has 3 entries"),
    ({"preset": None, "scales": [64, 80], "boundaries": [0, 7], "sigmas": [1, 0.5, 0]},
     r"give exactly one of them"),
    ({"preset": None, "scales": [64, 80]}, r"give exactly one of them"),
    ({"preset": None}, r"swd.scales: missing"),
    ({"scales": [64, 80], "boundaries": [0, 7]}, r"swd.scales: given together with swd.preset='tiny-4step'"),
    ({"preset": "sd35-huge"}, r"swd.preset: 'sd35-huge' is not a preset; valid: \['sd35-medium-4step'"),
    ({"loss": {"dmd_k_range": [12, 40]}}, r"swd.loss.dmd_k_range: \[12, 40\] must be a half-open range"),
    ({"grid": {"num_steps": 20}}, r"swd.loss.dmd_k_range: \[12, 28\] .* <= swd.grid.num_steps = 20"),
    ({"loss": {"mode": "mmd_only", "mmd_features": "fake"}}, r"swd.loss.mmd_features: 'fake' needs the fake"),
    ({"loss": {"mode": "mmd_only", "mmd_weight": 0}}, r"swd.loss.mmd_weight: 0 leaves swd.loss.mode='mmd_only'"),
    ({"loss": {"mmd_kernel": "cosine"}}, r"mmd_kernel"),
    ({"unknown_key": 1}, r"unknown_key"),
])
def test_config_validation_messages(raw, match):
    with pytest.raises(ValidationError, match=match):
        SwdConfig.model_validate(raw)


def test_schedule_checks_directly():
    with pytest.raises(ValueError, match=r"swd.sigmas: \[1.0, 0.5, 0.7, 0.0\] must be strictly decreasing"):
        check_sigmas([1.0, 0.5, 0.7, 0], 3)
    assert check_scales([16, 16]) == [16, 16]


def test_scales_against_the_teacher():
    check_scales_for_patch([8, 10, 12, 16], patch_size=2, latent_side=16)
    with pytest.raises(ValueError, match=r"swd.scales: \[8, 9, 16\] has sides \[9\] that are not multiples of the "
                                         r"teacher's patch size 2"):
        check_scales_for_patch([8, 9, 16], patch_size=2, latent_side=16)
    with pytest.raises(ValueError, match=r"swd.scales: \[64, 80, 96, 128\] has sides \[96, 128\] larger than the "
                                         r"teacher's latent side 80"):
        check_scales_for_patch([64, 80, 96, 128], patch_size=2, latent_side=80)
    with pytest.raises(ValueError, match=r"swd.feature_block: 11 is not a block of the teacher, which has 4 blocks; "
                                         r"valid: 0..3"):
        check_feature_block(11, 4)
    # Every problem at once.
    with pytest.raises(ValueError, match=r"(?s)larger than the teacher's latent side 8.*swd.feature_block: 11"):
        check_against_teacher(SwdConfig(feature_block=11), patch_size=2, latent_side=8, num_layers=4)
    # The default section fits the embedded tiny teacher (latent 16, patch 2, 4 blocks).
    check_against_teacher(SwdConfig(), patch_size=2, latent_side=16, num_layers=4)
