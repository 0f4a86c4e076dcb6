"""The gateway's embedded store: instance files plus a SQLite index and work queue.

An instance is acknowledged only after :meth:`Store.ingest` returns, and that happens only
after its file is fsync'd under a content-addressed name and its row is committed (SQLite in
WAL mode with ``synchronous=FULL``). The same row is the instance's place in the work queue:
``queued`` -> ``processing`` (-> ``forwarding``) -> ``done``/``quarantined``/``rejected``
(:class:`State`). A crash leaves at most rows in ``processing`` or ``forwarding``;
:meth:`Store.recover` puts them back in the queue, and the pipeline writes its result and
the final state in one transaction, so each received instance is processed exactly once
(and sent to the PACS at least once). Files without a row (a crash between fsync and
commit: never acknowledged) are removed by ``recover``.

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
(``db_url = "postgresql://user:pw@host/radguard"``) and several gateways can then share one
queue (claims use ``FOR UPDATE SKIP LOCKED``). Files stay in the data folder either way.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from radguard.errors import RadguardError
from radguard.fileio import atomic_write_bytes, atomic_writer, room_above_reserve
from radguard.forensics.calibration import SCHEMA as CALIBRATION_SCHEMA

__all__ = ["IN_PROGRESS", "Instance", "ReserveError", "State", "Store", "StoreError",
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
        """A write failed with ``exc``."""
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

    def sql(self, text: str) -> str:
        return text

    def describe(self) -> str:
        return self.target

    def lock_uid(self, execute: Callable[..., Any], uid: str) -> None:  # noqa: B027
        """Serialise writers of one SOP Instance UID within a transaction (SQLite's write
        transaction already excludes every other writer)."""

    def broken(self, db: Any) -> bool:  # noqa: ANN401
        """Whether a connection is lost for good (reconnect instead of reusing it)."""
        return False


class _Postgres(_Backend):
    name = "postgresql"
    ddl = {"id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", "blob": "BYTEA",
           "int": "BIGINT", "float": "DOUBLE PRECISION"}
    begin = "BEGIN"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, target: str) -> None:
        super().__init__(target)
        try:
            import psycopg
        except ImportError as exc:
            raise StoreError("a PostgreSQL store needs psycopg: pip install "
                             "'psycopg[binary]'") from exc
        self.psycopg = psycopg
        self.errors = (psycopg.Error,)

    def connect(self) -> Any:  # noqa: ANN401
        return self.psycopg.connect(self.target, autocommit=True, connect_timeout=10)

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

        return redact(self.target.replace("postgresql://", "http://")).replace(
            "http://", "postgresql://")


class Store:
    """Files under ``data_dir/objects``; index in ``data_dir/radguard.db`` (SQLite) or in
    the PostgreSQL database ``db_url`` names."""

    def __init__(self, data_dir: str | os.PathLike[str], db_url: str | None = None, *,
                 min_free: int = 0) -> None:
        self.root = Path(data_dir)
        # bytes kept free on the data folder's filesystem (fileio.room_above_reserve): an
        # instance that would go below is refused, and the store is not healthy until there
        # is room again
        self.min_free = min_free
        self.objects = self.root / "objects"
        self.incoming = self.root / "incoming"  # large objects spooled while they arrive
        self.health = WriteHealth()  # whether writes work (the workers wait while they fail)
        # whether there is room above the reserve: below it new objects are refused (the
        # DICOM door, STOW-RS, ingest) while the workers go on - the reserve is their room
        self.intake = WriteHealth(_below_reserve)
        try:
            self.objects.mkdir(parents=True, exist_ok=True)
            self.incoming.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.root}: cannot create the data folder ({exc.strerror})") \
                from exc
        if db_url and db_url.startswith(("postgresql://", "postgres://")):
            self.backend: _Backend = _Postgres(db_url)
        elif db_url:
            raise StoreError(f"db_url: only postgresql://... URLs are supported "
                             f"(got {db_url.split(':', 1)[0]}:...)")
        else:
            self.backend = _Backend(str(self.root / "radguard.db"))
        self.db_path = self.backend.describe()
        self._local = threading.local()
        self._lock = threading.Lock()  # one writer at a time inside this process
        self._migrate()

    # -- connections and statements ----------------------------------------------------------
    def _db(self) -> Any:  # noqa: ANN401
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = self.backend.connect()
            except self.backend.errors as exc:
                raise StoreError(f"{self.db_path}: not a usable database ({exc})") from exc
            self._local.db = db
        return db

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:  # noqa: ANN401
        """Run one statement (``?`` placeholders) on this thread's connection."""
        db = self._db()
        try:
            return db.execute(self.backend.sql(sql), params)
        except self.backend.errors as exc:
            if self.backend.broken(db):  # the server went away: a new connection next time
                self._local.db = None
                with contextlib.suppress(Exception):
                    db.close()
            raise StoreError(f"{self.db_path}: database error ({exc})") from exc

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[None]:
        """One write transaction (committed on success, rolled back on any error).

        ``durable=False``: SQLite commits without waiting for the disk. Only for changes a
        power cut may undo harmlessly; a later durable commit makes them durable too, since
        the write-ahead log is synced in order."""
        lazy = not durable and self.backend.name == "sqlite"
        with self._lock:
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
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        with self.transaction():
            if self.backend.name == "postgresql":  # one migrating gateway at a time
                self.execute("LOCK TABLE schema_version IN EXCLUSIVE MODE")
            row = self.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(f"{self.db_path}: made by a newer radguard (schema {version})")
            for number, script in enumerate(MIGRATIONS[version:], version + 1):
                for statement in filter(str.strip, script.format(**self.backend.ddl).split(";")):
                    self.execute(statement)
                self.execute("DELETE FROM schema_version")
                self.execute("INSERT INTO schema_version VALUES (?)", (number,))

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
        except ReserveError:
            raise  # nothing was written: the store works (intake may pause, _check_room)
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
        sop = header["sop_uid"]
        known = self.execute("SELECT id FROM instances WHERE sop_uid=? AND sha256=? "
                             "ORDER BY id LIMIT 1", (sop, digest)).fetchone()
        if known is not None:  # a resend: no second file, no second row
            if spooled is not None:
                spooled.unlink(missing_ok=True)
            return int(known[0]), False
        path = self.objects / digest[:2] / f"{digest}.dcm"
        self._check_room(0 if spooled is not None and self._same_device(spooled) else size)
        if spooled is not None:
            self._adopt(spooled, path)
        elif not path.exists():
            atomic_write_bytes(path, data, 0o640, durable=True)  # type: ignore[arg-type]
        with self.transaction():
            self.backend.lock_uid(self.execute, sop)
            same = self.execute("SELECT id FROM instances WHERE sop_uid=? AND sha256=? "
                                "ORDER BY id LIMIT 1", (sop, digest)).fetchone()
            if same is not None:  # the same resend raced this one in
                return int(same[0]), False
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
                 str(path.relative_to(self.root)), digest, size, _now(), source,
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

    @staticmethod
    def _adopt(spooled: Path, path: Path) -> None:
        """Move a spooled object to its content-addressed place durably: fsync, rename (the
        spool folder is on the store's filesystem), fsync the folder. From elsewhere (another
        filesystem) it is copied through an atomic write instead."""
        if path.exists():
            spooled.unlink(missing_ok=True)
            return
        with open(spooled, "rb") as fh:
            os.fsync(fh.fileno())
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(spooled, 0o640)
        try:
            os.replace(spooled, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with open(spooled, "rb") as src, atomic_writer(path, 0o640) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            spooled.unlink(missing_ok=True)
            return
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

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
        """A spooled file on the store's filesystem is renamed into place (no new bytes)."""
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
                    "UPDATE instances SET state='processing', attempts=attempts+1 WHERE id=("
                    "SELECT id FROM instances WHERE state='queued' ORDER BY id LIMIT 1"
                    f"{self.backend.skip_locked}) RETURNING {', '.join(_COLUMNS)}").fetchall()
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
                    "UPDATE instances SET state=? WHERE id=? AND state=?",
                    (State.FORWARDING, instance.id, State.PROCESSING)).rowcount
        except (OSError, StoreError) as exc:
            self.health.failed(exc)
            raise
        return bool(changed)

    def finish(self, instance_id: int, *, state: str, verdict: str, trust: str,
               details: dict[str, Any], ai_probability: float | None = None,
               ai_suspicion: int | None = None, forwarded: str | None = None) -> bool:
        """Record the pipeline's result and final state in one transaction; False when the
        instance was superseded while it was checked (it stays rejected)."""
        if state not in (State.DONE, State.QUARANTINED, State.REJECTED):
            raise StoreError(f"unknown final state {state!r}")
        try:
            with self.transaction():
                changed = self.execute(
                    "UPDATE instances SET state=?, verdict=?, trust=?, details=?, "
                    "ai_probability=?, ai_suspicion=?, forwarded=?, processed_at=? "
                    "WHERE id=? AND state IN (?, ?)",
                    (state, verdict, trust, json.dumps(details, default=str), ai_probability,
                     ai_suspicion, forwarded, _now(), instance_id, State.PROCESSING,
                     State.FORWARDING)).rowcount
        except (OSError, StoreError) as exc:
            self.health.failed(exc)
            raise
        self.health.worked()
        return bool(changed)

    def requeue(self, instance_id: int) -> None:
        """Put a claimed instance back (the PACS was unreachable, the store could not record
        the result; try again later)."""
        try:
            with self.transaction():
                self.execute("UPDATE instances SET state=? WHERE id=? AND state IN (?, ?)",
                             (State.QUEUED, instance_id, State.PROCESSING, State.FORWARDING))
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

    def recover(self) -> dict[str, int]:
        """After a crash: unfinished work back to the queue, unacknowledged files removed
        (half-written ones, files without a row, objects still arriving in ``incoming``).
        (With a shared PostgreSQL queue, run it only when no other gateway is processing.)"""
        with self.transaction():
            requeued = self.execute("UPDATE instances SET state=? WHERE state IN (?, ?)",
                                    (State.QUEUED, State.PROCESSING,
                                     State.FORWARDING)).rowcount
        known = {r[0] for r in self.execute("SELECT path FROM instances").fetchall()}
        orphans = 0
        for path in self.objects.glob("*/*"):
            rel = str(path.relative_to(self.root))
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)  # a write the crash interrupted
                orphans += 1
            elif rel not in known:
                path.unlink(missing_ok=True)
                orphans += 1
        spooled = 0
        for path in self.incoming.glob("*"):  # objects still arriving: never acknowledged
            if path.is_file():
                path.unlink(missing_ok=True)
                spooled += 1
        return {"requeued": requeued, "orphans_removed": orphans, "spooled_removed": spooled}

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
            rows = self.execute("SELECT id, path FROM instances WHERE index_version IS NULL "
                                f"ORDER BY id LIMIT {int(batch)}").fetchall()
            if not rows:
                return done
            for row_id, rel in rows:
                try:
                    values = index_values(header(self.root / rel))
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
        """The instance's file on disk."""
        return self.root / instance.path

    def iter_queue(self) -> Iterator[Instance]:
        """Claim instances until the queue is empty."""
        while (instance := self.claim()) is not None:
            yield instance

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
