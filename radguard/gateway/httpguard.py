"""Protections of the gateway's HTTP side that do not depend on any one route.

* :class:`GuardMiddleware` (ASGI, outermost): request bodies are limited per route *while
  they stream in* - a declared ``Content-Length`` over the limit is answered 413 before a
  byte of the body is read, a chunked body is counted as it arrives, and a body that stalls
  or trickles times out - so an unauthenticated client cannot make the server hold gigabytes.
  A response that leaves part of a body unread carries ``Connection: close``, so the upload
  ends with the answer instead of being read and discarded. Every response gets the browser
  hardening headers (a strict Content-Security-Policy: no script at all, styles and images
  from the gateway only; no framing; no MIME sniffing; no referrer to other sites). Two
  exceptions, by path (:func:`security_headers`): the OHIF Viewer under ``/viewer/`` (a
  script application: :data:`VIEWER_CSP`, and :data:`VIEWER_WORKER_CSP` for its scripts when
  they run as web workers; framed by the gateway's own pages only) and the
  page that frames it, ``/studies/{uid}/viewer`` (the strict policy plus same-origin frames).
* :class:`LoginGuard`: failed logins counted per user name *from one address*, per user
  name from all addresses together (a higher threshold: distributed guessing) and per
  address under any names (spraying); addresses are grouped as
  :func:`~radguard.gateway.ratelimit.peer_key` does (IPv6 by ``ipv6_peer_prefix``). Past a
  threshold each further failure doubles the wait (up to a maximum), and while a count
  waits every attempt it covers is refused with 429 *before* any password is checked, so a
  flood costs no scrypt work - yet five wrong passwords from an attacker's address do not
  lock the real user out of their own.
* :func:`guarded_protocol`: uvicorn's h11 protocol with a deadline for each request's headers
  (uvicorn has none: a connection that sends nothing, or a byte now and then, was held
  forever, and 64 of them took every slot) and a cap on connections per client address.

Failed-login audit entries are bounded by :class:`~radguard.gateway.ratelimit.Throttle`.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from radguard.gateway.ratelimit import DEFAULT_IPV6_PREFIX, peer_key

__all__ = ["SECURITY_HEADERS", "VIEWER_CSP", "VIEWER_WORKER_CSP", "BodyTimeout",
           "BodyTooLarge", "GuardMiddleware", "LockReason", "Lockout", "LoginGuard",
           "guarded_protocol", "retry_after", "security_headers"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CSP = ("default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
#: the OHIF Viewer (``/viewer/``) runs scripts from the gateway, compiles its image codecs
#: (WebAssembly), starts web workers from blob: URLs, sets inline styles and shows data:
#: images; it talks to the gateway only, and only the gateway's own pages may frame it
VIEWER_CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
              "worker-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
              "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self' data: blob:; "
              "media-src 'self' blob:; object-src 'none'; form-action 'self'; "
              "frame-ancestors 'self'; base-uri 'self'")
#: a script file's policy governs it only when it runs as a web worker; OHIF's image
#: decoders do (WebAssembly codecs whose embind glue builds functions with ``new Function``),
#: so its scripts may eval - in a worker, without the page's DOM - and the page may not
VIEWER_WORKER_CSP = VIEWER_CSP.replace("'wasm-unsafe-eval'", "'wasm-unsafe-eval' 'unsafe-eval'")
_FRAMES_VIEWER = re.compile(r"/studies/[^/]+/viewer")  # radguard's page around the viewer


def _headers(csp: str, frame_options: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", frame_options),
            (b"referrer-policy", b"same-origin"),
            (b"cross-origin-opener-policy", b"same-origin"),
            # patient data is not kept by browsers or proxies (a route that serves
            # something cacheable, the viewer's hashed bundles, says so itself)
            (b"cache-control", b"no-store"))


SECURITY_HEADERS = _headers(CSP, b"DENY")
_VIEWER_HEADERS = _headers(VIEWER_CSP, b"SAMEORIGIN")
_VIEWER_WORKER_HEADERS = _headers(VIEWER_WORKER_CSP, b"SAMEORIGIN")
_FRAMING_HEADERS = _headers(CSP + "; frame-src 'self'", b"DENY")


def security_headers(path: str) -> tuple[tuple[bytes, bytes], ...]:
    """The hardening headers of a response to ``path``: the strict set everywhere but the
    viewer (relaxed, same-origin framing) and the one page that frames it."""
    if path == "/viewer" or path.startswith("/viewer/"):
        return _VIEWER_WORKER_HEADERS if path.endswith(".js") else _VIEWER_HEADERS
    if _FRAMES_VIEWER.fullmatch(path):
        return _FRAMING_HEADERS
    return SECURITY_HEADERS


BODY_IDLE_SECONDS = 60.0  # no byte of a large body for this long: 408 (as DICOM's default)


class BodyTooLarge(Exception):
    """The request body passed its route's limit while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class BodyTimeout(Exception):
    """The request body stalled (or trickled in too slowly)."""


class GuardMiddleware:
    """Body limits and security headers for every request; ``limit_for(method, path)`` gives
    the largest body a route accepts. Bodies of routes that accept at most ``small_limit``
    bytes (forms, logins) must arrive whole within ``small_seconds``; larger ones may pause
    for ``BODY_IDLE_SECONDS`` at most."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 limit_for: Callable[[str, str], int], small_limit: int,
                 small_seconds: float) -> None:
        self.app = app
        self.limit_for = limit_for
        self.small_limit, self.small_seconds = small_limit, small_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").strip()
        chunked = b"transfer-encoding" in headers
        if declared and (not declared.isdigit() or int(declared) > limit):
            await _answer(send, 413, f"request body larger than {limit} bytes")
            return
        state = _BodyState(done=not chunked and int(declared or 0) == 0)
        deadline = time.monotonic() + self.small_seconds if limit <= self.small_limit else None

        async def guarded_receive() -> Message:
            if state.done:
                return await receive()
            timeout = BODY_IDLE_SECONDS
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(timeout, 0.001))
            except TimeoutError as exc:
                raise BodyTimeout("the request body stalled") from exc
            if message["type"] == "http.request":
                state.received += len(message.get("body", b""))
                if state.received > limit:
                    raise BodyTooLarge(limit)
                state.done = not message.get("more_body", False)
            else:
                state.done = True  # the client went away
            return message

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [h for h in security_headers(scope["path"])
                         if h[0] not in {k.lower() for k, _ in message.get("headers", [])}]
                if not state.done:  # do not read (and discard) the rest of the upload
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, guarded_receive, guarded_send)


@dataclass
class _BodyState:
    done: bool
    received: int = 0


async def _answer(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})


# -- logins ------------------------------------------------------------------------------------

class LockReason(Enum):
    """What a login wait is counted against."""

    USER_CLIENT = "user from client"  # one user name from one address
    USER = "user"  # one user name from all addresses together
    CLIENT = "client"  # one address under any user names


@dataclass
class _Strikes:
    failures: int = 0
    locked_until: float = 0.0
    last: float = 0.0
    # a name's overall count: what each address added (at most max_failures each)
    by_client: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Lockout:
    """A wait that has just begun (``name`` or ``client`` is "" where the count has none)."""

    reason: LockReason
    name: str
    client: str
    failures: int
    seconds: float

    @property
    def who(self) -> str:
        """What waits, for logs and audit targets."""
        if self.reason is LockReason.USER_CLIENT:
            return f"{self.name} from {self.client}"
        return self.name or self.client


_Key = tuple[LockReason, str, str]  # (reason, user name or "", peer or "")


class LoginGuard:
    """Failed-login counters with exponential backoff.

    Three counts, each with its own threshold: a user name from one address
    (``max_failures``), from all addresses together (``max_failures_all_clients``, default
    20 x ``max_failures``; one address adds at most ``max_failures`` to it while that count
    lives, so locking a name out everywhere takes ``max_failures_all_clients /
    max_failures`` addresses) and an address under any names (``max_failures_per_client``).
    A right password clears only the count of that name from that address: the address's
    spray count and the name's overall count go on.

    Kept in memory (a restart forgets them; gateways sharing a PostgreSQL store count
    separately). A count with no failure for an hour starts afresh. At most ``capacity``
    counts are kept, the least recently failed forgotten first - but never one that has
    reached its threshold within the hour (locked or waiting to double), so a flood of
    failures under random names cannot unlock a target. Those cost at least
    ``max_failures`` password checks each, so their number is bounded by the password
    checks the server can make in an hour."""

    FORGET_SECONDS = 3600.0

    def __init__(self, max_failures: int, max_failures_per_client: int, backoff: float,
                 backoff_max: float, *, max_failures_all_clients: int | None = None,
                 capacity: int = 10_000, clock: Callable[[], float] = time.monotonic,
                 ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> None:
        all_clients = max_failures_all_clients if max_failures_all_clients is not None \
            else 20 * max_failures
        self.ipv6_prefix = ipv6_prefix  # IPv6 addresses counted as one (ratelimit.peer_key)
        self.limits = {LockReason.USER_CLIENT: max_failures, LockReason.USER: all_clients,
                       LockReason.CLIENT: max_failures_per_client}
        self.backoff, self.backoff_max = backoff, backoff_max
        self.capacity = capacity
        self.clock = clock
        self._table: OrderedDict[_Key, _Strikes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Counts remembered."""
        with self._lock:
            return len(self._table)

    def _keys(self, name: str, client: str) -> tuple[_Key, _Key, _Key]:
        name, peer = name[:64], peer_key(client, self.ipv6_prefix)
        return ((LockReason.USER_CLIENT, name, peer), (LockReason.USER, name, ""),
                (LockReason.CLIENT, "", peer))

    def wait(self, name: str, client: str) -> tuple[float, LockReason | None]:
        """Seconds until this name from this address may try again (0: now) and why."""
        now = self.clock()
        with self._lock:
            waits = [(s.locked_until - now, key[0]) for key in self._keys(name, client)
                     if (s := self._table.get(key)) is not None and s.locked_until > now]
        return max(waits, key=lambda w: w[0]) if waits else (0.0, None)

    def failed(self, name: str, client: str) -> list[Lockout]:
        """Count a wrong password; returns the waits this failure starts."""
        now = self.clock()
        started = []
        with self._lock:
            keys = self._keys(name, client)
            peer = keys[2][2]
            for key in keys:
                strikes = self._table.pop(key, None)
                if strikes is None or now - strikes.last > self.FORGET_SECONDS:
                    strikes = _Strikes()
                self._table[key] = strikes  # most recently failed last
                if key[0] is LockReason.USER and not self._add_client(strikes, peer):
                    continue
                strikes.failures += 1
                strikes.last = now
                over = strikes.failures - self.limits[key[0]]
                if over >= 0:
                    seconds = min(self.backoff * 2.0 ** min(over, 60), self.backoff_max)
                    strikes.locked_until = now + seconds
                    started.append(Lockout(key[0], key[1], key[2], strikes.failures, seconds))
            self._forget_beyond_capacity(now)
        return started

    def _add_client(self, overall: _Strikes, peer: str) -> bool:
        """Whether a failure from ``peer`` counts towards a name's overall count: each
        address adds at most ``max_failures`` for as long as the count lives, so locking a
        name out everywhere takes many addresses, not one patient one."""
        added = overall.by_client.get(peer, 0)
        if added >= self.limits[LockReason.USER_CLIENT]:
            return False
        if added or len(overall.by_client) < self.limits[LockReason.USER]:
            overall.by_client[peer] = added + 1  # (beyond that many addresses: locked anyway)
        return True

    def _count(self, key: _Key, now: float) -> int:
        strikes = self._table.get(key)
        return 0 if strikes is None or now - strikes.last > self.FORGET_SECONDS \
            else strikes.failures

    def _forget_beyond_capacity(self, now: float) -> None:
        """Drop the least recently failed counts beyond ``capacity``, keeping (moved to the
        back) every count that waits or has reached its threshold within the hour."""
        kept = 0
        while len(self._table) > self.capacity and kept < len(self._table):
            key, strikes = next(iter(self._table.items()))
            if strikes.locked_until > now or self._count(key, now) >= self.limits[key[0]]:
                self._table.move_to_end(key)
                kept += 1
            else:
                del self._table[key]

    def succeeded(self, name: str, client: str) -> None:
        """A right password (outside any wait): this name from this address starts afresh;
        the address's count under other names and the name's overall count do not."""
        with self._lock:
            self._table.pop(self._keys(name, client)[0], None)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


# -- connections -------------------------------------------------------------------------------

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 37"
         b"\r\nconnection: close\r\n\r\ntoo many connections from this address")


def guarded_protocol(header_seconds: float, max_per_client: int,
                     exempt: list[str] | None = None) -> type:
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``): a connection must
    deliver each request's headers within ``header_seconds`` of opening or of the previous
    answer, else it is closed; a client address may hold ``max_per_client`` connections
    (``exempt``: addresses or networks of trusted reverse proxies, which carry everyone's
    connections)."""
    import ipaddress

    from uvicorn.protocols.http.h11_impl import H11Protocol

    proxies = [ipaddress.ip_network(n, strict=False) for n in exempt or []]
    open_per_client: dict[str, int] = {}

    def limited(client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return True  # a Unix socket or an unknown peer: counted under its name
        return not any(address in network for network in proxies)

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _counted: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            client = self.client[0] if self.client else ""
            if limited(client):
                if open_per_client.get(client, 0) >= max_per_client:
                    transport.write(_BUSY)
                    transport.close()
                    return
                open_per_client[client] = open_per_client.get(client, 0) + 1
                self._counted = client
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._counted is not None:
                left = open_per_client.get(self._counted, 1) - 1
                if left > 0:
                    open_per_client[self._counted] = left
                else:
                    open_per_client.pop(self._counted, None)
                self._counted = None
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in: the body has its own limits

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (
                    self.cycle is None or self.cycle.response_complete):
                self._arm()  # waiting for the next request's headers

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
