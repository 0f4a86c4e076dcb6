"""Ordered parallel map over threads, for batch work whose heavy parts release the GIL."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["background_pool", "default_workers", "map_ordered"]

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def background_pool() -> ThreadPoolExecutor:
    """A shared pool for work that overlaps a caller's own (hashing while copying...).

    Shared, so per-file work does not pay for creating threads."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="radguard-bg")
        return _POOL


def default_workers() -> int:
    """One worker per core, at most four (file I/O saturates beyond that)."""
    return max(1, min(4, os.cpu_count() or 1))


def map_ordered(func: Callable[[T], R], items: Iterable[T], workers: int = 1) -> Iterator[R]:
    """``map`` with ``workers`` threads, yielding results in input order as they complete.

    At most ``2 * workers`` items are in flight, so memory stays bounded on huge batches.
    """
    if workers <= 1:
        yield from map(func, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(func, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
