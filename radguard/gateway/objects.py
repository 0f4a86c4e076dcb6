"""Where the gateway keeps instance files: content-addressed objects every gateway can read.

Two backends, chosen with ``[cluster] objects`` (docs/gateway.md#deployment):

- :class:`FolderObjects` (``"folder"``, the default): ``objects/ab/<sha256>.dcm`` under the
  data folder, or under ``objects_dir``, a folder every gateway of a cluster mounts (NFS or
  another NAS). A file is written to a temporary name, fsync'd and renamed into place, then
  the folder is fsync'd; no ``flock`` is relied upon (NFS locks are unreliable). A file with
  no row referencing it (a crash between the write and the commit) is removed only when it
  is old (:data:`ORPHAN_GRACE`) and, under the object's database lock, still unreferenced.
- :class:`DatabaseObjects` (``"database"``, PostgreSQL only): the bytes in the ``objects``
  table in 1 MiB chunks, inserted in the same transaction as the instance's row, so an
  object exists exactly when a committed row references it and one database is all a
  cluster needs (as Orthanc's PostgreSQL storage plugin keeps its attachments). Readers get
  a local copy from a bounded cache in the gateway's own data folder, checked against the
  SHA-256 that names it.

Both are content-addressed: a name is the SHA-256 of the bytes, so a cached or shared copy
is never stale, and writing the same object twice is harmless.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from radguard.fileio import atomic_write_bytes, atomic_writer

__all__ = ["CHUNK", "ORPHAN_GRACE", "DatabaseObjects", "FolderObjects", "ObjectStorage",
           "ObjectsError"]

#: bytes per row of the ``objects`` table (PostgreSQL's bytea is read whole per row)
CHUNK = 1 << 20

#: seconds an unreferenced file or temporary file is left alone: another gateway may be
#: between writing it and committing its row (a large object over NFS takes a while)
ORPHAN_GRACE = 3600.0

#: seconds a cached copy is kept after its last use whatever the cache's size (a worker may
#: have just been handed its path)
_CACHE_MIN_AGE = 120.0

Execute = Callable[..., Any]


class ObjectsError(OSError):
    """An object cannot be stored or read (an OSError: the store treats it as storage)."""


class ObjectStorage(Protocol):
    """What the store needs of an object backend."""

    kind: str

    def identity(self) -> str:
        """What the cluster records: gateways sharing a database must share this."""

    def location(self, digest: str) -> str:
        """The row's ``path``: where the object is, relative to the data folder."""

    def put(self, digest: str, data: bytes | Path, execute: Execute) -> None:
        """Store the object durably; ``execute`` runs SQL in the row's transaction."""

    def local(self, digest: str, execute: Execute) -> Path:
        """A file holding the object, readable now."""

    def sweep(self, referenced: Callable[[str], bool], lock: Callable[[str], Any]
              ) -> int:
        """Remove old unreferenced objects and temporary files; returns how many."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _adopt(spooled: Path, path: Path) -> None:
    """Move a spooled object to its place durably: fsync, rename (same filesystem), fsync
    the folder; from another filesystem (a shared folder) through an atomic copy."""
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
    _fsync_dir(path.parent)


class FolderObjects:
    """Content-addressed files in one folder (the data folder's, or a shared one)."""

    kind = "folder"
    MARKER = ".radguard-objects"

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root = root
        self.data_dir = data_dir

    def identity(self) -> str:
        """``folder:<uuid>`` from a marker file made once in the folder: written whole under
        a temporary name, then hard-linked to its name (atomic, and refused if it exists -
        also on NFS), so gateways starting together on an empty shared folder agree on one
        and none ever reads a half-written marker."""
        marker = self.root / self.MARKER
        if not marker.exists():
            temporary = self.root / f".{self.MARKER}.{uuid.uuid4().hex}.tmp"
            try:
                atomic_write_bytes(temporary, uuid.uuid4().hex.encode("ascii"), 0o644)
                with contextlib.suppress(FileExistsError):
                    os.link(temporary, marker)
            finally:
                temporary.unlink(missing_ok=True)
        text = marker.read_text(encoding="ascii").strip()
        if not text:
            raise ObjectsError(errno.EIO, f"{marker}: empty marker file (delete it)")
        return f"folder:{text}"

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.dcm"

    def location(self, digest: str) -> str:
        path = self.path(digest)
        with contextlib.suppress(ValueError):
            return str(path.relative_to(self.data_dir))
        return str(path)

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, digest: str, data: bytes | Path, execute: Execute) -> None:
        """Write the object unless it is there already; a spooled file is moved (and
        deleted when the object is there)."""
        path = self.path(digest)
        if path.exists():
            if isinstance(data, Path):
                data.unlink(missing_ok=True)
            return
        if isinstance(data, Path):
            _adopt(data, path)
        else:
            atomic_write_bytes(path, data, 0o640, durable=True)

    def local(self, digest: str, execute: Execute) -> Path:
        return self.path(digest)

    def sweep(self, referenced: Callable[[str], bool], lock: Callable[[str], Any]) -> int:
        """Old temporary files (an interrupted write) and old files no row references (a
        crash between write and commit), each looked up under the object's lock right
        before it goes, so a gateway committing a row for it meanwhile keeps it."""
        removed = 0
        cutoff = time.time() - ORPHAN_GRACE
        for path in self.root.glob("*/*"):
            try:
                if path.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed += 1
                continue
            digest = path.name.removesuffix(".dcm")
            if referenced(digest):  # the common case, without a lock (an indexed lookup)
                continue
            with lock(digest):
                if not referenced(digest):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


class DatabaseObjects:
    """Objects in the database's ``objects`` table; a bounded local cache for readers."""

    kind = "database"

    def __init__(self, cache: Path, cache_bytes: int) -> None:
        self.cache = cache
        self.cache_bytes = cache_bytes

    def identity(self) -> str:
        return "database"

    def location(self, digest: str) -> str:
        return f"database:{digest}"

    def path(self, digest: str) -> Path:
        return self.cache / digest[:2] / f"{digest}.dcm"

    def put(self, digest: str, data: bytes | Path, execute: Execute) -> None:
        """Insert the chunks in the caller's transaction (nothing if they are there); a
        spooled file becomes the cached copy, as it will be read right away."""
        if execute("SELECT 1 FROM objects WHERE sha256=? AND chunk=0", (digest,)).fetchone():
            if isinstance(data, Path):
                data.unlink(missing_ok=True)
            return
        for number, chunk in enumerate(self._chunks(data)):
            execute("INSERT INTO objects (sha256, chunk, data) VALUES (?, ?, ?)",
                    (digest, number, chunk))
        if isinstance(data, Path):
            target = self.path(digest)
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # only a cache: a failure costs a read later
                os.replace(data, target)

    @staticmethod
    def _chunks(data: bytes | Path) -> Iterator[bytes]:
        if not isinstance(data, Path):
            view = memoryview(data)
            for start in range(0, max(len(view), 1), CHUNK):
                yield bytes(view[start:start + CHUNK])
            return
        with open(data, "rb") as fh:
            first = True
            while (chunk := fh.read(CHUNK)) or first:
                first = False
                yield chunk

    def local(self, digest: str, execute: Execute) -> Path:
        """The cached copy, fetched chunk by chunk when missing (never the whole object in
        memory) and checked against its SHA-256 before it is put in place."""
        path = self.path(digest)
        if path.exists():
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: the last the cache evicts
            return path
        check = hashlib.sha256()
        found = False
        with atomic_writer(path, 0o640, durable=False) as fh:
            for number in range(1 << 31):
                row = execute("SELECT data FROM objects WHERE sha256=? AND chunk=?",
                              (digest, number)).fetchone()
                if row is None:
                    break
                found = True
                chunk = bytes(row[0])
                check.update(chunk)
                fh.write(chunk)
            if not found:
                raise ObjectsError(errno.ENOENT, f"object {digest[:16]}... is not in the "
                                                 "database")
            if check.hexdigest() != digest:
                raise ObjectsError(errno.EIO, f"object {digest[:16]}... in the database does "
                                              "not match its SHA-256")
        return path

    def sweep(self, referenced: Callable[[str], bool], lock: Callable[[str], Any]) -> int:
        """Evict the least recently used cached copies beyond the cache's size (never one
        used in the last two minutes). Rows and objects are one transaction: no orphans."""
        files = []
        for path in self.cache.glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        removed = 0
        cutoff = time.time() - _CACHE_MIN_AGE
        for mtime, size, path in sorted(files):
            if total <= self.cache_bytes:
                break
            if mtime > cutoff:  # just used, or a copy being fetched now
                continue
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed
