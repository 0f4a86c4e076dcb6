"""A hash-chained, append-only audit log: who did what to which data, and when.

Each entry is one JSON line holding its sequence number, time, actor, action, target and
details, the hash of the previous entry and its own hash (SHA-256 over the canonical JSON of
everything else). Editing, deleting, inserting or reordering any line breaks the chain, and
``verify`` names the first line where it breaks. Cutting lines off the end leaves a valid
shorter chain, so every append also writes the head (count and last hash) to a side file; a
truncated log no longer matches its head. An attacker who rewrites log and head together is
caught only by a head kept elsewhere: ``verify(expect_head=...)`` checks against one (print
it with ``radguard audit head`` and store it off the machine, e.g. in the PACS or a ticket).
Deleting log and head together would otherwise look like a log that was never written, so a
missing (or empty) log without a head file is a problem unless the caller says the log is new
(``verify(new=True)``, ``radguard audit verify --new``).

Appends from several processes are serialised with an exclusive ``flock`` on the log and
fsync'd before returning, so an acknowledged entry survives a crash. An append that cannot be
completed (disk full, file too large) is taken back out: the log never ends in half a line.

Several gateways sharing one PostgreSQL database keep one chain there instead
(:class:`DatabaseAuditLog`, table ``radguard_audit``): the same entries, hashes and checks,
each entry naming the gateway that wrote it (``gateway``, part of the hash; entries without it,
as every file written before, verify as before). Appends take the table's write lock for one
transaction - read the last entry, insert the next - so concurrent gateways extend one chain.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radguard.errors import RadguardError
from radguard.fileio import atomic_write_bytes
from radguard.postgres import import_psycopg, is_postgres_url

__all__ = ["AuditEntry", "AuditLog", "AuditLogError", "ChainReport", "DatabaseAuditLog",
           "default_audit_log"]

GENESIS = "0" * 64
AUDIT_LOG_ENV = "RADGUARD_AUDIT_LOG"


class AuditLogError(RadguardError):
    """The audit log cannot be read or written."""


def default_audit_log() -> Path:
    """``$RADGUARD_AUDIT_LOG``, else ``~/.radguard/audit.jsonl``."""
    env = os.environ.get(AUDIT_LOG_ENV)
    return Path(env) if env else Path.home() / ".radguard" / "audit.jsonl"


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode("utf-8")


def _entry_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


@dataclass(frozen=True)
class AuditEntry:
    """One line of the log."""

    seq: int
    ts: str
    actor: str
    action: str
    target: str
    details: dict[str, Any]
    prev: str
    hash: str
    gateway: str | None = None  # the gateway that wrote it (absent in single-gateway logs)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to the log (and hashed: no ``gateway`` key when unset, as
        in entries written before gateways were named)."""
        record = {"seq": self.seq, "ts": self.ts, "actor": self.actor, "action": self.action,
                  "target": self.target, "details": self.details, "prev": self.prev,
                  "hash": self.hash}
        if self.gateway is not None:
            record["gateway"] = self.gateway
        return record


@dataclass
class ChainReport:
    """What ``verify`` found."""

    path: str
    entries: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)
    missing: bool = False  # the log file does not exist

    @property
    def intact(self) -> bool:
        """No edit, deletion, insertion, reordering or truncation found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "intact": self.intact, "missing": self.missing,
                "entries": self.entries, "head": self.head, "problems": self.problems}


class _Chain:
    """What every audit log shares: building the next entry of the chain, reading entries,
    and the chain check. A log supplies its records in order and its stored head."""

    #: where the log keeps its head (named in problems)
    head_name = "head file"

    def __init__(self, actor: str | None, gateway: str | None) -> None:
        self.actor = actor or _current_user()
        self.gateway = gateway

    @property
    def where(self) -> str:
        """The log, as reports name it."""
        raise NotImplementedError

    def _records(self) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        """(place, record or None, problem) for every entry in chain order."""
        raise NotImplementedError

    def _walk(self, heads: list[dict[str, Any] | None]
              ) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        """The records, then the head recorded at the last append (None: there is none)
        appended to ``heads``, both as of one moment: an append in between is no break."""
        raise NotImplementedError

    def _missing(self, report: ChainReport, expect_head: str | None, new: bool) -> bool:
        """Fill ``report`` and return True when the log itself is gone."""
        return False

    def _next(self, last: dict[str, Any] | None, action: str, target: str,
              details: dict[str, Any] | None, actor: str | None,
              now: dt.datetime | None = None) -> dict[str, Any]:
        """The entry that follows ``last`` (its ``seq`` and ``hash``), hashed."""
        now = now or dt.datetime.now(dt.UTC)
        record: dict[str, Any] = {
            "seq": (last["seq"] + 1) if last else 1,
            "ts": now.astimezone(dt.UTC).isoformat(timespec="microseconds"),
            "actor": actor or self.actor,
            "action": action,
            "target": str(target),
            "details": details or {},
            "prev": last["hash"] if last else GENESIS,
        }
        if self.gateway is not None:
            record["gateway"] = self.gateway
        record["hash"] = _entry_hash(record)
        return record

    def entries(self) -> Iterator[AuditEntry]:
        """Every entry in order (no chain check; use ``verify`` for that)."""
        for _, record, problem in self._records():
            if record is not None and not problem:
                yield AuditEntry(**record)

    def head(self) -> dict[str, Any]:
        """The current head (entries, hash) as recomputed from the log itself."""
        report = self.verify()
        return {"entries": report.entries, "head": report.head}

    def verify(self, expect_head: str | None = None, *, new: bool = False) -> ChainReport:
        """Walk the chain; every break, the stored head and ``expect_head`` are checked.

        A missing or empty log without a head is what deleting both leaves behind, so it is
        a problem unless ``new`` says nothing was ever logged here. The gateway logs its own
        start, so its log is never legitimately missing.
        """
        report = ChainReport(self.where)
        if self._missing(report, expect_head, new):
            return report
        prev, seq = GENESIS, 0
        heads: list[dict[str, Any] | None] = []
        for place, record, problem in self._walk(heads):
            if problem:
                report.problems.append(problem)
                continue
            assert record is not None
            seq += 1
            if record["seq"] != seq:
                report.problems.append(f"{place}: sequence {record['seq']} where {seq} "
                                       "was expected (an entry was deleted, inserted or moved)")
                seq = int(record["seq"]) if isinstance(record["seq"], int) else seq
            if record["prev"] != prev:
                report.problems.append(f"{place} (entry {record['seq']}): does not "
                                       "follow the previous entry (chain broken)")
            if _entry_hash(record) != record["hash"]:
                report.problems.append(f"{place} (entry {record['seq']}): content was "
                                       "edited after it was written")
            prev = record["hash"]
            report.entries += 1
        report.head = prev
        stored = heads[0] if heads else None
        if stored is None:
            if report.entries:
                report.problems.append(f"the {self.head_name} is missing")
            elif not new and not report.problems:
                report.problems.append(
                    f"the log is empty and has no {self.head_name}: if anything was ever "
                    "logged here, it was erased (for a log not written yet: audit verify --new)")
        elif stored.get("head") != prev or stored.get("entries") != report.entries:
            report.problems.append(
                f"the log ends at entry {report.entries} but its {self.head_name} records "
                f"{stored.get('entries')} entries (entries were removed from the end or the "
                "log was replaced)")
        if expect_head and expect_head != prev:
            report.problems.append(f"head {prev[:16]} differs from the expected head "
                                   f"{expect_head[:16]}")
        return report


class AuditLog(_Chain):
    """Append to and verify one log file (created with its folder on first append)."""

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 actor: str | None = None, *, gateway: str | None = None) -> None:
        """``gateway``: name the writing gateway in every entry (none by default)."""
        super().__init__(actor, gateway)
        self.path = Path(path) if path is not None else default_audit_log()
        self.head_path = self.path.with_name(self.path.name + ".head")

    @property
    def where(self) -> str:
        """The log file."""
        return str(self.path)

    # -- writing -----------------------------------------------------------------------------
    def append(self, action: str, target: str = "", details: dict[str, Any] | None = None,
               *, actor: str | None = None) -> AuditEntry:
        """Add one entry and return it once it is on disk."""
        if not action:
            raise AuditLogError("an audit entry needs an action")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        except OSError as exc:
            raise AuditLogError(f"{self.path}: cannot open audit log ({exc.strerror})") from exc
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                record = self._next(_last_record(fh, self.path), action, target, details, actor)
                # written straight to the descriptor (O_APPEND), so that a failed write
                # leaves nothing buffered to be flushed after the log is cut back
                end = os.lseek(fh.fileno(), 0, os.SEEK_END)
                try:
                    line = memoryview(_canonical(record) + b"\n")
                    while line:
                        line = line[os.write(fh.fileno(), line):]
                    os.fsync(fh.fileno())
                    head = {"entries": record["seq"], "head": record["hash"]}
                    atomic_write_bytes(self.head_path, _canonical(head) + b"\n", 0o640)
                except OSError as exc:
                    _take_back(fh.fileno(), end)
                    raise AuditLogError(f"{self.path}: cannot write audit entry "
                                        f"({exc.strerror or exc}); nothing was logged") from exc
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return AuditEntry(**record)

    # -- reading -----------------------------------------------------------------------------
    def recent(self, limit: int = 20, actions: tuple[str, ...] = (),
               window: int = 4 << 20) -> list[AuditEntry]:
        """The latest entries (optionally only these actions), newest last, read from the
        log's last ``window`` bytes only: pages that show recent events must not re-read a
        log that grows with every request. No chain check (``verify`` does that)."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - window))
                data = fh.read()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise AuditLogError(f"{self.path}: cannot read audit log ({exc.strerror})") from exc
        lines = data.split(b"\n")
        if size > window:
            lines = lines[1:]  # the first line is cut
        found: list[AuditEntry] = []
        for raw in reversed(lines):
            if len(found) >= limit:
                break
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if _valid(record) and (not actions or record["action"] in actions):
                found.append(AuditEntry(**record))
        return found[::-1]

    def _records(self) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise AuditLogError(f"{self.path}: cannot read audit log ({exc.strerror})") from exc
        with fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    record = json.loads(raw)
                    if not _valid(record):
                        raise ValueError("wrong fields")
                except ValueError:
                    yield f"line {lineno}", None, f"line {lineno}: not a valid audit entry"
                    continue
                yield f"line {lineno}", record, ""

    def _walk(self, heads: list[dict[str, Any] | None]
              ) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        yield from self._records()
        heads.append(self._stored_head())

    def _missing(self, report: ChainReport, expect_head: str | None, new: bool) -> bool:
        if self.path.exists():
            return False
        report.missing = True
        if self.head_path.exists():
            report.problems.append("the log is missing but its head file exists")
        elif not new:
            report.problems.append(
                "no audit log and no head file: if anything was ever logged here, both "
                "were deleted (for a log not written yet: audit verify --new)")
        if expect_head and expect_head != GENESIS:
            report.problems.append("the log is missing; expected head " + expect_head[:16])
        return True

    def _stored_head(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.head_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"head": "unreadable", "entries": "unreadable"}
        return value if isinstance(value, dict) else {"head": "unreadable"}


_FIELDS = {"seq", "ts", "actor", "action", "target", "details", "prev", "hash"}
_OPTIONAL = {"gateway"}  # added for several gateways on one log; older entries lack it


def _valid(record: object) -> bool:
    """Whether a parsed line has exactly an entry's fields."""
    return isinstance(record, dict) and _FIELDS <= record.keys() <= _FIELDS | _OPTIONAL


def _last_record(fh: Any, path: Path) -> dict[str, Any] | None:
    """The last line of an open log, read backwards from the end (logs grow large)."""
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end == 0:
        return None
    block, data = 4096, b""
    pos = end
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        data = fh.read(step) + data
        if data.rstrip(b"\n").count(b"\n") >= 1:
            break
    line = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(line)
        if not _valid(record):
            raise ValueError("wrong fields")
    except ValueError as exc:
        raise AuditLogError(f"{path}: the last entry is damaged; run 'radguard audit verify' "
                            "before writing more") from exc
    return record


def _take_back(fd: int, end: int) -> None:
    """Cut an append that failed half-way back to where the log ended before it."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, end)
        os.fsync(fd)


def _current_user() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return f"uid:{os.getuid()}"


# -- the chain in PostgreSQL ---------------------------------------------------------------------

_AUDIT_SCHEMA = (
    # one creator at a time: concurrent CREATE TABLE IF NOT EXISTS can collide in the catalog
    "SELECT pg_advisory_xact_lock(hashtextextended('radguard_audit', 0))",
    """CREATE TABLE IF NOT EXISTS radguard_audit (
        seq BIGINT PRIMARY KEY, ts TEXT NOT NULL, actor TEXT NOT NULL, gateway TEXT,
        action TEXT NOT NULL, target TEXT NOT NULL, details TEXT NOT NULL,
        prev TEXT NOT NULL, hash TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS radguard_audit_action ON radguard_audit (action, seq)",
    # the head, as the file log's head file: cutting entries off the end shows
    """CREATE TABLE IF NOT EXISTS radguard_audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1), entries BIGINT NOT NULL, head TEXT NOT NULL)""",
)
_COLUMNS = "seq, ts, actor, gateway, action, target, details, prev, hash"


class DatabaseAuditLog(_Chain):
    """The audit chain in a PostgreSQL database (tables ``radguard_audit`` and
    ``radguard_audit_head``, created on first use), shared by every gateway writing to it.

    Each call borrows a connection (at most ``max_connections`` at once; a few are kept
    for the next call, and checked before reuse) and every problem reaching the server is an
    :class:`AuditLogError` naming the database without its password.
    """

    head_name = "head record"

    def __init__(self, db_url: str, actor: str | None = None, *, gateway: str | None = None,
                 max_connections: int = 4, connect_timeout: int = 10,
                 connections: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
                 ) -> None:
        """``gateway`` names the writing gateway in every entry (default: this host).
        ``connections``: borrow connections from someone else's pool (the gateway's store:
        its ``db_pool`` then bounds the audit log's connections too) instead of opening
        up to ``max_connections`` of its own."""
        super().__init__(actor, gateway or _host())
        if not is_postgres_url(db_url):
            raise AuditLogError("an audit database is a postgresql://... URL (got "
                                f"{db_url.split(':', 1)[0] or 'nothing'}:...)")
        self._psycopg = import_psycopg(AuditLogError, "an audit log in PostgreSQL")
        self.url = db_url
        self.connect_timeout = connect_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._idle: list[Any] = []
        self._idle_pid = os.getpid()
        self._idle_lock = threading.Lock()
        self._ready = False  # the tables exist
        self._borrow = connections

    @property
    def where(self) -> str:
        """The database (no password) and table."""
        from radguard.dicom.web import redact

        return f"{redact(self.url)} (table radguard_audit)"

    # -- connections ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection for one call; database errors become AuditLogError."""
        if self._borrow is not None:
            try:
                with self._borrow() as conn:
                    self._create(conn)
                    yield conn
            except self._psycopg.Error as exc:
                raise AuditLogError(f"{self.where}: audit database error: "
                                    f"{_reason(exc)}") from exc
            except AuditLogError:
                raise
            except RadguardError as exc:  # the lender's own error (no connection)
                raise AuditLogError(f"{self.where}: {exc}") from exc
            return
        if not self._slots.acquire(timeout=60):
            raise AuditLogError(f"{self.where}: every audit database connection is busy")
        conn = None
        try:
            conn = self._reuse() or self._connect()
            yield conn
        except self._psycopg.Error as exc:
            raise AuditLogError(f"{self.where}: audit database error: {_reason(exc)}") from exc
        else:
            self._keep(conn)
            conn = None
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            self._slots.release()

    def _connect(self) -> Any:
        try:
            conn = self._psycopg.connect(self.url, autocommit=True,
                                         connect_timeout=self.connect_timeout)
        except self._psycopg.Error as exc:
            raise AuditLogError(f"{self.where}: cannot reach the audit database "
                                f"({_reason(exc)})") from exc
        try:
            self._create(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create(self, conn: Any) -> None:
        """The tables, once per log object."""
        if not self._ready:
            with conn.transaction():
                for statement in _AUDIT_SCHEMA:
                    conn.execute(statement)
            self._ready = True

    def _reuse(self) -> Any:
        """An idle connection that still works, or None (the server may have restarted)."""
        with self._idle_lock:
            if self._idle_pid != os.getpid():  # forked: the parent's sockets are not ours
                self._idle, self._idle_pid = [], os.getpid()
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                conn.execute("SELECT 1")
            except self._psycopg.Error:
                with contextlib.suppress(Exception):
                    conn.close()
                return None
        return conn

    def _keep(self, conn: Any) -> None:
        with self._idle_lock:
            if self._idle_pid == os.getpid() and len(self._idle) < 2 and not conn.closed:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close the idle connections (the log stays usable: later calls connect again)."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()

    # -- writing -------------------------------------------------------------------------------
    def append(self, action: str, target: str = "", details: dict[str, Any] | None = None,
               *, actor: str | None = None) -> AuditEntry:
        """Add one entry and return it once committed. The table's write lock, held from
        reading the last entry to the commit, makes concurrent gateways take turns."""
        if not action:
            raise AuditLogError("an audit entry needs an action")
        with self._connection() as conn, conn.transaction():
            conn.execute("LOCK TABLE radguard_audit IN EXCLUSIVE MODE")
            row = conn.execute("SELECT seq, hash, clock_timestamp() FROM radguard_audit "
                               "ORDER BY seq DESC LIMIT 1").fetchone()
            now = row[2] if row else conn.execute("SELECT clock_timestamp()").fetchone()[0]
            last = {"seq": row[0], "hash": row[1]} if row else None
            # PostgreSQL text holds no NUL character (a request could carry one)
            record = self._next(last, _text(action), _text(target), details,
                                _text(actor) if actor else None, now)
            conn.execute(f"INSERT INTO radguard_audit ({_COLUMNS}) "
                         "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                         (record["seq"], record["ts"], record["actor"], record.get("gateway"),
                          record["action"], record["target"],
                          _canonical(record["details"]).decode("utf-8"), record["prev"],
                          record["hash"]))
            conn.execute("INSERT INTO radguard_audit_head (id, entries, head) VALUES (1, %s, %s) "
                         "ON CONFLICT (id) DO UPDATE SET entries = excluded.entries, "
                         "head = excluded.head", (record["seq"], record["hash"]))
        return AuditEntry(**record)

    # -- reading -------------------------------------------------------------------------------
    def recent(self, limit: int = 20, actions: tuple[str, ...] = (),
               window: int = 4 << 20) -> list[AuditEntry]:
        """The latest entries (optionally only these actions), newest last (``window``, the
        file log's read limit, does not apply). No chain check (``verify`` does that)."""
        where, params = ("WHERE action = ANY(%s) ", [list(actions)]) if actions else ("", [])
        with self._connection() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM radguard_audit {where}"
                                "ORDER BY seq DESC LIMIT %s", (*params, limit)).fetchall()
        found = [_row_record(row) for row in reversed(rows)]
        return [AuditEntry(**record) for record in found if record is not None]

    def _records(self) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        return self._walk([])

    def _walk(self, heads: list[dict[str, Any] | None]
              ) -> Iterator[tuple[str, dict[str, Any] | None, str]]:
        # one snapshot for the rows and the head (gateways go on appending meanwhile)
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            head = conn.execute("SELECT entries, head FROM radguard_audit_head "
                                "WHERE id = 1").fetchone()
            with conn.cursor(name="radguard_audit_walk") as cursor:
                cursor.itersize = 2000  # a server-side cursor: the table may be large
                cursor.execute(f"SELECT {_COLUMNS} FROM radguard_audit ORDER BY seq")
                for number, row in enumerate(cursor, 1):
                    record = _row_record(row)
                    if record is None:
                        yield (f"row {number}", None,
                               f"row {number} (entry {row[0]}): not a valid audit entry")
                    else:
                        yield f"row {number}", record, ""
        heads.append({"entries": head[0], "head": head[1]} if head else None)


def _row_record(row: tuple[Any, ...]) -> dict[str, Any] | None:
    """A table row as the entry it holds; None when its details are not JSON."""
    seq, ts, actor, gateway, action, target, details, prev, hash_ = row
    try:
        parsed = json.loads(details)
    except ValueError:
        return None
    record = {"seq": seq, "ts": ts, "actor": actor, "action": action, "target": target,
              "details": parsed, "prev": prev, "hash": hash_}
    if gateway is not None:
        record["gateway"] = gateway
    return record


def _text(value: str) -> str:
    return str(value).replace("\x00", "\ufffd")


def _reason(exc: BaseException) -> str:
    """A database error's first line (psycopg adds hints and context on further lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _host() -> str:
    import socket

    return socket.gethostname() or "gateway"
