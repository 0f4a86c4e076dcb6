"""Beyond one ROC curve: subgroups, internal vs external sites, detections (FROC), readers.

* subgroup analysis: the same metrics per group, the largest gap, and a flag when a gap is
  both large (>= ``min_gap``) and statistically credible (its 95% CI excludes zero);
* internal vs external: the AUC difference (unpaired DeLong) and the change of sensitivity and
  specificity at the same threshold;
* FROC: a detection hits a lesion when it lies within the lesion's radius; sensitivity at
  0.5, 1, 2 and 4 false positives per image;
* reader studies: majority vote, Cohen's and Fleiss' kappa, readers next to the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from radguard.evaluation.metrics import (
    EvaluationError,
    check_inputs,
    delong_auc,
    delong_unpaired,
    wilson,
)

__all__ = [
    "cohen_kappa",
    "compare_sites",
    "fleiss_kappa",
    "froc",
    "majority_vote",
    "reader_table",
    "subgroups",
]


def _rates(y: np.ndarray, s: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    pred = s >= threshold
    return (int(np.sum(pred & (y == 1))), int(np.sum(~pred & (y == 1))),
            int(np.sum(~pred & (y == 0))), int(np.sum(pred & (y == 0))))


def subgroups(labels: np.ndarray, scores: np.ndarray, groups: Sequence[object],
              threshold: float, *, min_gap: float = 0.05, min_cases: int = 10
              ) -> dict[str, object]:
    """Per-group AUC, sensitivity and specificity with CIs; the largest gaps and flags."""
    y, s = check_inputs(labels, scores)
    g = np.asarray([str(v) for v in groups])
    if len(g) != len(y):
        raise EvaluationError("the group column does not match the predictions")
    rows: dict[str, dict[str, Any]] = {}  # JSON-shaped
    for name in sorted(set(g)):
        mask = g == name
        yy, ss = y[mask], s[mask]
        tp, fn, tn, fp = _rates(yy, ss, threshold)
        row: dict[str, object] = {
            "n": int(mask.sum()), "positives": int(yy.sum()),
            "sensitivity": wilson(tp, tp + fn).to_dict(),
            "specificity": wilson(tn, tn + fp).to_dict(),
        }
        if yy.min() != yy.max() and mask.sum() >= min_cases:
            row["auc"] = delong_auc(yy, ss).to_dict()
        rows[name] = row
    gaps = {}
    for metric in ("auc", "sensitivity", "specificity"):
        scored = {k: _value(v, metric) for k, v in rows.items()}
        scored = {k: v for k, v in scored.items() if not math.isnan(v)}
        if len(scored) < 2:
            continue
        best, worst = max(scored, key=scored.__getitem__), min(scored, key=scored.__getitem__)
        gap = scored[best] - scored[worst]
        if metric == "auc":
            mb, mw = g == best, g == worst
            diff = delong_unpaired(y[mb], s[mb], y[mw], s[mw])
            low, high = diff["low"], diff["high"]
        else:
            low, high = _proportion_gap_ci(rows[best][metric], rows[worst][metric])
        gaps[metric] = {"best": best, "worst": worst, "gap": gap, "low": low, "high": high,
                        "flag": bool(gap >= min_gap and low > 0)}
    return {"threshold": threshold, "groups": rows, "largest_gaps": gaps}


def _value(row: dict[str, Any], metric: str) -> float:
    if metric not in row:
        return math.nan
    return float(row[metric]["auc"] if metric == "auc" else row[metric]["value"])


def _proportion_gap_ci(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """Newcombe's hybrid-score interval for a difference of two proportions (from their
    Wilson intervals)."""
    pa, pb = a["value"], b["value"]
    if any(math.isnan(v) for v in (pa, pb, a["low"], b["low"])):
        return math.nan, math.nan
    diff = pa - pb
    low = diff - math.sqrt((pa - a["low"]) ** 2 + (b["high"] - pb) ** 2)
    high = diff + math.sqrt((a["high"] - pa) ** 2 + (pb - b["low"]) ** 2)
    return low, high


def compare_sites(internal: tuple[np.ndarray, np.ndarray],
                  external: tuple[np.ndarray, np.ndarray], threshold: float
                  ) -> dict[str, object]:
    """Internal vs external validation at the same operating threshold."""
    (yi, si), (ye, se) = internal, external
    yi, si = check_inputs(yi, si)
    ye, se = check_inputs(ye, se)
    auc_i, auc_e = delong_auc(yi, si), delong_auc(ye, se)
    out: dict[str, object] = {"internal_auc": auc_i.to_dict(), "external_auc": auc_e.to_dict(),
                              "auc_difference": delong_unpaired(yi, si, ye, se)}
    ti, fni, tni, fpi = _rates(yi, si, threshold)
    te, fne, tne, fpe = _rates(ye, se, threshold)
    for name, (ki, ni, ke, ne) in {"sensitivity": (ti, ti + fni, te, te + fne),
                                   "specificity": (tni, tni + fpi, tne, tne + fpe)}.items():
        a, b = wilson(ki, ni), wilson(ke, ne)
        out[name] = {"internal": a.to_dict(), "external": b.to_dict(),
                     "change": b.value - a.value}
    return out


def froc(detections: Sequence[dict[str, Any]], lesions: Sequence[dict[str, Any]], n_images: int,
         fp_rates: Sequence[float] = (0.5, 1, 2, 4)) -> dict[str, object]:
    """Free-response ROC.

    ``detections``: dicts with image, x, y, score. ``lesions``: dicts with image, x, y, radius.
    A detection is a hit if it lies within a not-yet-hit lesion's radius on the same image;
    otherwise it is a false positive.
    """
    if n_images <= 0:
        raise EvaluationError("FROC needs the number of images")
    n_lesions = len(lesions)
    if n_lesions == 0:
        raise EvaluationError("FROC needs at least one lesion")
    by_image: dict[object, list[dict[str, Any]]] = {}
    for lesion in lesions:
        by_image.setdefault(lesion["image"], []).append(lesion)
    ordered = sorted(detections, key=lambda d: -float(d["score"]))
    hit_lesions: set[int] = set()
    points = [(0.0, 0.0, math.inf)]
    fps = 0
    for det in ordered:
        best = None
        for lesion in by_image.get(det["image"], []):
            key = id(lesion)
            if key in hit_lesions:
                continue
            dist = math.hypot(float(det["x"]) - float(lesion["x"]),
                              float(det["y"]) - float(lesion["y"]))
            if dist <= float(lesion["radius"]):
                best = key
                break
        if best is None:
            fps += 1
        else:
            hit_lesions.add(best)
        points.append((fps / n_images, len(hit_lesions) / n_lesions, float(det["score"])))
    fp_axis = np.array([p[0] for p in points])
    sens_axis = np.array([p[1] for p in points])
    at = {}
    for rate in fp_rates:
        reachable = sens_axis[fp_axis <= rate]
        at[str(rate)] = float(reachable.max()) if len(reachable) else 0.0
    return {"fp_per_image": fp_axis.tolist(), "sensitivity": sens_axis.tolist(),
            "sensitivity_at": at, "lesions": n_lesions, "images": n_images}


def majority_vote(reads: np.ndarray) -> np.ndarray:
    """Cases x readers 0/1 -> majority label (ties count as positive: the safe side)."""
    r = np.asarray(reads, dtype=np.float64)
    return (r.mean(axis=1) >= 0.5).astype(np.int64)


def cohen_kappa(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Cohen's kappa of two raters on the same cases (any number of categories)."""
    x, y = np.asarray(a), np.asarray(b)
    if len(x) != len(y) or len(x) == 0:
        raise EvaluationError("kappa needs two equally long, non-empty ratings")
    cats = np.union1d(x, y)
    po = float(np.mean(x == y))
    pe = float(sum(np.mean(x == c) * np.mean(y == c) for c in cats))
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def fleiss_kappa(reads: np.ndarray) -> float:
    """Fleiss' kappa: cases x raters matrix of category labels."""
    r = np.asarray(reads)
    if r.ndim != 2 or r.shape[1] < 2:
        raise EvaluationError("Fleiss' kappa needs a cases x raters table with 2+ raters")
    cats = np.unique(r)
    n_raters = r.shape[1]
    counts = np.stack([(r == c).sum(axis=1) for c in cats], axis=1).astype(np.float64)
    p_j = counts.sum(axis=0) / counts.sum()
    p_i = ((counts**2).sum(axis=1) - n_raters) / (n_raters * (n_raters - 1))
    p_bar, pe = p_i.mean(), float((p_j**2).sum())
    return 1.0 if pe == 1 else float((p_bar - pe) / (1 - pe))


def reader_table(truth: Sequence[int], reads: dict[str, Sequence[int]]
                 ) -> list[dict[str, object]]:
    """Accuracy, sensitivity and specificity (Wilson CIs) per reader or model."""
    y = np.asarray(truth, dtype=np.int64)
    rows = []
    for name, values in reads.items():
        r = np.asarray(values, dtype=np.int64)
        if len(r) != len(y):
            raise EvaluationError(f"reader {name}: {len(r)} reads for {len(y)} cases")
        tp, tn = int(np.sum((r == 1) & (y == 1))), int(np.sum((r == 0) & (y == 0)))
        rows.append({"reader": name, "accuracy": wilson(int(np.sum(r == y)), len(y)).to_dict(),
                     "sensitivity": wilson(tp, int(y.sum())).to_dict(),
                     "specificity": wilson(tn, int((y == 0).sum())).to_dict(),
                     "kappa_vs_truth": cohen_kappa(y, r)})
    return rows
