"""Operating points: which score makes a study "read first", and what each cut-off costs.

Three ways to choose, all on validation predictions (never on the test set):

* ``sensitivity`` - the highest threshold whose sensitivity reaches the target (the usual
  screening choice: "miss at most 5% of cancers");
* ``specificity`` - the lowest threshold whose specificity reaches the target;
* ``cost`` - the threshold minimising expected cost per study,
  ``prevalence * (1 - sens) * cost_ratio + (1 - prevalence) * (1 - spec)``, with
  ``cost_ratio`` = cost of a missed positive / cost of an unnecessary recall or read-first.

The workload table is the seeds' "47% fewer reads, 7% of cancers deprioritised" trade-off for
every suspicion cut-off 1-10.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from radguard.evaluation.metrics import check_inputs, workload_curve
from radguard.triage.scores import SuspicionScale, TriageError

__all__ = ["OperatingPoint", "choose_threshold", "plot_workload", "workload_table"]


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and what it does on the data it was chosen on."""

    threshold: float
    method: str
    sensitivity: float
    specificity: float
    expected_cost: float | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def _rates(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float, float]:
    pred = s >= t
    return float(pred[y == 1].mean()), float((~pred[y == 0]).mean())


def choose_threshold(labels: np.ndarray, scores: np.ndarray, *,
                     sensitivity: float | None = None, specificity: float | None = None,
                     cost_ratio: float | None = None, prevalence: float | None = None
                     ) -> OperatingPoint:
    """Pick a threshold by exactly one criterion (see the module docstring)."""
    chosen = [k for k, v in (("sensitivity", sensitivity), ("specificity", specificity),
                             ("cost", cost_ratio)) if v is not None]
    if len(chosen) != 1:
        raise TriageError("give exactly one of: target sensitivity, target specificity, "
                          "cost ratio")
    y, s = check_inputs(labels, scores)
    cuts = np.unique(s)[::-1]  # descending: sensitivity grows, specificity falls
    pos, neg = s[y == 1], s[y == 0]
    sens = np.array([(pos >= c).mean() for c in cuts])
    spec = np.array([(neg < c).mean() for c in cuts])
    method = chosen[0]
    if method == "sensitivity":
        target = float(sensitivity)  # type: ignore[arg-type]
        if not 0 < target <= 1:
            raise TriageError("target sensitivity must be in (0, 1]")
        i = int(np.argmax(sens >= target - 1e-12))
        return OperatingPoint(float(cuts[i]), method, float(sens[i]), float(spec[i]))
    if method == "specificity":
        target = float(specificity)  # type: ignore[arg-type]
        if not 0 < target <= 1:
            raise TriageError("target specificity must be in (0, 1]")
        ok = np.flatnonzero(spec >= target - 1e-12)
        i = int(ok[-1]) if ok.size else 0
        return OperatingPoint(float(cuts[i]), method, float(sens[i]), float(spec[i]))
    ratio = float(cost_ratio)  # type: ignore[arg-type]
    prev = float(prevalence) if prevalence is not None else float(y.mean())
    if ratio <= 0 or not 0 < prev < 1:
        raise TriageError("cost ratio must be > 0 and prevalence in (0, 1)")
    # 'nobody read first' (threshold above every score) is a candidate too
    cuts = np.r_[np.inf, cuts]
    sens, spec = np.r_[0.0, sens], np.r_[1.0, spec]
    cost = prev * (1 - sens) * ratio + (1 - prev) * (1 - spec)
    i = int(np.argmin(cost))
    return OperatingPoint(float(cuts[i]), method, float(sens[i]), float(spec[i]), float(cost[i]))


def workload_table(labels: np.ndarray, probabilities: np.ndarray,
                   scale: SuspicionScale) -> list[dict[str, float]]:
    """For each suspicion cut-off 2..10: share of studies below it (no longer read first) and
    share of all positives that fall below it (deprioritised)."""
    cutoffs = np.array([scale.lowest_probability(k) for k in range(2, 11)])
    rows = workload_curve(labels, probabilities, cutoffs)
    for k, row in zip(range(2, 11), rows, strict=True):
        row["suspicion_cutoff"] = k
    return rows


def plot_workload(rows: list[dict[str, float]], path: str | os.PathLike[str],
                  title: str = "Workload reduction vs. positives deprioritised") -> None:
    """Both shares against the suspicion cut-off, as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radguard.fileio import atomic_write_bytes

    ks = [r["suspicion_cutoff"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [100 * r["workload_reduction"] for r in rows], "o-",
            label="studies no longer read first")
    ax.plot(ks, [100 * r["positives_deprioritised"] for r in rows], "s-",
            label="positives deprioritised (of all positives)")
    ax.set_xlabel("suspicion cut-off (read first if suspicion >= cut-off)")
    ax.set_ylabel("% of studies / % of positives")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
