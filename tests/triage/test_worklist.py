"""Worklist order with aging, and second-reader discrepancies."""

from __future__ import annotations

import datetime as dt

import pytest

from radguard.triage import Study, TriageError, discrepancies, order_worklist

NOW = dt.datetime(2026, 11, 23, 12, 0)


def _study(uid, minutes_ago, p, suspicion):
    return Study(uid, NOW - dt.timedelta(minutes=minutes_ago), p, suspicion)


def test_critical_first_then_suspicion_with_aging():
    studies = [
        _study("fresh-10", 0, 0.6, 10),
        _study("old-1", 300, 0.01, 1),  # waited 10 aging periods of 30 min
        _study("mid-5", 30, 0.2, 5),
        _study("critical-new", 0, 0.95, 10),
        _study("critical-old", 20, 0.92, 9),
    ]
    order = [s.uid for s in order_worklist(studies, NOW, critical=0.9, aging_minutes=30)]
    assert order[:2] == ["critical-old", "critical-new"]
    # old-1: 1 + 10 = 11 beats fresh-10 (10) and mid-5 (5 + 1 = 6)
    assert order[2:] == ["old-1", "fresh-10", "mid-5"]


def test_nothing_starves():
    """However many suspicious studies keep arriving, a low one reaches the top in bounded
    time: after 9 aging periods it ties with a fresh suspicion-10 study and wins on wait."""
    low = _study("low", 9 * 30, 0.01, 1)
    flood = [_study(f"new{i}", 0, 0.5, 10) for i in range(50)]
    assert order_worklist(flood + [low], NOW, aging_minutes=30)[0].uid == "low"


def test_bad_studies_are_refused():
    with pytest.raises(TriageError):
        _study("x", 0, 1.5, 3)
    with pytest.raises(TriageError):
        _study("x", 0, 0.5, 11)
    with pytest.raises(TriageError):
        order_worklist([], NOW, aging_minutes=0)


def test_second_reader_discrepancies():
    reads = {"a": False, "b": True, "c": False, "d": True}
    probs = {"a": 0.97, "b": 0.02, "c": 0.5, "d": 0.99}
    found = {d.uid: d for d in discrepancies(reads, probs, high=0.9, low=0.05)}
    assert set(found) == {"a", "b"}
    assert not found["a"].read_positive and "read negative" in found["a"].message
