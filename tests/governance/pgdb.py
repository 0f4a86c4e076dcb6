"""A fresh database per test on the session's PostgreSQL server (tests/conftest.py)."""

from __future__ import annotations

import uuid


def fresh_database(server_url: str) -> str:
    """Create an empty database on the server ``server_url`` names; its URL."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


def run_sql(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """One statement, committed; its rows (if it returns any)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []
