"""Every metric against an independent computation (scikit-learn, scipy, brute force,
published worked examples)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from radguard.evaluation import (
    EvaluationError,
    bootstrap_auc,
    calibration,
    cohen_kappa,
    confusion_metrics,
    decision_curve,
    delong_auc,
    delong_paired,
    delong_unpaired,
    fleiss_kappa,
    froc,
    pr_curve,
    roc_curve,
    subgroups,
    wilson,
)


def _data(n=400, shift=1.0, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = rng.normal(0, 1, n) + shift * y
    if ties:
        s = np.round(s, 1)
    return y, s


def _brute_delong(y, scores_list):
    """DeLong et al. 1988 straight from the definition: O(m n) placement values."""
    v10s, v01s, aucs = [], [], []
    for s in scores_list:
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
        aucs.append(psi.mean())
    s10, s01 = np.cov(np.vstack(v10s)), np.cov(np.vstack(v01s))
    m, n = len(v10s[0]), len(v01s[0])
    return np.array(aucs), np.atleast_2d(s10) / m + np.atleast_2d(s01) / n


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_sklearn_and_the_definition(ties):
    y, s = _data(ties=ties)
    result = delong_auc(y, s)
    assert result.auc == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    auc, cov = _brute_delong(y, [s])
    assert result.se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-9)
    z = stats.norm.ppf(0.975)
    assert result.low == pytest.approx(auc[0] - z * result.se, abs=1e-12)


def test_paired_and_unpaired_differences():
    y, s1 = _data(seed=1)
    s2 = s1 + np.random.default_rng(2).normal(0, 1.5, len(s1))
    paired = delong_paired(y, s1, s2)
    auc, cov = _brute_delong(y, [s1, s2])
    assert paired["difference"] == pytest.approx(auc[0] - auc[1], abs=1e-12)
    assert paired["se"] == pytest.approx(math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]),
                                         rel=1e-9)
    assert paired["p_value"] < 0.05  # s2 is s1 plus noise: clearly worse
    y2, s3 = _data(seed=3, shift=0.5)
    unpaired = delong_unpaired(y, s1, y2, s3)
    a, b = delong_auc(y, s1), delong_auc(y2, s3)
    assert unpaired["se"] == pytest.approx(math.hypot(a.se, b.se), rel=1e-12)


def test_bootstrap_agrees_with_delong_within_its_error():
    y, s = _data(n=600, seed=4)
    boot, dl = bootstrap_auc(y, s, n_boot=2000, seed=1), delong_auc(y, s)
    assert abs(boot.low - dl.low) < 0.015 and abs(boot.high - dl.high) < 0.015


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (97, 130), (1, 1000)])
def test_wilson_matches_scipy(k, n):
    ours = wilson(k, n)
    low, high = stats.binomtest(k, n).proportion_ci(method="wilson")
    assert (ours.low, ours.high) == pytest.approx((low, high), abs=1e-9)


def test_confusion_metrics_and_curves_match_sklearn():
    y, s = _data(seed=5, ties=True)
    result = confusion_metrics(y, s, 0.5)
    pred = (s >= 0.5).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (tp, fp, tn, fn)
    assert result["sensitivity"]["value"] == pytest.approx(skm.recall_score(y, pred))
    assert result["ppv"]["value"] == pytest.approx(skm.precision_score(y, pred))
    assert result["f1"]["value"] == pytest.approx(skm.f1_score(y, pred))
    assert result["f1"]["low"] <= result["f1"]["value"] <= result["f1"]["high"]
    roc = roc_curve(y, s)
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(roc["fpr"], fpr) and np.allclose(roc["tpr"], tpr)
    assert pr_curve(y, s)["average_precision"] == pytest.approx(
        skm.average_precision_score(y, s), abs=1e-12)


def test_calibration_and_decision_curve():
    rng = np.random.default_rng(6)
    p = rng.uniform(0, 1, 2000)
    y = (rng.uniform(0, 1, 2000) < p).astype(int)
    cal = calibration(y, p, n_bins=10)
    assert cal["brier"] == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
    frac, mean = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert np.allclose([b["fraction_positive"] for b in cal["bins"]], frac)
    assert np.allclose([b["mean_predicted"] for b in cal["bins"]], mean)
    assert cal["ece"] < 0.05  # calibrated by construction
    dc = decision_curve(y, p, thresholds=np.array([0.2]))
    act = p >= 0.2
    expected = np.sum(act & (y == 1)) / len(y) - np.sum(act & (y == 0)) / len(y) * 0.25
    assert dc["model"][0] == pytest.approx(expected)


def test_kappas_match_sklearn_and_fleiss_worked_example():
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    b[:120] = a[:120]
    assert cohen_kappa(a, b) == pytest.approx(skm.cohen_kappa_score(a, b), abs=1e-12)
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories, kappa 0.210
    counts = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
              [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
              [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    reads = np.array([[c for c, k in enumerate(row) for _ in range(k)] for row in counts])
    assert fleiss_kappa(reads) == pytest.approx(0.2099, abs=5e-4)


def test_froc_counts_hits_within_radius():
    lesions = [{"image": "a", "x": 10, "y": 10, "radius": 5},
               {"image": "b", "x": 50, "y": 50, "radius": 8}]
    detections = [{"image": "a", "x": 12, "y": 11, "score": 0.9},  # hit
                  {"image": "a", "x": 90, "y": 90, "score": 0.8},  # FP
                  {"image": "a", "x": 11, "y": 10, "score": 0.7},  # second hit on a: FP
                  {"image": "b", "x": 55, "y": 52, "score": 0.6}]  # hit
    result = froc(detections, lesions, n_images=2)
    assert result["sensitivity_at"]["0.5"] == 0.5  # one FP on two images = 0.5 FP/image
    assert result["sensitivity_at"]["1"] == 1.0


def test_subgroup_gap_is_flagged_only_when_credible():
    rng = np.random.default_rng(8)
    n = 600
    y = rng.integers(0, 2, n)
    group = np.where(np.arange(n) < n // 2, "site A", "site B")
    strong = rng.normal(0, 1, n) + 2.5 * y
    weak = rng.normal(0, 1, n) + 0.3 * y
    s = np.where(group == "site A", strong, weak)
    result = subgroups(y, s, group, threshold=1.0)
    assert result["largest_gaps"]["auc"]["flag"] is True
    assert result["largest_gaps"]["auc"]["worst"] == "site B"
    same = subgroups(y, strong, group, threshold=1.0)
    assert same["largest_gaps"]["auc"]["flag"] is False


@pytest.mark.parametrize(("labels", "scores", "message"), [
    ([0, 1, 2], [0.1, 0.2, 0.3], "0 or 1"),
    ([1, 1, 1], [0.1, 0.2, 0.3], "only positive"),
    ([0, 1, 0], [0.1, float("nan"), 0.3], "NaN"),
    ([], [], "no cases"),
])
def test_bad_inputs(labels, scores, message):
    with pytest.raises(EvaluationError, match=message):
        delong_auc(np.array(labels), np.array(scores))
