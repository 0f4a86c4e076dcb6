"""Ordered parallel map over threads, for batch work whose heavy parts release the GIL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["default_workers", "map_ordered"]


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
