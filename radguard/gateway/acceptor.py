"""An event-driven DICOM upper layer for the SCP: one asyncio loop serves every association.

pynetdicom's own acceptor runs two polling threads per association (1 ms sleeps): with ten
idle associations they burn about half a core, and under load they fight the checks for the
interpreter lock. Here a socket wakes the loop only when bytes arrive. The protocol pieces
are still pynetdicom's (A-ASSOCIATE-RQ/AC decoding and encoding, presentation context and
role negotiation, file meta information); this module adds the state machine of an acceptor
that offers C-STORE and C-ECHO (PS3.8 9.3, PS3.7 9.3.1 and 9.3.5):

* each proposed presentation context gets the first of *its* transfer syntaxes that we
  offer: the requestor lists the syntax its data is in first, and a conversion would break
  a DICOM signature (8-bit pixel data is OB in Explicit VR and OW in Implicit VR);
  SCP/SCU role selection is not answered, so the default roles apply (PS3.7 D.3.3.4);
* the first PDU must be an A-ASSOCIATE-RQ within ``network_timeout``; a calling AE title not
  allowed, an unknown application context, a bad protocol version or too many associations
  get an A-ASSOCIATE-RJ with the matching reason;
* P-DATA-TF fragments are reassembled per message (command first, then data set, on one
  accepted presentation context); a complete C-STORE is handed to ``handler`` on a thread
  pool (parse, fsync and commit take time and release the GIL) and its status goes back
  once the handler has returned, so "success" still means "durably stored";
* anything out of order, a PDU longer than we offered, an undecodable request, or a peer
  silent for ``network_timeout`` ends the association with an A-ABORT; bytes of an
  unfinished message are dropped, nothing reaches the store.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["Acceptor", "StoreRequest"]

log = logging.getLogger("radguard.gateway")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 1, 2, 3, 4
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 5, 6, 7
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATA_SET = 0x0101
UNRECOGNISED_OPERATION, CANNOT_UNDERSTAND = 0x0211, 0xC000
# A-ABORT reasons (source 2 = service provider)
UNRECOGNISED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x01, 0x02, 0x06
ASSOCIATION_PDU_LIMIT = 1 << 20  # an A-ASSOCIATE-RQ with 128 contexts is ~40 KB


@dataclass(frozen=True)
class StoreRequest:
    """One complete C-STORE: who sent it, what the command said and the Part 10 bytes
    (128-byte preamble, file meta built from the request, the data set exactly as sent)."""

    calling_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes


StoreHandler = Callable[[StoreRequest], int]


class _Abort(Exception):
    """End the association with an A-ABORT (reason) or, before it exists, a reject."""

    def __init__(self, reason: int, why: str) -> None:
        super().__init__(why)
        self.reason = reason


class _Message:
    """A DIMSE message being reassembled from PDV fragments."""

    def __init__(self, context_id: int) -> None:
        self.context_id = context_id
        self.command_parts: list[memoryview] = []
        self.command: dict[int, bytes] | None = None
        self.data_parts: list[memoryview] = []
        self.data_size = 0
        self.data_done = False

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


def encode_response(request: dict[int, bytes], status: int) -> bytes:
    """The response command set to ``request``: Implicit VR Little Endian, group length
    first, elements in tag order."""

    def element(number: int, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        return struct.pack("<HHI", 0, number, len(value)) + value

    field = _us(request[0x0100]) or 0
    body = b""
    if 0x0002 in request:
        body += element(0x0002, request[0x0002].rstrip(b"\x00 "))
    body += element(0x0100, struct.pack("<H", field | 0x8000))
    body += element(0x0120, request[0x0110])
    body += element(0x0800, struct.pack("<H", NO_DATA_SET))
    body += element(0x0900, struct.pack("<H", status))
    if 0x1000 in request:
        body += element(0x1000, request[0x1000].rstrip(b"\x00 "))
    return element(0x0000, struct.pack("<I", len(body))) + body


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


def _p_data(context_id: int, command: bytes, peer_max: int) -> bytes:
    """A command set as P-DATA-TF PDUs no longer than the peer accepts (0 = no limit)."""
    room = len(command) if not peer_max else max(1, peer_max - 6)
    out = b""
    for at in range(0, len(command), room):
        piece = command[at:at + room]
        header = 0x01 | (0x02 if at + room >= len(command) else 0)
        out += _pdu(P_DATA_TF, struct.pack(">IBB", len(piece) + 2, context_id, header) + piece)
    return out


class Acceptor:
    """Listens on ``host:port`` in a background thread until :meth:`stop`."""

    def __init__(self, ae_title: str, contexts: list[Any], handler: StoreHandler, *,  # noqa: ANN401
                 allowed_calling_aes: list[str] | None = None,
                 ssl_context: ssl.SSLContext | None = None, max_associations: int = 32,
                 network_timeout: float = 60.0, max_pdu: int = 4 << 20,
                 max_data_set: int = 4 << 30) -> None:
        self.ae_title = ae_title
        self.syntaxes = {str(c.abstract_syntax): {str(t) for t in c.transfer_syntax}
                         for c in contexts}  # abstract syntax -> transfer syntaxes offered
        self.handler = handler
        self.allowed = {a.strip() for a in allowed_calling_aes or []}
        self.ssl_context = ssl_context
        self.max_associations = max_associations
        self.network_timeout = network_timeout
        self.max_pdu, self.max_data_set = max_pdu, max_data_set
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pool = ThreadPoolExecutor(max_workers=min(32, max_associations),
                                        thread_name_prefix="radguard-store")

    @property
    def active(self) -> int:
        """Open connections (the one being negotiated included)."""
        return len(self._writers)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with port 0). Raises OSError if it cannot bind."""
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
        self._server = await asyncio.start_server(
            self._serve, host, port, ssl=self.ssl_context, reuse_address=True,
            ssl_handshake_timeout=self.network_timeout if self.ssl_context else None,
            limit=1 << 20)
        return int(self._server.sockets[0].getsockname()[1])

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
        loop.close()
        self._loop = None

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    # -- one connection -----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        no_delay(writer.get_extra_info("socket"))
        self._writers.add(writer)
        try:
            await self._association(reader, writer)
        except _Abort as exc:
            log.warning("DICOM association aborted: %s", exc)
            writer.write(_pdu(A_ABORT, bytes([0, 0, 2, exc.reason])))
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ssl.SSLError):
            pass  # the peer went away or went silent: nothing of its unfinished message kept
        except Exception:  # noqa: BLE001 - one broken association must not stop the server
            log.exception("DICOM association failed")
            writer.write(_pdu(A_ABORT, bytes([0, 0, 2, 0])))
        finally:
            self._writers.discard(writer)
            try:
                writer.close()
            except (OSError, RuntimeError):
                pass

    async def _read_pdu(self, reader: asyncio.StreamReader, limit: int) -> tuple[int, bytes]:
        async with asyncio.timeout(self.network_timeout):
            head = await reader.readexactly(6)
            kind, length = head[0], struct.unpack(">I", head[2:])[0]
            if not A_ASSOCIATE_RQ <= kind <= A_ABORT:
                raise _Abort(UNRECOGNISED_PDU, f"unknown PDU type 0x{kind:02X}")
            if length > limit:
                raise _Abort(INVALID_PARAMETER, f"PDU of {length} bytes (at most {limit})")
            body = await reader.readexactly(length)
            # an A-ASSOCIATE-RQ goes to pynetdicom's decoder whole; P-DATA is read in place
            return kind, head + body if kind == A_ASSOCIATE_RQ else body

    async def _association(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        kind, pdu = await self._read_pdu(reader, ASSOCIATION_PDU_LIMIT)
        if kind != A_ASSOCIATE_RQ:
            raise _Abort(UNEXPECTED_PDU, f"PDU type {kind} before A-ASSOCIATE-RQ")
        accepted, calling, peer_max = self._negotiate(pdu, writer)
        if accepted is None:
            return
        await writer.drain()
        message: _Message | None = None
        while True:
            kind, pdu = await self._read_pdu(reader, self.max_pdu)
            if kind == A_RELEASE_RQ:
                writer.write(_pdu(A_RELEASE_RP, b"\x00" * 4))
                await writer.drain()
                return
            if kind == A_ABORT:
                return
            if kind != P_DATA_TF:
                raise _Abort(UNEXPECTED_PDU, f"PDU type {kind} during the association")
            at, view = 0, memoryview(pdu)
            while at < len(pdu):
                if at + 6 > len(pdu):
                    raise _Abort(INVALID_PARAMETER, "truncated PDV item")
                length, context_id, control = struct.unpack_from(">IBB", pdu, at)
                if length < 2 or at + 4 + length > len(pdu):
                    raise _Abort(INVALID_PARAMETER, "PDV item length out of range")
                value = view[at + 6:at + 4 + length]  # no copy until the message is joined
                at += 4 + length
                if context_id not in accepted:
                    raise _Abort(INVALID_PARAMETER, f"PDV on context {context_id}, "
                                                    "which was not accepted")
                message = self._fragment(message, context_id, control, value)
                if message.complete:
                    await self._dispatch(message, accepted[context_id], calling, peer_max,
                                         writer)
                    message = None

    def _fragment(self, message: _Message | None, context_id: int, control: int,
                  value: memoryview) -> _Message:
        """Add one PDV fragment to the message being received (PS3.8 E.2)."""
        if message is None:
            message = _Message(context_id)
        elif message.context_id != context_id:
            raise _Abort(UNEXPECTED_PDU, "a message switched presentation context")
        if control & 0x01:  # command fragment
            if message.command is not None:
                raise _Abort(UNEXPECTED_PDU, "command fragment after the command ended")
            message.command_parts.append(value)
            if sum(map(len, message.command_parts)) > ASSOCIATION_PDU_LIMIT:
                raise _Abort(INVALID_PARAMETER, "command set too long")
            if control & 0x02:
                try:
                    message.command = parse_command(b"".join(message.command_parts))
                except ValueError as exc:
                    raise _Abort(INVALID_PARAMETER, str(exc)) from exc
                if _us(message.command.get(0x0110, b"")) is None:
                    raise _Abort(INVALID_PARAMETER, "request without a Message ID")
        else:
            if message.command is None or not message.has_data_set or message.data_done:
                raise _Abort(UNEXPECTED_PDU, "data set fragment without a command that "
                                             "announces one")
            message.data_parts.append(value)
            message.data_size += len(value)
            if message.data_size > self.max_data_set:
                raise _Abort(INVALID_PARAMETER, "data set larger than this gateway accepts")
            message.data_done = bool(control & 0x02)
        return message

    # -- negotiation ----------------------------------------------------------------------------
    def _negotiate(self, pdu: bytes, writer: asyncio.StreamWriter
                   ) -> tuple[dict[int, Any] | None, str, int]:
        """Answer the A-ASSOCIATE-RQ: ``({context id: accepted context}, calling AE, the peer's
        maximum PDU length)``, or ``(None, ...)`` after a reject."""
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
        reject = None
        if not version & 0x01:
            reject = (0x01, 0x02, 0x02)  # permanent, ACSE provider: protocol version
        elif context_name != APPLICATION_CONTEXT:
            reject = (0x01, 0x01, 0x02)  # permanent, user: application context name
        elif self.allowed and calling not in self.allowed:
            reject = (0x01, 0x01, 0x03)  # permanent, user: calling AE title not recognised
        elif self.active > self.max_associations:
            reject = (0x02, 0x03, 0x02)  # transient, presentation provider: local limit
        if reject:
            log.warning("A-ASSOCIATE from %r rejected %s", calling, reject)
            writer.write(_pdu(A_ASSOCIATE_RJ, bytes([0, *reject])))
            return None, calling, peer_max
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
        ac.user_information = self._user_information()
        ac_pdu = AcPdu()
        ac_pdu.from_primitive(ac)
        writer.write(ac_pdu.encode())
        accepted = {int(cx.context_id): cx for cx in results if cx.result == 0x00}
        return accepted, calling, peer_max

    def _choose(self, requested: Any) -> Any:  # noqa: ANN401
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

    def _user_information(self) -> list[Any]:
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
    async def _dispatch(self, message: _Message, context: Any, calling: str,  # noqa: ANN401
                        peer_max: int, writer: asyncio.StreamWriter) -> None:
        command = message.command
        assert command is not None
        field = _us(command[0x0100])
        if field == C_CANCEL_RQ:
            return  # nothing of ours can be cancelled: stores are answered one at a time
        if field == C_ECHO_RQ:
            status = 0x0000
        elif field == C_STORE_RQ and message.has_data_set:
            request = self._store_request(message, context, calling)
            if request is None:
                status = CANNOT_UNDERSTAND
            else:
                loop = asyncio.get_running_loop()
                status = await loop.run_in_executor(self._pool, self.handler, request)
        elif field == C_STORE_RQ:
            status = CANNOT_UNDERSTAND  # a C-STORE without its data set
        else:
            status = UNRECOGNISED_OPERATION
        writer.write(_p_data(message.context_id, encode_response(command, status), peer_max))
        await writer.drain()

    @staticmethod
    def _store_request(message: _Message, context: Any, calling: str  # noqa: ANN401
                       ) -> StoreRequest | None:
        """The Part 10 bytes of a received C-STORE; None if its command's UIDs cannot
        make file meta information."""
        command = message.command
        assert command is not None
        sop_class = _uid(command.get(0x0002, b""))
        sop_instance = _uid(command.get(0x1000, b""))
        syntax = str(context.transfer_syntax[0])
        meta = file_meta(sop_class, sop_instance, syntax)
        if meta is None:
            return None
        data = b"".join((b"\x00" * 128, b"DICM", meta, *message.data_parts))
        message.data_parts.clear()
        return StoreRequest(calling, sop_class, sop_instance, syntax, data)
