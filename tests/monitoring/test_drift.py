"""Drift statistics against scipy / direct computations, and the CUSUM's false-alarm budget."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from radguard.monitoring import (
    Cusum,
    NormalScorer,
    calibrate_threshold,
    chi2_test,
    ks_test,
    mmd_test,
    psi,
)


def test_ks_and_chi2_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 300), rng.normal(0.3, 1, 200)
    ours = ks_test(a, b)
    ref = stats.ks_2samp(a, b)
    assert ours["statistic"] == pytest.approx(ref.statistic)
    assert ours["p_value"] == pytest.approx(ref.pvalue)
    x = ["GE"] * 50 + ["Philips"] * 30 + ["Agfa"] * 20
    y = ["GE"] * 20 + ["Philips"] * 30 + ["Agfa"] * 50
    table = np.array([[20, 50, 30], [50, 20, 30]])  # rows: x, y; columns: Agfa, GE, Philips
    expected = stats.chi2_contingency(table)
    assert chi2_test(x, y)["statistic"] == pytest.approx(expected[0])
    assert chi2_test(x, x)["p_value"] == pytest.approx(1.0)


def test_psi_by_hand():
    ref = np.arange(1000, dtype=float)
    same = psi(ref, ref)
    assert same == pytest.approx(0.0, abs=1e-9)
    shifted = psi(ref, ref[:500])  # all mass in the lower half of the deciles
    r, c = np.full(10, 0.1), np.r_[np.full(5, 0.2), np.full(5, 1e-6)]
    assert shifted == pytest.approx(np.sum((c - r) * np.log(c / r)), rel=1e-3)


def test_mmd_separates_shifted_embeddings_only():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (80, 8)), rng.normal(0, 1, (80, 8))
    c = rng.normal(0.8, 1, (80, 8))
    assert mmd_test(a, b)["p_value"] > 0.05
    assert mmd_test(a, c)["p_value"] < 0.01


def test_normal_scores_are_standard_normal_on_the_reference_distribution():
    rng = np.random.default_rng(2)
    ref = rng.exponential(2.0, (5000, 1))  # skewed: why normal scores beat raw z-scores
    z = NormalScorer.fit(ref).transform(rng.exponential(2.0, (5000, 1)))[:, 0]
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05


def test_calibrated_cusum_keeps_its_false_alarm_budget_and_detects_shifts():
    rng = np.random.default_rng(3)
    reference = rng.normal(0, 1, (2000, 6))
    h = calibrate_threshold(reference, false_alarms_per=1_000, length=40_000)
    detector = Cusum(h=h)
    alarms = sum(len(detector.update(z)) for z in rng.normal(0, 1, (20_000, 6)))
    assert alarms <= 20  # budget: 1 per 1,000 studies
    shifted = Cusum(h=h)
    delay = next(i for i, z in enumerate(rng.normal(1.5, 1, (200, 6))) if shifted.update(z).size)
    assert delay < 15


def test_image_features_per_level_equal_the_per_pixel_definition():
    """Integer images take a per-level shortcut (histogram, percentiles); the features must
    be the numbers the plain per-pixel definition gives, or a monitor fitted on one would
    drift against the other."""
    from radguard.monitoring.features import image_features

    def reference(img, peak, offset=0.0):
        small = (np.asarray(img, np.float64)[:: max(1, img.shape[1] // 256),
                                             :: max(1, img.shape[1] // 256)] - offset) / peak
        hist = np.histogram(small, bins=64, range=(0.0, 1.0))[0].astype(np.float64)
        prob = hist[hist > 0] / hist.sum()
        p05, p50, p95 = np.percentile(small, [5, 50, 95])
        return p05, p50, p95, float(-(prob * np.log2(prob)).sum()), float(small.mean())

    rng = np.random.default_rng(9)
    for dtype, high, offset, peak in ((np.uint8, 256, 0.0, 255.0), (np.uint16, 4096, 0.0, 4095.0),
                                      (np.int16, 3000, -1000.0, 4095.0)):
        img = (rng.integers(0, high, (333, 515)) + (offset if dtype == np.int16 else 0)
               ).astype(dtype)
        got = image_features(img, peak, offset=offset)
        assert (got["p05"], got["p50"], got["p95"], got["entropy"], got["mean"]) == \
            reference(img, peak, offset)
