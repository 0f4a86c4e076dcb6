"""The ``radguard`` command line.

Every command prints a one-line error and exits non-zero on bad input; tracebacks are shown
only with ``RADGUARD_DEBUG=1``. Exit codes: 0 success, 1 a check failed (e.g. a file is not
validly signed), 2 bad usage or bad input, or a file that cannot be read or written (no
permission, read-only file system, file too large, disk full: outputs are written atomically,
so nothing half-written is left), 3 internal error, 130 interrupted, 141 the reader of the
output went away (``radguard verify ... | head``).

The package has one module per command group, each command a thin wrapper over a library
function the Python API exposes too: :mod:`~radguard.cli.provenance` (keys, sign, verify),
:mod:`~radguard.cli.watermark`, :mod:`~radguard.cli.scan` (dicom, scan),
:mod:`~radguard.cli.forensics`, :mod:`~radguard.cli.triage`, :mod:`~radguard.cli.evaluate`
(evaluate, reader-study), :mod:`~radguard.cli.monitor`, :mod:`~radguard.cli.governance`
(dataset, deid, audit, audit-archive), :mod:`~radguard.cli.gateway` (serve, user, demo).
A command whose optional dependencies are missing says which extra installs them (exit 2).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from radguard import __version__
from radguard.cli.common import _err, extra_message, missing_extra
from radguard.errors import RadguardError

__all__ = ["main"]


#: SQLite primary result codes that mean the database file cannot be read or written
#: (permission, read-only, I/O error, disk full, cannot open), not a bug in a query.
_SQLITE_STORAGE_ERRORS = frozenset({3, 8, 10, 13, 14})


def _os_error_message(exc: OSError) -> str:
    """One line for a file that cannot be read or written: which file, why, and the errno
    name (EACCES, EROFS, EFBIG, ENOSPC...)."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    code = errno.errorcode.get(exc.errno) if isinstance(exc.errno, int) else None
    if code:
        reason += f" ({code})"
    name = exc.filename2 if exc.filename2 is not None else exc.filename
    if name is None:
        return f"cannot read or write a file: {reason}; nothing half-written was left"
    path = Path(os.fsdecode(name))
    if path.name.startswith(".") and path.name.endswith(".tmp"):
        # the atomic writer's temporary file (.NAME.random.tmp): name the real output
        path = path.with_name(path.name[1:-4].rsplit(".", 1)[0])
    return f"{path}: {reason}"


class _Group(click.Group):
    """Turns RadguardError, and files that cannot be read or written, into a one-line
    message and exit code 2; hides tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RadguardError as exc:
            _err(str(exc))
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _err("interrupted")
            ctx.exit(130)
        except BrokenPipeError:
            # the reader of our output is gone: say nothing more (stdout is dead too)
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except OSError as exc:
            if os.environ.get("RADGUARD_DEBUG"):
                raise
            _err(_os_error_message(exc))
            ctx.exit(2)
        except Exception as exc:
            if os.environ.get("RADGUARD_DEBUG"):
                raise
            extra = missing_extra(exc) if isinstance(exc, ImportError) else None
            if extra is not None:  # an optional dependency not installed: say which extra
                click.echo(extra_message(ctx.invoked_subcommand or "", extra), err=True)
                ctx.exit(2)
            if isinstance(exc, sqlite3.OperationalError) and \
                    (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_STORAGE_ERRORS:
                _err(f"database file cannot be used: {exc} "
                     f"({getattr(exc, 'sqlite_errorname', 'SQLITE_ERROR')})")
                ctx.exit(2)
            _err(f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                 "rerun with RADGUARD_DEBUG=1 for details")
            ctx.exit(3)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="radguard")
def main() -> None:
    """radguard: keep radiology images and the AI that reads them trustworthy."""


def _register() -> None:
    from radguard.cli import (
        evaluate,
        forensics,
        gateway,
        governance,
        monitor,
        provenance,
        scan,
        triage,
        watermark,
    )

    for command in (provenance.keys, provenance.sign, provenance.verify, watermark.watermark,
                    scan.dicom, scan.scan, forensics.forensics, triage.triage,
                    evaluate.evaluate, evaluate.reader_study, monitor.monitor,
                    governance.dataset, governance.deid, governance.audit,
                    governance.audit_archive_command, gateway.serve, gateway.user,
                    gateway.demo):
        main.add_command(command)


_register()
