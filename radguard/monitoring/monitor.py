"""The monitoring service: reference, per-study updates, alarms, all persisted in SQLite.

``Monitor.observe`` is what the gateway calls for every study: the study's features (image
statistics, the model's score) become normal scores against the reference, two-sided CUSUMs
per site raise alarms within a false-alarm budget, and everything is written to SQLite in the
same transaction, so a restart resumes exactly where it stopped. ``Monitor.add_label`` takes
the radiologist's late label: a one-sided CUSUM on the per-study Brier loss catches
performance decay. ``Monitor.status`` adds window tests (KS, PSI), rolling metrics with CIs
and label-free estimates from calibrated scores (CBPE-style) before labels arrive.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from radguard.errors import RadguardError
from radguard.evaluation.metrics import EvaluationError, delong_auc, wilson
from radguard.monitoring.drift import (
    Cusum,
    NormalScorer,
    calibrate_threshold,
    chi2_test,
    ks_test,
    psi,
)

__all__ = ["Alarm", "Monitor", "MonitorError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reference (name TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cusum (site TEXT, detector TEXT, upper TEXT, lower TEXT,
                                  PRIMARY KEY (site, detector));
CREATE TABLE IF NOT EXISTS studies (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, site TEXT,
                                    ts TEXT, features TEXT, score REAL, label INTEGER);
CREATE TABLE IF NOT EXISTS alarms (id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT, seq INTEGER,
                                   site TEXT, detector TEXT, feature TEXT, direction TEXT,
                                   study_id TEXT);
CREATE TABLE IF NOT EXISTS categories (site TEXT, field TEXT, value TEXT,
                                       PRIMARY KEY (site, field, value));
"""
_MIGRATIONS = [  # (table, column, declaration): columns added after the first release
    ("studies", "metadata", "TEXT"),
]


class MonitorError(RadguardError):
    """Monitoring cannot proceed (no reference, unknown feature, bad values)."""


@dataclass(frozen=True)
class Alarm:
    """A sequential detector crossed its threshold."""

    seq: int
    site: str
    detector: str  # "drift" or "performance"
    feature: str
    direction: str  # "up" or "down"
    study_id: str

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


def _halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(12345).permutation(n)
    return order[: n // 2], order[n // 2 :]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


T = TypeVar("T")


def _serialised(method: Callable[..., T]) -> Callable[..., T]:
    """Run a Monitor method under its lock: one gateway shares a monitor between its
    worker threads, and a study's update (read CUSUM, write study, write CUSUM) must not
    interleave with another's."""

    @functools.wraps(method)
    def locked(self: Monitor, *args: object, **kwargs: object) -> T:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Monitor:
    """A persistent monitor over one SQLite file (created on first use). Safe to share
    between threads: its methods take turns."""

    def __init__(self, db_path: str | os.PathLike[str], *,
                 audit_log: object | None = None) -> None:
        """``audit_log`` (an object with ``append(action, target, details)``, such as
        :class:`radguard.governance.AuditLog`) receives every alarm as it is raised."""
        self.path = Path(db_path)
        self.audit_log = audit_log
        self._lock = threading.RLock()
        try:
            # shared by the threads that call it (under self._lock), not bound to the opener
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            for table, column, decl in _MIGRATIONS:
                have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        except sqlite3.DatabaseError as exc:
            raise MonitorError(f"{self.path}: not a usable monitoring database ({exc})") from exc
        self._load()

    # -- reference -------------------------------------------------------------------------
    @_serialised
    def fit_reference(self, features: np.ndarray, names: list[str], *,
                      scores: np.ndarray | None = None, labels: np.ndarray | None = None,
                      metadata: list[dict[str, str]] | None = None,
                      false_alarms_per: float = 10_000, k: float = 0.75) -> dict[str, float]:
        """Learn the reference window and calibrate the alarm thresholds.

        Half of the false-alarm budget goes to drift (all features together) and half to
        performance decay (when reference labels and scores are given). The allowance ``k``
        (in standard deviations) sets the smallest shift worth an alarm: 0.75 ignores the
        offsets of a few tenths of a standard deviation that any two samples of one population
        show, and still catches a shift of 2 standard deviations within a handful of studies.
        """
        x = np.asarray(features, float)
        if x.ndim != 2 or x.shape[1] != len(names) or len(x) < 50:
            raise MonitorError("the reference needs at least 50 studies with every feature")
        if not np.isfinite(x).all():
            raise MonitorError("the reference holds NaN or infinite feature values")
        columns = list(names)
        if scores is not None:
            x = np.column_stack([x, np.asarray(scores, float)])
            columns.append("score")
        scorer = NormalScorer.fit(x)
        # Cross-fitted calibration: new studies are scored against a finite reference, so
        # simulate exactly that - score each half of the reference against the other half
        # (a reference half the size makes the threshold conservative).
        first, second = _halves(len(x))
        out_of_fold = [NormalScorer.fit(x[first]).transform(x[second]),
                       NormalScorer.fit(x[second]).transform(x[first])]
        h = calibrate_threshold(out_of_fold, false_alarms_per=2 * false_alarms_per, k=k)
        meta: dict[str, object] = {"names": columns, "k": k, "h": h,
                                   "false_alarms_per": false_alarms_per, "fitted": _now()}
        if metadata:
            fields = sorted({f for row in metadata for f in row})
            meta["metadata"] = {f: [str(row.get(f, "")) for row in metadata] for f in fields}
        if labels is not None and scores is not None:
            y = np.asarray(labels, float)
            loss = (np.asarray(scores, float) - y) ** 2
            meta["loss_mean"], meta["loss_std"] = float(loss.mean()), float(loss.std() or 1e-6)
            folds = [((loss[second] - loss[first].mean()) / (loss[first].std() or 1e-6))[:, None],
                     ((loss[first] - loss[second].mean()) / (loss[second].std() or 1e-6))[:, None]]
            meta["h_performance"] = calibrate_threshold(folds, k=k,
                                                        false_alarms_per=2 * false_alarms_per)
            meta["reference_auc"] = delong_auc(y, scores).auc
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM reference")
            self.db.execute("DELETE FROM cusum")
            self.db.execute("DELETE FROM categories")
            for j, name in enumerate(columns):
                self.db.execute("INSERT INTO reference VALUES (?, ?)",
                                (name, scorer.sorted_reference[:, j].tobytes()))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (json.dumps(meta),))
        self._load()
        return {"h": h, "h_performance": float(meta.get("h_performance", float("nan")))}

    def _load(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        self.meta: dict[str, object] = json.loads(row[0]) if row else {}
        self.scorer: NormalScorer | None = None
        if self.meta:
            names = self.meta["names"]
            data = dict(self.db.execute("SELECT name, data FROM reference").fetchall())
            self.scorer = NormalScorer(np.column_stack([np.frombuffer(data[n]) for n in names]))
        seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM studies").fetchone()[0]
        self.seq = int(seq)

    def _require(self) -> NormalScorer:
        if self.scorer is None:
            raise MonitorError(f"{self.path}: no reference yet (run 'radguard monitor init')")
        return self.scorer

    def _cusum(self, site: str, detector: str, h: float) -> Cusum:
        row = self.db.execute("SELECT upper, lower FROM cusum WHERE site=? AND detector=?",
                              (site, detector)).fetchone()
        c = Cusum(k=float(self.meta["k"]), h=h)
        if row:
            c.upper, c.lower = np.array(json.loads(row[0])), np.array(json.loads(row[1]))
        return c

    def _save_cusum(self, site: str, detector: str, c: Cusum) -> None:
        self.db.execute("INSERT OR REPLACE INTO cusum VALUES (?, ?, ?, ?)",
                        (site, detector, json.dumps(c.upper.tolist()),
                         json.dumps(c.lower.tolist())))

    # -- per study ---------------------------------------------------------------------------
    @_serialised
    def observe(self, study_id: str, features: dict[str, float], *, score: float | None = None,
                site: str = "default", metadata: dict[str, str] | None = None
                ) -> list[Alarm]:
        """Record one study; returns the alarms it raised.

        ``metadata`` (manufacturer, model, protocol, view...) raises a "new value" alarm the
        first time a site shows a value the reference never had: a new scanner or protocol.
        """
        scorer = self._require()
        names = list(self.meta["names"])
        values = dict(features)
        if "score" in names:
            if score is None:
                raise MonitorError("the reference includes model scores: give the study's score")
            values["score"] = score
        missing = [n for n in names if n not in values]
        if missing:
            raise MonitorError(f"study {study_id}: missing feature(s) {', '.join(missing)}")
        try:
            row = np.array([float(values[n]) for n in names])
        except (TypeError, ValueError) as exc:
            raise MonitorError(f"study {study_id}: a feature is not a number") from exc
        if not np.isfinite(row).all():
            raise MonitorError(f"study {study_id}: NaN or infinite feature value")
        z = scorer.transform(row)[0]
        alarms = []
        with self.db:
            self.db.execute("BEGIN")
            if self.db.execute("SELECT 1 FROM studies WHERE id=?", (study_id,)).fetchone():
                raise MonitorError(f"study {study_id} was already observed")
            self.seq += 1
            self.db.execute("INSERT INTO studies (id, seq, site, ts, features, score, label, "
                            "metadata) VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                            (study_id, self.seq, site, _now(), json.dumps(values), score,
                             json.dumps(metadata or {})))
            known = self.meta.get("metadata") or {}
            for name, value in (metadata or {}).items():
                value = str(value)
                if name not in known or value in known[name]:
                    continue
                seen = self.db.execute("SELECT 1 FROM categories WHERE site=? AND field=? AND "
                                       "value=?", (site, name, value)).fetchone()
                if not seen:
                    self.db.execute("INSERT INTO categories VALUES (?, ?, ?)",
                                    (site, name, value))
                    alarms.append(self._alarm(site, "metadata", f"{name}={value}", "new",
                                              study_id))
            detector = self._cusum(site, "drift", float(self.meta["h"]))
            up_before = detector.upper.copy() if detector.upper.size else np.zeros(len(names))
            hits = detector.update(z)
            for j in hits:
                direction = "up" if up_before[j] + z[j] - detector.k > detector.h else "down"
                alarms.append(self._alarm(site, "drift", names[j], direction, study_id))
            self._save_cusum(site, "drift", detector)
        return alarms

    @_serialised
    def add_label(self, study_id: str, label: int) -> list[Alarm]:
        """Record the late ground truth of an observed study; performance alarms, if any."""
        if label not in (0, 1):
            raise MonitorError("labels must be 0 or 1")
        row = self.db.execute("SELECT site, score FROM studies WHERE id=?",
                              (study_id,)).fetchone()
        if row is None:
            raise MonitorError(f"study {study_id} was never observed")
        site, score = row
        alarms = []
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("UPDATE studies SET label=? WHERE id=?", (int(label), study_id))
            if "h_performance" in self.meta and score is not None:
                loss = (float(score) - label) ** 2
                z = (loss - float(self.meta["loss_mean"])) / float(self.meta["loss_std"])
                detector = self._cusum(site, "performance", float(self.meta["h_performance"]))
                if detector.update(np.array([z])).size:
                    alarms.append(self._alarm(site, "performance", "brier loss", "up",
                                              study_id))
                detector.lower[:] = 0.0  # one-sided: only a worsening loss matters
                self._save_cusum(site, "performance", detector)
        return alarms

    def _alarm(self, site: str, detector: str, feature: str, direction: str,
               study_id: str) -> Alarm:
        alarm = Alarm(self.seq, site, detector, feature, direction, study_id)
        self.db.execute("INSERT INTO alarms (ts, seq, site, detector, feature, direction, "
                        "study_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (_now(), self.seq, site, detector, feature, direction, study_id))
        if self.audit_log is not None:
            self.audit_log.append("monitoring.alarm", f"{site}/{detector}",  # type: ignore[attr-defined]
                                  alarm.to_dict(), actor="radguard-monitor")
        return alarm

    # -- status ------------------------------------------------------------------------------
    @_serialised
    def alarms(self, limit: int = 100) -> list[dict[str, object]]:
        """The most recent alarms, newest first."""
        rows = self.db.execute("SELECT ts, seq, site, detector, feature, direction, study_id "
                               "FROM alarms ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        keys = ("ts", "seq", "site", "detector", "feature", "direction", "study_id")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    @_serialised
    def status(self, window: int = 200, threshold: float = 0.5) -> dict[str, object]:
        """Counts, recent alarms, window drift tests, rolling and label-free performance."""
        scorer = self._require()
        names = list(self.meta["names"])
        rows = self.db.execute("SELECT features, score, label, metadata FROM studies ORDER BY "
                               "seq DESC LIMIT ?", (window,)).fetchall()
        out: dict[str, object] = {"studies": self.seq, "alarms": self.alarms(20),
                                  "window": len(rows), "thresholds": {
                                      "drift_h": self.meta["h"],
                                      "performance_h": self.meta.get("h_performance")}}
        if len(rows) >= 20:
            current = np.array([[json.loads(r[0])[n] for n in names] for r in rows])
            tests = {}
            for j, name in enumerate(names):
                ref = scorer.sorted_reference[:, j]
                tests[name] = {**ks_test(ref, current[:, j]), "psi": psi(ref, current[:, j])}
            out["drift_tests"] = tests
            reference_meta = self.meta.get("metadata") or {}
            current_meta = [json.loads(r[3] or "{}") for r in rows]
            out["metadata_tests"] = {
                name: chi2_test(list(ref), [str(m.get(name, "")) for m in current_meta])
                for name, ref in reference_meta.items()}
        scores = np.array([r[1] for r in rows if r[1] is not None], float)
        if len(scores) and scores.min() >= 0 and scores.max() <= 1:
            # label-free estimates from calibrated probabilities (confidence-based)
            pos = scores >= threshold
            out["estimated"] = {
                "positive_rate": float(pos.mean()),
                "sensitivity": float(scores[pos].sum() / max(scores.sum(), 1e-12)),
                "specificity": float((1 - scores[~pos]).sum() / max((1 - scores).sum(),
                                                                   1e-12)),
            }
        labelled = [(r[1], r[2]) for r in rows if r[2] is not None and r[1] is not None]
        if labelled:
            s = np.array([v[0] for v in labelled], float)
            y = np.array([v[1] for v in labelled], int)
            pred = s >= threshold
            perf: dict[str, object] = {
                "labelled": len(y),
                "sensitivity": wilson(int(np.sum(pred & (y == 1))), int(y.sum())).to_dict(),
                "specificity": wilson(int(np.sum(~pred & (y == 0))),
                                      int((y == 0).sum())).to_dict()}
            try:
                perf["auc"] = delong_auc(y, s).to_dict()
            except EvaluationError:
                pass
            out["performance"] = perf
        return out

    @_serialised
    def copy(self, path: str | os.PathLike[str]) -> Monitor:
        """A consistent copy of this monitor's database (SQLite online backup)."""
        target = sqlite3.connect(Path(path))
        with target:
            self.db.backup(target)
        target.close()
        return Monitor(path)

    @_serialised
    def close(self) -> None:
        """Close the database."""
        self.db.close()
