"""pipeline/bootstrap.py: paired bootstrap intervals, checked against a hand computation and against
the direct (D x D) Frechet distance on every resample."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import bootstrap as B
from pipeline import metrics as M


def test_percentile_interval_and_mean_resamples_by_hand():
    # 4 prompts, per-prompt adherence 1, 0, 1, 1; three resamples written out by hand
    per_prompt = np.array([1.0, 0.0, 1.0, 1.0])
    idx = np.array([[0, 0, 1, 2], [1, 1, 1, 3], [3, 2, 0, 0]])
    means = B.mean_resamples(per_prompt, idx)
    assert means.tolist() == [0.75, 0.25, 1.0]
    # numpy's linear percentile of [0.25, 0.75, 1.0] at 2.5 and 97.5: 0.25 + 0.05 * 0.5, 0.75 + 0.95 * 0.25
    lo, hi = B.percentile_interval(means)
    assert lo == pytest.approx(0.275) and hi == pytest.approx(0.9875)
    assert B.is_real(0.01, 0.2) and B.is_real(-0.3, -0.1) and not B.is_real(-0.1, 0.2)


def test_resample_indices_are_seeded_and_in_range():
    a, b = B.resample_indices(10, 50, seed=3), B.resample_indices(10, 50, seed=3)
    assert a.shape == (50, 10) and (a == b).all() and a.min() >= 0 and a.max() <= 9
    assert not (a == B.resample_indices(10, 50, seed=4)).all()
    with pytest.raises(ValueError, match="n >= 2"):
        B.resample_indices(1, 5, 0)


@pytest.mark.parametrize("n, dim", [(12, 40), (30, 8)])  # the Gram form (n <= D) and the D x D form
def test_fd_resamples_equal_the_direct_frechet_distance(n, dim):
    rng = np.random.default_rng(0)
    f, r = rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) + 0.5
    idx = B.resample_indices(n, 6, seed=1)
    direct = [M.frechet_distance_of(f[i], r[i]) for i in idx]
    # rank-deficient covariances (n < D): the direct eigen route loses ~1e-8 relative in sqrt of round-off eigenvalues
    np.testing.assert_allclose(B.fd_resamples(f, r, idx), direct, rtol=1e-6, atol=1e-6)
    mu, sigma = M.feature_statistics(rng.normal(size=(50, dim)))  # fixed reference statistics
    direct = [M.frechet_distance(*M.feature_statistics(f[i]), mu, sigma) for i in idx]
    np.testing.assert_allclose(B.fd_resamples(f, (mu, sigma), idx), direct, rtol=1e-6, atol=1e-6)


def test_intervals_names_and_paired_differences():
    resampled = {"student": {"adherence": np.array([0.5, 0.6, 0.7]), "fd": np.array([3.0, 4.0, 5.0])},
                 "teacher": {"adherence": np.array([0.6, 0.8, 0.9]), "fd": np.array([2.0, 2.0, 2.0])}}
    out = B.intervals(resampled, [("student", "teacher"), ("baseline", "student")])
    assert set(out) == {f"{g}_{m}_ci95_{e}" for g in ("student", "teacher") for m in ("adherence", "fd")
                        for e in ("low", "high")} | {f"student_minus_teacher_{m}_ci95_{e}" for m in ("adherence", "fd")
                                                     for e in ("low", "high")}
    # differences per resample: adherence -0.1, -0.2, -0.2; fd 1, 2, 3
    assert out["student_minus_teacher_adherence_ci95_low"] == pytest.approx(np.percentile([-0.1, -0.2, -0.2], 2.5))
    assert out["student_minus_teacher_fd_ci95_high"] == pytest.approx(np.percentile([1.0, 2.0, 3.0], 97.5))


def test_pairing_narrows_the_interval_of_a_difference():
    """Two generators that share the prompts' difficulty: the paired difference's interval is far narrower
    than the unpaired one (independent resamples)."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, 200)
    a = (rng.uniform(0, 1, 200) < difficulty).astype(float)
    b = np.where(rng.uniform(0, 1, 200) < 0.9, a, 1 - a)
    idx = B.resample_indices(200, 500, 0)
    paired = B.percentile_interval(B.mean_resamples(a, idx) - B.mean_resamples(b, idx))
    other = B.resample_indices(200, 500, 1)
    unpaired = B.percentile_interval(B.mean_resamples(a, idx) - B.mean_resamples(b, other))
    assert paired[1] - paired[0] < 0.7 * (unpaired[1] - unpaired[0])
