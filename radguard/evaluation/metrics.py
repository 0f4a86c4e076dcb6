"""Diagnostic accuracy metrics with confidence intervals, on numpy and scipy alone.

* AUC with DeLong's variance (fast mid-rank algorithm, Sun & Xu 2014), paired (same cases)
  and unpaired (internal vs external) comparisons, and a stratified bootstrap;
* sensitivity, specificity, PPV, NPV, accuracy with Wilson intervals, F1 with a bootstrap;
* ROC and precision-recall curves, calibration (reliability bins, ECE, Brier), decision curves
  (net benefit) and the triage workload curve.

Labels are 0/1 with 1 = positive (disease present); higher scores mean more suspicious.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from radguard.errors import RadguardError

__all__ = [
    "AucResult",
    "EvaluationError",
    "Interval",
    "bootstrap_auc",
    "calibration",
    "check_inputs",
    "confusion_metrics",
    "decision_curve",
    "delong_auc",
    "delong_paired",
    "delong_unpaired",
    "pr_curve",
    "roc_curve",
    "wilson",
    "workload_curve",
]


class EvaluationError(RadguardError):
    """Inputs that cannot be evaluated (one class only, NaN scores, labels not 0/1...)."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class AucResult:
    """AUC with its DeLong standard error and interval."""

    auc: float
    se: float
    low: float
    high: float
    positives: int
    negatives: int

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return asdict(self)


def check_inputs(labels: np.ndarray, scores: np.ndarray, *, need_both: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (labels as int 0/1, scores as float)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise EvaluationError("labels and scores must be two columns of the same length")
    if y.size == 0:
        raise EvaluationError("no cases to evaluate")
    if np.isnan(s).any():
        raise EvaluationError(f"{int(np.isnan(s).sum())} scores are NaN")
    try:
        y_num = y.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise EvaluationError("labels must be 0 or 1") from exc
    if not np.isin(y_num, (0.0, 1.0)).all():
        raise EvaluationError("labels must be 0 or 1 (1 = positive)")
    y_int = y_num.astype(np.int64)
    if need_both and (y_int.min() == y_int.max()):
        which = "positive" if y_int[0] == 1 else "negative"
        raise EvaluationError(f"only {which} cases: AUC, sensitivity and specificity need both")
    return y_int, s


def _z(alpha: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2))


def wilson(successes: int, trials: int, alpha: float = 0.05) -> Interval:
    """Wilson score interval for a proportion (NaN when there are no trials)."""
    if trials == 0:
        return Interval(math.nan, math.nan, math.nan)
    z = _z(alpha)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def case_components(negatives: np.ndarray, positives: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of an AUC, in O(n log n): ``(v_neg, v_pos)``, for each
    negative case the share of positives rated higher (ties one half), for each positive the
    share of negatives rated lower. Both means are the (Wilcoxon) AUC; deleting one case
    changes it by an amount they give exactly (the MRMC jackknife relies on it)."""
    x = np.sort(np.asarray(negatives, dtype=np.float64))
    y = np.sort(np.asarray(positives, dtype=np.float64))
    below = (np.searchsorted(x, positives, "left") + np.searchsorted(x, positives, "right")) / 2
    above = len(y) - (np.searchsorted(y, negatives, "left")
                      + np.searchsorted(y, negatives, "right")) / 2
    return above / len(y), below / len(x)


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components V10 (positives) and V01 (negatives)."""
    v01, v10 = case_components(s[y == 0], s[y == 1])
    return float(v10.mean()), v10, v01


def delong_auc(labels: np.ndarray, scores: np.ndarray, alpha: float = 0.05) -> AucResult:
    """AUC with DeLong's variance and a normal-approximation interval (clipped to [0, 1])."""
    y, s = check_inputs(labels, scores)
    auc, v10, v01 = _placements(y, s)
    m, n = len(v10), len(v01)
    var = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    se = math.sqrt(max(var, 0.0))
    z = _z(alpha)
    return AucResult(auc, se, max(0.0, auc - z * se), min(1.0, auc + z * se), m, n)


def delong_paired(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                  alpha: float = 0.05) -> dict[str, float]:
    """Difference in AUC (a - b) of two models on the same cases, with DeLong's covariance."""
    y, sa = check_inputs(labels, scores_a)
    _, sb = check_inputs(labels, scores_b)
    auc_a, v10a, v01a = _placements(y, sa)
    auc_b, v10b, v01b = _placements(y, sb)
    m, n = len(v10a), len(v01a)
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1]
                                                          - 2 * s01[0, 1]) / n
    return _difference(auc_a - auc_b, var, alpha)


def delong_unpaired(labels_a: np.ndarray, scores_a: np.ndarray, labels_b: np.ndarray,
                    scores_b: np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """Difference in AUC (a - b) between two independent samples (internal vs external)."""
    a = delong_auc(labels_a, scores_a, alpha)
    b = delong_auc(labels_b, scores_b, alpha)
    return _difference(a.auc - b.auc, a.se**2 + b.se**2, alpha)


def _difference(diff: float, var: float, alpha: float) -> dict[str, float]:
    se = math.sqrt(max(var, 0.0))
    z = _z(alpha)
    p = 2 * (1 - stats.norm.cdf(abs(diff) / se)) if se > 0 else (0.0 if diff else 1.0)
    return {"difference": diff, "se": se, "low": diff - z * se, "high": diff + z * se,
            "p_value": float(p)}


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, *, n_boot: int = 2000,
                  alpha: float = 0.05, seed: int = 0) -> Interval:
    """Stratified (positives and negatives resampled separately) percentile bootstrap."""
    y, s = check_inputs(labels, scores)
    rng = np.random.default_rng(seed)
    pos, neg = s[y == 1], s[y == 0]
    values = np.empty(n_boot)
    yy = np.r_[np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)]
    for i in range(n_boot):
        sample = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        values[i] = _placements(yy, sample)[0]
    auc = _placements(y, s)[0]
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return Interval(auc, float(low), float(high))


def confusion_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, *,
                      alpha: float = 0.05, n_boot: int = 1000, seed: int = 0
                      ) -> dict[str, object]:
    """Metrics of the rule "positive if score >= threshold", each with its interval."""
    y, s = check_inputs(labels, scores, need_both=False)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    f1 = _f1(tp, fp, fn)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        p, t = pred[idx], y[idx]
        boots.append(_f1(int(np.sum(p & (t == 1))), int(np.sum(p & (t == 0))),
                         int(np.sum(~p & (t == 1)))))
    boots_arr = np.array([b for b in boots if not math.isnan(b)])
    f1_ci = (Interval(f1, *map(float, np.quantile(boots_arr, [alpha / 2, 1 - alpha / 2])))
             if len(boots_arr) and not math.isnan(f1) else Interval(f1, math.nan, math.nan))
    return {
        "threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity": wilson(tp, tp + fn, alpha).to_dict(),
        "specificity": wilson(tn, tn + fp, alpha).to_dict(),
        "ppv": wilson(tp, tp + fp, alpha).to_dict(),
        "npv": wilson(tn, tn + fn, alpha).to_dict(),
        "accuracy": wilson(tp + tn, len(y), alpha).to_dict(),
        "f1": f1_ci.to_dict(),
    }


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else math.nan


def _cumulative(labels: np.ndarray, scores: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending), true positives and cases at or above each."""
    y, s = check_inputs(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s_sorted) - 1]
    return s_sorted[distinct], np.cumsum(y_sorted)[distinct], distinct + 1


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """False/true positive rates at every distinct threshold (descending)."""
    thresholds, tps, predicted = _cumulative(labels, scores)
    fps = predicted - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
            "thresholds": np.r_[np.inf, thresholds].tolist()}


def pr_curve(labels: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """Precision and recall at every distinct threshold, and average precision."""
    _thresholds, tps, predicted = _cumulative(labels, scores)
    precision = tps / predicted
    recall = tps / tps[-1]
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return {"precision": precision.tolist(), "recall": recall.tolist(),
            "average_precision": ap}


def calibration(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 10
                ) -> dict[str, object]:
    """Reliability diagram (equal-width bins), expected calibration error and Brier score."""
    y, p = check_inputs(labels, probabilities, need_both=False)
    if p.min() < 0 or p.max() > 1:
        raise EvaluationError("calibration needs probabilities in [0, 1]")
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    bins = []
    ece = 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        if count:
            mean_p, frac = float(p[mask].mean()), float(y[mask].mean())
            ece += count / len(y) * abs(mean_p - frac)
            bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                         "mean_predicted": mean_p, "fraction_positive": frac})
    return {"bins": bins, "ece": ece, "brier": float(np.mean((p - y) ** 2))}


def decision_curve(labels: np.ndarray, probabilities: np.ndarray,
                   thresholds: np.ndarray | None = None) -> dict[str, list[float]]:
    """Net benefit of acting on the model, on everyone, on no one (Vickers & Elkin 2006)."""
    y, p = check_inputs(labels, probabilities, need_both=False)
    ts = np.linspace(0.01, 0.99, 99) if thresholds is None else np.asarray(thresholds)
    n = len(y)
    prevalence = y.mean()
    model, treat_all = [], []
    for t in ts:
        act = p >= t
        tp, fp = np.sum(act & (y == 1)), np.sum(act & (y == 0))
        w = t / (1 - t)
        model.append(float(tp / n - fp / n * w))
        treat_all.append(float(prevalence - (1 - prevalence) * w))
    return {"thresholds": ts.tolist(), "model": model, "treat_all": treat_all,
            "treat_none": [0.0] * len(ts)}


def workload_curve(labels: np.ndarray, scores: np.ndarray,
                   cutoffs: np.ndarray | None = None) -> list[dict[str, float]]:
    """For each cut-off: share of studies a radiologist no longer reads first (score below
    the cut-off) and share of positives that would be deprioritised with them."""
    y, s = check_inputs(labels, scores, need_both=False)
    cuts = np.unique(np.quantile(s, np.linspace(0, 1, 11))) if cutoffs is None else cutoffs
    n_pos = max(int(y.sum()), 1)
    rows = []
    for c in cuts:
        low = s < c
        rows.append({"cutoff": float(c), "workload_reduction": float(low.mean()),
                     "positives_deprioritised": float(np.sum(low & (y == 1)) / n_pos)})
    return rows
