"""From raw model output to numbers a worklist can use.

* :class:`Calibrator` - Platt scaling (a logistic fit of the label on the raw score), so a
  probability of 0.3 means about 30% of such studies are positive on the calibration site;
* :class:`SuspicionScale` - a 1-10 suspicion score from the deciles of a reference
  population, as commercial mammography triage systems report (10 = the top 10% most
  suspicious studies of the reference population).

Both fit on validation data (sklearn-style ``fit`` / transform methods) and round-trip
through plain dicts so they ship beside model weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from radguard.errors import RadguardError
from radguard.evaluation.metrics import check_inputs

__all__ = ["Calibrator", "SuspicionScale", "TriageError"]


class TriageError(RadguardError):
    """Triage input or configuration that cannot be used."""


@dataclass
class Calibrator:
    """Platt scaling: p = 1 / (1 + exp(-(a * score + b)))."""

    a: float = 1.0
    b: float = 0.0

    def fit(self, scores: np.ndarray, labels: np.ndarray, *, iterations: int = 100
            ) -> Calibrator:
        """Maximum-likelihood a, b by Newton's method, with Platt's smoothed targets so that
        separable data does not drive the slope to infinity."""
        y, s = check_inputs(labels, scores)
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
        a, b = 0.0, float(np.log((n_pos + 1) / (n_neg + 1)))
        for _ in range(iterations):
            p = 1 / (1 + np.exp(-(a * s + b)))
            w = p * (1 - p) + 1e-12
            grad = np.array([np.sum((p - target) * s), np.sum(p - target)])
            hess = np.array([[np.sum(w * s * s), np.sum(w * s)], [np.sum(w * s), np.sum(w)]])
            hess += np.eye(2) * 1e-9
            step = np.linalg.solve(hess, grad)
            a, b = a - float(step[0]), b - float(step[1])
            if np.abs(step).max() < 1e-10:
                break
        self.a, self.b = a, b
        return self

    def predict(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities."""
        z = self.a * np.asarray(scores, dtype=np.float64) + self.b
        return 1 / (1 + np.exp(-np.clip(z, -500, 500)))

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form."""
        return {"a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Calibrator:
        try:
            return cls(float(data["a"]), float(data["b"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TriageError(f"malformed calibrator ({exc})") from exc


@dataclass
class SuspicionScale:
    """1-10 suspicion from the deciles of a reference population's probabilities."""

    edges: list[float] = field(default_factory=list)  # 9 inner decile boundaries, ascending

    def fit(self, probabilities: np.ndarray) -> SuspicionScale:
        p = np.asarray(probabilities, dtype=np.float64)
        if p.ndim != 1 or len(p) < 10 or not np.isfinite(p).all():
            raise TriageError("a suspicion scale needs at least 10 finite reference scores")
        self.edges = [float(e) for e in np.quantile(p, np.linspace(0.1, 0.9, 9))]
        return self

    def score(self, probabilities: np.ndarray | float) -> np.ndarray:
        """Suspicion 1..10: how many reference deciles the probability reaches, plus one."""
        if len(self.edges) != 9:
            raise TriageError("suspicion scale is not fitted")
        return np.searchsorted(np.asarray(self.edges), np.asarray(probabilities), side="right") + 1

    def lowest_probability(self, suspicion: int) -> float:
        """The smallest probability that earns ``suspicion`` (for cut-off tables)."""
        if not 1 <= suspicion <= 10:
            raise TriageError(f"suspicion must be 1..10, not {suspicion}")
        return 0.0 if suspicion == 1 else self.edges[suspicion - 2]

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready form."""
        return {"edges": self.edges}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> SuspicionScale:
        try:
            edges = [float(e) for e in data["edges"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise TriageError(f"malformed suspicion scale ({exc})") from exc
        if len(edges) != 9 or edges != sorted(edges):
            raise TriageError("suspicion scale needs 9 ascending decile edges")
        return cls(edges)
