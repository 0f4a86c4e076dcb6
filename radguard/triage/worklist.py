"""Worklist order and second-reader discrepancies.

Order (documented aging rule, so nothing starves):

1. **critical** studies first (the model's probability at or above the critical threshold),
   oldest first among them;
2. then by *priority* = suspicion (1-10) + minutes waited / ``aging_minutes``: every
   ``aging_minutes`` of waiting is worth one suspicion level, so a suspicion-1 study that has
   waited 9 aging periods ranks with a fresh suspicion-10 one; ties go to the longer wait.

A second-reader discrepancy is a finished report that disagrees with a confident model:
read negative while the probability is at or above ``high``, or read positive while it is at
or below ``low``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from radguard.triage.scores import TriageError

__all__ = ["Discrepancy", "Study", "discrepancies", "order_worklist"]


@dataclass(frozen=True)
class Study:
    """One study waiting to be read."""

    uid: str
    arrived: dt.datetime
    probability: float
    suspicion: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise TriageError(f"study {self.uid}: probability {self.probability} not in [0, 1]")
        if not 1 <= self.suspicion <= 10:
            raise TriageError(f"study {self.uid}: suspicion {self.suspicion} not in 1..10")


def order_worklist(studies: list[Study], now: dt.datetime, *, critical: float = 0.9,
                   aging_minutes: float = 30.0) -> list[Study]:
    """Studies in reading order (see the module docstring)."""
    if aging_minutes <= 0:
        raise TriageError("aging_minutes must be positive")

    def key(s: Study) -> tuple[int, float, float]:
        waited = max(0.0, (now - s.arrived).total_seconds() / 60.0)
        if s.probability >= critical:
            return (0, -waited, 0.0)
        return (1, -(s.suspicion + waited / aging_minutes), -waited)

    return sorted(studies, key=key)


@dataclass(frozen=True)
class Discrepancy:
    """A finished read the model disagrees with confidently."""

    uid: str
    read_positive: bool
    probability: float
    message: str


def discrepancies(reads: dict[str, bool], probabilities: dict[str, float], *,
                  high: float = 0.9, low: float = 0.05) -> list[Discrepancy]:
    """Finished reads (uid -> read positive?) that a confident model output contradicts."""
    if not 0 <= low < high <= 1:
        raise TriageError("need 0 <= low < high <= 1")
    out = []
    for uid, positive in reads.items():
        p = probabilities.get(uid)
        if p is None:
            continue
        if not positive and p >= high:
            out.append(Discrepancy(uid, False, p, f"read negative, model probability {p:.2f}"))
        elif positive and p <= low:
            out.append(Discrepancy(uid, True, p, f"read positive, model probability {p:.2f}"))
    return out
