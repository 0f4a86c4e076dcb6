"""The gateway's embedded store: instance files plus a SQLite index and work queue.

An instance is acknowledged only after :meth:`Store.ingest` returns, and that happens only
after its file is fsync'd under a content-addressed name and its row is committed (SQLite in
WAL mode with ``synchronous=FULL``). The same row is the instance's place in the work queue:
``queued`` -> ``processing`` (-> ``forwarding``) -> ``done``/``quarantined``/``rejected``
(:class:`State`). A claim has an owner (the gateway's id) and a lease the gateway's
heartbeat extends (:meth:`Store.heartbeat`); a crash leaves at most rows in ``processing``
or ``forwarding``, which :meth:`Store.recover` puts back in the queue at the gateway's next
start - its own claims only - and any gateway's heartbeat once their lease has expired. The
pipeline writes its result and the final state in one transaction, and only while it owns
the claim, so each received instance is processed once, again only after a lease lapsed
(and sent to the PACS at least once). Files without a row (a crash between fsync and
commit: never acknowledged) are swept once old (:meth:`Store.sweep`).

One SOP Instance UID names one object. The same bytes again (same SHA-256) are a resend:
acknowledged, no new row. Different bytes under a UID already held are stored - never
instead of the first copy - with ``duplicate_of`` naming the earliest copy that was not
rejected (a rejected copy, e.g. an attacker's who guessed the UID, makes nothing a
duplicate), and the gateway quarantines them for an admin to decide; the first copy that
passed is what DICOMweb and the viewer serve (:meth:`Store.clinical_instances`). So a peer
cannot shadow an image by resending its UID.

Large objects arrive as files (the DICOM acceptor spools them to ``data_dir/incoming``, on
the store's filesystem): :meth:`Store.ingest` hashes them while reading and renames them
into place, so no copy of a large object is ever held in memory.

Write failures (a full disk, an unreachable database) are tracked in :attr:`Store.health`:
the first failure and the first success after failures are the transitions the gateway
logs, audits and shows; nothing is lost meanwhile (refused objects were not acknowledged,
claimed ones go back to the queue). A filesystem below the free-space reserve
(``min_free``) is not a failure: :attr:`Store.intake` pauses new objects only, and the
workers use the reserve to go on.

Schema changes are numbered migrations applied in order at open (``schema_version``); the
fourth holds the known-real detector scores of per-source calibration
(:mod:`radguard.forensics.calibration`: the store is a ``ScoreStore``).
The embedded default is SQLite in the data folder; a larger site gives a PostgreSQL URL
(``db_url = "postgresql://user:pw@host/radguard"``, a bounded pool of connections that
reconnects by itself) and several gateways can then share one queue (claims use ``FOR
UPDATE SKIP LOCKED``) - provided they share the instance files too: a shared folder, or the
database itself (:mod:`radguard.gateway.objects`; :meth:`Store.register` refuses a gateway
that would not, docs/gateway.md#deployment).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from radguard.errors import RadguardError
from radguard.fileio import atomic_write_bytes, room_above_reserve
from radguard.forensics.calibration import SCHEMA as CALIBRATION_SCHEMA
from radguard.gateway.objects import DatabaseObjects, FolderObjects, ObjectStorage
from radguard.postgres import import_psycopg, is_postgres_url

__all__ = ["IN_PROGRESS", "Instance", "PoolBusy", "ReserveError", "State", "Store", "StoreError",
           "WriteHealth", "storage_failure"]

log = logging.getLogger("radguard.gateway")

MIGRATIONS = [
    # 1: instances and their queue state ({id} is the backend's auto-increment key)
    """
    CREATE TABLE instances (
        id {id},
        sop_uid TEXT NOT NULL, study_uid TEXT, series_uid TEXT, sop_class TEXT,
        patient_id TEXT, patient_name TEXT, modality TEXT, study_date TEXT,
        path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
        received_at TEXT NOT NULL, source TEXT NOT NULL, calling_ae TEXT,
        state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0,
        verdict TEXT, trust TEXT, ai_probability REAL, ai_suspicion INTEGER,
        details TEXT, forwarded TEXT, processed_at TEXT, decided_by TEXT, decision_note TEXT
    );
    CREATE INDEX instances_state ON instances(state, id);
    CREATE INDEX instances_study ON instances(study_uid);
    CREATE INDEX instances_sop ON instances(sop_uid);
    """,
    # 2: people and their tokens (radguard.gateway.auth)
    """
    CREATE TABLE users (name TEXT PRIMARY KEY, role TEXT NOT NULL, salt {blob} NOT NULL,
                        password_hash {blob} NOT NULL, created TEXT NOT NULL);
    CREATE TABLE tokens (digest TEXT PRIMARY KEY, name TEXT NOT NULL, expires TEXT NOT NULL);
    """,
    # 3: a conflicting copy of a SOP Instance UID already held names the first copy's row
    """
    ALTER TABLE instances ADD COLUMN duplicate_of {int}
    """,
    # 4: known-real detector scores per source, for per-source calibration of the content
    # detectors (radguard.forensics.calibration.SCHEMA, read and written by SourceScores)
    CALIBRATION_SCHEMA,
    # 5: the attributes QIDO-RS and C-FIND match and return (radguard.gateway.query), with
    # case-folded person names (PN matching is case-insensitive; SQLite's lower() folds ASCII
    # only); index_version NULL marks rows stored before, indexed by Store.backfill_index
    """
    ALTER TABLE instances ADD COLUMN accession TEXT;
    ALTER TABLE instances ADD COLUMN study_time TEXT;
    ALTER TABLE instances ADD COLUMN study_description TEXT;
    ALTER TABLE instances ADD COLUMN referring_physician TEXT;
    ALTER TABLE instances ADD COLUMN study_id TEXT;
    ALTER TABLE instances ADD COLUMN patient_birth_date TEXT;
    ALTER TABLE instances ADD COLUMN patient_sex TEXT;
    ALTER TABLE instances ADD COLUMN series_number TEXT;
    ALTER TABLE instances ADD COLUMN series_description TEXT;
    ALTER TABLE instances ADD COLUMN pps_start_date TEXT;
    ALTER TABLE instances ADD COLUMN pps_start_time TEXT;
    ALTER TABLE instances ADD COLUMN instance_number TEXT;
    ALTER TABLE instances ADD COLUMN pixel_rows {int};
    ALTER TABLE instances ADD COLUMN pixel_columns {int};
    ALTER TABLE instances ADD COLUMN bits_allocated {int};
    ALTER TABLE instances ADD COLUMN frames {int};
    ALTER TABLE instances ADD COLUMN charset TEXT;
    ALTER TABLE instances ADD COLUMN patient_name_fold TEXT;
    ALTER TABLE instances ADD COLUMN referring_fold TEXT;
    ALTER TABLE instances ADD COLUMN index_version {int};
    CREATE INDEX instances_patient ON instances(patient_id);
    CREATE INDEX instances_date ON instances(study_date);
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE INDEX instances_accession ON instances(accession);
    CREATE INDEX instances_name ON instances(patient_name_fold)
    """,
    # 6: several gateways on one database (docs/gateway.md#deployment): a claim's owner and
    # lease (epoch seconds on the database's clock), the live gateways, cluster-wide facts
    # (which object storage the cluster uses), instance files kept in the database itself
    # (objects = "database"), and the bulk-read counts every gateway adds to
    """
    ALTER TABLE instances ADD COLUMN owner TEXT;
    ALTER TABLE instances ADD COLUMN lease_until {float};
    CREATE INDEX instances_owner ON instances(owner);
    CREATE TABLE gateways (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid {int} NOT NULL,
                           started TEXT NOT NULL, heartbeat {float} NOT NULL,
                           problem TEXT, objects TEXT NOT NULL, version TEXT NOT NULL);
    CREATE TABLE cluster (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE objects (sha256 TEXT NOT NULL, chunk {int} NOT NULL, data {blob} NOT NULL,
                          PRIMARY KEY (sha256, chunk));
    CREATE TABLE bulk_reads (name TEXT NOT NULL, at {float} NOT NULL, count {int} NOT NULL);
    CREATE INDEX bulk_reads_name ON bulk_reads(name, at);
    CREATE TABLE bulk_alarms (name TEXT PRIMARY KEY, at {float} NOT NULL)
    """,
    # 7: reader studies read in the browser and deepfake-awareness rounds
    # (radguard.gateway.readers): studies, their cases with truth, each reader's sessions
    # (arm, stored random order), each reading (rating, server times, window/level changes)
    """
    CREATE TABLE reader_studies (id {id}, name TEXT NOT NULL, created_by TEXT NOT NULL,
                                 created_at TEXT NOT NULL, arms TEXT NOT NULL,
                                 scale TEXT NOT NULL, washout_days {float} NOT NULL,
                                 seed TEXT NOT NULL);
    CREATE TABLE reader_cases (study_id {int} NOT NULL, num {int} NOT NULL,
                               label TEXT NOT NULL, truth {int} NOT NULL, instance_id {int},
                               path TEXT, PRIMARY KEY (study_id, num));
    CREATE TABLE reader_sessions (study_id {int} NOT NULL, reader TEXT NOT NULL,
                                  sess {int} NOT NULL, arm TEXT NOT NULL,
                                  case_order TEXT NOT NULL, started_at {float},
                                  finished_at {float}, PRIMARY KEY (study_id, reader, sess));
    CREATE TABLE reader_readings (study_id {int} NOT NULL, reader TEXT NOT NULL,
                                  sess {int} NOT NULL, pos {int} NOT NULL,
                                  case_num {int} NOT NULL, arm TEXT NOT NULL,
                                  served_at {float}, rated_at {float}, diseased {int},
                                  confidence {float}, rating {float}, seconds {float},
                                  wl_center {float} NOT NULL, wl_width {float} NOT NULL,
                                  wl_changes TEXT NOT NULL,
                                  PRIMARY KEY (study_id, reader, sess, pos));
    CREATE TABLE awareness_rounds (id {id}, reader TEXT NOT NULL, generator TEXT NOT NULL,
                                   started_at {float} NOT NULL, finished_at {float});
    CREATE TABLE awareness_items (round_id {int} NOT NULL, pos {int} NOT NULL,
                                  path TEXT NOT NULL, source TEXT NOT NULL,
                                  synthetic {int} NOT NULL, answer {int}, confidence {int},
                                  served_at {float}, answered_at {float}, feedback TEXT,
                                  PRIMARY KEY (round_id, pos));
    CREATE TABLE awareness_seen (reader TEXT NOT NULL, generator TEXT NOT NULL,
                                 round_id {int} NOT NULL, PRIMARY KEY (reader, generator))
    """,
    # 8: objects looked up by content (the sweep asks, per old file, whether a row holds it)
    """
    CREATE INDEX instances_sha256 ON instances(sha256)
    """,
]

#: the columns migration 5 added, filled from the header at ingest (the ``header`` keys of
#: :func:`radguard.gateway.dimse.header_of` of the same names; the folded names derived)
INDEXED = ("accession", "study_time", "study_description", "referring_physician", "study_id",
           "patient_birth_date", "patient_sex", "series_number", "series_description",
           "pps_start_date", "pps_start_time", "instance_number", "pixel_rows",
           "pixel_columns", "bits_allocated", "frames", "charset")
INDEX_VERSION = 1


def index_values(header: dict[str, str]) -> tuple[Any, ...]:
    """The migration-5 column values of a header, in ``INDEXED`` order, then the folded
    patient and referring physician names and the index version."""
    values: list[Any] = []
    for column in INDEXED:
        value = header.get(column, "")
        if column in ("pixel_rows", "pixel_columns", "bits_allocated", "frames"):
            values.append(int(value) if str(value).isdigit() else None)
        else:
            values.append(value or "")
    return (*values, header.get("patient_name", "").casefold(),
            header.get("referring_physician", "").casefold(), INDEX_VERSION)


_INDEX_COLUMNS = (*INDEXED, "patient_name_fold", "referring_fold", "index_version")


class StoreError(RadguardError):
    """The store cannot be opened or written."""


class PoolBusy(StoreError):
    """Every pooled connection stayed busy for the pool's wait while the server answers:
    load, not an outage (the store's health is not failed for it)."""


class ReserveError(OSError):
    """Writing an object would leave less free space than the reserve (ENOSPC of radguard's
    own making: nothing was written, the store still works)."""


class State(StrEnum):
    """Where an instance is: in the queue, being checked, being sent to the PACS (the
    superseding of a copy is refused meanwhile: :meth:`Store.decide`), or decided."""

    QUEUED = "queued"
    PROCESSING = "processing"
    FORWARDING = "forwarding"
    DONE = "done"
    QUARANTINED = "quarantined"
    REJECTED = "rejected"


#: the states of work not finished: a crash or a failed write puts these back in the queue
IN_PROGRESS = (State.QUEUED, State.PROCESSING, State.FORWARDING)


@dataclass(frozen=True)
class Instance:
    """One stored instance row."""

    id: int
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class: str
    patient_id: str
    patient_name: str
    modality: str
    study_date: str
    path: str
    sha256: str
    size: int
    received_at: str
    source: str
    calling_ae: str
    state: str
    attempts: int
    verdict: str | None
    trust: str | None
    ai_probability: float | None
    ai_suspicion: int | None
    details: str | None
    forwarded: str | None
    processed_at: str | None
    decided_by: str | None
    decision_note: str | None
    duplicate_of: int | None = None  # the first copy's row when this is a conflicting one

    @property
    def detail(self) -> dict[str, Any]:
        """The pipeline's findings (decoded ``details``)."""
        return json.loads(self.details) if self.details else {}


_COLUMNS = [f for f in Instance.__dataclass_fields__]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _disk_full(exc: BaseException) -> bool:
    """A write failed for want of space (ENOSPC, a quota, a file size limit)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(exc).lower()
    return "disk is full" in text or "no space left" in text or "file too large" in text


def storage_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the state of the storage, not the fault of the data being written:
    no room (ENOSPC, a quota, a file size limit), a read-only filesystem, any SQLite
    operational error (full, locked, busy, read-only, I/O) or the store's own failure. Such
    an error never condemns an instance; it waits until the storage works."""
    if isinstance(exc, StoreError | sqlite3.OperationalError) or _disk_full(exc):
        return True
    return isinstance(exc, OSError) and exc.errno == errno.EROFS


def _write_failure(exc: BaseException, since: str) -> str:
    what = "disk full" if _disk_full(exc) else "the store cannot be written"
    return f"{what} since {since}Z: new images refused"


def _below_reserve(_exc: BaseException, since: str) -> str:
    return (f"intake paused since {since}Z: less free space than the reserve; new images "
            "refused, those received are still checked and forwarded")


class WriteHealth:
    """Whether writes work: ``problem`` is None while they do, else one line saying since
    when and why they fail. Listeners hear each transition once (``listener(problem)`` on
    failing, ``listener(None)`` on recovering), not every failed write. ``describe(exc,
    since)`` words the start of that line for the failure that began the outage."""

    def __init__(self, describe: Callable[[BaseException, str], str] = _write_failure
                 ) -> None:
        self.problem: str | None = None
        self.since: str | None = None
        self.failures = 0  # failed writes of the current (or last) outage
        self._describe = describe
        self._lock = threading.Lock()
        self.listeners: list[Callable[[str | None], None]] = []

    def failed(self, exc: BaseException) -> None:
        """A write failed with ``exc`` (a busy connection pool is load, not a failure)."""
        if isinstance(exc, PoolBusy):
            return
        with self._lock:
            if self.problem is not None:
                self.failures += 1
                return
            self.since, self.failures = _now(), 1
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            self.problem = f"{self._describe(exc, self.since[:19])} ({reason})"
            problem = self.problem
        for listener in list(self.listeners):
            listener(problem)

    def worked(self) -> None:
        """A durable write succeeded."""
        if self.problem is None:  # the common case: no lock
            return
        with self._lock:
            if self.problem is None:
                return
            self.problem = None
        for listener in list(self.listeners):
            listener(None)


class _Backend:
    """The few things that differ between SQLite and PostgreSQL."""

    name = "sqlite"
    ddl = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB", "int": "INTEGER",
           "float": "REAL"}
    begin = "BEGIN IMMEDIATE"  # take the write lock now: no upgrade deadlocks
    skip_locked = ""
    errors: tuple[type[BaseException], ...] = (sqlite3.DatabaseError,)

    def __init__(self, target: str) -> None:
        self.target = target

    def connect(self) -> Any:  # noqa: ANN401
        db = sqlite3.connect(self.target, isolation_level=None, timeout=30,
                             check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
        # LIKE as PostgreSQL's: case-sensitive (DICOM wildcard matching is, person names
        # aside, which are matched on their case-folded column)
        db.execute("PRAGMA case_sensitive_like=ON")
        return db

    #: the database's clock in epoch seconds (leases and heartbeats are compared on one
    #: clock, the database's, never on each gateway's own)
    clock = "((julianday('now') - 2440587.5) * 86400.0)"

    def sql(self, text: str) -> str:
        return text

    def describe(self) -> str:
        return self.target

    def close(self) -> None:
        """Close what the backend holds for all threads (SQLite: nothing)."""

    def lock_uid(self, execute: Callable[..., Any], uid: str) -> None:  # noqa: B027
        """Serialise writers of one SOP Instance UID within a transaction (SQLite's write
        transaction already excludes every other writer)."""

    def broken(self, db: Any) -> bool:  # noqa: ANN401
        """Whether a connection is lost for good (reconnect instead of reusing it)."""
        return False


class _Rows:
    """A statement's result, read whole before its pooled connection goes back (the
    cursor's interface the store's callers use)."""

    def __init__(self, cursor: Any) -> None:  # noqa: ANN401
        self.rowcount = cursor.rowcount
        self._rows = cursor.fetchall() if cursor.description is not None else []
        self._next = 0

    def fetchone(self) -> Any:  # noqa: ANN401
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rows, self._next = self._rows[self._next:], len(self._rows)
        return rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


class _Postgres(_Backend):
    """A bounded pool of connections (psycopg_pool), checked before each use: a server
    restart costs the statements in flight, and the pool reconnects by itself."""

    name = "postgresql"
    ddl = {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "blob": "BYTEA",
           "int": "BIGINT", "float": "DOUBLE PRECISION"}
    begin = "BEGIN"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    clock = "extract(epoch from clock_timestamp())::double precision"

    def __init__(self, target: str, *, pool_size: int = 8, name: str = "radguard",
                 wait: float = 10.0) -> None:
        super().__init__(target)
        psycopg = import_psycopg(StoreError, "a PostgreSQL store")
        try:
            import psycopg_pool
        except ImportError as exc:
            raise StoreError("a PostgreSQL store needs psycopg_pool: pip install "
                             "psycopg-pool") from exc
        self.psycopg = psycopg
        self.errors = (psycopg.Error, psycopg_pool.PoolTimeout)
        self.wait = wait  # seconds a statement waits for a free connection
        # the pool's own warnings repeat every reconnection attempt during an outage; the
        # store's health says it once (WriteHealth)
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        # whether the latest connection attempt (the pool's, in the background) failed: a
        # statement that finds no free connection then fails at once instead of waiting
        # out the pool's timeout - the server is away, not merely busy
        self.unreachable = False
        backend = self

        class _Connection(psycopg.Connection):  # type: ignore[type-arg]
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
                try:
                    conn = super().connect(*args, **kwargs)
                except psycopg.OperationalError:
                    backend.unreachable = True
                    raise
                backend.unreachable = False
                return conn

        self.pool = psycopg_pool.ConnectionPool(
            target, min_size=1, max_size=pool_size, open=False, timeout=wait,
            name=f"radguard-{name}", check=psycopg_pool.ConnectionPool.check_connection,
            # give a reconnection up after 3 s: the next statement starts a fresh one, so
            # the pool is back within a second or two of the server, not after a backoff
            # grown through a long outage (the store's health reports the outage)
            reconnect_timeout=3.0, connection_class=_Connection,
            kwargs={"autocommit": True, "connect_timeout": 5,
                    "application_name": f"radguard {name}"[:63],
                    # a gateway frozen or cut off inside a transaction must not hold its
                    # locks (the audit chain's, a UID's) for the cluster: the server ends
                    # such a session after a minute; a lock is waited for at most 30 s; a
                    # dead peer is noticed by keepalives within about half a minute
                    "options": "-c idle_in_transaction_session_timeout=60000 "
                               "-c lock_timeout=30000 -c statement_timeout=300000",
                    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                    "keepalives_count": 3, "tcp_user_timeout": 30000})

    def open(self) -> None:
        """Connect once directly (a wrong URL, password or port is said at once, with the
        server's words), then open the pool."""
        try:
            self.psycopg.connect(self.target, connect_timeout=5).close()
            self.pool.open(wait=True, timeout=self.wait)
        except self.errors as exc:
            self.pool.close()
            raise StoreError(f"{self.describe()}: not a usable database ({exc})") from exc

    def connect(self, wait: float | None = None) -> Any:  # noqa: ANN401
        """A pooled connection within ``wait`` seconds (the pool's wait by default), asked
        for a second at a time: once the pool's latest attempt to connect has failed, the
        server is away and the PoolTimeout comes after that second, not the full wait."""
        import time

        deadline = time.monotonic() + (self.wait if wait is None else wait)
        while True:
            slice_ = max(0.05, min(1.0, deadline - time.monotonic()))
            try:
                return self.pool.getconn(timeout=slice_)
            except self.errors[1]:
                if self.unreachable or time.monotonic() >= deadline:
                    raise

    def release(self, db: Any) -> None:  # noqa: ANN401
        self.pool.putconn(db)

    def close(self) -> None:
        self.pool.close()

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")  # no literal question marks in radguard's SQL

    def lock_uid(self, execute: Callable[..., Any], uid: str) -> None:
        # gateways sharing the database: an advisory lock per UID until the transaction ends
        execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (uid,))

    def broken(self, db: Any) -> bool:  # noqa: ANN401
        return bool(getattr(db, "closed", False)) or getattr(
            getattr(db, "info", None), "status", None) == self.psycopg.pq.ConnStatus.BAD

    def describe(self) -> str:
        from radguard.dicom.web import redact

        return redact(self.target)  # no user name or password in messages


class Store:
    """Files under ``data_dir/objects`` (or a shared ``objects_dir``, or in the database:
    :mod:`radguard.gateway.objects`); index in ``data_dir/radguard.db`` (SQLite) or in the
    PostgreSQL database ``db_url`` names.

    ``gateway_id`` names this gateway in a cluster: it owns its claims, whose leases
    (``lease_seconds``) :meth:`heartbeat` extends; ``pool_size`` bounds its PostgreSQL
    connections."""

    def __init__(self, data_dir: str | os.PathLike[str], db_url: str | None = None, *,
                 min_free: int = 0, gateway_id: str = "radguard", objects: str = "folder",
                 objects_dir: str | os.PathLike[str] | None = None, pool_size: int = 8,
                 lease_seconds: float = 30.0, cache_mb: int = 2048) -> None:
        self.root = Path(data_dir)
        self.gateway_id = gateway_id
        # lease_seconds is the longest a dead gateway's claims wait for another gateway: a
        # claim's lease runs three quarters of it from each extension, and the heartbeats
        # that extend leases (two may be missed) and reclaim lapsed ones come every quarter
        self.lease_seconds = float(lease_seconds)
        self._lease = self.lease_seconds * 3 / 4
        self.heartbeat_seconds = self.lease_seconds / 4
        # bytes kept free on the data folder's filesystem (fileio.room_above_reserve): an
        # instance that would go below is refused, and the store is not healthy until there
        # is room again
        self.min_free = min_free
        self.incoming = self.root / "incoming"  # large objects spooled while they arrive
        if objects == "database":
            if not is_postgres_url(db_url):
                raise StoreError('objects = "database" needs a PostgreSQL db_url')
            self.storage: ObjectStorage = DatabaseObjects(self.root / "cache", cache_mb << 20)
            self.objects = self.root  # the reserve is kept on the data folder's filesystem
        elif objects == "folder":
            self.objects = Path(objects_dir) if objects_dir else self.root / "objects"
            self.storage = FolderObjects(self.objects, self.root)
        else:
            raise StoreError(f'objects {objects!r}: "folder" or "database"')
        self.health = WriteHealth()  # whether writes work (the workers wait while they fail)
        # whether there is room above the reserve: below it new objects are refused (the
        # DICOM door, STOW-RS, ingest) while the workers go on - the reserve is their room
        self.intake = WriteHealth(_below_reserve)
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.root}: cannot create the data folder ({exc.strerror})") \
                from exc
        if is_postgres_url(db_url):
            self.backend: _Backend = _Postgres(db_url, pool_size=pool_size, name=gateway_id)
        elif db_url:
            raise StoreError(f"db_url: only postgresql://... URLs are supported "
                             f"(got {db_url.split(':', 1)[0]}:...)")
        else:
            self.backend = _Backend(str(self.root / "radguard.db"))
        self.db_path = self.backend.describe()
        self._local = threading.local()
        # SQLite: one writer at a time inside this process (its write lock is the file's);
        # PostgreSQL: transactions run side by side, each on its own pooled connection
        self._lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.backend.name == "sqlite" else contextlib.nullcontext())
        if isinstance(self.backend, _Postgres):
            self.backend.open()
        try:
            self._migrate()
        except BaseException:
            self.backend.close()
            raise

    # -- connections and statements ----------------------------------------------------------
    def _db(self) -> Any:  # noqa: ANN401
        """SQLite: this thread's connection (opened on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = self.backend.connect()
            except self.backend.errors as exc:
                raise StoreError(f"{self.db_path}: not a usable database ({exc})") from exc
            self._local.db = db
        return db

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:  # noqa: ANN401
        """Run one statement (``?`` placeholders): in this thread's open transaction, else
        on SQLite this thread's connection, on PostgreSQL a pooled connection borrowed for
        the statement (its rows read before it goes back)."""
        held = getattr(self._local, "tx", None)
        if held is None and isinstance(self.backend, _Postgres):
            with self._borrowed() as db:
                return _Rows(self._run(db, sql, params))
        return self._run(held if held is not None else self._db(), sql, params)

    def _run(self, db: Any, sql: str, params: tuple[Any, ...]) -> Any:  # noqa: ANN401
        try:
            return db.execute(self.backend.sql(sql), params)
        except self.backend.errors as exc:
            if self.backend.name == "sqlite" and self.backend.broken(db):
                self._local.db = None
                with contextlib.suppress(Exception):
                    db.close()
            raise StoreError(f"{self.db_path}: database error ({exc})") from exc

    def connection(self) -> contextlib.AbstractContextManager[Any]:
        """A PostgreSQL connection of the store's pool, for a while (another part of the
        gateway - the audit log - writing to the same database within ``db_pool``)."""
        if not isinstance(self.backend, _Postgres):
            raise StoreError("only a PostgreSQL store lends connections")
        return self._borrowed()

    @contextlib.contextmanager
    def _borrowed(self, wait: float | None = None) -> Iterator[Any]:
        """A pooled PostgreSQL connection for a while (StoreError when none comes within
        ``wait`` seconds: the server is away or every connection is busy). While writes
        are failing, or once the pool cannot connect, the wait is a second: a C-STORE is
        refused (0xA700) at once, not after the pool's full wait."""
        backend = self.backend
        assert isinstance(backend, _Postgres)
        if wait is None and self.health.problem:
            wait = 1.0
        try:
            db = backend.connect(wait)
        except backend.errors as exc:
            if not backend.unreachable:
                raise PoolBusy(f"{self.db_path}: every database connection is busy "
                               f"({exc})") from exc
            raise StoreError(f"{self.db_path}: no database connection ({exc})") from exc
        try:
            yield db
        finally:
            backend.release(db)  # a broken one is discarded, and replaced in the background

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """One write transaction (committed on success, rolled back on any error).

        ``durable=False``: SQLite commits without waiting for the disk. Only for changes a
        power cut may undo harmlessly; a later durable commit makes them durable too, since
        the write-ahead log is synced in order."""
        lazy = not durable and self.backend.name == "sqlite"
        with self._lock, contextlib.ExitStack() as stack:
            if isinstance(self.backend, _Postgres):
                self._local.tx = stack.enter_context(self._borrowed())
                stack.callback(setattr, self._local, "tx", None)
            if lazy:
                self.execute("PRAGMA synchronous=NORMAL")
            try:
                self.execute(self.backend.begin)
                try:
                    yield
                    self.execute("COMMIT")
                except BaseException:
                    # also after a failed COMMIT (a full disk): SQLite may keep the
                    # transaction open, and the next BEGIN on this connection would fail
                    with contextlib.suppress(StoreError):
                        self.execute("ROLLBACK")
                    raise
            finally:
                if lazy:
                    with contextlib.suppress(StoreError):
                        self.execute("PRAGMA synchronous=FULL")

    def _migrate(self) -> None:
        with self.transaction():
            # one migrating gateway at a time, from the very first statement (two creating
            # the table at once on an empty PostgreSQL collide in its catalogue)
            self.backend.lock_uid(self.execute, "radguard-migrate")
            self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.db_path}: made by a newer radguard (schema {version})")
            for number, script in enumerate(MIGRATIONS[version:], version + 1):
                for statement in filter(str.strip, script.format(**self.backend.ddl).split(";")):
                    self.execute(statement)
                self.execute("DELETE FROM schema_version")
                self.execute("INSERT INTO schema_version VALUES (?)", (number,))

    def ping(self, wait: float = 2.0) -> None:
        """StoreError unless the database answers within about ``wait`` seconds (the
        readiness a load balancer asks for)."""
        if isinstance(self.backend, _Postgres):
            with self._borrowed(wait) as db:
                self._run(db, "SELECT 1", ())
        else:
            self.execute("SELECT 1")

    def now(self) -> float:
        """The database's clock, epoch seconds (what leases, heartbeats and the bulk-read
        window are measured on, so gateways with skewed clocks agree)."""
        return float(self.execute(f"SELECT {self.backend.clock}").fetchone()[0])

    @property
    def schema_version(self) -> int:
        """The applied migration count."""
        return int(self.execute("SELECT version FROM schema_version").fetchone()[0])

    # -- ingest ----------------------------------------------------------------------------------
    def ingest(self, data: bytes | os.PathLike[str], header: dict[str, str], *, source: str,
               calling_ae: str = "") -> int:
        """Store one Part 10 object durably and queue it; returns its row id. ``header``
        holds the UIDs and the few attributes the worklist shows (already validated by the
        caller).

        ``data`` is the object's bytes or a file holding it (a spooled large object): the
        file is hashed while read and moved into the store - or deleted when the store
        already holds the same bytes. When ingest fails the caller deletes what is left of
        it; a file already moved but without a row is never acknowledged, and
        :meth:`recover` removes it.
        The same bytes under the same SOP Instance UID again are a resend: the first row's
        id comes back and nothing is added. Different bytes under a UID already held get
        a row of their own with ``duplicate_of`` set; they never replace the first copy.
        """
        try:
            row, wrote = self._ingest(data, header, source, calling_ae)
        except (ReserveError, PoolBusy):
            raise  # nothing was written, the store works (intake may pause, _check_room)
        except (OSError, StoreError) as exc:
            self.health.failed(exc)
            raise
        if wrote:
            self.health.worked()
            self.intake.worked()
        return row

    def _ingest(self, data: bytes | os.PathLike[str], header: dict[str, str], source: str,
                calling_ae: str) -> tuple[int, bool]:
        """(row id, whether anything was written)."""
        spooled = None if isinstance(data, bytes | bytearray | memoryview) else Path(data)
        if spooled is None:
            digest, size = hashlib.sha256(data).hexdigest(), len(data)  # type: ignore[arg-type]
        else:
            with open(spooled, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
                size = os.fstat(fh.fileno()).st_size
        # PostgreSQL's text holds no NUL (a sender's data may): never a store failure
        header = {k: v.replace("\x00", "\ufffd") if isinstance(v, str) else v
                  for k, v in header.items()}
        sop = header["sop_uid"]
        known = self.execute("SELECT id FROM instances WHERE sop_uid=? AND sha256=? "
                             "ORDER BY id LIMIT 1", (sop, digest)).fetchone()
        if known is not None:  # a resend: no second file, no second row
            if spooled is not None:
                spooled.unlink(missing_ok=True)
            return int(known[0]), False
        self._check_room(0 if spooled is not None and self._same_device(spooled) else size)
        payload: bytes | Path = spooled if spooled is not None else bytes(data)  # type: ignore[arg-type]
        folder = isinstance(self.storage, FolderObjects)
        if folder and not self.storage.exists(digest):  # type: ignore[attr-defined]
            # written before the transaction (no database lock held while it lasts); an
            # object already there is confirmed under its lock below, where a sweep that
            # might remove it waits
            self.storage.put(digest, payload, self.execute)
        with self.transaction():
            self.backend.lock_uid(self.execute, sop)
            self.backend.lock_uid(self.execute, digest)  # against a sweep of this object
            same = self.execute("SELECT id FROM instances WHERE sop_uid=? AND sha256=? "
                                "ORDER BY id LIMIT 1", (sop, digest)).fetchone()
            if same is not None:  # the same resend raced this one in
                if spooled is not None:
                    spooled.unlink(missing_ok=True)
                return int(same[0]), False
            self.storage.put(digest, payload, self.execute)
            row = self.execute(
                "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class, "
                "patient_id, patient_name, modality, study_date, path, sha256, size, "
                f"received_at, source, calling_ae, duplicate_of, {', '.join(_INDEX_COLUMNS)}) "
                f"VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?{',?' * len(_INDEX_COLUMNS)}) "
                "RETURNING id",
                (sop, header.get("study_uid", ""),
                 header.get("series_uid", ""), header.get("sop_class", ""),
                 header.get("patient_id", ""), header.get("patient_name", ""),
                 header.get("modality", ""), header.get("study_date", ""),
                 self.storage.location(digest), digest, size, _now(), source,
                 calling_ae, self._original_id(sop), *index_values(header))).fetchone()
        return int(row[0]), True

    def _original_id(self, sop_uid: str, before: int | None = None) -> int | None:
        """The copy a new copy of ``sop_uid`` (or row ``before``) conflicts with: the
        earliest one not rejected. None: no such copy, so it is no duplicate."""
        bound, params = ("", (sop_uid,)) if before is None else (" AND id<?", (sop_uid, before))
        row = self.execute("SELECT id FROM instances WHERE sop_uid=? AND state<>'rejected'"
                           f"{bound} ORDER BY id LIMIT 1", params).fetchone()
        return None if row is None else int(row[0])

    def recheck_original(self, instance: Instance) -> Instance | None:
        """The copy a conflicting duplicate conflicts with now - the earliest earlier copy
        not rejected, which changes when that one was rejected after this one arrived -
        recorded in ``duplicate_of`` (None: it is no longer a duplicate)."""
        with self.transaction():
            self.backend.lock_uid(self.execute, instance.sop_uid)
            original = self._original_id(instance.sop_uid, instance.id)
            if original != instance.duplicate_of:
                self.execute("UPDATE instances SET duplicate_of=? WHERE id=?",
                             (original, instance.id))
        return None if original is None else self.get(original)

    def _check_room(self, size: int) -> None:
        """:class:`ReserveError` when writing ``size`` more bytes would leave less than the
        reserve free (0: whether the disk is below the reserve already). Below it, intake
        pauses (:attr:`intake`); an object too large for the room above it is only refused."""
        if not self.min_free:
            return
        room = room_above_reserve(self.objects, self.min_free)
        if room >= size:
            return
        exc = ReserveError(errno.ENOSPC, f"less than the reserve of {self.min_free >> 20} "
                                         "MiB would be left free (at most 5% of the filesystem)")
        if room < 0:
            self.intake.failed(exc)
        raise exc

    def check_intake(self) -> bool:
        """Whether new objects may come in now (the filesystem is above the reserve), with
        :attr:`intake` paused or resumed to match. One statvfs: the workers ask while intake
        is paused, to notice when space returns. Other OSErrors (statvfs failing) propagate."""
        try:
            self._check_room(0)
        except ReserveError:
            return False
        self.intake.worked()
        return True

    def door_refused(self, problem: OSError) -> None:
        """The DICOM door could not keep a data set (``Acceptor(on_unwritable=...)``, at
        most once a minute): for want of room, intake pauses if the filesystem is below the
        reserve (one data set too large for the room above it changes nothing); any other
        failure - or running out of space with no reserve - is the store's :attr:`health`."""
        if self.min_free and _disk_full(problem):
            self.check_intake()
        else:
            self.health.failed(problem)

    def _same_device(self, spooled: Path) -> bool:
        """A spooled file on the store's filesystem is renamed into place (no new bytes).
        Objects in the database: the spool becomes the cached copy, nothing new either."""
        if isinstance(self.storage, DatabaseObjects):
            return True
        try:
            return spooled.stat().st_dev == self.objects.stat().st_dev
        except OSError:
            return False

    def probe(self) -> bool:
        """Whether the store can be written now (a 1 MiB file written and fsync'd, then
        removed, and one durable database transaction); records the result in
        :attr:`health`. Used while writes fail, to notice when they work again. Real
        writability only, not the reserve: below it the workers go on (:attr:`intake`)."""
        try:
            probe = self.incoming / "write-probe"  # removed by recover() after a crash
            atomic_write_bytes(probe, bytes(1 << 20), 0o600, durable=True)
            probe.unlink(missing_ok=True)  # several workers may probe at once
            with self.transaction():
                self.execute("UPDATE schema_version SET version=version")
        except (OSError, StoreError) as exc:
            self.health.failed(exc)
            return False
        self.health.worked()
        return True

    # -- queue -----------------------------------------------------------------------------------
    def claim(self) -> Instance | None:
        """The oldest queued instance, now marked ``processing`` (None if the queue is empty).
        Not a durable commit: a claim lost to a power cut leaves the instance queued, and
        :meth:`recover` requeues claims that survive a crash anyway.
        One statement takes the row and returns it, so no later read can fail and leave it
        claimed by nobody."""
        try:
            with self.transaction(durable=False):
                rows = self.execute(
                    "UPDATE instances SET state='processing', attempts=attempts+1, owner=?, "
                    f"lease_until={self.backend.clock}+? WHERE id=("
                    "SELECT id FROM instances WHERE state='queued' ORDER BY id LIMIT 1"
                    f"{self.backend.skip_locked}) RETURNING {', '.join(_COLUMNS)}",
                    (self.gateway_id, self._lease)).fetchall()
        except (OSError, StoreError) as exc:
            self.health.failed(exc)
            raise
        return Instance(*rows[0]) if rows else None

    def start_forwarding(self, instance: Instance) -> bool:
        """Mark a checked instance ``forwarding`` before it is sent to the PACS. False when
        it is no longer ``processing`` - an admin released another copy of its SOP Instance
        UID meanwhile, superseding this one - and it must not be sent. While it is
        forwarding, such a release is refused (:meth:`decide`). Not a durable commit: a
        power cut that undoes it leaves the claim, which :meth:`recover` requeues."""
        try:
            with self.transaction(durable=False):
                self.backend.lock_uid(self.execute, instance.sop_uid)
                changed = self.execute(
                    "UPDATE instances SET state=? WHERE id=? AND state=? AND owner=? "
                    "AND attempts=?", (State.FORWARDING, instance.id, State.PROCESSING,
                                       self.gateway_id, instance.attempts)).rowcount
        except (OSError, StoreError) as exc:
            self.health.failed(exc)
            raise
        return bool(changed)

    def finish(self, instance_id: int, *, state: str, verdict: str, trust: str,
               details: dict[str, Any], ai_probability: float | None = None,
               ai_suspicion: int | None = None, forwarded: str | None = None,
               attempt: int | None = None) -> bool:
        """Record the pipeline's result and final state in one transaction; False when the
        instance was superseded while it was checked (it stays rejected), or when this
        gateway's claim lapsed meanwhile (its lease expired and another gateway took it).
        ``attempt`` (the claim's ``attempts``) fences the claim itself: a worker whose claim
        lapsed and was claimed again - even by a worker of this gateway - changes nothing."""
        if state not in (State.DONE, State.QUARANTINED, State.REJECTED):
            raise StoreError(f"unknown final state {state!r}")
        try:
            with self.transaction():
                changed = self.execute(
                    "UPDATE instances SET state=?, verdict=?, trust=?, details=?, "
                    "ai_probability=?, ai_suspicion=?, forwarded=?, processed_at=?, "
                    "lease_until=NULL WHERE id=? AND state IN (?, ?) AND owner=?"
                    f"{'' if attempt is None else ' AND attempts=?'}",
                    (state, verdict, trust, json.dumps(details, default=str), ai_probability,
                     ai_suspicion, forwarded, _now(), instance_id, State.PROCESSING,
                     State.FORWARDING, self.gateway_id,
                     *(() if attempt is None else (attempt,)))).rowcount
        except (OSError, StoreError) as exc:
            self.health.failed(exc)
            raise
        self.health.worked()
        return bool(changed)

    def requeue(self, instance_id: int, attempt: int | None = None) -> None:
        """Put a claimed instance back (the PACS was unreachable, the store could not record
        the result; try again later); ``attempt`` fences the claim as in :meth:`finish`."""
        try:
            with self.transaction():
                self.execute("UPDATE instances SET state=?, owner=NULL, lease_until=NULL "
                             "WHERE id=? AND state IN (?, ?) AND owner=?"
                             f"{'' if attempt is None else ' AND attempts=?'}",
                             (State.QUEUED, instance_id, State.PROCESSING, State.FORWARDING,
                              self.gateway_id, *(() if attempt is None else (attempt,))))
        except (OSError, StoreError) as exc:
            self.health.failed(exc)
            raise

    def set_forwarded(self, instance_id: int, forwarded: str) -> None:
        """Record where an instance went after a release."""
        with self.transaction():
            self.execute("UPDATE instances SET forwarded=? WHERE id=?", (forwarded, instance_id))

    def decide(self, instance_id: int, state: str, who: str, note: str) -> Instance:
        """A person's release (``done``) or rejection of a quarantined instance.

        Releasing a conflicting duplicate (``duplicate_of`` set) accepts it as the
        replacement of the copy served so far: every other copy of that SOP Instance UID that
        is not rejected - served, queued, being checked or in quarantine - is rejected in the
        same transaction ("superseded"), so exactly one copy is served, none can become
        served later, and the one forwarded on release is the one the admin chose. A copy
        being sent to the PACS at that moment cannot be called back: the release is then
        refused (StoreError, "decide again in a moment") until it is sent, so the PACS gets
        the admin's choice last."""
        if state not in (State.DONE, State.REJECTED):
            raise StoreError("a quarantine decision is release or reject")
        with self.transaction():
            row = self.execute("SELECT sop_uid, duplicate_of FROM instances WHERE id=?",
                               (instance_id,)).fetchone()
            if row is not None:  # no worker starts forwarding a copy of it meanwhile
                self.backend.lock_uid(self.execute, row[0])
            changed = self.execute(
                "UPDATE instances SET state=?, decided_by=?, decision_note=? "
                "WHERE id=? AND state='quarantined'", (state, who, note, instance_id)).rowcount
            if changed and state == "done" and row is not None and row[1] is not None:
                sending = self.execute("SELECT id FROM instances WHERE sop_uid=? AND id<>? "
                                       "AND state=?", (row[0], instance_id,
                                                       State.FORWARDING)).fetchone()
                if sending is not None:
                    raise StoreError(f"row {sending[0]}, another copy of this SOP Instance "
                                     "UID, is being sent to the PACS now; decide again in a "
                                     "moment")
                self.execute(
                    "UPDATE instances SET state='rejected', decided_by=?, decision_note=? "
                    "WHERE sop_uid=? AND id<>? AND state<>'rejected'",
                    (who, f"superseded by row {instance_id}, released by {who}: {note}"[:500],
                     row[0], instance_id))
        if not changed:
            raise StoreError(f"instance {instance_id} is not in quarantine")
        found = self.get(instance_id)
        assert found is not None
        return found

    def recover(self, *, sweep: bool = True) -> dict[str, int]:
        """At start, after a crash of this gateway: its own unfinished claims back to the
        queue, its own spooled objects (never acknowledged) removed, and old unreferenced
        objects swept (:meth:`sweep`). Other gateways' claims are theirs: a dead gateway's
        come back when their lease expires (:meth:`heartbeat`). An embedded SQLite store has
        no other gateway: every claim is this one's (and rows from before leases have no
        owner)."""
        mine = "1=1" if self.backend.name == "sqlite" else "owner=?"
        with self.transaction():
            requeued = self.execute(
                "UPDATE instances SET state=?, owner=NULL, lease_until=NULL "
                f"WHERE state IN (?, ?) AND {mine}",
                (State.QUEUED, State.PROCESSING, State.FORWARDING,
                 *(() if mine == "1=1" else (self.gateway_id,)))).rowcount
        spooled = 0
        for path in self.incoming.glob("*"):  # objects still arriving: never acknowledged
            if path.is_file():
                path.unlink(missing_ok=True)
                spooled += 1
        if isinstance(self.storage, DatabaseObjects):
            # a cached copy written before a crash may be torn (the cache is not fsync'd):
            # fetched again when needed
            shutil.rmtree(self.storage.cache, ignore_errors=True)
        return {"requeued": requeued, "orphans_removed": self.sweep() if sweep else 0,
                "spooled_removed": spooled}

    def sweep(self) -> int:
        """Objects no row references, old enough that no gateway can be about to commit one
        (:data:`~radguard.gateway.objects.ORPHAN_GRACE`), and interrupted writes; for
        objects in the database, the cache beyond its size."""
        def referenced(digest: str) -> bool:
            return self.execute("SELECT 1 FROM instances WHERE sha256=? LIMIT 1",
                                (digest,)).fetchone() is not None

        @contextlib.contextmanager
        def locked(digest: str) -> Iterator[None]:
            with self.transaction():
                self.backend.lock_uid(self.execute, digest)
                yield

        return self.storage.sweep(referenced, locked)

    def register(self, *, host: str, pid: int, version: str) -> None:
        """Record this gateway among the cluster's (table ``gateways``) and check that it
        shares the cluster's object storage: a gateway whose objects the others cannot read
        would claim instances it cannot find, and serve none of theirs. StoreError if not, or
        if a live gateway already has this id (its heartbeat is recent and, on this host, its
        process runs): after two leases without a heartbeat - a gateway killed on another
        host, or in a container that came back under a new name - the id is free again, so
        a restart waits that long rather than failing. Nothing to do on embedded SQLite (a
        start on a full disk must not fail here)."""
        import time

        if self.backend.name == "sqlite":  # a file of its own: no other gateway shares it
            return
        try:
            identity = self.storage.identity()
        except OSError as exc:
            raise StoreError(f"{self.objects}: cannot mark the object folder "
                             f"({exc.strerror or exc})") from exc
        deadline = time.monotonic() + 2 * self.lease_seconds + 1
        while not self._join(identity, host, pid, version):
            if time.monotonic() > deadline:
                clash = self._id_in_use(host, pid) or ("?", 0)
                raise StoreError(f"gateway id {self.gateway_id!r} is in use by a running "
                                 f"gateway (process {clash[1]} on {clash[0]}): give each "
                                 "gateway its own [cluster] gateway_id")
            time.sleep(0.5)

    def _join(self, identity: str, host: str, pid: int, version: str) -> bool:
        """One attempt of :meth:`register`, under the cluster's lock (two gateways starting
        together under one id cannot both pass): False while the id is in use."""
        with self.transaction():
            self.backend.lock_uid(self.execute, "radguard-cluster")
            if self._id_in_use(host, pid) is not None:
                return False
            row = self.execute("SELECT value FROM cluster WHERE key='objects'").fetchone()
            if row is None:
                self.execute("INSERT INTO cluster (key, value) VALUES ('objects', ?)",
                             (identity,))
            elif row[0] != identity:
                raise StoreError(
                    f"the gateways on {self.db_path} keep instance files in "
                    f"{_storage_name(row[0])}, this one in {_storage_name(identity)}: every "
                    "gateway must read every other's objects. Set [cluster] objects = "
                    '"database", or objects_dir to the folder they share (a folder of '
                    "one's own is not shared: docs/gateway.md#deployment). If the objects "
                    "were moved on purpose: DELETE FROM cluster WHERE key='objects'")
            self.execute("DELETE FROM gateways WHERE id=?", (self.gateway_id,))
            self.execute("INSERT INTO gateways (id, host, pid, started, heartbeat, problem, "
                         f"objects, version) VALUES (?, ?, ?, ?, {self.backend.clock}, NULL, "
                         "?, ?)", (self.gateway_id, host, pid, _now(), identity, version))
        return True

    def unregister(self) -> None:
        """A clean stop: this gateway leaves the cluster's list (its id is free at once) and
        its unfinished claims, if any, go back to the queue for the others."""
        with self.transaction():
            self.execute("UPDATE instances SET state=?, owner=NULL, lease_until=NULL WHERE "
                         "owner=? AND state IN (?, ?)", (State.QUEUED, self.gateway_id,
                                                         State.PROCESSING, State.FORWARDING))
            self.execute("DELETE FROM gateways WHERE id=?", (self.gateway_id,))

    def _id_in_use(self, host: str, pid: int) -> tuple[str, int] | None:
        """(host, process) of another live gateway registered under this id, or None."""
        row = self.execute(f"SELECT host, pid FROM gateways WHERE id=? AND heartbeat>"
                           f"{self.backend.clock}-?", (self.gateway_id, 2 * self.lease_seconds)
                           ).fetchone()
        if row is None or (row[0], row[1]) == (host, pid):
            return None
        if row[0] == host:  # on this host: whether that process still runs
            try:
                os.kill(int(row[1]), 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass  # it runs, as another user
        return str(row[0]), int(row[1])

    def heartbeat(self, problem: str | None = None,
                  held: Collection[int] | None = None) -> dict[str, int]:
        """Say this gateway lives (``gateways.heartbeat``), extend the leases of the claims
        its workers hold (``held``; None: every claim in its name), and put back in the
        queue the claims whose lease expired - a gateway that died or lost the database
        for longer than a lease, or a claim no worker holds (its commit reached the server,
        the answer did not). Run every quarter of a lease (``heartbeat_seconds``): a dead
        gateway's claims are back in the queue within ``lease_seconds`` of its death."""
        clock = self.backend.clock
        ids = sorted(held) if held is not None else None
        with self.transaction(durable=False):
            self.execute(f"UPDATE gateways SET heartbeat={clock}, problem=? WHERE id=?",
                         (problem, self.gateway_id))
            mine = "" if ids is None else f" AND id IN ({','.join('?' * len(ids)) or 'NULL'})"
            extended = self.execute(
                f"UPDATE instances SET lease_until={clock}+? WHERE owner=? AND state IN (?, ?)"
                f"{mine}", (self._lease, self.gateway_id, State.PROCESSING,
                            State.FORWARDING, *(ids or ()))).rowcount
        lapsed = f"state IN (?, ?) AND (lease_until IS NULL OR lease_until<{clock})"
        with self.transaction():
            reclaimed = self.execute(f"SELECT id, owner FROM instances WHERE {lapsed}"
                                     f"{self.backend.skip_locked}",
                                     (State.PROCESSING, State.FORWARDING)).fetchall()
            for row_id, _owner in reclaimed:
                self.execute("UPDATE instances SET state=?, owner=NULL, lease_until=NULL "
                             f"WHERE id=? AND {lapsed}",
                             (State.QUEUED, row_id, State.PROCESSING, State.FORWARDING))
        for row_id, owner in reclaimed:
            log.warning("row %s back in the queue: the lease of gateway %s expired", row_id,
                        owner)
        return {"extended": extended, "reclaimed": len(reclaimed)}

    def gateways(self) -> list[dict[str, Any]]:
        """The cluster's gateways with the age of their last heartbeat (seconds)."""
        rows = self.execute(
            f"SELECT id, host, pid, started, {self.backend.clock}-heartbeat, problem, objects, "
            "version FROM gateways ORDER BY id").fetchall()
        keys = ("id", "host", "pid", "started", "silent_for", "problem", "objects", "version")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # -- reading ---------------------------------------------------------------------------------
    def get(self, instance_id: int) -> Instance | None:
        """One row by id."""
        row = self.execute(f"SELECT {', '.join(_COLUMNS)} FROM instances WHERE id=?",
                           (instance_id,)).fetchone()
        return Instance(*row) if row else None

    def instances(self, where: str = "1=1", params: tuple[Any, ...] = (),
                  order: str = "id") -> list[Instance]:
        """Rows matching a fixed SQL condition (callers pass constants, values as params)."""
        cur = self.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM instances WHERE {where} ORDER BY {order}",
            params)
        return [Instance(*r) for r in cur.fetchall()]

    def clinical_instances(self, where: str = "1=1", params: tuple[Any, ...] = (),
                           order: str = "id") -> list[Instance]:
        """What DICOMweb and the viewer serve, among rows matching ``where``: per SOP
        Instance UID the first copy that passed the checks or was released (``done``). A
        conflicting later copy never shadows it; only an admin's release of that copy
        replaces it (:meth:`decide`). The first copy is chosen among all copies of the UID,
        whatever ``where`` says of them (a copy claiming another study changes nothing)."""
        return self.instances(f"{self.visible_where(False)} AND ({where})", params, order)

    def visible_where(self, quarantine: bool) -> str:
        """The SQL condition on ``instances`` of :meth:`visible_instances` (for queries
        that select their own columns, :mod:`radguard.gateway.query`).

        On SQLite the state test is written ``+instances.state``, which keeps the planner
        off the state index: without statistics it takes ``state='done'`` for selective,
        when nearly every row is done, and walks the whole table (rows carrying their
        check results, 4 KB each) instead of the index of a search's own key (a name or a
        date): 38 ms instead of 2 for 110 matches among 10,000 studies."""
        state = "+instances.state" if self.backend.name == "sqlite" else "instances.state"
        clinical = (f"({state}='done' AND NOT EXISTS (SELECT 1 FROM instances AS "
                    "earlier WHERE earlier.sop_uid=instances.sop_uid AND earlier.state='done' "
                    "AND earlier.id<instances.id))")
        # a quarantined copy only where no copy is clinical, and the first of them: a
        # viewer must never get two objects under one SOP Instance UID
        held = (f"({state}='quarantined' AND NOT EXISTS (SELECT 1 FROM instances AS "
                "other WHERE other.sop_uid=instances.sop_uid AND (other.state='done' OR "
                "(other.state='quarantined' AND other.id<instances.id))))")
        return f"({clinical} OR {held})" if quarantine else clinical

    def backfill_index(self, header: Callable[[Path], dict[str, str]],
                       batch: int = 500) -> int:
        """Fill the query columns of rows stored before migration 5 from their files (a
        file that cannot be read keeps empty columns, marked indexed: it is said once in
        the log, never retried at each start). Returns the rows indexed."""
        done = 0
        while True:
            rows = self.execute("SELECT id, sha256, path FROM instances WHERE index_version IS "
                                f"NULL ORDER BY id LIMIT {int(batch)}").fetchall()
            if not rows:
                return done
            for row_id, digest, rel in rows:
                try:
                    values = index_values(header(self.locate(digest, rel)))
                except (OSError, RadguardError) as exc:
                    log.warning("row %s: query attributes not indexed: %s", row_id, exc)
                    values = index_values({})
                columns = ", ".join(f"{c}=?" for c in _INDEX_COLUMNS)
                with self.transaction():
                    self.execute(f"UPDATE instances SET {columns} WHERE id=?", (*values, row_id))
                done += 1

    def visible_instances(self, where: str = "1=1", params: tuple[Any, ...] = (), *,
                          quarantine: bool = False, order: str = "id") -> list[Instance]:
        """What a DICOMweb or DIMSE client may query and retrieve: the clinical copies
        (:meth:`clinical_instances`), plus - for roles that decide about quarantine
        (``quarantine``) - the quarantined copies, so they can be looked at before a
        decision. Rejected objects are never served."""
        return self.instances(f"{self.visible_where(quarantine)} AND ({where})", params, order)

    def counts(self) -> dict[str, int]:
        """Instances per state."""
        return dict(self.execute("SELECT state, COUNT(*) FROM instances GROUP BY state")
                    .fetchall())

    def file(self, instance: Instance) -> Path:
        """The instance's file on disk (from the database: a cached copy)."""
        return self.locate(instance.sha256, instance.path)

    def locate(self, sha256: str, path: str) -> Path:
        """The file of a row's ``sha256`` and ``path``: in a folder where ``path`` says
        (relative to the data folder, or absolute in a shared folder), from the database
        through the cache."""
        if isinstance(self.storage, DatabaseObjects):
            return self.storage.local(sha256, self.execute)
        here = self.storage.path(sha256)  # by content: a shared folder may be mounted
        return here if here.exists() else self.root / path  # elsewhere by another gateway

    def iter_queue(self) -> Iterator[Instance]:
        """Claim instances until the queue is empty."""
        while (instance := self.claim()) is not None:
            yield instance

    def close(self) -> None:
        """Close this thread's connection (SQLite) or the pool (PostgreSQL: the store is
        not used after)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        self.backend.close()


def _storage_name(identity: str) -> str:
    return "the database" if identity == "database" else f"object folder {identity}"
