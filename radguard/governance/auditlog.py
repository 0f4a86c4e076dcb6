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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radguard.errors import RadguardError
from radguard.fileio import atomic_write_bytes

__all__ = ["AuditEntry", "AuditLog", "AuditLogError", "ChainReport", "default_audit_log"]

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

    def to_dict(self) -> dict[str, Any]:
        """The JSON form written to the log."""
        return {"seq": self.seq, "ts": self.ts, "actor": self.actor, "action": self.action,
                "target": self.target, "details": self.details, "prev": self.prev,
                "hash": self.hash}


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


class AuditLog:
    """Append to and verify one log file (created with its folder on first append)."""

    def __init__(self, path: str | os.PathLike[str] | None = None,
                 actor: str | None = None) -> None:
        self.path = Path(path) if path is not None else default_audit_log()
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.actor = actor or _current_user()

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
                last = _last_record(fh, self.path)
                record: dict[str, Any] = {
                    "seq": (last["seq"] + 1) if last else 1,
                    "ts": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
                    "actor": actor or self.actor,
                    "action": action,
                    "target": str(target),
                    "details": details or {},
                    "prev": last["hash"] if last else GENESIS,
                }
                record["hash"] = _entry_hash(record)
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
    def entries(self) -> Iterator[AuditEntry]:
        """Every entry in order (no chain check; use ``verify`` for that)."""
        for _, record, problem in self._records():
            if record is not None and not problem:
                yield AuditEntry(**record)

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
            if isinstance(record, dict) and set(record) == _FIELDS and (
                    not actions or record["action"] in actions):
                found.append(AuditEntry(**record))
        return found[::-1]

    def head(self) -> dict[str, Any]:
        """The current head (entries, hash) as recomputed from the log itself."""
        report = self.verify()
        return {"entries": report.entries, "head": report.head}

    def _records(self) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
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
                    if not isinstance(record, dict) or set(record) != _FIELDS:
                        raise ValueError("wrong fields")
                except ValueError:
                    yield lineno, None, f"line {lineno}: not a valid audit entry"
                    continue
                yield lineno, record, ""

    def verify(self, expect_head: str | None = None, *, new: bool = False) -> ChainReport:
        """Walk the chain; every break, the head file and ``expect_head`` are checked.

        A missing or empty log without a head file is what deleting both leaves behind, so
        it is a problem unless ``new`` says nothing was ever logged here. The gateway logs
        its own start, so its log is never legitimately missing.
        """
        report = ChainReport(str(self.path))
        if not self.path.exists():
            report.missing = True
            if self.head_path.exists():
                report.problems.append("the log is missing but its head file exists")
            elif not new:
                report.problems.append(
                    "no audit log and no head file: if anything was ever logged here, both "
                    "were deleted (for a log not written yet: audit verify --new)")
            if expect_head and expect_head != GENESIS:
                report.problems.append("the log is missing; expected head " + expect_head[:16])
            return report
        prev, seq = GENESIS, 0
        for lineno, record, problem in self._records():
            if problem:
                report.problems.append(problem)
                continue
            assert record is not None
            seq += 1
            if record["seq"] != seq:
                report.problems.append(f"line {lineno}: sequence {record['seq']} where {seq} "
                                       "was expected (an entry was deleted, inserted or moved)")
                seq = int(record["seq"]) if isinstance(record["seq"], int) else seq
            if record["prev"] != prev:
                report.problems.append(f"line {lineno} (entry {record['seq']}): does not "
                                       "follow the previous entry (chain broken)")
            if _entry_hash(record) != record["hash"]:
                report.problems.append(f"line {lineno} (entry {record['seq']}): content was "
                                       "edited after it was written")
            prev = record["hash"]
            report.entries += 1
        report.head = prev
        stored = self._stored_head()
        if stored is None:
            if report.entries:
                report.problems.append("the head file is missing")
            elif not new and not report.problems:
                report.problems.append(
                    "the log is empty and has no head file: if anything was ever logged "
                    "here, it was erased (for a log not written yet: audit verify --new)")
        elif stored.get("head") != prev or stored.get("entries") != report.entries:
            report.problems.append(
                f"the log ends at entry {report.entries} but its head file records "
                f"{stored.get('entries')} entries (entries were removed from the end or the "
                "log was replaced)")
        if expect_head and expect_head != prev:
            report.problems.append(f"head {prev[:16]} differs from the expected head "
                                   f"{expect_head[:16]}")
        return report

    def _stored_head(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.head_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"head": "unreadable", "entries": "unreadable"}
        return value if isinstance(value, dict) else {"head": "unreadable"}


_FIELDS = {"seq", "ts", "actor", "action", "target", "details", "prev", "hash"}


def _last_record(fh: Any, path: Path) -> dict[str, Any] | None:  # noqa: ANN401
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
        if not isinstance(record, dict) or set(record) != _FIELDS:
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
