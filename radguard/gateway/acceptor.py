"""An event-driven DICOM upper layer for the SCP: one asyncio loop serves every association.

pynetdicom's own acceptor runs two polling threads per association (1 ms sleeps): with ten
idle associations they burn about half a core, and under load they fight the checks for the
interpreter lock. Here a socket wakes the loop only when bytes arrive. The protocol pieces
are still pynetdicom's (A-ASSOCIATE-RQ/AC decoding and encoding, presentation context and
role negotiation, file meta information); this module adds the state machine of an acceptor
that offers C-STORE and C-ECHO (PS3.8 9.3, PS3.7 9.3.1 and 9.3.5), and hands the other
requests (C-FIND, C-MOVE, C-GET, N-ACTION: :mod:`radguard.gateway.qr`) to ``service``:

* each proposed presentation context gets the first of *its* transfer syntaxes that we
  offer: the requestor lists the syntax its data is in first, and a conversion would break
  a DICOM signature (8-bit pixel data is OB in Explicit VR and OW in Implicit VR);
  SCP/SCU role selection items are accepted as proposed for the contexts accepted (PS3.7
  D.3.3.4), so a C-GET requestor may take the SCP role of the storage classes;
* a service operation (C-FIND, C-MOVE, C-GET, N-ACTION) runs as a task of the loop while
  the connection goes on reading: its C-CANCEL, and the C-STORE-RSPs of the C-STORE
  sub-operations of a C-GET, are read meanwhile. No asynchronous operations window is
  negotiated, so a second request before the first one's final response aborts;
* every status other than Success carries an Error Comment (0000,0902) saying why;
* the first PDU must be an A-ASSOCIATE-RQ; a calling AE title not allowed, an unknown
  application context, a bad protocol version or too many associations get an
  A-ASSOCIATE-RJ with the matching reason;
* P-DATA-TF fragments are reassembled per message (command first, then data set, on one
  accepted presentation context); a complete C-STORE is handed to ``handler`` on a thread
  pool (parse, fsync and commit take time and release the GIL) and its status goes back
  once the handler has returned, so "success" still means "durably stored";
* anything out of order, a PDU longer than we offered, an undecodable request, or a peer
  out of time (below) ends the association with an A-ABORT; bytes of an unfinished message
  are dropped, nothing reaches the store.

What one peer may cost is bounded (:class:`DimseLimits`, ``[dicom]`` in the gateway
configuration), so that neither slow nor large senders starve the port, exhaust memory or
fill the disk:

* connections: a peer is a network named in ``peer_limits`` (all its addresses together),
  else an IPv4 address or the IPv6 network of its first ``ipv6_prefix`` bits
  (:func:`ratelimit.peer_key`; 64 by default: a host is usually given a whole /64). At most
  ``max_per_ip`` open connections from one peer, counted from the moment they are accepted
  (TLS handshake and negotiation included), and at most ``max(64, 2 * max_associations)``
  connections not yet associated; more are closed unread. At most ``max_per_ae``
  associations from one peer with one calling AE title (the title is the peer's choice, so
  it is never counted across peers); more get an A-ASSOCIATE-RJ (transient, local limit
  exceeded). ``peer_limits`` replaces both limits for the peers it names (a PACS or a NAT
  with many parallel associations).
* slots: at most ``max_associations`` associations at once. When all are taken, a new one
  takes a slot of the peer holding the most of them: the one of its associations (of all
  such peers', if several hold as many) with the least allowance left (below), provided it
  has waited at least ``EVICT_AFTER`` seconds more than its bytes paid for (the credit of
  new instances, below, keeps an association from being dropped, not its slot from a
  newcomer); it is aborted. A sender at ``min_rate`` or faster, one that has only just
  associated, one whose handler or spool write is running, and every association of a
  peer holding fewer slots than another are never evicted - so a lone modality that pauses
  is safe from the newcomers of a peer that keeps many slots busy. When no association
  qualifies, the newcomer gets the reject.
* time: the TLS handshake and the whole A-ASSOCIATE-RQ must arrive within
  ``connect_timeout`` of the connection. From then on the association has an allowance of
  ``idle_timeout`` seconds: time spent waiting for the peer uses it up (our own work - the
  handler, a spool write - does not), every byte received adds ``1 / min_rate`` seconds,
  and a C-STORE answered Success for a SOP Instance UID the port has not acknowledged
  lately (among the last ``RECENT_INSTANCES``) adds ``NEW_INSTANCE_CREDIT * idle_timeout``
  seconds, all up to ``idle_timeout``; a resend earns its bytes only, and nothing else
  refills it. When it is used up the association is aborted. So a silent peer goes after
  ``idle_timeout``, a trickle slower than ``min_rate`` - tiny PDUs or the same small
  instances again - a little later, while a sender at ``min_rate`` or faster never runs
  out and may pause up to ``idle_timeout`` between bursts or images, and a modality that
  stores each small image as it is taken (an ultrasound: 300 KB every 30 s) keeps its
  association. No association lasts longer than ``max_association_time``: it ends at the
  first moment after that between messages; a message under way may finish until half as
  long again has passed (``OVERTIME``), so a long migration is not cut mid-object. A
  handler at work is never cut off.
* memory: a PDU is never held whole; data set fragments are read in pieces of at most
  256 KiB. A data set stays in memory up to ``memory_per_message`` bytes and only while the
  data sets in memory of all associations together (those with their handler included)
  fit in ``memory_budget``; beyond either it is spooled to a file in ``spool_dir`` (the
  store's filesystem, so the handler can rename it into place) and the handler gets its
  path. A data set larger than ``max_data_set`` aborts the association. A spool file is
  deleted as soon as its association ends unfinished, and after the handler returns unless
  the handler moved it; leftovers of a crash are deleted at start.
* disk: the spool files of all unanswered messages together hold at most ``spool_budget``
  bytes, and nothing is taken while the spool folder's filesystem has less than
  ``min_free`` bytes free (at most 5% of its size, so a small disk is not refused
  outright) - checked (statvfs) when a data set begins and before every spool write, so
  the database, the audit log and the workers keep room. A message that does not fit, or
  whose spool file cannot be written, ends there: the rest of it is read and dropped and
  the C-STORE is answered 0xA700 (out of resources); the association and the server go
  on. A disk that is short or cannot be written is also reported to ``on_unwritable`` (the
  store: below the reserve intake pauses, a failing disk is a store outage; either is the
  gateway's banner), at most once a minute.

Refusals, rejects, aborts, drops and 0xA700s are logged through one bounded
:class:`ratelimit.Throttle`: the first per peer and kind, then one a minute with the
number left out, at most 60 lines a minute in all, and once a minute a line with the
number of events left out since the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from radguard.fileio import room_above_reserve
from radguard.gateway.ratelimit import DEFAULT_IPV6_PREFIX, Throttle, ip_of, peer_key

if TYPE_CHECKING:
    from pynetdicom.pdu_primitives import ServiceParameter
    from pynetdicom.presentation import PresentationContext

__all__ = ["Acceptor", "DimseLimits", "Link", "ServiceRequest", "Status", "StoreRequest",
           "error_comment"]

log = logging.getLogger("radguard.gateway")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 1, 2, 3, 4
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 5, 6, 7
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
C_GET_RQ, C_FIND_RQ, C_MOVE_RQ = 0x0010, 0x0020, 0x0021
N_EVENT_REPORT_RQ, N_ACTION_RQ = 0x0100, 0x0130
RESPONSE = 0x8000  # the Command Field bit of every response
NO_DATA_SET, DATA_SET = 0x0101, 0x0001
SUCCESS, PENDING = 0x0000, 0xFF00
# the data set of a service request (an identifier, action information) is held in memory
# whole and must fit in this; a larger one is read and dropped and the request refused
REQUEST_DATA_LIMITS = {C_FIND_RQ: 64 << 10, C_MOVE_RQ: 64 << 10, C_GET_RQ: 64 << 10,
                       N_ACTION_RQ: 1 << 20}
COMMENT_LENGTH = 64  # Error Comment is LO
UNRECOGNISED_OPERATION, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0211, 0xC000, 0xA700
# A-ABORT reasons (source 2 = service provider)
UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x01, 0x02, 0x06
LOCAL_LIMIT = (0x02, 0x03, 0x02)  # A-ASSOCIATE-RJ: transient, presentation provider, limit
ASSOCIATION_PDU_LIMIT = 1 << 20  # an A-ASSOCIATE-RQ with 128 contexts is ~40 KB
SMALL_PDU_LIMIT = 1024  # A-RELEASE-RQ and A-ABORT carry 4 bytes
READ_CHUNK = 256 << 10  # data set bytes taken off the socket at a time
WRITE_CHUNK = 1 << 20  # spooled bytes gathered before one write
READ_BUFFER = 256 << 10  # the stream reader pauses the socket at twice this
HANG_UP_GRACE = 2.0  # seconds a closed connection may take to flush before it is cut
ARTIM_TIMEOUT = 2.0  # seconds a rejected requestor has to close the connection itself
SPOOL_PREFIX, SPOOL_SUFFIX = "dimse-", ".part"
EVICT_AFTER = 5.0  # seconds an association must be behind its allowance before it may be
                   # evicted for a newcomer (at most half of idle_timeout); a sender between
                   # the images of a study waits milliseconds
NEW_INSTANCE_CREDIT = 0.5  # of idle_timeout: what a newly acknowledged instance adds to its
                           # association's allowance (a small image every half minute)
RECENT_INSTANCES = 1 << 15  # acknowledged SOP Instance UIDs remembered (hashed: ~4 MB), so a
                            # resend earns no credit unless this many others came since
OVERTIME = 0.5  # a message under way at max_association_time may go on this much longer
ROOM_SECONDS = 1.0  # how long a statvfs that found room is believed (NFS: one RPC each)


@dataclass(frozen=True)
class DimseLimits:
    """What one peer may cost the gateway; the rules are in the module docstring. The
    defaults admit real modalities (a 4 GiB object, a 50 MB image over a 1 Mbit/s link)."""

    max_associations: int = 32
    max_per_ip: int = 16  # open connections from one address, negotiating ones included
    max_per_ae: int = 16  # associations with one calling AE title
    connect_timeout: float = 15.0  # seconds to a whole A-ASSOCIATE-RQ, TLS included
    idle_timeout: float = 60.0  # the allowance of time without progress, seconds
    min_rate: int = 16 << 10  # bytes per second that count as progress
    max_association_time: float = 3600.0  # seconds
    max_data_set: int = 4 << 30  # bytes
    memory_per_message: int = 32 << 20  # bytes of one data set held in memory
    memory_budget: int = 256 << 20  # bytes of data sets held in memory, all associations
    spool_budget: int = 8 << 30  # bytes in spool files of unanswered messages, all of them
    min_free: int = 1 << 30  # bytes kept free on the spool folder's filesystem (<= 5% of it)
    # (address or network, which counts as one peer, and its max_per_ip and max_per_ae)
    peer_limits: tuple[tuple[str, int], ...] = ()
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX  # IPv6 addresses in one network this long: one peer

    def __post_init__(self) -> None:
        counts = (self.max_associations, self.max_per_ip, self.max_per_ae, self.min_rate,
                  self.max_data_set, self.spool_budget, *(n for _, n in self.peer_limits))
        times = (self.connect_timeout, self.idle_timeout, self.max_association_time)
        if min(counts) < 1 or min(times) <= 0 or min(self.memory_per_message,
                                                      self.memory_budget, self.min_free) < 0 \
                or not 0 <= self.ipv6_prefix <= 128:
            raise ValueError(f"impossible DICOM limits: {self}")
        for network, _ in self.peer_limits:
            ipaddress.ip_network(network, strict=False)  # ValueError if it is not one


@dataclass(frozen=True)
class StoreRequest:
    """One complete C-STORE: who sent it, what the command said and the Part 10 bytes
    (128-byte preamble, file meta built from the request, the data set exactly as sent).

    A message too large for the in-memory budget is spooled to disk while it arrives: then
    ``data`` is empty and ``path`` names a file holding the whole Part 10 object (written
    and closed, not fsync'd). The handler owns that file once it is called (moves it into
    the store or leaves it); if it is still there when the handler returns, it is deleted."""

    calling_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes
    path: Path | None = None
    peer: str = ""  # the peer's IP address


class Status(int):
    """A DIMSE status with the reason for it: the Error Comment a non-success status is sent
    with. Still an ``int``, so a handler may return either."""

    comment: str

    def __new__(cls, code: int, comment: str = "") -> Status:
        status = super().__new__(cls, code)
        status.comment = comment
        return status


def error_comment(text: str) -> str:
    """``text`` as an Error Comment: printable ASCII, no backslash (LO), at most 64 chars."""
    clean = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in " ".join(text.split()))
    return clean[:COMMENT_LENGTH].rstrip()


StoreHandler = Callable[[StoreRequest], int]


@dataclass(frozen=True)
class ServiceRequest:
    """A complete request the acceptor does not answer itself (C-FIND, C-MOVE, C-GET,
    N-ACTION): who asked, on which presentation context, the command and its data set
    (``data``: as sent, in ``transfer_syntax``; empty if none)."""

    calling_ae: str
    peer: str
    command_field: int
    message_id: int
    abstract_syntax: str
    transfer_syntax: str
    command: dict[int, bytes]
    data: bytes


ServiceHandler = Callable[[ServiceRequest, "Link"], Awaitable[None]]


class _Abort(Exception):
    """End the association with an A-ABORT (reason)."""

    def __init__(self, reason: int, why: str) -> None:
        super().__init__(why)
        self.reason = reason


class _Expiry(enum.Enum):
    """Why the clock ended a connection."""

    CONNECT = "no complete A-ASSOCIATE-RQ within the connect timeout"
    IDLE = "idle or slower than the minimum transfer rate"
    TOTAL = "longer than the maximum association time"
    EVICTED = "the idlest association of the peer holding the most while all were taken: " \
              "its slot went to a new one"


class _Keep(enum.Enum):
    """Where the data set of the message being received goes."""

    MEMORY = "memory"
    SPOOL = "spool file"
    DISCARD = "nowhere"  # read and dropped: the answer is already decided


class _Message:
    """A DIMSE message being reassembled from PDV fragments."""

    def __init__(self, context_id: int, transfer_syntax: str) -> None:
        self.context_id = context_id
        self.transfer_syntax = transfer_syntax
        self.command_parts: list[bytes] = []
        self.command_size = 0
        self.command: dict[int, bytes] | None = None
        self.data_size = 0
        self.data_done = False
        self.keep: _Keep | None = None  # decided by the first data set fragment
        self.status: int | None = None  # the answer when the data set is discarded
        self.comment = ""  # why, for that answer
        self.limit = 0  # a service request's data set: held in memory up to this, unbudgeted
        self.parts: list[bytes] = []  # Part 10 head and data set in memory, or not written yet
        self.pending = 0  # bytes in ``parts`` not yet written to the spool file
        self.held = 0  # bytes reserved from the memory budget
        self.spooled = 0  # bytes counted against the spool budget
        self.file: BinaryIO | None = None
        self.path: Path | None = None

    @property
    def has_data_set(self) -> bool:
        assert self.command is not None
        return _us(self.command.get(0x0800, b"")) != NO_DATA_SET

    @property
    def complete(self) -> bool:
        return self.command is not None and (not self.has_data_set or self.data_done)


def _us(value: bytes) -> int | None:
    return struct.unpack("<H", value)[0] if len(value) == 2 else None


def _uid(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def parse_command(data: bytes) -> dict[int, bytes]:
    """A DIMSE command set (always Implicit VR Little Endian, group 0000) as
    ``{element number: value bytes}``; ValueError if it is not one."""
    out: dict[int, bytes] = {}
    at = 0
    while at < len(data):
        if at + 8 > len(data):
            raise ValueError("command set: truncated element header")
        group, element, length = struct.unpack_from("<HHI", data, at)
        if group != 0x0000:
            raise ValueError(f"command set: element ({group:04X},{element:04X}) outside group 0")
        if at + 8 + length > len(data):
            raise ValueError("command set: element runs past the end")
        out[element] = data[at + 8:at + 8 + length]
        at += 8 + length
    if _us(out.get(0x0100, b"")) is None:
        raise ValueError("command set without a Command Field")
    return out


def encode_command(elements: dict[int, bytes | int | str]) -> bytes:
    """A command set (Implicit VR Little Endian, group 0000): ``{element number: value}``,
    an int as US, a str as text (UI padded with NUL, others with a space), bytes as they
    are; group length first, elements in tag order."""
    body = b""
    for number in sorted(elements):
        value = elements[number]
        if isinstance(value, int):
            value = struct.pack("<H", value)
        elif isinstance(value, str):
            value = value.encode("ascii", "replace")
            if len(value) % 2:
                value += b"\x00" if number in _UI_ELEMENTS else b" "
        elif len(value) % 2:
            value += b"\x00"
        body += struct.pack("<HHI", 0, number, len(value)) + value
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


_UI_ELEMENTS = {0x0002, 0x0003, 0x1000, 0x1001}


def encode_response(request: dict[int, bytes], status: int, comment: str = "", *,
                    data_set: bool = False, extra: dict[int, int | str] | None = None) -> bytes:
    """The response command set to ``request``: its SOP class and instance (the requested
    ones of an N- service become the affected ones), ``status``, the Error Comment for a
    status other than Success or Pending, and ``extra`` elements (sub-operation counts).
    Without comment, data set and extras: exactly the C-STORE-RSP / C-ECHO-RSP as before."""
    field = _us(request[0x0100]) or 0
    elements: dict[int, bytes | int | str] = {
        0x0100: field | RESPONSE, 0x0120: request[0x0110],
        0x0800: DATA_SET if data_set else NO_DATA_SET, 0x0900: status}
    for affected, requested in ((0x0002, 0x0003), (0x1000, 0x1001)):
        value = request.get(affected, request.get(requested))
        if value is not None:
            elements[affected] = value.rstrip(b"\x00 ")
    if comment and status not in (SUCCESS, PENDING, 0xFF01):
        elements[0x0902] = error_comment(comment)
    elements.update(extra or {})
    return encode_command(elements)


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes | None:
    """File Meta Information for a received instance (PS3.10 7.1), encoded directly: the
    same bytes as pydicom encoding pynetdicom's ``create_file_meta`` (tested), in
    microseconds instead of a millisecond on the event loop. None if a UID cannot be one
    (empty, longer than 64 characters, not ASCII)."""
    import pynetdicom

    from radguard.dicom.splice import explicit_header

    def element(number: int, vr: str, value: bytes) -> bytes:
        if len(value) % 2:
            value += b" " if vr == "SH" else b"\x00"
        return explicit_header(0x00020000 | number, vr, len(value)) + value

    uids = []
    for uid in (sop_class, sop_instance, transfer_syntax):
        if not uid or len(uid) > 64 or not uid.isascii():
            return None
        uids.append(uid.encode("ascii"))
    body = b"".join((
        element(0x0001, "OB", b"\x00\x01"),
        element(0x0002, "UI", uids[0]), element(0x0003, "UI", uids[1]),
        element(0x0010, "UI", uids[2]),
        element(0x0012, "UI", pynetdicom.PYNETDICOM_IMPLEMENTATION_UID.encode("ascii")),
        element(0x0013, "SH", pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
    ))
    return element(0x0000, "UL", struct.pack("<I", len(body))) + body


def no_delay(sock: socket.socket | None) -> None:
    """Switch off Nagle's algorithm: without it a small message waits 40-90 ms on delayed
    ACKs (about 20 instances/s instead of hundreds)."""
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def _p_data(context_id: int, command: bytes, peer_max: int, *, is_command: bool = True,
            last: bool = True) -> bytes:
    """A command set, or a piece of a data set, as P-DATA-TF PDUs no longer than the peer
    accepts (0 = no limit); ``last``: the message part ends with this piece."""
    room = max(1, len(command) if not peer_max else peer_max - 6)
    out = b""
    for at in range(0, max(1, len(command)), room):
        piece = command[at:at + room]
        header = (0x01 if is_command else 0) | (0x02 if last and at + room >= len(command)
                                                else 0)
        out += _pdu(P_DATA_TF, struct.pack(">IBB", len(piece) + 2, context_id, header) + piece)
    return out


class Link:
    """What a service operation may do on its association (on the loop): answer its
    request, send C-STORE sub-operations (C-GET) or an N-EVENT-REPORT, and see whether the
    peer cancelled (``cancelled``, a threading.Event so a worker thread can watch it) or
    went away (``open``)."""

    def __init__(self, acceptor: Acceptor, connection: _Connection, request: ServiceRequest,
                 context_id: int) -> None:
        self._acceptor, self._connection = acceptor, connection
        self.request, self.context_id = request, context_id
        self.cancelled = threading.Event()
        self.finished = False  # its final response went out (or the association ended)

    @property
    def open(self) -> bool:
        """Whether the association still carries messages."""
        return not self._connection.closed

    async def respond(self, status: int, comment: str = "", *, data: bytes | None = None,
                      extra: dict[int, int | str] | None = None) -> None:
        """Send a response to the request; any status but Pending is the final one, after
        which the peer may send its next request."""
        if status not in (PENDING, 0xFF01):
            self.finished = True
            if self._connection.operation is self:
                self._connection.operation = None
        if not self.open:
            return
        command = encode_response(self.request.command, status, comment,
                                  data_set=data is not None, extra=extra)
        await self._acceptor.send(self._connection, self.context_id, command, data)

    async def pending(self, answers: list[bytes], extra: dict[int, int | str] | None = None
                      ) -> None:
        """Pending responses, one per data set in ``answers`` (C-FIND matches), written
        together (one write of ~64 KiB, not one segment per match: a peer reading hundreds
        of matches reads them in a few system calls)."""
        if not self.open or not answers:
            return
        command = encode_response(self.request.command, PENDING, data_set=True, extra=extra)
        peer_max = self._connection.peer_max
        head = _p_data(self.context_id, command, peer_max)
        await self._acceptor.send_raw(self._connection, b"".join(
            head + _p_data(self.context_id, data, peer_max, is_command=False, last=True)
            for data in answers))

    def storage_contexts(self, sop_class: str) -> list[tuple[int, str]]:
        """(context id, transfer syntax) of the accepted contexts of ``sop_class`` on which
        the peer took the SCP role (a C-GET requestor's storage contexts)."""
        if sop_class not in self._connection.scp_classes:
            return []
        return [(cid, str(cx.transfer_syntax[0]))
                for cid, cx in self._connection.contexts.items()
                if str(cx.abstract_syntax) == sop_class]

    async def store(self, context_id: int, sop_class: str, sop_instance: str,
                    data: bytes | tuple[Path, int], timeout: float) -> Status | None:
        """A C-STORE sub-operation on this association: ``data`` is the data set in the
        context's transfer syntax (bytes, or a file and the offset it starts at). Its
        status, or None if the peer did not answer in ``timeout`` seconds or went away."""
        command = {0x0002: sop_class, 0x0100: C_STORE_RQ, 0x0700: 0, 0x0800: DATA_SET,
                   0x1000: sop_instance}
        return await self._request(context_id, command, data, timeout)

    async def event_report(self, event_type: int, sop_instance: str, data: bytes,
                           timeout: float) -> Status | None:
        """An N-EVENT-REPORT-RQ on the request's context (Storage Commitment's result);
        its status, or None if unanswered or the association ended."""
        command = {0x0002: self.request.abstract_syntax, 0x0100: N_EVENT_REPORT_RQ,
                   0x0800: DATA_SET, 0x1000: sop_instance, 0x1002: event_type}
        return await self._request(self.context_id, command, data, timeout)

    async def _request(self, context_id: int, elements: dict[int, bytes | int | str],
                       data: bytes | tuple[Path, int], timeout: float) -> Status | None:
        connection = self._connection
        if not self.open:
            return None
        message_id = connection.next_message_id()
        elements[0x0110] = message_id
        answer: asyncio.Future[dict[int, bytes]] = connection.loop.create_future()
        connection.waiting[message_id] = answer
        try:
            await self._acceptor.send(connection, context_id, encode_command(elements), data)
            async with asyncio.timeout(timeout):
                response = await answer
        except TimeoutError:  # a peer that does not answer our request is cut off: waiting
            connection.closed = True  # on it again for every instance of a C-GET would
            connection.writer.transport.abort()  # hold its association slot for hours
            return None
        except (ConnectionError, OSError):
            return None
        finally:
            connection.waiting.pop(message_id, None)
        comment = response.get(0x0902, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        code = _us(response.get(0x0900, b""))
        return Status(CANNOT_UNDERSTAND if code is None else code, comment)

    def background(self, work: Coroutine[object, object, None]) -> None:
        """Run ``work`` on the loop beyond this operation and even this association (a
        Storage Commitment report); it is cancelled when the acceptor stops."""
        self._acceptor.background(work)

    def ours(self) -> contextlib.AbstractContextManager[None]:
        """While this runs the association's peer is waiting for us (a commitment's checks):
        its idle allowance is not used up."""
        return self._connection.ours()


class _Connection:
    """One peer: its streams, what it counts against the limits, and its clock (the
    allowance of the module docstring, enforced by one timer that re-arms itself)."""

    def __init__(self, acceptor: Acceptor, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, ip: str, peer: str, limit: int | None) -> None:
        self.acceptor, self.limits = acceptor, acceptor.limits
        self.reader, self.writer, self.ip = reader, writer, ip
        self.peer = peer  # what the per-peer limits count (Acceptor.peer_of)
        self.limit = limit  # peer_limits' number for this peer, if it names it
        self.calling: str | None = None  # set once associated
        self.slot = False  # counted against max_associations and max_per_ae
        self.handshaking = False  # TLS: asyncio bounds the handshake itself
        self.message: _Message | None = None
        self.expired: _Expiry | None = None
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.deadline = now + self.limits.connect_timeout
        self.paid = self.deadline  # (both clocks are described below)
        self.end = now + self.limits.max_association_time
        self.last_end = now + self.limits.max_association_time * (1 + OVERTIME)
        self.paused_since: float | None = None
        self.busy = 0  # our own pieces of work running (``ours``), nested or concurrent
        self.timer: asyncio.TimerHandle | None = self.loop.call_at(self.deadline, self._check)
        # -- set once associated: what service operations need --
        self.contexts: dict[int, PresentationContext] = {}  # accepted, by context id
        self.scp_classes: set[str] = set()  # SOP classes the peer may be the SCP of (C-GET)
        self.peer_max = 0  # the peer's maximum PDU length (0: none)
        self.operation: Link | None = None  # the request not answered finally yet
        self.waiting: dict[int, asyncio.Future[dict[int, bytes]]] = {}  # our requests
        self.message_id = 0
        self.closed = False  # released or gone: nothing more is sent
        self.send_lock = asyncio.Lock()  # one message at a time on the wire
        self.tasks: set[asyncio.Task[None]] = set()  # its operation, cancelled when it ends

    def next_message_id(self) -> int:
        """A Message ID for a request of ours (C-STORE sub-operation, N-EVENT-REPORT)."""
        self.message_id = self.message_id % 0xFFFF + 1
        return self.message_id

    # -- the clock --------------------------------------------------------------------------
    # Two clocks: ``deadline`` ends the allowance (bytes and new instances refill it), and
    # ``paid`` is what the bytes alone paid for, which ranks associations for eviction -
    # new instances keep an association from being dropped, not its slot from a newcomer.
    def associated(self, calling: str) -> None:
        self.calling, self.slot = calling, True
        self.deadline = self.paid = self.loop.time() + self.limits.idle_timeout
        self.rearm()

    def _added(self, until: float, seconds: float) -> float:
        now = self.loop.time()
        return min(now + self.limits.idle_timeout, max(until, now) + seconds)

    def received(self, size: int) -> None:
        """Bytes received buy time at ``min_rate`` on both clocks (nothing before the
        association: the A-ASSOCIATE-RQ has a fixed deadline)."""
        if self.calling is not None:
            seconds = size / self.limits.min_rate
            self.deadline = self._added(self.deadline, seconds)
            self.paid = self._added(self.paid, seconds)

    def stored_new(self) -> None:
        """A new instance was acknowledged: ``NEW_INSTANCE_CREDIT`` of the idle allowance."""
        self.deadline = self._added(self.deadline, NEW_INSTANCE_CREDIT * self.limits.idle_timeout)

    @contextlib.contextmanager
    def ours(self) -> Iterator[None]:
        """Time spent on our side (a handler, a spool write, a service operation) is not the
        peer's; several may overlap (an operation and a store), the first starts the pause,
        the last ends it."""
        self.busy += 1
        if self.busy == 1:
            self.paused_since = self.loop.time()
        try:
            yield
        finally:
            self.busy -= 1
            if self.busy == 0 and self.paused_since is not None:
                self._resume()

    def _resume(self) -> None:
        if self.paused_since is not None:
            now = self.loop.time()
            paused, most = now - self.paused_since, now + self.limits.idle_timeout
            self.deadline = min(most, self.deadline + paused)
            self.paid = min(most, self.paid + paused)
            self.paused_since = None
            self.rearm()

    def behind(self, now: float) -> float:
        """Seconds this association has waited beyond what its bytes paid for (about 0 for
        a sender at ``min_rate`` or faster). Not meaningful while our work runs."""
        return now + self.limits.idle_timeout - self.paid

    def due(self) -> float:
        """When the clock must look next: the allowance's end, or the association's (later
        while a message is under way)."""
        return min(self.deadline, self.end if self.message is None else self.last_end)

    def rearm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = self.loop.call_at(self.due(), self._check)

    def stop_clock(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        if self.timer is None or self.paused_since is not None or self.handshaking:
            return  # closed, our own work running, or TLS: re-armed when it ends
        now = self.loop.time()
        due = self.due()
        if now + 0.001 < due:
            self.timer = self.loop.call_at(due, self._check)
            return
        self.expire(_Expiry.CONNECT if self.calling is None
                    else _Expiry.IDLE if now + 0.001 >= self.deadline else _Expiry.TOTAL)

    def expire(self, why: _Expiry) -> None:
        """End the connection: its slot freed at once, logged, an A-ABORT if associated, the
        transport aborted (the pending read fails and the association unwinds)."""
        self.stop_clock()
        self.expired = why
        self.acceptor.release(self)
        self.acceptor.note(logging.WARNING, self.peer, "expired",
                           "DICOM connection from %s (%s) dropped: %s", self.ip,
                           self.calling or "not associated", why.value)
        transport = self.writer.transport
        if self.calling is not None and not transport.get_write_buffer_size():
            transport.write(_pdu(A_ABORT, bytes([0, 0, 2, 0])))
        transport.abort()

    # -- reading; every byte buys time at min_rate ---------------------------------------------
    async def exactly(self, size: int) -> bytes:
        data = await self.reader.readexactly(size)
        self.received(size)
        return data

    async def some(self, size: int) -> bytes:
        data = await self.reader.read(size)
        if not data:
            raise asyncio.IncompleteReadError(b"", size)
        self.received(len(data))
        return data


class Acceptor:
    """Listens on ``host:port`` in a background thread until :meth:`stop`. ``spool_dir``
    receives data sets too large for memory (default: a private temporary folder).
    ``on_unwritable`` hears, at most once a minute, why messages are refused because the
    spool folder's filesystem is short of space or cannot be written (called on an I/O
    thread, never on the loop)."""

    def __init__(self, ae_title: str, contexts: list[PresentationContext],
                 handler: StoreHandler, *, allowed_calling_aes: list[str] | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 limits: DimseLimits | None = None, spool_dir: Path | None = None,
                 max_pdu: int = 4 << 20,
                 on_unwritable: Callable[[OSError], None] | None = None,
                 service: ServiceHandler | None = None) -> None:
        self.ae_title = ae_title
        self.service = service  # C-FIND, C-MOVE, C-GET, N-ACTION (None: 0x0211)
        self._tasks: set[asyncio.Task[None]] = set()  # operations and reports under way
        self.syntaxes = {str(c.abstract_syntax): {str(t) for t in c.transfer_syntax}
                         for c in contexts}  # abstract syntax -> transfer syntaxes offered
        self.handler = handler
        self.allowed = {a.strip() for a in allowed_calling_aes or []}
        self.ssl_context = ssl_context
        self.limits = limits or DimseLimits()
        self.max_pdu = max_pdu
        self.spool_dir = spool_dir
        self._own_spool = spool_dir is None
        self.port = 0
        self.on_unwritable = on_unwritable
        self.throttle = Throttle()  # log lines about what peers can repeat at will
        self.left_out = 0  # log lines the throttle held back since the last summary
        self._tell_store = Throttle(global_per_minute=1, capacity=1)  # on_unwritable
        self._summary: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._lingering: set[asyncio.BaseTransport] = set()
        self._per_peer: Counter[str] = Counter()  # open connections per peer (peer_of)
        self._per_ae: Counter[tuple[str, str]] = Counter()  # associations per (peer, AE title)
        self._associations = 0
        # most specific first: (network, max_per_ip and max_per_ae of that peer)
        self._peer_limits = sorted(
            ((ipaddress.ip_network(net, strict=False), n) for net, n in self.limits.peer_limits),
            key=lambda item: -item[0].prefixlen)
        # hashes of SOP Instance UIDs lately answered Success, least recently first
        self._acknowledged: OrderedDict[int, None] = OrderedDict()
        # connections not yet associated (each for connect_timeout at most), from all addresses
        self.negotiating_limit = max(64, 2 * self.limits.max_associations)
        self.memory_held = 0  # bytes of data sets in memory (unfinished or being handled)
        self.spooled = 0  # bytes in spool files of unanswered messages
        self._room_until = 0.0  # until when the last statvfs that found room is believed
        self._spools: dict[Path, BinaryIO] = {}  # spool files of unfinished messages
        self._pool = ThreadPoolExecutor(max_workers=min(32, self.limits.max_associations),
                                        thread_name_prefix="radguard-store")
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="radguard-spool")

    @property
    def active(self) -> int:
        """Open connections (the ones being negotiated included)."""
        return len(self._connections)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with port 0). Raises OSError if it cannot bind
        or cannot use the spool folder."""
        if self.spool_dir is None:
            self.spool_dir = Path(tempfile.mkdtemp(prefix="radguard-spool-"))
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        leftovers = list(self.spool_dir.glob(f"{SPOOL_PREFIX}*{SPOOL_SUFFIX}"))
        for path in leftovers:  # never acknowledged: the sender still has them
            path.unlink(missing_ok=True)
        if leftovers:
            log.info("removed %d unfinished DICOM spool file(s) from %s", len(leftovers),
                     self.spool_dir)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="radguard-dicom",
                                        daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(host, port), loop)
        try:
            self.port = future.result(30)
        except BaseException:
            self.stop()
            raise
        return self.port

    async def _listen(self, host: str, port: int) -> int:
        # TLS is started per connection, so a handshake already counts against the limits
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True,
                                                  limit=READ_BUFFER)
        self._summarise()
        return int(self._server.sockets[0].getsockname()[1])

    def _summarise(self) -> None:
        """Once a minute: how many log lines the throttle held back meanwhile (each kept
        line says how many like it were left out, but a peer that stops gets no more)."""
        if self.left_out:
            log.warning("DICOM port: %d more refusals, rejects, aborts or drops in the last "
                        "minute left out of the log", self.left_out)
            self.left_out = 0
        assert self._loop is not None
        self._summary = self._loop.call_later(60, self._summarise)

    def note(self, level: int, peer: str, kind: str, message: str, *args: object) -> None:
        """Log an event a peer can repeat at will (``peer``: :meth:`peer_of`, "" for
        the server as a whole): the first per peer and kind, then one a minute saying how
        many were left out, at most 60 lines a minute in all."""
        write, held = self.throttle.allow(f"{kind} {peer}")
        if not write:
            self.left_out += 1
            return
        if held:
            message += " (%d more like it left out of the log)"
            args = (*args, held)
        log.log(level, message, *args)

    def stop(self) -> None:
        """Stop listening, drop open associations (a message not yet answered was not
        acknowledged, so the sender still owns it), wait for running handlers."""
        loop = self._loop
        if loop is None:
            return
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(30)
        self._pool.shutdown(wait=True)
        self._io.shutdown(wait=True)
        loop.close()
        self._loop = None
        for path, file in list(self._spools.items()):  # associations cut off by the stop
            with contextlib.suppress(OSError):
                file.close()
            path.unlink(missing_ok=True)
        self._spools.clear()
        if self._own_spool and self.spool_dir is not None:
            shutil.rmtree(self.spool_dir, ignore_errors=True)

    async def _close(self) -> None:
        if self._summary is not None:
            self._summary.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for connection in list(self._connections):
            connection.closed = True
            if connection.operation is not None:  # a worker thread stops at its next step
                connection.operation.cancelled.set()
            connection.stop_clock()
            if connection.writer.transport is not None:
                connection.writer.transport.abort()
        for transport in list(self._lingering):
            transport.abort()
        self._lingering.clear()

    # -- one connection -----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = writer.get_extra_info("peername")
        ip = str(address[0]) if address else "?"
        peer, limit = self.peer_of(ip)
        refusal = self._admit(peer, limit)
        if refusal:
            self.note(logging.WARNING, peer, "refused",
                      "DICOM connection from %s closed unread: %s", ip, refusal)
            writer.transport.abort()
            return
        no_delay(writer.get_extra_info("socket"))
        connection = _Connection(self, reader, writer, ip, peer, limit)
        self._connections.add(connection)
        self._per_peer[peer] += 1
        try:
            if self.ssl_context is not None:
                await self._start_tls(connection)
            await self._association(connection)
        except _Abort as exc:
            self.note(logging.WARNING, peer, "aborted",
                      "DICOM association from %s (%s) aborted: %s", ip,
                      connection.calling or "not associated", exc)
            writer.write(_pdu(A_ABORT, bytes([0, 0, 2, exc.reason])))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ssl.SSLError):
            pass  # the peer went away, or its time ran out (logged by the clock)
        except Exception:  # noqa: BLE001 - one broken association must not stop the server
            log.exception("DICOM association from %s failed", ip)
            writer.write(_pdu(A_ABORT, bytes([0, 0, 2, 0])))
        finally:
            await self._forget(connection)
            self._hang_up(writer)

    async def _start_tls(self, connection: _Connection) -> None:
        """The TLS handshake, bounded by asyncio's own timeout (the clock leaves it alone:
        aborting the transport under a handshake would leave the stream without one)."""
        connection.handshaking = True
        try:
            await connection.writer.start_tls(self.ssl_context,
                                              ssl_handshake_timeout=self.limits.connect_timeout)
        finally:
            connection.handshaking = False
        if connection.writer.transport is None:  # closed under the handshake (a stop)
            raise ConnectionResetError("connection closed during the TLS handshake")
        connection.rearm()

    def peer_of(self, ip: str) -> tuple[str, int | None]:
        """The peer an address belongs to - the most specific ``peer_limits`` network that
        holds it (all its addresses count together), else its :func:`ratelimit.peer_key`
        - and the limit ``peer_limits`` gives that peer (None: ``max_per_ip`` and
        ``max_per_ae``)."""
        address = ip_of(ip) if self._peer_limits else None
        if address is not None:
            for network, limit in self._peer_limits:
                if address in network:
                    name = network.network_address if network.num_addresses == 1 else network
                    return str(name), limit
        return peer_key(ip, self.limits.ipv6_prefix), None

    def _admit(self, peer: str, limit: int | None) -> str:
        """Why a new connection is closed before a byte is read ("" to let it in)."""
        most = limit or self.limits.max_per_ip
        if self._per_peer[peer] >= most:
            return f"{self._per_peer[peer]} connections from {peer} already (at most {most})"
        if len(self._connections) - self._associations >= self.negotiating_limit:
            return f"{self.negotiating_limit} connections are negotiating already"
        return ""

    def release(self, connection: _Connection) -> None:
        """The association no longer counts against max_associations and max_per_ae."""
        if connection.slot and connection.calling is not None:
            connection.slot = False
            self._associations -= 1
            key = (connection.peer, connection.calling)
            self._per_ae[key] -= 1
            if self._per_ae[key] <= 0:
                del self._per_ae[key]

    def _evict(self) -> bool:
        """Every slot is taken: abort, to make room for a new association, the idlest
        association of the peer holding the most slots (rules in the module docstring);
        False if none of that peer's may be evicted. Never someone else's: the newcomers of
        a peer that keeps many slots busy could otherwise take a lone modality's the moment
        it pauses."""
        assert self._loop is not None
        now = self._loop.time()
        slots = Counter(c.peer for c in self._connections if c.slot)
        most = max(slots.values(), default=0)
        candidates = [c for c in self._connections
                      if c.slot and slots[c.peer] == most and c.paused_since is None]
        if not candidates:
            return False
        idlest = max(candidates, key=lambda c: c.behind(now))
        if idlest.behind(now) < self.evict_after:
            return False
        idlest.expire(_Expiry.EVICTED)
        return True

    @property
    def evict_after(self) -> float:
        """Seconds behind its allowance that make an association evictable."""
        return min(EVICT_AFTER, self.limits.idle_timeout / 2)

    def _new_instance(self, sop_instance_uid: str) -> bool:
        """Whether a SOP Instance UID just answered Success was not acknowledged lately (of
        the last ``RECENT_INSTANCES`` distinct ones): only then does it earn its association
        the ``NEW_INSTANCE_CREDIT``. On the loop's thread only. Only 64-bit hashes are kept,
        to bound the memory: a collision costs one credit, nothing else."""
        key = hash(sop_instance_uid)
        if key in self._acknowledged:
            self._acknowledged.move_to_end(key)  # a resend keeps it remembered
            return False
        self._acknowledged[key] = None
        if len(self._acknowledged) > RECENT_INSTANCES:
            self._acknowledged.popitem(last=False)
        return True

    async def _forget(self, connection: _Connection) -> None:
        """A connection ended: its counts go at once, its unfinished message with them, its
        operation is cancelled and its unanswered requests fail."""
        connection.stop_clock()
        connection.closed = True
        if connection.operation is not None:
            connection.operation.cancelled.set()  # a worker thread stops at its next step
        for task in list(connection.tasks):
            task.cancel()
        for waiter in connection.waiting.values():
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the association ended"))
        connection.waiting.clear()
        self._connections.discard(connection)
        self._per_peer[connection.peer] -= 1
        if self._per_peer[connection.peer] <= 0:
            del self._per_peer[connection.peer]
        self.release(connection)
        if connection.message is not None:
            message, connection.message = connection.message, None
            await self._drop(message)

    def _hang_up(self, writer: asyncio.StreamWriter) -> None:
        """Close; a peer that does not read what is still buffered is cut off soon after,
        so it cannot keep the socket open."""
        transport = writer.transport
        if transport is None:  # closed under a TLS handshake
            return
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()
        self._lingering.add(transport)

        def cut() -> None:
            self._lingering.discard(transport)
            transport.abort()  # nothing happens if it closed meanwhile

        asyncio.get_running_loop().call_later(HANG_UP_GRACE, cut)

    async def _association(self, connection: _Connection) -> None:
        head = await connection.exactly(6)
        kind, length = head[0], struct.unpack(">I", head[2:])[0]
        if not A_ASSOCIATE_RQ <= kind <= A_ABORT:
            raise _Abort(UNRECOGNISED_PDU, f"unknown PDU type 0x{kind:02X}")
        if kind != A_ASSOCIATE_RQ:
            raise _Abort(UNEXPECTED_PDU, f"PDU type {kind} before A-ASSOCIATE-RQ")
        if length > ASSOCIATION_PDU_LIMIT:
            raise _Abort(INVALID_PARAMETER, f"A-ASSOCIATE-RQ of {length} bytes "
                                            f"(at most {ASSOCIATION_PDU_LIMIT})")
        pdu = head + await connection.exactly(length)
        accepted, peer_max = self._negotiate(pdu, connection)
        if accepted is None:
            await self._await_close(connection)
            return
        await connection.writer.drain()
        while True:
            head = await connection.exactly(6)
            kind, length = head[0], struct.unpack(">I", head[2:])[0]
            if not A_ASSOCIATE_RQ <= kind <= A_ABORT:
                raise _Abort(UNRECOGNISED_PDU, f"unknown PDU type 0x{kind:02X}")
            if kind == P_DATA_TF:
                if length > self.max_pdu:
                    raise _Abort(INVALID_PARAMETER, f"PDU of {length} bytes "
                                                    f"(at most {self.max_pdu})")
                await self._receive_p_data(connection, length, accepted, peer_max)
                continue
            if kind not in (A_RELEASE_RQ, A_ABORT):
                raise _Abort(UNEXPECTED_PDU, f"PDU type {kind} during the association")
            if length > SMALL_PDU_LIMIT:
                raise _Abort(INVALID_PARAMETER, f"PDU type {kind} of {length} bytes")
            await connection.exactly(length)
            if kind == A_ABORT:
                return
            async with connection.send_lock:  # after a message being sent, if any
                connection.closed = True
            connection.writer.write(_pdu(A_RELEASE_RP, b"\x00" * 4))
            await connection.writer.drain()
            return

    @staticmethod
    async def _await_close(connection: _Connection) -> None:
        """After an A-ASSOCIATE-RJ the requestor closes the connection (PS3.8 9.2, Sta13),
        or the ARTIM timer runs out: closing first races the requestor's reading of the
        reject (pynetdicom then reports an abort)."""
        await connection.writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ARTIM_TIMEOUT):
                while await connection.reader.read(4096):
                    pass

    async def _receive_p_data(self, connection: _Connection, length: int,
                              accepted: dict[int, PresentationContext], peer_max: int) -> None:
        """One P-DATA-TF PDU, read PDV by PDV (PS3.8 9.3.5); data set values in pieces."""
        left = length
        while left:
            if left < 6:
                raise _Abort(INVALID_PARAMETER, "truncated PDV item")
            item = await connection.exactly(6)
            left -= 6
            item_length, context_id, control = struct.unpack(">IBB", item)
            size = item_length - 2
            if item_length < 2 or size > left:
                raise _Abort(INVALID_PARAMETER, "PDV item length out of range")
            left -= size
            if context_id not in accepted:
                raise _Abort(INVALID_PARAMETER, f"PDV on context {context_id}, "
                                                "which was not accepted")
            message = self._fragment(connection.message, context_id, control,
                                     str(accepted[context_id].transfer_syntax[0]))
            connection.message = message
            if control & 0x01:
                if message.command_size + size > ASSOCIATION_PDU_LIMIT:
                    raise _Abort(INVALID_PARAMETER, "command set too long")
                message.command_parts.append(await connection.exactly(size))
                message.command_size += size
                if control & 0x02:
                    self._command_done(message)
            else:
                await self._data(connection, message, size)
                if control & 0x02:
                    message.data_done = True
                    await self._data_done(connection, message)
            if message.complete:
                connection.message = None
                await self._dispatch(connection, message, peer_max)
                if connection.loop.time() >= connection.end:  # the one it waited for
                    connection.rearm()

    @staticmethod
    def _fragment(message: _Message | None, context_id: int, control: int,
                  transfer_syntax: str) -> _Message:
        """The message a PDV fragment belongs to, if it may come now (PS3.8 E.2)."""
        if message is None:
            message = _Message(context_id, transfer_syntax)
        elif message.context_id != context_id:
            raise _Abort(UNEXPECTED_PDU, "a message switched presentation context")
        if control & 0x01:  # command fragment
            if message.command is not None:
                raise _Abort(UNEXPECTED_PDU, "command fragment after the command ended")
        elif message.command is None or not message.has_data_set or message.data_done:
            raise _Abort(UNEXPECTED_PDU, "data set fragment without a command that "
                                         "announces one")
        return message

    @staticmethod
    def _command_done(message: _Message) -> None:
        """Parse the complete command set (PS3.7 9.3: it names the operation)."""
        try:
            message.command = parse_command(b"".join(message.command_parts))
        except ValueError as exc:
            raise _Abort(INVALID_PARAMETER, str(exc)) from exc
        message.command_parts.clear()
        field = _us(message.command[0x0100]) or 0
        if field & RESPONSE or field == C_CANCEL_RQ:
            if _us(message.command.get(0x0120, b"")) is None:
                raise _Abort(INVALID_PARAMETER, "response or C-CANCEL without the Message "
                                                "ID Being Responded To")
        elif _us(message.command.get(0x0110, b"")) is None:
            raise _Abort(INVALID_PARAMETER, "request without a Message ID")

    # -- data sets: memory, spool file or nowhere -------------------------------------------------
    async def _data(self, connection: _Connection, message: _Message, size: int) -> None:
        """Take ``size`` bytes of data set off the socket and keep them where they go."""
        if message.keep is None:
            self._start_data_set(message)
            if message.keep is _Keep.MEMORY and not message.limit and \
                    (short := self._short_of_room()) is not None:
                await self._fail(connection, message, short)
        while size:
            chunk = await connection.some(min(size, READ_CHUNK))
            size -= len(chunk)
            message.data_size += len(chunk)
            if message.data_size > self.limits.max_data_set:
                raise _Abort(INVALID_PARAMETER, f"data set larger than this gateway accepts "
                                                f"({self.limits.max_data_set} bytes)")
            if message.limit and message.keep is _Keep.MEMORY:
                if message.data_size <= message.limit:
                    message.parts.append(chunk)
                    continue
                message.parts = []  # never budgeted: the limit keeps it small
                message.keep, message.status = _Keep.DISCARD, CANNOT_UNDERSTAND
                message.comment = f"request data set larger than {message.limit >> 10} KiB"
                continue
            if message.keep is _Keep.MEMORY:
                n = len(chunk)
                if (message.held + n <= self.limits.memory_per_message
                        and self.memory_held + n <= self.limits.memory_budget):
                    message.parts.append(chunk)
                    message.held += n
                    self.memory_held += n
                    continue
                await self._spool(connection, message)
            if message.keep is _Keep.SPOOL:
                message.parts.append(chunk)
                message.pending += len(chunk)
                if message.pending >= WRITE_CHUNK:
                    await self._write(connection, message)

    def _start_data_set(self, message: _Message) -> None:
        """The Part 10 head (preamble, file meta) of a C-STORE's data set; a data set that
        cannot become an instance is not kept at all."""
        command = message.command
        assert command is not None
        meta = None
        if (limit := REQUEST_DATA_LIMITS.get(_us(command[0x0100]) or 0)) is not None:
            message.keep, message.limit = _Keep.MEMORY, limit  # an identifier: kept as sent
            return
        if _us(command[0x0100]) == C_STORE_RQ:
            meta = file_meta(_uid(command.get(0x0002, b"")), _uid(command.get(0x1000, b"")),
                             message.transfer_syntax)
        if meta is None:  # answered UNRECOGNISED_OPERATION or CANNOT_UNDERSTAND
            message.keep, message.status = _Keep.DISCARD, CANNOT_UNDERSTAND
            message.comment = "no data set expected, or a bad SOP Class/Instance UID"
            return
        head = b"".join((b"\x00" * 128, b"DICM", meta))
        message.keep, message.parts, message.held = _Keep.MEMORY, [head], len(head)
        self.memory_held += len(head)

    async def _spool(self, connection: _Connection, message: _Message) -> None:
        """Move a message from memory to a new spool file: what it has so far is written
        at once and its memory released."""
        assert self.spool_dir is not None and self._loop is not None
        spool_dir = self.spool_dir

        def create() -> tuple[BinaryIO, Path]:
            fd, name = tempfile.mkstemp(prefix=SPOOL_PREFIX, suffix=SPOOL_SUFFIX, dir=spool_dir)
            os.fchmod(fd, 0o640)  # what the store gives its files: a rename is enough
            return os.fdopen(fd, "wb"), Path(name)

        try:
            with connection.ours():
                message.file, message.path = await self._loop.run_in_executor(self._io, create)
        except OSError as exc:
            await self._fail(connection, message, exc)
            return
        self._spools[message.path] = message.file
        message.keep = _Keep.SPOOL
        message.pending = sum(map(len, message.parts))
        await self._write(connection, message)

    async def _write(self, connection: _Connection, message: _Message) -> None:
        """Write what is pending to the spool file (on the I/O threads), if the spool budget
        and the disk's reserve leave room for it."""
        assert message.file is not None and self._loop is not None
        parts, size, message.parts, message.pending = message.parts, message.pending, [], 0
        try:
            if self.spooled + size > self.limits.spool_budget:
                await self._fail(connection, message, f"the spool budget is taken (spool files "
                                 f"of unanswered messages: {self.spooled >> 20} MiB)")
                return
            self.spooled += size
            message.spooled += size
            try:
                with connection.ours():
                    await self._loop.run_in_executor(self._io, self._write_spool, message.file,
                                                     parts, size)
            except OSError as exc:
                await self._fail(connection, message, exc)
        finally:
            self.memory_held -= message.held  # parts moved from memory, if any, are gone
            message.held = 0

    def _write_spool(self, file: BinaryIO, parts: list[bytes], size: int) -> None:
        """Spooled bytes to their file, unless they would take the disk below its reserve
        (on an I/O thread: statvfs may be a network round trip)."""
        assert self.spool_dir is not None
        if room_above_reserve(self.spool_dir, self.limits.min_free) < size:
            raise self._no_room()
        file.writelines(parts)

    def _no_room(self) -> OSError:
        return OSError(errno.ENOSPC, "less free space than the reserve (dicom.min_free_mb, "
                                     "at most 5% of the filesystem)")

    def _short_of_room(self) -> OSError | None:
        """Why no data set may begin now (the spool folder's filesystem is below its reserve,
        or statvfs fails), or None. A reading that found room is believed for
        ROOM_SECONDS, one that did not is never reused."""
        assert self.spool_dir is not None
        now = time.monotonic()
        if now < self._room_until:
            return None
        try:
            if room_above_reserve(self.spool_dir, self.limits.min_free) < 0:
                return self._no_room()
        except OSError as exc:
            return exc
        self._room_until = now + ROOM_SECONDS
        return None

    async def _data_done(self, connection: _Connection, message: _Message) -> None:
        """The last fragment arrived: a spool file gets its rest and is closed."""
        if message.keep is not _Keep.SPOOL:
            return
        if message.parts:
            await self._write(connection, message)
        file = message.file
        if message.keep is _Keep.SPOOL and file is not None:
            assert self._loop is not None
            try:
                with connection.ours():
                    await self._loop.run_in_executor(self._io, file.close)
            except OSError as exc:
                await self._fail(connection, message, exc)

    async def _fail(self, connection: _Connection, message: _Message,
                    problem: OSError | str) -> None:
        """The message cannot be kept: the disk is below its reserve or cannot be written
        (``problem`` an OSError, also reported to ``on_unwritable``), or the spool budget
        is taken. The rest of it is dropped and the C-STORE answered "out of resources"."""
        if isinstance(problem, OSError):
            self._room_until = 0.0  # the next data set asks statvfs again
            kind, why = "unwritable", f"spool folder {self.spool_dir}: " \
                                      f"{problem.strerror or problem}"
            if self.on_unwritable is not None and self._tell_store.allow("store")[0]:
                self._io.submit(self._report, self.on_unwritable, problem)
        else:
            kind, why = "spool budget", problem
        self.note(logging.ERROR, "", kind, "C-STORE from %s (%s) not received: %s; answering "
                  "0xA700", connection.ip, connection.calling, why)
        await self._drop(message)
        message.keep, message.status = _Keep.DISCARD, OUT_OF_RESOURCES
        message.comment = "gateway spool not writable (disk full or failing)" \
            if kind == "unwritable" else "gateway spool budget taken, retry later"

    @staticmethod
    def _report(listener: Callable[[OSError], None], problem: OSError) -> None:
        """``on_unwritable`` on an I/O thread (it may log and write an audit entry)."""
        try:
            listener(problem)
        except Exception as exc:  # noqa: BLE001 - a listener's failure must not stop us
            log.error("reporting a disk problem failed: %s: %s", type(exc).__name__, exc)

    def _settle(self, message: _Message) -> None:
        """A message no longer counts against the memory and spool budgets."""
        self.memory_held -= message.held
        self.spooled -= message.spooled
        message.held = message.spooled = 0

    async def _drop(self, message: _Message) -> None:
        """Forget a message's data set: memory released, spool file deleted."""
        self._settle(message)
        message.parts, message.pending = [], 0
        file, path, message.file, message.path = message.file, message.path, None, None
        if path is None:
            return
        self._spools.pop(path, None)

        def remove() -> None:
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()
            path.unlink(missing_ok=True)

        assert self._loop is not None
        with contextlib.suppress(OSError):
            await self._loop.run_in_executor(self._io, remove)

    # -- negotiation ----------------------------------------------------------------------------
    def _negotiate(self, pdu: bytes, connection: _Connection
                   ) -> tuple[dict[int, PresentationContext] | None, int]:
        """Answer the A-ASSOCIATE-RQ: ``({context id: accepted context}, the peer's maximum
        PDU length)``, or ``(None, ...)`` after a reject."""
        from pynetdicom.pdu import A_ASSOCIATE_AC as AcPdu
        from pynetdicom.pdu import A_ASSOCIATE_RQ as RqPdu
        from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification

        try:
            rq_pdu = RqPdu()
            rq_pdu.decode(pdu)
            rq = rq_pdu.to_primitive()
            calling = str(rq.calling_ae_title or "").strip()
            info = list(rq.user_information or [])
            peer_max = next((int(i.maximum_length_received or 0) for i in info
                             if isinstance(i, MaximumLengthNotification)), 0)
            version = rq_pdu.protocol_version
            context_name = str(rq.application_context_name or "")
        except Exception as exc:  # noqa: BLE001 - pynetdicom's decoders raise anything
            raise _Abort(INVALID_PARAMETER, f"undecodable A-ASSOCIATE-RQ "
                                            f"({type(exc).__name__})") from exc
        reject, why = None, ""
        if not version & 0x01:
            reject, why = (0x01, 0x02, 0x02), "protocol version"
        elif context_name != APPLICATION_CONTEXT:
            reject, why = (0x01, 0x01, 0x02), "application context name"
        elif self.allowed and calling not in self.allowed:
            reject, why = (0x01, 0x01, 0x03), "calling AE title not allowed"
        elif (held := self._per_ae[connection.peer, calling]) >= \
                (most := connection.limit or self.limits.max_per_ae):
            reject, why = LOCAL_LIMIT, f"{held} associations from this peer with this " \
                                       f"calling AE title (at most {most})"
        elif self._associations >= self.limits.max_associations and not self._evict():
            reject, why = LOCAL_LIMIT, f"{self._associations} associations open " \
                                       f"(max_associations {self.limits.max_associations}), " \
                                       f"none of the peer holding the most idle for " \
                                       f"{self.evict_after:g} s"
        if reject:
            self.note(logging.WARNING, connection.peer, "rejected",
                      "A-ASSOCIATE from %s (%r) rejected %s: %s", connection.ip, calling,
                      reject, why)
            connection.writer.write(_pdu(A_ASSOCIATE_RJ, bytes([0, *reject])))
            return None, peer_max
        try:
            results = [self._choose(cx) for cx in rq.presentation_context_definition_list]
        except Exception as exc:  # noqa: BLE001 - malformed context items
            raise _Abort(INVALID_PARAMETER, f"unusable presentation contexts "
                                            f"({type(exc).__name__})") from exc
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title, ac.called_ae_title = rq.calling_ae_title, rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = results
        accepted = {int(cx.context_id): cx for cx in results if cx.result == 0x00}
        roles = self._roles(info, {str(cx.abstract_syntax) for cx in accepted.values()})
        ac.user_information = self._user_information() + roles
        ac_pdu = AcPdu()
        ac_pdu.from_primitive(ac)
        connection.writer.write(ac_pdu.encode())
        self._associations += 1
        self._per_ae[connection.peer, calling] += 1
        connection.associated(calling)
        connection.contexts, connection.peer_max = accepted, peer_max
        connection.scp_classes = {str(r.sop_class_uid) for r in roles if r.scp_role}
        return accepted, peer_max

    @staticmethod
    def _roles(info: list[ServiceParameter], accepted: set[str]) -> list[ServiceParameter]:
        """The answer to the requestor's SCP/SCU role selection items: the roles it proposed,
        for the abstract syntaxes accepted (a C-GET requestor is the SCP of storage)."""
        from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation as Role

        answers: list[ServiceParameter] = []
        for item in info:
            if isinstance(item, Role) and str(item.sop_class_uid) in accepted and \
                    str(item.sop_class_uid) not in {str(a.sop_class_uid) for a in answers}:
                answer = Role()
                answer.sop_class_uid = item.sop_class_uid
                answer.scu_role, answer.scp_role = bool(item.scu_role), bool(item.scp_role)
                answers.append(answer)
        return answers

    def _choose(self, requested: PresentationContext) -> PresentationContext:
        """The answer to one proposed presentation context (PS3.8 9.3.3.2)."""
        from pynetdicom.presentation import PresentationContext

        answer = PresentationContext()
        answer.context_id = requested.context_id
        answer.abstract_syntax = requested.abstract_syntax
        proposed = [str(t) for t in requested.transfer_syntax]
        offered = self.syntaxes.get(str(requested.abstract_syntax))
        chosen = next((t for t in proposed if t in offered), None) if offered else None
        if chosen is not None:
            answer.result = 0x00
        else:  # 3: abstract syntax not supported, 4: none of its transfer syntaxes
            answer.result = 0x03 if offered is None else 0x04
        answer.transfer_syntax = [chosen or (proposed[0] if proposed else "1.2.840.10008.1.2")]
        return answer

    def _user_information(self) -> list[ServiceParameter]:
        import pynetdicom
        from pynetdicom.pdu_primitives import (
            ImplementationClassUIDNotification,
            ImplementationVersionNameNotification,
            MaximumLengthNotification,
        )

        length = MaximumLengthNotification()
        length.maximum_length_received = self.max_pdu
        uid = ImplementationClassUIDNotification()
        uid.implementation_class_uid = pynetdicom.PYNETDICOM_IMPLEMENTATION_UID
        name = ImplementationVersionNameNotification()
        name.implementation_version_name = pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION
        return [length, uid, name]

    # -- messages -------------------------------------------------------------------------------
    async def _dispatch(self, connection: _Connection, message: _Message, peer_max: int) -> None:
        command = message.command
        assert command is not None and self._loop is not None
        field = _us(command[0x0100]) or 0
        if field & RESPONSE:
            self._answered(connection, command)
            return
        if field == C_CANCEL_RQ:  # of the running operation, if it names it
            link = connection.operation
            if link is not None and _us(command[0x0120]) == link.request.message_id:
                link.cancelled.set()
            return
        if connection.operation is not None:
            raise _Abort(UNEXPECTED_PDU, "a request before the previous one was answered")
        comment = ""
        if field in REQUEST_DATA_LIMITS and self.service is not None:
            if message.status is None:
                self._start_operation(connection, message)
                return
            status, comment = message.status, message.comment  # its data set was dropped
        elif field == C_ECHO_RQ:
            status = 0x0000
        elif field == C_STORE_RQ and message.has_data_set:
            if message.status is not None:
                status = message.status
            else:
                request = self._store_request(connection, message)
                try:
                    with connection.ours():
                        status = await self._loop.run_in_executor(self._pool, self._handle,
                                                                  request)
                finally:
                    self._settle(message)
                if status == SUCCESS and self._new_instance(request.sop_instance_uid):
                    connection.stored_new()
        elif field == C_STORE_RQ:
            status, comment = CANNOT_UNDERSTAND, "C-STORE without a data set"
        else:
            status, comment = UNRECOGNISED_OPERATION, "operation not supported on this port"
        if message.status is not None and field == C_STORE_RQ:
            comment = message.comment
        comment = getattr(status, "comment", "") or comment or \
            ("" if status == SUCCESS else f"refused (0x{status:04X})")
        await self.send(connection, message.context_id, encode_response(command, status, comment))

    def _answered(self, connection: _Connection, command: dict[int, bytes]) -> None:
        """A response to a request of ours (a C-STORE sub-operation, an N-EVENT-REPORT)."""
        waiter = connection.waiting.pop(_us(command[0x0120]) or 0, None)
        if waiter is None or waiter.done():
            self.note(logging.INFO, connection.peer, "stray response", "DICOM peer %s (%s) "
                      "answered a request it was not asked (ignored)", connection.ip,
                      connection.calling)
            return
        waiter.set_result(command)

    def _start_operation(self, connection: _Connection, message: _Message) -> None:
        """Run the service for a complete request as a task; the connection reads on."""
        command = message.command
        assert command is not None and connection.calling is not None
        abstract = str(connection.contexts[message.context_id].abstract_syntax)
        request = ServiceRequest(connection.calling, connection.ip, _us(command[0x0100]) or 0,
                                 _us(command[0x0110]) or 0, abstract, message.transfer_syntax,
                                 command, b"".join(message.parts))
        message.parts = []
        link = Link(self, connection, request, message.context_id)
        connection.operation = link
        self.background(self._operate(connection, link), connection=connection)

    async def _operate(self, connection: _Connection, link: Link) -> None:
        """The service on one request; a final failure response if it fails without one."""
        assert self.service is not None
        try:
            with connection.ours():
                await self.service(link.request, link)
        except ConnectionError:
            pass  # the peer went away, or stopped reading (logged by _drain)
        except Exception:  # noqa: BLE001 - one failed request must not end the association
            log.exception("DICOM %s from %s failed", hex(link.request.command_field),
                          connection.ip)
        finally:
            if not link.finished:
                with contextlib.suppress(Exception):
                    await link.respond(CANNOT_UNDERSTAND, "internal error in the gateway")
            link.finished = True
            if connection.operation is link:
                connection.operation = None

    def background(self, work: Coroutine[object, object, None], *,
                   connection: _Connection | None = None) -> None:
        """Run ``work`` as a task of the loop, kept until it ends, cancelled on stop (and
        when ``connection`` ends, if given)."""
        assert self._loop is not None
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if connection is not None:
            connection.tasks.add(task)
            task.add_done_callback(connection.tasks.discard)

    async def send(self, connection: _Connection, context_id: int, command: bytes,
                   data: bytes | tuple[Path, int] | None = None) -> None:
        """One whole message on the wire - command set, then the data set (bytes, or a file
        from an offset, read in pieces) - with no other message's PDUs in between."""
        if connection.closed:
            return
        async with connection.send_lock:
            head = _p_data(context_id, command, connection.peer_max)
            if isinstance(data, bytes) and len(data) <= READ_CHUNK:
                # a small answer (a C-FIND match) in one write: one segment, not two
                connection.writer.write(head + _p_data(context_id, data, connection.peer_max,
                                                       is_command=False, last=True))
                await self._drain(connection)
                return
            connection.writer.write(head)
            if isinstance(data, bytes):
                for at in range(0, max(1, len(data)), READ_CHUNK):
                    await self._drain(connection)
                    connection.writer.write(_p_data(
                        context_id, data[at:at + READ_CHUNK], connection.peer_max,
                        is_command=False, last=at + READ_CHUNK >= len(data)))
            elif data is not None:
                await self._send_file(connection, context_id, *data)
            await self._drain(connection)

    async def send_raw(self, connection: _Connection, pdus: bytes) -> None:
        """Whole messages already made into P-DATA-TF PDUs, on the wire as one write."""
        if connection.closed:
            return
        async with connection.send_lock:
            connection.writer.write(pdus)
            await self._drain(connection)

    async def _drain(self, connection: _Connection) -> None:
        """Wait until the peer has taken what we wrote; a peer that reads nothing for
        ``idle_timeout`` (the clock is paused while our operations send) is cut off."""
        try:
            async with asyncio.timeout(self.limits.idle_timeout):
                await connection.writer.drain()
        except TimeoutError:
            connection.closed = True
            self.note(logging.WARNING, connection.peer, "not reading", "DICOM peer %s (%s) "
                      "dropped: it read nothing of our messages for %g s", connection.ip,
                      connection.calling, self.limits.idle_timeout)
            connection.writer.transport.abort()
            raise ConnectionResetError("the peer does not read") from None

    async def _send_file(self, connection: _Connection, context_id: int, path: Path,
                         offset: int) -> None:
        """A data set from a file, from ``offset`` to its end, a piece at a time (a file
        that ends early cuts the association off: the message cannot be completed)."""
        assert self._loop is not None
        size = path.stat().st_size - offset
        with path.open("rb") as file:
            file.seek(offset)
            sent = 0
            while sent < size or not sent:
                piece = await self._loop.run_in_executor(self._io, file.read, READ_CHUNK)
                if not piece and sent < size:
                    connection.closed = True
                    connection.writer.transport.abort()
                    raise ConnectionResetError(f"{path} ended early")
                sent += len(piece)
                connection.writer.write(_p_data(context_id, piece, connection.peer_max,
                                                is_command=False, last=sent >= size))
                await self._drain(connection)
                if not piece:
                    break

    def _handle(self, request: StoreRequest) -> int:
        """The handler, on the store threads; its spool file does not outlive it."""
        try:
            return self.handler(request)
        finally:
            if request.path is not None:
                request.path.unlink(missing_ok=True)

    def _store_request(self, connection: _Connection, message: _Message) -> StoreRequest:
        """The received C-STORE: Part 10 bytes in memory, or the spool file now handed over."""
        command = message.command
        assert command is not None and connection.calling is not None
        data, path = b"", None
        if message.path is not None:
            path = message.path
            self._spools.pop(path, None)  # the handler's from now on
            message.file = message.path = None
        else:
            data = b"".join(message.parts)
        message.parts = []
        return StoreRequest(connection.calling, _uid(command.get(0x0002, b"")),
                            _uid(command.get(0x1000, b"")), message.transfer_syntax, data,
                            path=path, peer=connection.ip)
