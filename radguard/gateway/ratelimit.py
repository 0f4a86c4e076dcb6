"""Bounded bookkeeping for events an attacker can repeat at will (refused C-STOREs, dropped
connections, failed logins): which of them get their own log line or audit entry, and how
peers are grouped.

An unauthenticated peer chooses its calling AE title, user names and, with IPv6, any
address in its /64. Keys therefore name what the peer cannot choose cheaply (the IPv4
address, the IPv6 /64), every table is bounded, and a flood of distinct keys meets a global
budget instead of becoming a flood of fsyncs.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["Throttle", "peer_key"]


def peer_key(address: str) -> str:
    """What one peer is counted as: an IPv4 address, or the /64 of an IPv6 address (one
    host is usually given a whole /64, so its single addresses cost it nothing). Anything
    that is not an IP address (a Unix socket, a test double) is its own key."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class Throttle:
    """Decides which of many similar events get their own entry: the first per key, then one
    a ``per_key_seconds``, and never more than ``global_per_minute`` in a minute; ``allow``
    returns how many events of that key were held back since its last entry. At most
    ``capacity`` keys are remembered (the least recently written are forgotten first)."""

    def __init__(self, per_key_seconds: float = 60.0, global_per_minute: int = 60, *,
                 capacity: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_key_seconds, self.global_per_minute = per_key_seconds, global_per_minute
        self.capacity = capacity
        self.clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._held: dict[str, int] = {}
        self._minute, self._written = 0.0, 0
        self._lock = threading.Lock()

    def allow(self, key: str) -> tuple[bool, int]:
        """(write an entry now?, events of this key held back before this one)."""
        now = self.clock()
        with self._lock:
            if now - self._minute >= 60:
                self._minute, self._written = now, 0
            last = self._last.get(key)
            if (last is not None and now - last < self.per_key_seconds) or \
                    self._written >= self.global_per_minute:
                if key in self._last or len(self._held) < self.capacity:
                    self._held[key] = self._held.get(key, 0) + 1
                return False, 0
            self._written += 1
            self._last.pop(key, None)
            self._last[key] = now
            while len(self._last) > self.capacity:
                old, _ = self._last.popitem(last=False)
                self._held.pop(old, None)
            return True, self._held.pop(key, 0)

    def held_back(self) -> int:
        """Events held back and not yet reported with a later entry of their key (for a
        periodic summary)."""
        with self._lock:
            return sum(self._held.values())
