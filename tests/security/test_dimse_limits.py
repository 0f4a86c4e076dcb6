"""The DICOM door under attack (issue 21, items 4 and 5): raw sockets against an Acceptor and
against a real ``radguard serve`` process.

* time: a trickle of tiny but complete PDUs, a peer that never finishes its A-ASSOCIATE-RQ,
  a TLS handshake that never starts, an association that never ends - each is dropped after
  its limit, while a slow but steady sender is not;
* connections: per address (counted before negotiation, TLS included), per calling AE title,
  and globally (associations, not half-open connections) - a flood from one address leaves
  room for everyone else, which a real dcmtk ``storescu`` proves;
* memory: unfinished data sets beyond the per-message size or the global budget go to spool
  files, which disappear with their association; 32 unfinished 200 MB C-STOREs keep the
  gateway's peak RSS bounded while a large real image still arrives intact; a spool file that
  cannot be written gets 0xA700 and the server goes on.
"""

from __future__ import annotations

import hashlib
import resource
import select
import socket
import sqlite3
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from radguard.gateway.acceptor import Acceptor, DimseLimits, StoreRequest, file_meta
from tests.conftest import NIH_DX, dcmtk_tool
from tests.gateway.test_acceptor import (
    SECONDARY_CAPTURE,
    VERIFICATION,
    Recorder,
    _associate_rq,
    _command,
    _contexts,
    _p_data_pdu,
    _pdv,
    _read_pdu,
    _status,
)

OTHER_HOST = "127.0.0.2"  # a second loopback address: another peer as the gateway sees it
RELEASE_RQ = struct.pack(">BBI", 5, 0, 4) + b"\x00" * 4
ECHO = _p_data_pdu(_pdv(3, 0x03, _command(0x0030, data=False, sop_class=VERIFICATION)))
STORE_COMMAND = _p_data_pdu(_pdv(1, 0x03, _command(0x0001, 1, data=True)))
TWO_BYTES = _p_data_pdu(_pdv(1, 0x00, b"\x00\x00"))  # a complete PDU: 14 bytes on the wire


class Keeper(Recorder):
    """A handler that also reads the spooled file while it exists (it is the handler's)."""

    def __init__(self) -> None:
        super().__init__()
        self.contents: list[bytes] = []

    def __call__(self, request: StoreRequest) -> int:
        self.contents.append(request.path.read_bytes() if request.path else request.data)
        return super().__call__(request)


@pytest.fixture
def server(tmp_path):
    started: list[Acceptor] = []

    def start(handler=None, *, ssl_context=None, **limits):
        acceptor = Acceptor("RADGUARD", _contexts(), handler or Recorder(),
                            ssl_context=ssl_context, limits=DimseLimits(**limits),
                            spool_dir=tmp_path / "incoming")
        acceptor.start("127.0.0.1", 0)
        started.append(acceptor)
        return acceptor

    yield start
    for acceptor in started:
        acceptor.stop()


def _connect(port: int, source: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _associate(port: int, source: str = "127.0.0.1", calling: str = "RAW",
               contexts=((1, SECONDARY_CAPTURE), (3, VERIFICATION))
               ) -> tuple[socket.socket, int, bytes]:
    sock = _connect(port, source)
    sock.sendall(_associate_rq(contexts=contexts, calling=calling))
    kind, body = _read_pdu(sock)
    return sock, kind, body


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the peer ends the connection (EOF or reset, after an A-ABORT or not) within
    ``seconds``; whatever else arrives meanwhile is ignored."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return True
    except (ConnectionError, TimeoutError, OSError):
        return time.monotonic() < deadline
    return False


def _closed_unread(sock: socket.socket) -> bool:
    """The gateway closed this connection at once, without answering anything."""
    try:
        sock.settimeout(5)
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def _trickle(sock: socket.socket, pdu: bytes, every: float, limit: float) -> float | None:
    """Send ``pdu`` every ``every`` seconds until the gateway ends the connection; seconds
    until then, or None if it still stands after ``limit`` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            sock.sendall(pdu)
        except OSError:
            return time.monotonic() - start
        readable, _, _ = select.select([sock], [], [], every)
        if readable:
            try:
                data = sock.recv(65536)
            except OSError:
                return time.monotonic() - start
            if not data or data[0] == 7:  # closed, or A-ABORT
                return time.monotonic() - start
    return None


def _spool_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("dimse-*.part")) if folder.exists() else []


def _store(sock: socket.socket, data: bytes, *, piece: int = 64 << 10,
           message_id: int = 1, sop_instance: str = "1.2.3.4") -> None:
    """A whole C-STORE on context 1 (not waiting for the answer)."""
    sock.sendall(_p_data_pdu(_pdv(1, 0x03, _command(0x0001, message_id, data=True,
                                                    sop_instance=sop_instance))))
    for at in range(0, len(data), piece):
        last = at + piece >= len(data)
        sock.sendall(_p_data_pdu(_pdv(1, 0x02 if last else 0x00, data[at:at + piece])))


def _wait(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


# -- time: trickles, half-finished requests, endless associations ---------------------------------

def test_a_trickle_of_tiny_complete_pdus_does_not_hold_an_association(server):
    """Item 5: two bytes of data set in a complete P-DATA PDU every 0.2 s kept the slot
    forever (the timeout restarted with every PDU); now too slow is too slow."""
    recorder = Recorder()
    acceptor = server(recorder, idle_timeout=1.0)
    sock, kind, _ = _associate(acceptor.port)
    assert kind == 2
    sock.sendall(STORE_COMMAND)
    dropped = _trickle(sock, TWO_BYTES, every=0.2, limit=10)
    assert dropped is not None, "the trickling association was never dropped"
    assert dropped >= 0.8  # the allowance itself is honoured
    assert _wait(lambda: acceptor.active == 0)
    assert not recorder.requests


def test_a_steady_slow_sender_gets_through_and_a_slower_one_is_dropped(server):
    """The allowance refills with data: a sender above ``min_rate`` may take many times the
    idle limit for one data set (a real modality on a slow link); one below it may not."""
    keeper = Keeper()
    acceptor = server(keeper, idle_timeout=1.5, min_rate=32 << 10)
    data = bytes(range(256)) * (448 << 2)  # 448 KiB: 3.5 s at 128 KiB/s
    sock, kind, _ = _associate(acceptor.port)
    assert kind == 2
    sock.sendall(STORE_COMMAND)
    pieces = [data[at:at + (16 << 10)] for at in range(0, len(data), 16 << 10)]
    start = time.monotonic()
    for i, piece in enumerate(pieces):  # 16 KiB every 1/8 s: four times the minimum rate
        sock.sendall(_p_data_pdu(_pdv(1, 0x02 if i == len(pieces) - 1 else 0x00, piece)))
        time.sleep(0.125)
    assert time.monotonic() - start > 2 * 1.5
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0
    assert keeper.contents[0].endswith(data)
    sock.sendall(RELEASE_RQ)
    assert _read_pdu(sock)[0] == 6
    sock.close()
    # 4 KiB every 1/2 s is a quarter of the minimum rate: dropped, though bytes keep coming
    slow, kind, _ = _associate(acceptor.port)
    assert kind == 2
    slow.sendall(STORE_COMMAND)
    dropped = _trickle(slow, _p_data_pdu(_pdv(1, 0x00, b"\x00" * 4096)), every=0.5, limit=15)
    assert dropped is not None and dropped >= 1.2
    assert len(keeper.requests) == 1


def test_a_busy_association_ends_at_the_total_time_limit(server):
    """C-ECHOs are real traffic, but no association may last forever."""
    acceptor = server(max_association_time=2.0)
    sock, kind, _ = _associate(acceptor.port)
    assert kind == 2
    start = time.monotonic()
    ended = None
    while time.monotonic() - start < 10:
        try:
            sock.sendall(ECHO)
            kind, body = _read_pdu(sock)
        except OSError:
            kind = 0
        if kind != 4:
            ended = time.monotonic() - start
            break
        assert _status(body) == 0
        time.sleep(0.1)
    assert ended is not None and 1.5 <= ended < 6


def test_an_unfinished_a_associate_rq_is_dropped_at_the_connect_timeout(server):
    acceptor = server(connect_timeout=1.0)
    request = _associate_rq()
    sock = _connect(acceptor.port)
    dropped = None
    start = time.monotonic()
    for byte in request:  # one byte every 0.1 s: whole after 20+ s
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            dropped = time.monotonic() - start
            break
        if select.select([sock], [], [], 0.1)[0]:
            dropped = time.monotonic() - start
            break
    assert dropped is not None and dropped < 5
    assert _closed_within(sock, 5)


@pytest.fixture
def tls_context(tmp_path, pki) -> ssl.SSLContext:
    from radguard.provenance.keys import Identity, create_signer, save_certificate, save_private_key

    key, cert = create_signer(Identity("radguard gateway", "device", "Test Hospital"),
                              ca_key=pki.ca_key, ca_cert=pki.ca_cert)
    save_private_key(key, tmp_path / "tls.key")
    save_certificate(cert, tmp_path / "tls.crt")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    return context


def test_tls_handshakes_are_bounded_and_count_against_the_address(server, tls_context, pki):
    """A TLS handshake that never starts used to happen before any limit saw the
    connection; now it counts against its address and ends at the connect timeout."""
    acceptor = server(ssl_context=tls_context, connect_timeout=1.5, max_per_ip=2)
    silent = [_connect(acceptor.port, OTHER_HOST) for _ in range(2)]
    assert _wait(lambda: acceptor.active == 2, 5)
    third = _connect(acceptor.port, OTHER_HOST)
    assert _closed_unread(third)
    for sock in silent:
        assert _closed_within(sock, 6)
    # and TLS itself still works
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert_path))
    client.check_hostname = False
    with client.wrap_socket(_connect(acceptor.port, OTHER_HOST)) as tls:
        tls.sendall(_associate_rq(contexts=((3, VERIFICATION),)))
        assert _read_pdu(tls)[0] == 2
        tls.sendall(ECHO)
        kind, body = _read_pdu(tls)
        assert kind == 4 and _status(body) == 0


# -- connections: per address, per calling AE title, in all ----------------------------------------

def test_one_address_cannot_take_every_connection(server):
    """Silent connections count from the moment they are accepted: more than ``max_per_ip``
    from one address are closed unread, another address still gets in."""
    acceptor = server(max_per_ip=3, max_associations=8)
    held = [_connect(acceptor.port, OTHER_HOST) for _ in range(3)]
    assert _wait(lambda: acceptor.active == 3, 5)
    extra = _connect(acceptor.port, OTHER_HOST)
    assert _closed_unread(extra)
    sock, kind, _ = _associate(acceptor.port, "127.0.0.1")
    assert kind == 2
    sock.sendall(ECHO)
    assert _status(_read_pdu(sock)[1]) == 0
    held.pop().close()
    assert _wait(lambda: acceptor.active == 3, 5)
    again, kind, _ = _associate(acceptor.port, OTHER_HOST)
    assert kind == 2
    for s in (*held, sock, again, extra):
        s.close()


def test_one_calling_ae_title_cannot_take_every_association(server):
    acceptor = server(max_per_ae=2, max_associations=8)
    flood = [_associate(acceptor.port, f"127.0.0.{10 + i}", "FLOOD") for i in range(2)]
    assert all(kind == 2 for _, kind, _ in flood)
    sock, kind, body = _associate(acceptor.port, "127.0.0.20", "FLOOD")
    assert kind == 3 and tuple(body[1:4]) == (0x02, 0x03, 0x02)  # transient, local limit
    other, kind, _ = _associate(acceptor.port, "127.0.0.20", "CT1")
    assert kind == 2
    for s, _, _ in flood:
        s.close()
    for s in (sock, other):
        s.close()


def test_the_association_limit_counts_associations_not_half_open_connections(server):
    """Connections that never negotiate used to count against ``max_associations``, so a
    few silent sockets turned real modalities away; the limit itself still holds."""
    acceptor = server(max_associations=2, max_per_ip=4)
    silent = [_connect(acceptor.port, OTHER_HOST) for _ in range(2)]
    assert _wait(lambda: acceptor.active == 2, 5)
    first, kind, _ = _associate(acceptor.port)
    assert kind == 2
    second, kind, _ = _associate(acceptor.port)
    assert kind == 2
    third, kind, body = _associate(acceptor.port)
    assert kind == 3 and tuple(body[1:4]) == (0x02, 0x03, 0x02)
    for s in (*silent, first, second, third):
        s.close()


# -- memory: the per-message size, the global budget, spool files ---------------------------------

def test_large_data_sets_are_spooled_and_arrive_whole(server, tmp_path):
    keeper = Keeper()
    acceptor = server(keeper, memory_per_message=1 << 20)
    large = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    small = large[:100_000]
    sock, kind, _ = _associate(acceptor.port)
    assert kind == 2
    _store(sock, large, message_id=1)
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0
    _store(sock, small, message_id=2)
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0
    sock.close()
    spooled, in_memory = keeper.requests
    head = b"\x00" * 128 + b"DICM" + file_meta(SECONDARY_CAPTURE, "1.2.3.4",
                                                ExplicitVRLittleEndian)
    assert spooled.data == b"" and spooled.path is not None and spooled.peer == "127.0.0.1"
    assert keeper.contents[0] == head + large
    assert spooled.path.parent == tmp_path / "incoming"
    assert in_memory.path is None and in_memory.data == head + small
    assert not _spool_files(tmp_path / "incoming")  # the handler left it: deleted after it
    assert _wait(lambda: acceptor.memory_held == 0, 5)


def test_unfinished_data_sets_share_one_memory_budget_and_vanish_with_their_association(
        server, tmp_path):
    acceptor = server(memory_per_message=3 << 20, memory_budget=4 << 20)
    part = b"\x01" * (2 << 20)
    first, kind, _ = _associate(acceptor.port)
    assert kind == 2
    first.sendall(STORE_COMMAND + _p_data_pdu(_pdv(1, 0x00, part)))
    assert _wait(lambda: acceptor.memory_held >= len(part), 5)
    assert not _spool_files(tmp_path / "incoming")  # within both limits: in memory
    second, kind, _ = _associate(acceptor.port)
    assert kind == 2
    second.sendall(STORE_COMMAND + _p_data_pdu(_pdv(1, 0x00, part)))
    assert _wait(lambda: len(_spool_files(tmp_path / "incoming")) == 1, 5)
    assert acceptor.memory_held <= 4 << 20
    assert _wait(lambda: _spool_files(tmp_path / "incoming")[0].stat().st_size > 1 << 20, 5)
    second.close()  # the peer goes away: its spool file at once
    assert _wait(lambda: not _spool_files(tmp_path / "incoming"), 5)
    first.close()
    assert _wait(lambda: acceptor.memory_held == 0, 5)


def test_spool_files_left_by_a_crash_are_removed_at_start(tmp_path):
    spool = tmp_path / "incoming"
    spool.mkdir()
    (spool / "dimse-crashed.part").write_bytes(b"never acknowledged")
    (spool / "keep.dcm").write_bytes(b"not ours")
    acceptor = Acceptor("RADGUARD", _contexts(), Recorder(), spool_dir=spool)
    acceptor.start("127.0.0.1", 0)
    acceptor.stop()
    assert sorted(p.name for p in spool.iterdir()) == ["keep.dcm"]


def test_a_spool_file_that_cannot_be_written_gets_out_of_resources(server, tmp_path):
    """A full disk (here: the file size limit, EFBIG) ends that message with 0xA700 and
    deletes its file; the association and the server go on."""
    keeper = Keeper()
    acceptor = server(keeper, memory_per_message=1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, hard))
    try:
        sock, kind, _ = _associate(acceptor.port)
        assert kind == 2
        _store(sock, b"\x02" * (8 << 20))
        kind, body = _read_pdu(sock)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert kind == 4 and _status(body) == 0xA700
    assert not keeper.requests and not _spool_files(tmp_path / "incoming")
    _store(sock, b"\x03" * (2 << 20), message_id=2)  # room again: the next one is stored
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0 and len(keeper.requests) == 1
    sock.close()
    assert acceptor.memory_held == 0


# -- against a real gateway process ---------------------------------------------------------------

def _storescu(port: int, path: Path, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk_tool("storescu"), "-aet", "MODALITY", "-aec", "RADGUARD",
                           "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=timeout)


def _stored_sha256(gw, sop_uid: str) -> str | None:
    with sqlite3.connect(f"file:{gw.data_dir / 'radguard.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT sha256 FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
    return row[0] if row else None


def _attempt_associate(port: int, source: str, calling: str = "RAW"
                       ) -> tuple[socket.socket | None, int]:
    """Connect and ask; (socket, 2) when associated, (None, 0/3) when refused or rejected."""
    try:
        sock, kind, _ = _associate(port, source, calling)
    except OSError:
        return None, 0
    if kind != 2:
        sock.close()
        return None, kind
    return sock, kind


def test_trickling_associations_fill_every_slot_only_until_the_idle_limit(gateway_process):
    """Item 5 as reported: 33 associations each sending two bytes of data set in a complete
    PDU every 0.3 s. They take every slot, so a real storescu is at first turned away, but
    they are dropped at the idle limit however diligently they trickle, and it gets in."""
    from pydicom import dcmread

    gw = gateway_process("[dicom]\nidle_timeout = 4\nmax_per_ip = 32\n")
    results: list[float | None | str] = [None] * 33
    associated = threading.Barrier(34, timeout=60)

    def attacker(i: int) -> None:  # a calling AE title each, so only the time limit helps
        sock, kind = _attempt_associate(gw.dicom_port, OTHER_HOST, f"TRICKLE{i}")
        if sock is None:
            results[i] = "refused"
            associated.wait()
            return
        sock.sendall(STORE_COMMAND)
        associated.wait()
        results[i] = _trickle(sock, TWO_BYTES, every=0.3, limit=40)
        sock.close()

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(33)]
    for t in threads:
        t.start()
    associated.wait()
    start = time.monotonic()
    first = _storescu(gw.dicom_port, NIH_DX)
    assert first.returncode != 0, "the attack did not even fill the slots"
    while True:
        sent = _storescu(gw.dicom_port, NIH_DX)
        if sent.returncode == 0 or time.monotonic() - start > 30:
            break
        time.sleep(0.5)
    got_in = time.monotonic() - start
    for t in threads:
        t.join(60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert got_in < 4 + 15
    assert results.count("refused") == 1  # the 33rd from that address was closed unread
    held = [r for r in results if r != "refused"]
    assert all(isinstance(r, float) and 3 <= r < 4 + 8 for r in held), held
    assert _stored_sha256(gw, dcmread(NIH_DX).SOPInstanceUID)
    assert gw.alive()


def test_a_flood_from_one_address_leaves_room_for_a_modality_with_default_limits(
        gateway_process):
    """Item 5 with every setting at its default: 40 peers on one address reconnect as fast
    as they are turned away and trickle to keep what they get. They never hold more than
    16 connections, a real storescu from another address stores at its first attempt, and
    the refusals take a few log lines, not thousands."""
    from pydicom import dcmread

    gw = gateway_process()
    stop = threading.Event()
    lock = threading.Lock()
    state = {"held": 0, "most": 0, "refused": 0}

    def attacker(i: int) -> None:
        while not stop.is_set():
            sock, _ = _attempt_associate(gw.dicom_port, OTHER_HOST, f"FLOOD{i}")
            if sock is None:
                with lock:
                    state["refused"] += 1
                time.sleep(0.05)
                continue
            with lock:
                state["held"] += 1
                state["most"] = max(state["most"], state["held"])
            try:
                sock.sendall(STORE_COMMAND)
                while not stop.wait(0.3):
                    sock.sendall(TWO_BYTES)
            except OSError:
                pass
            finally:
                with lock:
                    state["held"] -= 1
                sock.close()

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    try:
        assert _wait(lambda: state["held"] >= 16 and state["refused"] >= 100, 30), state
        sent = _storescu(gw.dicom_port, NIH_DX)
        held_meanwhile = state["held"]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert _stored_sha256(gw, dcmread(NIH_DX).SOPInstanceUID)
    assert held_meanwhile == 16 and state["most"] == 16, state
    refusal_lines = [line for line in gw.stderr_text().splitlines() if "closed unread" in line]
    assert 1 <= len(refusal_lines) <= 3, refusal_lines


def _large_image(path: Path, rows: int = 4000, columns: int = 5000) -> bytes:
    """A 16-bit radiograph of rows x columns (40 MB by default), as sent; returns its
    data set bytes (what follows the file meta)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    pixels = np.random.default_rng(7).integers(0, 4096, (rows, columns), dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BIG-1", "Large^Image", "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    raw = path.read_bytes()
    meta_end = 132 + 12 + struct.unpack_from("<I", raw, 132 + 8)[0]  # after (0002,0000)
    return raw[meta_end:]


def test_unfinished_large_stores_stay_out_of_memory_and_a_real_image_still_arrives(
        gateway_process, tmp_path):
    """Item 4 (DIMSE): 32 associations each send 200 MiB of a C-STORE they never finish.
    The data sets used to stay in memory (up to 4 GiB each); now at most the memory budget
    is, the rest waits in spool files that go with their associations, and a 40 MB image
    sent meanwhile by storescu is stored byte for byte."""
    from pydicom import dcmread

    gw = gateway_process("[dicom]\nidle_timeout = 5\nmax_per_ip = 32\nmax_associations = 40\n")
    spool = gw.data_dir / "incoming"
    image = tmp_path / "large.dcm"
    data_set = _large_image(image)
    sop = dcmread(image, stop_before_pixels=True).SOPInstanceUID
    expected = hashlib.sha256(b"\x00" * 128 + b"DICM" + file_meta(
        SECONDARY_CAPTURE, sop, ExplicitVRLittleEndian) + data_set).hexdigest()
    time.sleep(1)
    idle = gw.rss_mb()
    gw.reset_peak()
    mib = _p_data_pdu(_pdv(1, 0x00, b"\x5a" * (1 << 20)))
    keep_alive = _p_data_pdu(_pdv(1, 0x00, b"\x5a" * (64 << 10)))
    sent_all = threading.Barrier(33, timeout=600)
    stop, runaway = threading.Event(), threading.Event()
    dropped: list[float | None] = []

    def attacker(i: int) -> None:
        sock, kind = _attempt_associate(gw.dicom_port, OTHER_HOST, f"BIG{i}")
        try:
            assert sock is not None, "attacker not associated"
            sock.sendall(STORE_COMMAND)
            for _ in range(200):
                if runaway.is_set():
                    break
                sock.sendall(mib)
            sent_all.wait()
            while not stop.wait(1.0):  # 64 KiB/s: above the minimum rate, so it stays
                sock.sendall(keep_alive)
            dropped.append(_trickle(sock, b"", every=0.5, limit=30))  # now silent
        except (OSError, threading.BrokenBarrierError):
            runaway.set()
        finally:
            if sock is not None:
                sock.close()

    def guard() -> None:  # never let a broken gateway take the shared machine's memory
        while not stop.is_set():
            if gw.rss_mb() > idle + 1500:
                runaway.set()
            time.sleep(0.2)

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(32)]
    threads.append(threading.Thread(target=guard))
    for t in threads:
        t.start()
    try:
        sent_all.wait()
        assert not runaway.is_set(), f"gateway memory ran away: {gw.rss_mb():.0f} MB"
        attack_peak = gw.peak_mb() - idle
        spooled = sum(p.stat().st_size for p in _spool_files(spool))
        sent = _storescu(gw.dicom_port, image, timeout=300)
        stored = _stored_sha256(gw, sop)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    print(f"idle {idle:.0f} MB, peak under attack +{attack_peak:.0f} MB, "
          f"spooled {spooled / 2**30:.1f} GiB")
    assert attack_peak < 500
    assert spooled > 5 << 30  # 32 x 200 MiB less the 256 MiB memory budget: on disk
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert stored == expected
    assert len(dropped) == 32 and all(d is not None for d in dropped), dropped
    assert _wait(lambda: not _spool_files(spool), 10), _spool_files(spool)
    assert gw.alive()


def test_the_dicom_table_configures_the_limits_and_rejects_impossible_ones(tmp_path):
    from radguard.gateway.config import ConfigError, load_config

    path = tmp_path / "radguard.toml"
    path.write_text("[dicom]\nmax_per_ip = 4\nidle_timeout = 2.5\nmemory_budget_mb = 64\n")
    config = load_config(path)
    assert (config.dicom_max_per_ip, config.dicom_idle_timeout) == (4, 2.5)
    assert (config.dicom_memory_budget_mb, config.dicom_max_associations) == (64, 32)
    for bad, message in [("max_per_ip = 40", "dicom.max_per_ip 40"),
                         ("idle_timeout = 0", "dicom.idle_timeout 0"),
                         ("min_rate_kib = true", "dicom.min_rate_kib True"),
                         ("memory_per_message_mb = 512", "dicom.memory_per_message_mb 512"),
                         ("max_association_time = 10\nidle_timeout = 60",
                          "max_association_time must not be below"),
                         ("max_data_set_mb = 'big'", "dicom.max_data_set_mb 'big'")]:
        path.write_text(f"[dicom]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
