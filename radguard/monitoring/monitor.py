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
import math
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
from radguard.monitoring.decay import SIGNALS, DecayError, DecayModel, calibrate_decay
from radguard.monitoring.drift import (
    NormalScorer,
    calibrate_threshold,
    chi2_test,
    ks_test,
    psi,
)
from radguard.monitoring.episodes import CAP, Episode, EpisodeState, Signal
from radguard.postgres import import_psycopg, is_postgres_url

__all__ = ["Alarm", "Monitor", "MonitorError", "estimate_performance"]

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
CREATE INDEX IF NOT EXISTS studies_seq ON studies (seq);
CREATE TABLE IF NOT EXISTS refs (version TEXT, name TEXT, data {blob} NOT NULL,
                                 PRIMARY KEY (version, name));
CREATE TABLE IF NOT EXISTS episodes (id {id}, site TEXT, version TEXT, signal TEXT,
                                     state TEXT, start_seq {int}, start_ts TEXT,
                                     start_study TEXT, onset_seq {int}, peak {real},
                                     peak_seq {int}, end_seq {int}, end_ts TEXT,
                                     changes TEXT, active TEXT);
CREATE INDEX IF NOT EXISTS episodes_open ON episodes (site, version, signal, state);
CREATE TABLE IF NOT EXISTS pending_labels (id TEXT PRIMARY KEY, label {int}, ts TEXT)
"""
_MIGRATIONS = [  # (table, column, declaration): columns added after the first release
    ("studies", "metadata", "TEXT"),
    ("studies", "version", "TEXT"),
    ("cusum", "extra", "TEXT"),
    ("alarms", "episode", "{int}"),
    ("alarms", "version", "TEXT"),
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

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
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

    def _connection(self) -> Any:
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

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
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

    def _retry(self, sql: str, params: tuple[Any, ...]) -> Any:
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
    """An episode opened: a sequential detector crossed its threshold (one per episode)."""

    seq: int
    site: str
    detector: str  # the signal: "drift", "sensitivity", "specificity" or "metadata"
    feature: str  # what changed ("mean, p95"; "Manufacturer=Acme"; "sensitivity")
    direction: str  # "up", "down", "mixed" or "new"
    study_id: str
    episode: int = 0
    model_version: str = ""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class _Reference:
    """One model version's reference: features (+ score), thresholds, decay model."""

    meta: dict[str, Any]
    scorer: NormalScorer
    decay: DecayModel | None


def _halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(12345).permutation(n)
    return order[: n // 2], order[n // 2 :]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _config_key(version: str) -> str:
    return "config" if not version else f"config:{version}"


def _state_key(signal: str, version: str) -> str:
    """The cusum table's detector column: one state per signal and model version."""
    return f"{signal}|{version}"


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
                 audit_log: object | None = None, notify: object | None = None) -> None:
        """``db_path``: a SQLite file, or a ``postgresql://user:pw@host/db`` URL (such as the
        gateways' shared ``db_url``). ``audit_log`` (an object with ``append(action, target,
        details)``, such as :class:`radguard.governance.AuditLog`) receives every episode as
        it opens and closes; ``notify`` (an object with ``notify(event)``, such as
        :class:`radguard.monitoring.notify.Dispatcher`) is handed the same events after
        their commit, to send by e-mail or webhook."""
        #: the SQLite file (None for PostgreSQL); ``where`` names either in messages
        self.path = None if is_postgres_url(db_path) else Path(db_path)
        self.audit_log = audit_log
        self.notify = notify
        self._lock = threading.RLock()
        self._events: list[dict[str, object]] = []
        self.db = _PostgresDb(str(db_path)) if self.path is None else _SqliteDb(self.path)
        self.where = self.db.where
        try:
            with self.db.transaction():  # gateways starting together create the tables once
                self.db.create(_SCHEMA.format(**self.db.ddl))
                for table, column, decl in _MIGRATIONS:
                    if column not in self.db.columns(table):
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} "
                                        f"{decl.format(**self.db.ddl)}")
                self._migrate_reference()
        except (MonitorError, sqlite3.DatabaseError) as exc:
            raise MonitorError(f"{self.where}: not a usable monitoring database "
                               f"({_first_line(exc.__cause__ or exc)})") from exc
        self._load()

    def _migrate_reference(self) -> None:
        """A reference written before references were kept per model version (table
        ``reference``) becomes the default version's; its CUSUM states (Brier-loss
        performance, unversioned drift) are dropped: the next studies start afresh."""
        if self.db.execute("SELECT 1 FROM refs").fetchone():
            return
        for name, data in self.db.execute("SELECT name, data FROM reference").fetchall():
            self.db.execute("INSERT INTO refs VALUES ('', ?, ?)", (name, data))
        for site, detector in self.db.execute("SELECT site, detector FROM cusum").fetchall():
            if "|" not in detector:
                self.db.execute("DELETE FROM cusum WHERE site=? AND detector=?",
                                (site, detector))

    # -- reference -------------------------------------------------------------------------
    @_serialised
    def fit_reference(self, features: np.ndarray, names: list[str], *,
                      scores: np.ndarray | None = None, labels: np.ndarray | None = None,
                      metadata: list[dict[str, str]] | None = None,
                      false_alarms_per: float = 10_000, k: float = 0.75,
                      threshold: float | None = None, drop: float = 0.10,
                      model_version: str = "") -> dict[str, float]:
        """Learn the reference window of one model version and calibrate its alarms.

        Half of the false-alarm budget goes to drift (all features together) and half to
        performance decay (when reference labels and scores are given): a quarter each to
        the sensitivity and the specificity detectors, per labelled study of their class
        (each study gives at most one label, so per study the budget holds whatever the
        labelling fraction). ``threshold`` is the model's operating point (default 0.5),
        ``drop`` the smallest fall of sensitivity or specificity worth an alarm.

        The allowance ``k`` (in standard deviations) sets the smallest drift worth an alarm:
        0.75 ignores the offsets of a few tenths of a standard deviation that any two samples
        of one population show, and still catches a shift of 2 standard deviations within a
        handful of studies.
        """
        x = np.asarray(features, float)
        if x.ndim != 2 or x.shape[1] != len(names) or len(x) < 50:
            raise MonitorError("the reference needs at least 50 studies with every feature")
        columns = list(names)
        if scores is not None:
            x = np.column_stack([x, np.asarray(scores, float)])
            columns.append("score")
        if not np.isfinite(x).all():
            raise MonitorError("the reference holds NaN or infinite feature values or scores")
        scorer = NormalScorer.fit(x)
        # Cross-fitted calibration: new studies are scored against a finite reference, so
        # simulate exactly that - score each half of the reference against the other half
        # (a reference half the size makes the threshold conservative).
        first, second = _halves(len(x))
        out_of_fold = [NormalScorer.fit(x[first]).transform(x[second]),
                       NormalScorer.fit(x[second]).transform(x[first])]
        h = calibrate_threshold(out_of_fold, false_alarms_per=2 * false_alarms_per, k=k)
        meta: dict[str, object] = {"names": columns, "k": k, "h": h,
                                   "false_alarms_per": false_alarms_per, "fitted": _now(),
                                   "model_version": model_version}
        if metadata:
            fields = sorted({f for row in metadata for f in row})
            meta["metadata"] = {f: [str(row.get(f, "")) for row in metadata] for f in fields}
        out = {"h": h}
        if labels is not None and scores is not None:
            y, s = np.asarray(labels, int), np.asarray(scores, float)
            point = 0.5 if threshold is None else float(threshold)
            meta["threshold"] = point
            meta["reference_auc"] = delong_auc(y, s).auc
            try:
                decay = DecayModel.fit(s, y, threshold=point, drop=drop)
                hs = calibrate_decay(s, y, threshold=point, drop=drop,
                                     false_alarms_per=4 * false_alarms_per)
            except DecayError as exc:
                meta["decay_off"] = str(exc)
            else:
                meta["decay"], meta["h_decay"] = decay.to_dict(), hs
                out.update({f"h_{name}": value for name, value in hs.items()})
        elif threshold is not None:
            meta["threshold"] = float(threshold)
        with self.db.transaction():
            self.db.execute("DELETE FROM refs WHERE version=?", (model_version,))
            for j, name in enumerate(columns):
                self.db.execute("INSERT INTO refs VALUES (?, ?, ?)",
                                (model_version, name, scorer.sorted_reference[:, j].tobytes()))
            own = {v for (v,) in self.db.execute("SELECT DISTINCT version FROM refs")}

            def judged_here(version: str) -> bool:
                """Its state was judged against this reference: the version itself, or (a
                new default) a version without a reference of its own."""
                return version == model_version or (not model_version and version not in own)

            for site, detector in self.db.execute("SELECT site, detector FROM cusum").fetchall():
                if judged_here(detector.partition("|")[2]):  # signals hold no "|"
                    self.db.execute("DELETE FROM cusum WHERE site=? AND detector=?",
                                    (site, detector))
            if not model_version:
                self.db.execute("DELETE FROM categories")
            for episode_id, version in self.db.execute(
                    "SELECT id, version FROM episodes WHERE state='open'").fetchall():
                if judged_here(version or ""):
                    self.db.execute("UPDATE episodes SET state='closed', end_seq=?, end_ts=?, "
                                    "active='[]' WHERE id=?",
                                    (self._count(), _now(), episode_id))
            self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                            "SET value = excluded.value",
                            (_config_key(model_version), json.dumps(meta)))
        self._load()
        return out

    def _load(self) -> None:
        self.references: dict[str, _Reference] = {}
        rows = [(key, value) for key, value in
                self.db.execute("SELECT key, value FROM meta").fetchall()
                if key == "config" or key.startswith("config:")]
        data: dict[tuple[str, str], bytes] = {
            (v, n): bytes(d) for v, n, d in
            self.db.execute("SELECT version, name, data FROM refs").fetchall()}
        for key, value in rows:
            version = "" if key == "config" else key.partition(":")[2]
            meta = json.loads(value)
            columns = [np.frombuffer(data[(version, n)]) for n in meta["names"]
                       if (version, n) in data]
            if len(columns) != len(meta["names"]):
                continue  # a reference being rewritten by another gateway: next load
            decay = DecayModel.from_dict(meta["decay"]) if "decay" in meta else None
            self.references[version] = _Reference(meta, NormalScorer(np.column_stack(columns)),
                                                  decay)
        default = self.references.get("")
        #: the default reference's settings and scorer (what the CLI and most callers use)
        self.meta: dict[str, Any] = default.meta if default else {}
        self.scorer: NormalScorer | None = default.scorer if default else None
        self._count()

    def _count(self) -> int:
        """The latest study number, from the database: other gateways number studies too."""
        seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM studies").fetchone()[0]
        self.seq = int(seq)
        return self.seq

    def _reference(self, version: str) -> _Reference:
        """The model version's own reference, else the default one."""
        ref = self.references.get(version) or self.references.get("")
        if ref is None:
            raise MonitorError(f"{self.where}: no reference yet (run 'radguard monitor init')")
        return ref

    def _state(self, site: str, key: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        row = self.db.execute("SELECT upper, lower, extra FROM cusum WHERE site=? AND "
                              "detector=?", (site, key)).fetchone()
        if not row:
            return np.zeros(0), np.zeros(0), {}
        return (np.array(json.loads(row[0]), float), np.array(json.loads(row[1]), float),
                json.loads(row[2] or "{}"))

    def _save_state(self, site: str, key: str, upper: np.ndarray, lower: np.ndarray,
                    extra: dict[str, Any]) -> None:
        self.db.execute("INSERT INTO cusum (site, detector, upper, lower, extra) VALUES "
                        "(?, ?, ?, ?, ?) ON CONFLICT (site, detector) DO UPDATE SET upper = "
                        "excluded.upper, lower = excluded.lower, extra = excluded.extra",
                        (site, key, json.dumps(upper.tolist()), json.dumps(lower.tolist()),
                         json.dumps(extra)))

    # -- per study ---------------------------------------------------------------------------
    @_serialised
    def observe(self, study_id: str, features: dict[str, float], *, score: float | None = None,
                site: str = "default", metadata: dict[str, str] | None = None,
                model_version: str | None = None) -> list[Alarm]:
        """Record one study; returns the alarms (episodes opened) it raised.

        ``metadata`` (manufacturer, model, protocol, view...) opens a "metadata" episode the
        first time a site shows a value the reference never had: a new scanner or protocol.
        ``model_version`` names the model that gave ``score``: each version has its own
        state, judged against its own reference when it has one (else the default one). A
        label that arrived before its study is applied now.
        """
        version = model_version or ""
        ref = self._reference(version)
        names = list(ref.meta["names"])
        values = dict(features)
        if score is not None:
            try:
                score = float(score)
            except (TypeError, ValueError) as exc:
                raise MonitorError(f"study {study_id}: the score is not a number") from exc
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
        if score is not None and not math.isfinite(float(score)):
            raise MonitorError(f"study {study_id}: the score is NaN or infinite")
        z = ref.scorer.transform(row)[0]
        alarms: list[Alarm] = []
        with self._committed():
            if self.db.execute("SELECT 1 FROM studies WHERE id=?", (study_id,)).fetchone():
                raise MonitorError(f"study {study_id} was already observed")
            self.seq = self._count() + 1
            self.db.execute("INSERT INTO studies (id, seq, site, ts, features, score, label, "
                            "metadata, version) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                            (study_id, self.seq, site, _now(), json.dumps(values), score,
                             json.dumps(metadata or {}), version))
            alarms += self._new_metadata(ref, site, version, metadata or {}, study_id)
            alarms += self._drift(ref, site, version, names, z, study_id)
            pending = self.db.execute("SELECT label FROM pending_labels WHERE id=?",
                                      (study_id,)).fetchone()
            if pending is not None:
                self.db.execute("DELETE FROM pending_labels WHERE id=?", (study_id,))
                alarms += self._label(study_id, int(pending[0]), site, score, version)
        return alarms

    def _new_metadata(self, ref: _Reference, site: str, version: str,
                      metadata: dict[str, str], study_id: str) -> list[Alarm]:
        """Values a site shows for the first time that the reference never had: one
        episode per study (a new scanner changes several fields at once), opened and
        closed at once - there is nothing to recover from."""
        known = ref.meta.get("metadata") or {}
        new = []
        for name, value in metadata.items():
            value = str(value)
            if name not in known or value in known[name]:
                continue
            seen = self.db.execute("SELECT 1 FROM categories WHERE site=? AND field=? AND "
                                   "value=?", (site, name, value)).fetchone()
            if not seen:
                self.db.execute("INSERT INTO categories VALUES (?, ?, ?)", (site, name, value))
                new.append({"feature": name, "value": value, "direction": "new"})
        if not new:
            return []
        episode = Episode(site, version, Signal.METADATA, self.seq, _now(), study_id,
                          self.seq, peak=1.0, peak_seq=self.seq, changes=new)
        alarm = self._open(episode, ", ".join(f"{c['feature']}={c['value']}" for c in new),
                           "new")
        self._close(episode)
        return [alarm]

    def _drift(self, ref: _Reference, site: str, version: str, names: list[str],
               z: np.ndarray, study_id: str) -> list[Alarm]:
        """The two-sided CUSUM per feature, in episodes (see radguard.monitoring.episodes)."""
        k, h = float(ref.meta["k"]), float(ref.meta["h"])
        key = _state_key(Signal.DRIFT, version)
        upper, lower, extra = self._state(site, key)
        if upper.shape != z.shape:
            upper, lower, extra = np.zeros_like(z), np.zeros_like(z), {}
        onset: dict[str, int] = extra.get("onset", {})
        for stats, sign, word in ((upper, 1.0, "up"), (lower, -1.0, "down")):
            before = stats.copy()
            stats[:] = np.maximum(0.0, stats + sign * z - k)
            for j in np.nonzero((before == 0) & (stats > 0))[0]:
                onset[f"{names[j]} {word}"] = self.seq
        statistic = {f"{n} up": float(u) for n, u in zip(names, upper, strict=True)}
        statistic.update({f"{n} down": float(v) for n, v in zip(names, lower, strict=True)})
        alarms = self._track(Signal.DRIFT, site, version, statistic, h, onset, study_id)
        np.minimum(upper, CAP * h, out=upper)
        np.minimum(lower, CAP * h, out=lower)
        for name in [n for n, v in statistic.items() if v == 0]:
            onset.pop(name, None)
        self._save_state(site, key, upper, lower, {"onset": onset})
        return alarms

    def _track(self, signal: Signal, site: str, version: str, statistic: dict[str, float],
               h: float, onset: dict[str, int], study_id: str,
               describe: Callable[[str], dict[str, object]] | None = None) -> list[Alarm]:
        """Open, extend or close the signal's episode from its statistics."""
        episode = self._open_episode(site, version, signal)
        crossed = [n for n, v in statistic.items() if v > h]

        def change(name: str) -> dict[str, object]:
            feature, _, direction = name.rpartition(" ")
            out: dict[str, object] = {"feature": feature, "direction": direction,
                                      "since": onset.get(name, self.seq)}
            return {**out, **describe(name)} if describe else out

        alarms = []
        if episode is None and crossed:
            episode = Episode(site, version, signal, self.seq, _now(), study_id,
                              min(onset.get(n, self.seq) for n in crossed),
                              peak=min(max(statistic[n] for n in crossed) / h, CAP),
                              peak_seq=self.seq, changes=[change(n) for n in crossed],
                              active=sorted(crossed))
            directions = {str(c["direction"]) for c in episode.changes}
            alarms.append(self._open(episode, ", ".join(str(c["feature"])
                                                        for c in episode.changes),
                                     directions.pop() if len(directions) == 1 else "mixed"))
        elif episode is not None:
            for name in crossed:
                if name not in episode.active:
                    episode.active.append(name)
                if not any(f"{c['feature']} {c['direction']}" == name for c in episode.changes):
                    episode.changes.append(change(name))
            if describe:  # the changes' estimates follow the labels that keep arriving
                episode.changes = [{**c, **describe(f"{c['feature']} {c['direction']}")}
                                   for c in episode.changes]
            episode.active = [n for n in episode.active if statistic.get(n, 0.0) > 0]
        if episode is None:
            return alarms
        strongest = max((statistic.get(n, 0.0) for n in episode.active), default=0.0) / h
        if strongest > episode.peak:
            episode.peak, episode.peak_seq = min(strongest, CAP), self.seq
        if not episode.active:
            self._close(episode)
        else:
            self._save_episode(episode)
        return alarms

    def _open_episode(self, site: str, version: str, signal: Signal) -> Episode | None:
        row = self.db.execute(f"SELECT {_EPISODE_COLUMNS} FROM episodes WHERE site=? AND "
                              "version=? AND signal=? AND state='open' ORDER BY id DESC",
                              (site, version, str(signal))).fetchone()
        return _episode(row) if row else None

    def _save_episode(self, episode: Episode) -> None:
        values = (episode.site, episode.version, str(episode.signal), str(episode.state),
                  episode.start_seq, episode.start_ts, episode.start_study, episode.onset_seq,
                  episode.peak, episode.peak_seq, episode.end_seq, episode.end_ts,
                  json.dumps(episode.changes), json.dumps(episode.active))
        if episode.id is None:
            row = self.db.execute(f"INSERT INTO episodes ({_EPISODE_COLUMNS.partition(', ')[2]})"
                                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                                  "RETURNING id", values).fetchone()
            episode.id = int(row[0])
        else:
            self.db.execute(f"UPDATE episodes SET ({_EPISODE_COLUMNS.partition(', ')[2]}) = "
                            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) WHERE id=?",
                            (*values, episode.id))

    def _open(self, episode: Episode, feature: str, direction: str) -> Alarm:
        """An episode opens: the one alarm it raises (alarms table, audit log, notice)."""
        self._save_episode(episode)
        alarm = Alarm(self.seq, episode.site, str(episode.signal), feature, direction,
                      episode.start_study, int(episode.id or 0), episode.version)
        self.db.execute("INSERT INTO alarms (ts, seq, site, detector, feature, direction, "
                        "study_id, episode, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (episode.start_ts, self.seq, episode.site, str(episode.signal),
                         feature, direction, episode.start_study, episode.id, episode.version))
        self._event("monitoring.alarm", episode)
        return alarm

    def _close(self, episode: Episode) -> None:
        episode.state, episode.end_seq, episode.end_ts = EpisodeState.CLOSED, self.seq, _now()
        episode.active = []
        self._save_episode(episode)
        self._event("monitoring.episode_closed", episode)

    def _event(self, action: str, episode: Episode) -> None:
        """Audited and notified once the update is committed (an update rolled back - a
        full disk, a dropped connection - leaves no entry for an episode that never was)."""
        self._events.append({**episode.to_dict(), "event": action})

    @contextlib.contextmanager
    def _committed(self) -> Iterator[None]:
        """One write transaction; the audit entries and notices of the episodes it opened
        or closed follow its commit, in order (never for an update that was rolled back)."""
        self._events = []
        try:
            with self.db.transaction():
                yield
        finally:  # rolled back: the exception goes on, and so do no entries
            events, self._events = self._events, []
        for event in events:
            if self.audit_log is not None:
                self.audit_log.append(str(event["event"]),  # type: ignore[attr-defined]
                                      f"{event['site']}/{event['signal']}",
                                      {**event, "detector": event["signal"]},
                                      actor="radguard-monitor")
            if self.notify is not None:
                self.notify.notify(event)  # type: ignore[attr-defined]

    # -- labels ------------------------------------------------------------------------------
    @_serialised
    def add_label(self, study_id: str, label: int) -> list[Alarm]:
        """Record the late ground truth of a study; returns the alarms it raised.

        A label for a study not observed yet (a report that came first, or a study of
        another system) waits until the study arrives. The same label again changes
        nothing; a different label for a labelled study is refused (nothing changes)."""
        if label not in (0, 1):
            raise MonitorError("labels must be 0 or 1")
        with self._committed():
            row = self.db.execute("SELECT site, score, label, version FROM studies WHERE id=?",
                                  (study_id,)).fetchone()
            if row is None:
                waiting = self.db.execute("SELECT label FROM pending_labels WHERE id=?",
                                          (study_id,)).fetchone()
                if waiting is not None and int(waiting[0]) != label:
                    raise MonitorError(f"study {study_id} is not observed yet and already has "
                                       f"a different label waiting ({waiting[0]})")
                if waiting is None:
                    self.db.execute("INSERT INTO pending_labels VALUES (?, ?, ?)",
                                    (study_id, int(label), _now()))
                return []
            site, score, known, version = row
            if known is not None:
                if int(known) != label:
                    raise MonitorError(f"study {study_id} is already labelled {known}: a "
                                       "different label is not applied")
                return []
            self._count()  # alarms carry the latest study number, whoever observed it
            return self._label(study_id, label, site, score, version or "")

    def _label(self, study_id: str, label: int, site: str, score: float | None,
               version: str) -> list[Alarm]:
        self.db.execute("UPDATE studies SET label=? WHERE id=?", (int(label), study_id))
        ref = self.references.get(version) or self.references.get("")
        if ref is None or ref.decay is None or score is None:
            return []
        decay, signal = ref.decay, Signal(SIGNALS[label])
        h = float(ref.meta["h_decay"][str(signal)])
        key = _state_key(signal, version)
        upper, _, extra = self._state(site, key)
        before = float(upper[0]) if upper.size else 0.0
        statistic = max(0.0, before + decay.step(float(score), label))
        if before == 0.0 and statistic > 0.0:  # a possible change begins: count from here
            extra = {"onset": self.seq, "labelled": 0, "correct": 0}
        if statistic > 0.0:
            extra["labelled"] = int(extra.get("labelled", 0)) + 1
            correct = (float(score) >= decay.threshold) == (label == 1)
            extra["correct"] = int(extra.get("correct", 0)) + int(correct)
        reference = decay.sensitivity if label == 1 else decay.specificity

        def describe(_: str) -> dict[str, object]:
            n = int(extra.get("labelled", 0))
            return {"rate": round(int(extra.get("correct", 0)) / n, 3) if n else None,
                    "labelled": n, "reference": round(reference, 3),
                    "operating_point": decay.threshold}

        alarms = self._track(signal, site, version, {f"{signal} down": statistic}, h,
                             {f"{signal} down": int(extra.get("onset", self.seq))}, study_id,
                             describe)
        if statistic == 0.0:
            extra = {}
        self._save_state(site, key, np.array([min(statistic, CAP * h)]), np.zeros(1), extra)
        return alarms

    # -- status ------------------------------------------------------------------------------
    @_serialised
    def alarms(self, limit: int = 100) -> list[dict[str, object]]:
        """The most recent alarms (one per episode, when it opened), newest first."""
        rows = self.db.execute("SELECT ts, seq, site, detector, feature, direction, study_id, "
                               "episode, version FROM alarms ORDER BY id DESC LIMIT ?",
                               (limit,)).fetchall()
        keys = ("ts", "seq", "site", "detector", "feature", "direction", "study_id",
                "episode", "model_version")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    @_serialised
    def episodes(self, limit: int = 100, *, open_only: bool = False) -> list[dict[str, object]]:
        """Episodes, open ones first, then the most recent."""
        where = "WHERE state='open' " if open_only else ""
        rows = self.db.execute(f"SELECT {_EPISODE_COLUMNS} FROM episodes {where}ORDER BY "
                               "CASE state WHEN 'open' THEN 0 ELSE 1 END, id DESC LIMIT ?",
                               (limit,)).fetchall()
        return [_episode(r).to_dict() for r in rows]

    @_serialised
    def status(self, window: int = 200, threshold: float | None = None, *,
               model_version: str | None = None) -> dict[str, object]:
        """Counts, episodes, window drift tests, rolling and label-free performance at the
        operating point (the reference's, unless ``threshold`` is given), over the studies
        judged against one reference: ``model_version``'s own, or (None) the default one -
        the studies of every version without a reference of its own."""
        ref = self._reference(model_version or "")
        scorer, names = ref.scorer, list(ref.meta["names"])
        point = float(threshold if threshold is not None else ref.meta.get("threshold", 0.5))
        if model_version:
            rows = self.db.execute("SELECT features, score, label, metadata FROM studies "
                                   "WHERE version=? ORDER BY seq DESC LIMIT ?",
                                   (model_version, window)).fetchall()
        else:
            own = sorted(v for v in self.references if v)
            marks = ", ".join("?" * len(own))
            rows = self.db.execute(
                "SELECT features, score, label, metadata FROM studies WHERE "
                + (f"COALESCE(version, '') NOT IN ({marks}) " if own else "1=1 ")
                + "ORDER BY seq DESC LIMIT ?", (*own, window)).fetchall()
        rows = [r for r in rows if set(names) <= set(json.loads(r[0]))]
        waiting = self.db.execute("SELECT COUNT(*) FROM pending_labels").fetchone()[0]
        out: dict[str, object] = {
            "studies": self._count(), "alarms": self.alarms(20),
            "episodes": self.episodes(20), "labels_waiting_for_their_study": int(waiting),
            "window": len(rows), "operating_point": point, "thresholds": {
                "drift_h": ref.meta["h"], **{f"{k}_h": v for k, v in
                                             (ref.meta.get("h_decay") or {}).items()}}}
        if "decay_off" in ref.meta:
            out["decay_detection"] = f"off: {ref.meta['decay_off']}"
        elif ref.decay is None and "loss_mean" in ref.meta:
            out["decay_detection"] = ("off: the reference was fitted before sensitivity and "
                                      "specificity were watched (refit it with 'radguard "
                                      "monitor init')")
        elif ref.decay is None:
            out["decay_detection"] = ("off: the reference has no labels and scores (refit it "
                                      "with 'radguard monitor init' on a labelled reference)")
        if len(rows) >= 20:
            current = np.array([[json.loads(r[0])[n] for n in names] for r in rows])
            tests = {}
            for j, name in enumerate(names):
                sample = scorer.sorted_reference[:, j]
                tests[name] = {**ks_test(sample, current[:, j]), "psi": psi(sample, current[:, j])}
            out["drift_tests"] = tests
            reference_meta = ref.meta.get("metadata") or {}
            current_meta = [json.loads(r[3] or "{}") for r in rows]
            out["metadata_tests"] = {
                name: chi2_test(list(values), [str(m.get(name, "")) for m in current_meta])
                for name, values in reference_meta.items()}
        scores = np.array([r[1] for r in rows if r[1] is not None], float)
        if len(scores) and scores.min() >= 0 and scores.max() <= 1:
            out["estimated"] = estimate_performance(scores, point)
        labelled = [(r[1], r[2]) for r in rows if r[2] is not None and r[1] is not None]
        if labelled:
            s = np.array([v[0] for v in labelled], float)
            y = np.array([v[1] for v in labelled], int)
            pred = s >= point
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
        """A consistent copy of this monitor's database (SQLite online backup); ``":memory:"``
        for a scratch copy in memory."""
        if self.path is None:
            raise MonitorError(f"{self.where}: copy a PostgreSQL monitor with pg_dump "
                               "(schema radguard_monitor)")
        if str(path) == ":memory:":  # a scratch copy (simulations): lost when closed
            copy = Monitor(":memory:")
            self.db.conn.backup(copy.db.conn)
            copy._load()
            return copy
        target = sqlite3.connect(Path(path))
        with target:
            self.db.conn.backup(target)
        target.close()
        return Monitor(path)

    @_serialised
    def close(self) -> None:
        """Close the database."""
        self.db.close()


def estimate_performance(scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Label-free estimates from calibrated probabilities (confidence-based performance
    estimation, as NannyML's CBPE): each study counts as positive with its probability.
    Valid while the model stays calibrated on the new studies - what drift alarms watch."""
    s = np.asarray(scores, float)
    pos = s >= threshold
    return {"positive_rate": float(pos.mean()),
            "prevalence": float(s.mean()),
            "sensitivity": float(s[pos].sum() / max(s.sum(), 1e-12)),
            "specificity": float((1 - s[~pos]).sum() / max((1 - s).sum(), 1e-12))}


_EPISODE_COLUMNS = ("id, site, version, signal, state, start_seq, start_ts, start_study, "
                    "onset_seq, peak, peak_seq, end_seq, end_ts, changes, active")


def _episode(row: tuple[Any, ...]) -> Episode:
    (id_, site, version, signal, state, start_seq, start_ts, start_study, onset_seq, peak,
     peak_seq, end_seq, end_ts, changes, active) = row
    return Episode(site, version or "", Signal(signal), int(start_seq), start_ts, start_study,
                   int(onset_seq), EpisodeState(state), float(peak), int(peak_seq),
                   None if end_seq is None else int(end_seq), end_ts, json.loads(changes),
                   json.loads(active), int(id_))
