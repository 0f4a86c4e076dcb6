"""The monitoring service: reference, per-study updates, alarms, all persisted in SQLite
(or in PostgreSQL, shared by several gateways).

``Monitor.observe`` is what the gateway calls for every study: the study's features (image
statistics, the model's score) become normal scores against the reference, two-sided CUSUMs
per site raise alarms within a false-alarm budget, and everything is written to SQLite in the
same transaction, so a restart resumes exactly where it stopped. ``Monitor.add_label`` takes
the radiologist's late label: a one-sided CUSUM on the per-study Brier loss catches
performance decay. ``Monitor.status`` adds window tests (KS, PSI), rolling metrics with CIs
and label-free estimates from calibrated scores (CBPE-style) before labels arrive.

Several gateways on one PostgreSQL database share one monitor: ``Monitor("postgresql://...")``
keeps the same tables in the schema ``radguard_monitor`` of that database (apart from the
store's tables), and every update - read the CUSUM state, write the study, write the state -
holds one advisory lock to its commit, so gateways observing at once lose no study and no
step of a CUSUM; study numbers come from the database, not from each process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

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
from radguard.postgres import import_psycopg, is_postgres_url

__all__ = ["Alarm", "Monitor", "MonitorError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reference (name TEXT PRIMARY KEY, data {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS cusum (site TEXT, detector TEXT, upper TEXT, lower TEXT,
                                  PRIMARY KEY (site, detector));
CREATE TABLE IF NOT EXISTS studies (id TEXT PRIMARY KEY, seq {int} NOT NULL, site TEXT,
                                    ts TEXT, features TEXT, score {real}, label {int});
CREATE TABLE IF NOT EXISTS alarms (id {id}, ts TEXT, seq {int},
                                   site TEXT, detector TEXT, feature TEXT, direction TEXT,
                                   study_id TEXT);
CREATE TABLE IF NOT EXISTS categories (site TEXT, field TEXT, value TEXT,
                                       PRIMARY KEY (site, field, value));
CREATE INDEX IF NOT EXISTS studies_seq ON studies (seq)
"""
_MIGRATIONS = [  # (table, column, declaration): columns added after the first release
    ("studies", "metadata", "TEXT"),
]


class MonitorError(RadguardError):
    """Monitoring cannot proceed (no reference, unknown feature, bad values)."""


class _SqliteDb:
    """The monitor's SQLite file (the default): one connection, used under the Monitor's
    lock by the threads of one process."""

    ddl = {"blob": "BLOB", "int": "INTEGER", "real": "REAL",
           "id": "INTEGER PRIMARY KEY AUTOINCREMENT"}
    #: what starts a write transaction: the write lock now, so no update waits to upgrade
    begin: tuple[str, ...] = ("BEGIN IMMEDIATE",)
    in_transaction = False

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        try:
            # shared by the threads that call it (under the Monitor's lock), not bound to
            # the opener
            self.conn: Any = sqlite3.connect(path, isolation_level=None,
                                             check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as exc:
            raise MonitorError(f"{path}: not a usable monitoring database ({exc})") from exc

    def sql(self, text: str) -> str:
        return text

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:  # noqa: ANN401
        """Run one statement (``?`` placeholders). SQLite's errors are raised as they are:
        the gateway tells a full disk (sqlite3.OperationalError) from bad data by them."""
        return self.conn.execute(self.sql(sql), params)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction, excluding every other writer (another process or gateway
        too) from its start to its commit: an update reads the state it then writes."""
        self.in_transaction = True
        try:
            self._begin()
            yield
            self.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(MonitorError, sqlite3.DatabaseError):
                self.execute("ROLLBACK")
            raise
        finally:
            self.in_transaction = False

    def _begin(self) -> None:
        for statement in self.begin:
            self.execute(statement)

    def create(self, schema: str) -> None:
        """Create the tables that are not there yet."""
        for statement in filter(str.strip, schema.split(";")):
            self.execute(statement)

    def columns(self, table: str) -> set[str]:
        return {r[1] for r in self.execute(f"PRAGMA table_info({table})")}

    def close(self) -> None:
        self.conn.close()


class _PostgresDb(_SqliteDb):
    """The monitor's tables in the schema ``radguard_monitor`` of a PostgreSQL database,
    shared by the gateways using it: one connection per Monitor (made again when the server
    dropped it), and an advisory lock around every write transaction."""

    ddl = {"blob": "BYTEA", "int": "BIGINT", "real": "DOUBLE PRECISION",
           "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"}
    schema = "radguard_monitor"
    #: every write (and the schema set-up) holds the monitor's advisory lock to its commit
    begin = ("BEGIN", "SELECT pg_advisory_xact_lock(hashtextextended('radguard_monitor', 0))")

    def __init__(self, url: str) -> None:  # (no super(): there is no SQLite file here)
        from radguard.dicom.web import redact

        self.psycopg = import_psycopg(MonitorError, "a monitor in PostgreSQL")
        self.url = url
        self.where = redact(url)
        self.conn = None
        self._connection()

    def _connection(self) -> Any:  # noqa: ANN401
        """The open connection, or a new one when there is none or the server dropped it."""
        if self.conn is not None and not self.conn.closed and \
                self.conn.info.status != self.psycopg.pq.ConnStatus.BAD:
            return self.conn
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
        try:
            # the monitor's own schema (created with the tables), apart from the store's
            conn = self.psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                        options=f"-c search_path={self.schema}")
        except self.psycopg.Error as exc:
            raise MonitorError(f"{self.where}: cannot reach the monitoring database "
                               f"({_first_line(exc)})") from exc
        self.conn = conn
        return conn

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")  # no literal question marks in the monitor's SQL

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:  # noqa: ANN401
        conn = self._connection()
        try:
            return conn.execute(self.sql(sql), params)
        except self.psycopg.Error as exc:
            if self._dropped() and not self.in_transaction:
                # the server dropped the idle connection (a restart, a failover): nothing
                # was done, so once more on a new one
                return self._retry(sql, params)
            raise MonitorError(f"{self.where}: monitoring database error "
                               f"({_first_line(exc)})") from exc

    def _retry(self, sql: str, params: tuple[Any, ...]) -> Any:  # noqa: ANN401
        try:
            return self._connection().execute(self.sql(sql), params)
        except self.psycopg.Error as exc:
            raise MonitorError(f"{self.where}: monitoring database error "
                               f"({_first_line(exc)})") from exc

    def _begin(self) -> None:
        try:
            super()._begin()
        except MonitorError:
            if not self._dropped():
                raise
            super()._begin()  # as in execute: nothing was done yet, once more

    def _dropped(self) -> bool:
        return self.conn is not None and (
            self.conn.closed or self.conn.info.status == self.psycopg.pq.ConnStatus.BAD)

    def create(self, schema: str) -> None:
        # apart from the store's tables, should the gateways' db_url be given
        self.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        super().create(schema)

    def columns(self, table: str) -> set[str]:
        rows = self.execute("SELECT column_name FROM information_schema.columns WHERE "
                            "table_schema = ? AND table_name = ?", (self.schema, table))
        return {r[0] for r in rows}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _first_line(exc: BaseException) -> str:
    """A database error's first line (psycopg adds hints and context on further lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


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
    """A persistent monitor over one SQLite file (created on first use) or one PostgreSQL
    database (a ``postgresql://`` URL; the tables are created on first use). Safe to share
    between threads, and on PostgreSQL between processes: updates take turns."""

    def __init__(self, db_path: str | os.PathLike[str], *,
                 audit_log: object | None = None) -> None:
        """``db_path``: a SQLite file, or a ``postgresql://user:pw@host/db`` URL (such as the
        gateways' shared ``db_url``). ``audit_log`` (an object with ``append(action, target,
        details)``, such as :class:`radguard.governance.AuditLog`) receives every alarm as
        it is raised."""
        #: the SQLite file (None for PostgreSQL); ``where`` names either in messages
        self.path = None if is_postgres_url(db_path) else Path(db_path)
        self.audit_log = audit_log
        self._lock = threading.RLock()
        self.db = _PostgresDb(str(db_path)) if self.path is None else _SqliteDb(self.path)
        self.where = self.db.where
        try:
            with self.db.transaction():  # gateways starting together create the tables once
                self.db.create(_SCHEMA.format(**self.db.ddl))
                for table, column, decl in _MIGRATIONS:
                    if column not in self.db.columns(table):
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        except (MonitorError, sqlite3.DatabaseError) as exc:
            raise MonitorError(f"{self.where}: not a usable monitoring database "
                               f"({_first_line(exc.__cause__ or exc)})") from exc
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
        with self.db.transaction():
            self.db.execute("DELETE FROM reference")
            self.db.execute("DELETE FROM cusum")
            self.db.execute("DELETE FROM categories")
            for j, name in enumerate(columns):
                self.db.execute("INSERT INTO reference VALUES (?, ?)",
                                (name, scorer.sorted_reference[:, j].tobytes()))
            self.db.execute("INSERT INTO meta VALUES ('config', ?) ON CONFLICT (key) DO UPDATE "
                            "SET value = excluded.value", (json.dumps(meta),))
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
        self._count()

    def _count(self) -> int:
        """The latest study number, from the database: other gateways number studies too."""
        seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM studies").fetchone()[0]
        self.seq = int(seq)
        return self.seq

    def _require(self) -> NormalScorer:
        if self.scorer is None:
            raise MonitorError(f"{self.where}: no reference yet (run 'radguard monitor init')")
        return self.scorer

    def _cusum(self, site: str, detector: str, h: float) -> Cusum:
        row = self.db.execute("SELECT upper, lower FROM cusum WHERE site=? AND detector=?",
                              (site, detector)).fetchone()
        c = Cusum(k=float(self.meta["k"]), h=h)
        if row:
            c.upper, c.lower = np.array(json.loads(row[0])), np.array(json.loads(row[1]))
        return c

    def _save_cusum(self, site: str, detector: str, c: Cusum) -> None:
        self.db.execute("INSERT INTO cusum VALUES (?, ?, ?, ?) ON CONFLICT (site, detector) "
                        "DO UPDATE SET upper = excluded.upper, lower = excluded.lower",
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
        with self.db.transaction():
            if self.db.execute("SELECT 1 FROM studies WHERE id=?", (study_id,)).fetchone():
                raise MonitorError(f"study {study_id} was already observed")
            self.seq = self._count() + 1
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
        with self.db.transaction():
            self._count()  # alarms carry the latest study number, whoever observed it
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
        out: dict[str, object] = {"studies": self._count(), "alarms": self.alarms(20),
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
        if self.path is None:
            raise MonitorError(f"{self.where}: copy a PostgreSQL monitor with pg_dump "
                               "(schema radguard_monitor)")
        target = sqlite3.connect(Path(path))
        with target:
            self.db.conn.backup(target)
        target.close()
        return Monitor(path)

    @_serialised
    def close(self) -> None:
        """Close the database."""
        self.db.close()
