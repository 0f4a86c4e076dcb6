"""Bounded bookkeeping for events an attacker can repeat at will (refused C-STOREs, dropped
connections, failed logins): which of them get their own log line or audit entry, and how
peers are grouped.

An unauthenticated peer chooses its calling AE title, user names and, with IPv6, any
address in its /64. Keys therefore name what the peer cannot choose cheaply (the IPv4
address, the IPv6 network of ``ipv6_prefix`` bits: the gateway's ``ipv6_peer_prefix``), every
table is bounded, and a flood of distinct keys meets a global budget instead of becoming a
flood of fsyncs.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["DEFAULT_IPV6_PREFIX", "Throttle", "ip_of", "peer_key"]

DEFAULT_IPV6_PREFIX = 64  # one host is usually given a whole /64


def ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a peer's address names (an IPv4-mapped IPv6 address as IPv4, an IPv6
    zone left out), or None if it is none (a Unix socket, a test double)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def peer_key(address: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """What one peer is counted as: an IPv4 address, or the network of the first
    ``ipv6_prefix`` bits of an IPv6 address (64: a host usually owns a whole /64, so its
    single addresses cost it nothing; 128: every address on its own, where a /64 is a VLAN
    of many hosts). Anything that is not an IP address is its own key."""
    ip = ip_of(address)
    if ip is None:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
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
