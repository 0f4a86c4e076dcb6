"""Calibration, suspicion deciles, operating points and the workload table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from radguard.cli import main
from radguard.triage import (
    Calibrator,
    SuspicionScale,
    TriageError,
    choose_threshold,
    plot_workload,
    workload_table,
)


@pytest.fixture(scope="module")
def validation():
    """Scores of a model with a known link: P(positive | score) = sigmoid(2 * score - 1)."""
    rng = np.random.default_rng(3)
    scores = rng.normal(0, 1.5, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-(2 * scores - 1)))).astype(int)
    return scores, labels


def test_platt_scaling_recovers_the_true_link(validation):
    scores, labels = validation
    cal = Calibrator().fit(scores, labels)
    assert cal.a == pytest.approx(2.0, abs=0.25) and cal.b == pytest.approx(-1.0, abs=0.2)
    p = cal.predict(scores)
    for lo, hi in ((0.1, 0.3), (0.4, 0.6), (0.7, 0.9)):
        sel = (p >= lo) & (p < hi)
        assert labels[sel].mean() == pytest.approx(p[sel].mean(), abs=0.05)
    assert Calibrator.from_dict(json.loads(json.dumps(cal.to_dict()))) == cal


def test_separable_data_keeps_a_finite_slope():
    cal = Calibrator().fit(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert np.isfinite(cal.a) and 0 < cal.predict(np.array([0.0]))[0] < 0.5


def test_suspicion_deciles(validation):
    scores, _ = validation
    scale = SuspicionScale().fit(scores)
    levels = scale.score(scores)
    counts = np.bincount(levels, minlength=11)[1:]
    assert levels.min() == 1 and levels.max() == 10
    assert np.all(np.abs(counts - 400) <= 2)  # each level holds a tenth of the reference
    assert scale.score(scale.lowest_probability(7)) == 7
    assert SuspicionScale.from_dict(scale.to_dict()) == scale
    with pytest.raises(TriageError):
        SuspicionScale.from_dict({"edges": [3, 2, 1]})
    with pytest.raises(TriageError):
        SuspicionScale().fit(np.array([0.1, np.nan] * 10))


def test_threshold_by_sensitivity_and_specificity(validation):
    scores, labels = validation
    sens = choose_threshold(labels, scores, sensitivity=0.95)
    assert sens.sensitivity >= 0.95
    assert (scores[labels == 1] >= sens.threshold).mean() == pytest.approx(sens.sensitivity)
    # the highest such threshold: one step up loses the target
    above = np.unique(scores)[np.unique(scores) > sens.threshold][0]
    assert (scores[labels == 1] >= above).mean() < 0.95
    spec = choose_threshold(labels, scores, specificity=0.9)
    assert spec.specificity >= 0.9 and spec.threshold > sens.threshold


def test_cost_threshold_moves_with_the_cost_ratio(validation):
    scores, labels = validation
    cheap = choose_threshold(labels, scores, cost_ratio=1.0, prevalence=0.1)
    dear = choose_threshold(labels, scores, cost_ratio=50.0, prevalence=0.1)
    assert dear.threshold < cheap.threshold  # missing a positive costs more: read more first
    assert dear.sensitivity > cheap.sensitivity
    # brute force agrees with the chosen minimum
    costs = [0.1 * (1 - (scores[labels == 1] >= t).mean()) * 50
             + 0.9 * (scores[labels == 0] >= t).mean() for t in np.unique(scores)]
    assert dear.expected_cost == pytest.approx(min(min(costs), 0.1 * 50))


def test_one_criterion_only(validation):
    scores, labels = validation
    with pytest.raises(TriageError, match="exactly one"):
        choose_threshold(labels, scores, sensitivity=0.9, specificity=0.9)
    with pytest.raises(TriageError, match="exactly one"):
        choose_threshold(labels, scores)
    with pytest.raises(TriageError):
        choose_threshold(labels, scores, sensitivity=1.5)


def test_workload_table_and_plot(validation, tmp_path):
    scores, labels = validation
    rows = workload_table(labels, scores, SuspicionScale().fit(scores))
    assert [r["suspicion_cutoff"] for r in rows] == list(range(2, 11))
    reduction = [r["workload_reduction"] for r in rows]
    missed = [r["positives_deprioritised"] for r in rows]
    assert reduction == sorted(reduction) and missed == sorted(missed)
    assert reduction[0] == pytest.approx(0.1, abs=0.01) and reduction[-1] == pytest.approx(0.9,
                                                                                          abs=0.01)
    assert all(m < r for m, r in zip(missed, reduction, strict=True))  # better than chance
    plot_workload(rows, tmp_path / "w.png")
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_threshold(validation, tmp_path):
    scores, labels = validation
    csv = tmp_path / "val.csv"
    csv.write_text("id,score,label\n" + "".join(f"s{i},{s},{y}\n" for i, (s, y)
                                                  in enumerate(zip(scores, labels, strict=True))))
    result = CliRunner().invoke(main, ["triage", "threshold", str(csv), "--cost-ratio", "20",
                                       "--prevalence", "0.05", "--plot", str(tmp_path / "p.png"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["operating_point"]["method"] == "cost" and len(data["workload"]) == 9
    bad = CliRunner().invoke(main, ["triage", "threshold", str(csv)])
    assert bad.exit_code != 0 and "exactly one" in bad.output and "Traceback" not in bad.output
