"""What every PostgreSQL user in radguard shares (the gateway's store, the audit chain, the
drift monitor): which URLs name a PostgreSQL database, and psycopg imported with an error
that says what to install."""

from __future__ import annotations

import os
from types import ModuleType

from radguard.errors import RadguardError

__all__ = ["import_psycopg", "is_postgres_url"]

SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(target: str | os.PathLike[str] | None) -> bool:
    """Whether ``target`` is a PostgreSQL URL (else a file path, or nothing)."""
    return isinstance(target, str) and target.startswith(SCHEMES)


def import_psycopg(error: type[RadguardError], what: str) -> ModuleType:
    """The psycopg module; ``error`` naming ``what`` needs it when it is not installed."""
    try:
        import psycopg
    except ImportError as exc:
        raise error(f"{what} needs psycopg: pip install 'psycopg[binary]'") from exc
    return psycopg
