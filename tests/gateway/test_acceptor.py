"""The event-driven DICOM acceptor on its own: real pynetdicom requestors for the protocol's
normal paths (negotiation, C-ECHO, C-STORE, rejects), raw sockets for what a hostile or
broken peer sends (nothing of an unfinished message reaches the handler, the server stays
up), and the limits (associations, PDU size, silence)."""

from __future__ import annotations

import math
import random
import socket
import struct
import threading
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from radguard.gateway import acceptor as acceptor_module
from radguard.gateway.acceptor import (
    Acceptor,
    DimseLimits,
    StoreRequest,
    _p_data,
    encode_response,
    parse_command,
)
from tests.conftest import NIH_DX, process_alive

VERIFICATION = "1.2.840.10008.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


class Recorder:
    """The C-STORE handler: keeps every request, answers a fixed status."""

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.requests: list[StoreRequest] = []
        self.lock = threading.Lock()

    def __call__(self, request: StoreRequest) -> int:
        with self.lock:
            self.requests.append(request)
        return self.status


def _contexts():
    from pynetdicom.presentation import build_context

    return [build_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            for uid in (SECONDARY_CAPTURE, DX_PRESENTATION, VERIFICATION)]


@pytest.fixture
def server():
    started: list[Acceptor] = []

    def start(handler=None, **options):
        acceptor = Acceptor("RADGUARD", _contexts(), handler or Recorder(), **options)
        acceptor.start("127.0.0.1", 0)
        started.append(acceptor)
        return acceptor

    yield start
    for acceptor in started:
        acceptor.stop()


def _echo_ok(port: int, calling: str = "ECHO") -> bool:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADGUARD")
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


# -- normal paths with a real requestor ----------------------------------------------------------

def test_c_echo_and_c_store_reach_the_handler_with_part10_bytes(server):
    from pydicom import dcmread
    from pynetdicom import AE

    recorder = Recorder()
    acceptor = server(recorder)
    assert _echo_ok(acceptor.port)
    ds = dcmread(NIH_DX)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="RADGUARD")
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    [request] = recorder.requests
    assert request.calling_ae == "MODALITY"
    assert request.sop_instance_uid == ds.SOPInstanceUID
    assert request.transfer_syntax == ExplicitVRLittleEndian
    stored = dcmread(__import__("io").BytesIO(request.data))
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData and stored.PatientID == ds.PatientID


def test_handler_status_goes_back_and_unknown_abstract_syntax_is_not_accepted(server):
    from pydicom import dcmread
    from pynetdicom import AE

    acceptor = server(Recorder(status=0xC000))
    ds = dcmread(NIH_DX)
    ae = AE()
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root C-FIND: not offered
    assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="RADGUARD")
    assert [c.abstract_syntax for c in assoc.accepted_contexts] == [ds.SOPClassUID]
    assert assoc.send_c_store(ds).Status == 0xC000
    assoc.release()


def test_each_context_gets_the_requestors_first_transfer_syntax_we_offer(server):
    from pynetdicom import AE

    acceptor = server()
    ae = AE()
    ae.add_requested_context(SECONDARY_CAPTURE, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(SECONDARY_CAPTURE, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    ae.add_requested_context(DX_PRESENTATION, ["1.2.840.10008.1.2.4.50"])  # not offered
    assoc = ae.associate("127.0.0.1", acceptor.port, ae_title="RADGUARD")
    accepted = sorted((c.context_id, c.transfer_syntax[0]) for c in assoc.accepted_contexts)
    assert accepted == [(1, ExplicitVRLittleEndian), (3, ImplicitVRLittleEndian)]
    assert [(c.context_id, c.result) for c in assoc.rejected_contexts] == [(5, 0x04)]
    assoc.release()


def test_calling_ae_not_allowed_is_rejected(server):
    acceptor = server(allowed_calling_aes=["CT1"])
    assert not _echo_ok(acceptor.port, "INTRUDER")
    assert _echo_ok(acceptor.port, "CT1")


def test_too_many_associations_get_a_transient_reject_and_later_ones_work(server, monkeypatch):
    from pynetdicom import AE

    # nobody may become idle enough to be evicted, however slow the machine is
    monkeypatch.setattr(acceptor_module, "EVICT_AFTER", math.inf)
    acceptor = server(limits=DimseLimits(max_associations=1, idle_timeout=600))
    assert acceptor.evict_after == 300
    ae = AE()
    ae.add_requested_context(VERIFICATION)
    first = ae.associate("127.0.0.1", acceptor.port, ae_title="RADGUARD")
    assert first.is_established
    # the second on a raw socket: pynetdicom's requestor sometimes reports a reject that
    # arrives together with the connection's end as an abort (a race on its side)
    with _raw(acceptor.port) as second:
        second.sendall(_associate_rq())
        kind, body = _read_pdu(second)
    assert kind == 3 and tuple(body[1:4]) == (0x02, 0x03, 0x02)  # transient, local limit
    first.release()
    deadline = time.monotonic() + 30
    while acceptor.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _echo_ok(acceptor.port)



def test_open_association_keeps_responses_for_the_thread_that_waits_for_them(server):
    """pynetdicom's requestor thread polls the DIMSE queue every millisecond and can take
    a response the sender is about to wait for; associations opened with open_association
    leave every message to the blocking reader (the sender)."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_ECHO

    from radguard.gateway.dimse import open_association

    recorder = Recorder()
    acceptor = server(recorder)
    ds = dcmread(NIH_DX)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = open_association(ae, "127.0.0.1", acceptor.port, "RADGUARD")
    assert assoc.is_established
    response = C_ECHO()
    assoc.dimse.msg_queue.put((1, response))
    time.sleep(0.2)  # the reactor thread polls about 200 times meanwhile
    assert assoc.dimse.get_msg(block=True) == (1, response)
    for _ in range(20):
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    assert len(recorder.requests) == 20

# -- the wire, byte by byte ------------------------------------------------------------------------

def _associate_rq(contexts=((1, SECONDARY_CAPTURE),), max_length=0, calling="RAW") -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = calling, "RADGUARD"
    items = []
    for context_id, uid in contexts:
        cx = build_context(uid, ExplicitVRLittleEndian)
        cx.context_id = context_id
        items.append(cx)
    primitive.presentation_context_definition_list = items
    length = MaximumLengthNotification()
    length.maximum_length_received = max_length
    primitive.user_information = [length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _command(field: int, message_id: int = 1, *, data: bool, sop_class=SECONDARY_CAPTURE,
             sop_instance="1.2.3.4") -> bytes:
    def element(number, value):
        if len(value) % 2:
            value += b"\x00"
        return struct.pack("<HHI", 0, number, len(value)) + value

    body = (element(0x0002, sop_class.encode()) + element(0x0100, struct.pack("<H", field))
            + element(0x0110, struct.pack("<H", message_id))
            + element(0x0800, struct.pack("<H", 0x0000 if data else 0x0101))
            + element(0x1000, sop_instance.encode()))
    return element(0x0000, struct.pack("<I", len(body))) + body


def _pdv(context_id: int, control: int, value: bytes) -> bytes:
    return struct.pack(">IBB", len(value) + 2, context_id, control) + value


def _p_data_pdu(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 4, 0, len(body)) + body


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return 0, b""
        head += chunk
    length = struct.unpack(">I", head[2:])[0]
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return head[0], body


def _raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def _established(port: int, **rq) -> socket.socket:
    sock = _raw(port)
    sock.sendall(_associate_rq(**rq))
    kind, _ = _read_pdu(sock)
    assert kind == 2, "A-ASSOCIATE-AC expected"
    return sock


def _status(body: bytes) -> int:
    command = parse_command(body[6:])  # one PDV: length(4), context, control
    return struct.unpack("<H", command[0x0900])[0]


def test_a_data_set_in_many_fragments_arrives_whole(server):
    recorder = Recorder()
    acceptor = server(recorder)
    data = bytes(random.Random(1).randrange(256) for _ in range(50_000))
    sock = _established(acceptor.port)
    sock.sendall(_p_data_pdu(_pdv(1, 0x01, _command(0x0001, 7, data=True)[:20])))
    sock.sendall(_p_data_pdu(_pdv(1, 0x03, _command(0x0001, 7, data=True)[20:])))
    pieces = [data[i:i + 999] for i in range(0, len(data), 999)]
    for i in range(0, len(pieces), 5):  # several PDVs per PDU, several PDUs
        group = pieces[i:i + 5]
        last = i + 5 >= len(pieces)
        sock.sendall(_p_data_pdu(*[_pdv(1, 0x02 if last and k == len(group) - 1 else 0x00, p)
                                   for k, p in enumerate(group)]))
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0
    assert struct.unpack("<H", parse_command(body[6:])[0x0120])[0] == 7
    sock.sendall(struct.pack(">BBI", 5, 0, 4) + b"\x00" * 4)
    assert _read_pdu(sock)[0] == 6  # A-RELEASE-RP
    sock.close()
    [request] = recorder.requests
    assert request.data.endswith(data) and request.data[128:132] == b"DICM"


def test_unknown_operation_gets_0211_and_store_without_data_set_c000(server):
    recorder = Recorder()
    acceptor = server(recorder)
    sock = _established(acceptor.port)
    sock.sendall(_p_data_pdu(_pdv(1, 0x03, _command(0x0020, data=False))))  # C-FIND-RQ
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0x0211
    sock.sendall(_p_data_pdu(_pdv(1, 0x03, _command(0x0001, data=False))))
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0xC000
    sock.close()
    assert not recorder.requests


@pytest.mark.parametrize("name, send", [
    ("P-DATA before association", lambda: _p_data_pdu(_pdv(1, 3, b"x" * 10))),
    ("garbage", lambda: bytes(range(256)) * 4),
    ("unknown PDU type", lambda: struct.pack(">BBI", 0x09, 0, 4) + b"\x00" * 4),
    ("huge declared length", lambda: struct.pack(">BBI", 1, 0, 0xFFFFFFF0) + b"\x00" * 100),
    ("undecodable A-ASSOCIATE-RQ", lambda: struct.pack(">BBI", 1, 0, 20) + b"\x01" * 20),
])
def test_hostile_first_pdus_end_the_connection_and_the_server_stays_up(server, name, send):
    recorder = Recorder()
    acceptor = server(recorder)
    sock = _raw(acceptor.port)
    sock.sendall(send())
    kind, _ = _read_pdu(sock)
    assert kind in (0, 3, 7), f"{name}: connection must end (reject / abort / close)"
    sock.close()
    assert _echo_ok(acceptor.port)
    assert not recorder.requests


@pytest.mark.parametrize("name, pdus", [
    ("data before command", [_p_data_pdu(_pdv(1, 0x02, b"data"))]),
    ("context not accepted", [_p_data_pdu(_pdv(9, 0x03, _command(0x0030, data=False)))]),
    ("command outside group 0", [_p_data_pdu(_pdv(1, 0x03, b"\x08\x00\x10\x00" + b"\x00" * 8))]),
    ("PDV length past the PDU", [_p_data_pdu(b"\x00\x01\x00\x00\x01\x03abc")]),
    ("unexpected PDU type", [struct.pack(">BBI", 2, 0, 4) + b"\x00" * 4]),
    ("P-DATA above the offered maximum", [struct.pack(">BBI", 4, 0, (4 << 20) + 1)]),
    ("store cut off mid data set", [
        _p_data_pdu(_pdv(1, 0x03, _command(0x0001, data=True)), _pdv(1, 0x00, b"half"))]),
])
def test_protocol_violations_abort_and_keep_nothing(server, name, pdus):
    recorder = Recorder()
    acceptor = server(recorder)
    sock = _established(acceptor.port)
    for pdu in pdus:
        sock.sendall(pdu)
    if name == "store cut off mid data set":
        sock.close()  # the peer vanishes: the half data set must not reach the handler
    else:
        assert _read_pdu(sock)[0] in (0, 7), f"{name}: A-ABORT or close expected"
        sock.close()
    assert _echo_ok(acceptor.port)
    assert not recorder.requests


def test_random_byte_streams_never_reach_the_handler_or_stop_the_server(server):
    recorder = Recorder()
    acceptor = server(recorder, limits=DimseLimits(connect_timeout=2, idle_timeout=2))
    rng = random.Random(2026)
    valid = _associate_rq() + _p_data_pdu(_pdv(1, 0x03, _command(0x0001, data=True)))
    for _ in range(300):
        stream = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            stream[rng.randrange(len(stream))] = rng.randrange(256)
        stream = stream[:rng.randrange(1, len(stream) + 1)]
        with _raw(acceptor.port) as sock:
            sock.sendall(bytes(stream))
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
    assert not recorder.requests  # no data set was ever completed
    assert _echo_ok(acceptor.port)


def test_a_silent_peer_is_dropped_after_the_connect_timeout(server):
    acceptor = server(limits=DimseLimits(connect_timeout=0.5))
    start = time.monotonic()
    sock = _raw(acceptor.port)  # reads time out after 10 s: the drop must come first
    assert _read_pdu(sock)[0] == 0  # closed without a word
    assert time.monotonic() - start >= 0.5 - 0.01
    sock.close()


def test_responses_respect_the_peers_maximum_pdu_length():
    command = encode_response(parse_command(_command(0x0001, 3, data=True)), 0xA700)
    pdus = _p_data(1, command, peer_max=26)
    pieces, at = [], 0
    while at < len(pdus):
        kind, length = pdus[at], struct.unpack(">I", pdus[at + 2:at + 6])[0]
        assert kind == 4 and length <= 26
        item = pdus[at + 6:at + 6 + length]
        pieces.append((item[5], item[6:]))
        at += 6 + length
    assert len(pieces) > 1 and all(c & 1 for c, _ in pieces)
    assert [c & 2 for c, _ in pieces] == [0] * (len(pieces) - 1) + [2]
    assert parse_command(b"".join(p for _, p in pieces))[0x0900] == struct.pack("<H", 0xA700)


@pytest.mark.parametrize("which", ["dicom_port", "http_port"])
def test_a_port_in_use_is_a_clear_error_and_nothing_keeps_listening(tmp_path, which):
    from radguard.gateway import Gateway, GatewayConfig
    from radguard.gateway.config import ConfigError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    ports = {"dicom_port": 0, "http_port": 0, which: port}
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), **ports).validate())
    with pytest.raises(ConfigError, match=f"{port}.*in use.*{which}"):
        gateway.start()
    # whatever had started (the web server, the workers) has stopped again
    assert gateway.dicom._server is None
    if which == "dicom_port":  # opened last, after the web server and the workers
        assert not gateway._http_thread.is_alive() and gateway._threads
    assert not any(t.is_alive() for t in gateway._threads)
    taken.close()


def test_file_meta_is_byte_for_byte_what_pydicom_and_pynetdicom_encode():
    from pydicom.uid import UID, generate_uid
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from radguard.gateway.acceptor import file_meta

    rng = random.Random(3)
    for _ in range(200):
        uids = [generate_uid()[:rng.randint(3, 64)].rstrip(".") for _ in range(2)]
        syntax = rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                             "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5"])
        expected = encode_file_meta(create_file_meta(
            sop_class_uid=UID(uids[0]), sop_instance_uid=UID(uids[1]),
            transfer_syntax=UID(syntax)))
        assert file_meta(uids[0], uids[1], syntax) == expected
    for bad in ("", "1." * 40, "1.2.\u00e9"):
        assert file_meta(bad, "1.2.3", ExplicitVRLittleEndian) is None


def test_a_start_that_fails_leaves_no_check_process_behind(tmp_path, monkeypatch):
    """Any failure after the check processes are up (here the web stack) stops them again:
    each is a few hundred MB that nothing would ever reap."""
    from radguard.gateway import Gateway, GatewayConfig

    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=1).validate())

    started = []

    def broken() -> None:
        started.extend(gateway.checks.pids)
        raise RuntimeError("the web stack failed to start")

    monkeypatch.setattr(gateway, "_start_http", broken)
    with pytest.raises(RuntimeError, match="web stack"):
        gateway.start()
    assert len(started) == 1
    deadline = time.monotonic() + 10
    while process_alive(started[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(started[0])
    assert gateway.dicom._server is None
