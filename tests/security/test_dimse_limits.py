"""The DICOM door under attack (issue 21, items 4 and 5; review findings 4, 6, 7 and 13;
second review M5 and M6): raw sockets against an Acceptor and against a real ``radguard
serve`` process.

* time: a trickle of tiny but complete PDUs, the same small instance again and again, a
  peer that never finishes its A-ASSOCIATE-RQ, a TLS handshake that never starts, an
  association that never ends - each is dropped after its limit, while a slow but steady
  sender and a modality storing each small image as it is taken are not, and a message
  under way at the total time limit may finish;
* slots: when every association is taken, a newcomer evicts the idlest one of the peer
  holding the most - never a productive sender, one whose handler is at work, or a lone
  modality while another peer holds more;
* connections: per peer (an IPv4 address, an IPv6 network of ``ipv6_prefix`` bits or a
  ``peer_limits`` network; counted before negotiation, TLS included), per calling AE title
  from one peer, per-peer overrides, and globally (associations, not half-open
  connections) - a flood from one address leaves room for everyone else, which a real
  dcmtk ``storescu`` proves;
* memory and disk: unfinished data sets beyond the per-message size or the global budget go
  to spool files, which disappear with their association; 32 unfinished 200 MB C-STOREs
  keep the gateway's peak RSS bounded while a large real image still arrives intact; spool
  files share one disk budget; below the free-space reserve (a real small filesystem)
  C-STOREs get 0xA700 at the door or mid-message and the gateway's store health says so.

Timing: bounds are lower bounds taken from before the peer could have started the clock,
and upper bounds are generous deadlines (a loaded 2-core machine only makes things later).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import resource
import select
import socket
import sqlite3
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from radguard.gateway import acceptor as acceptor_module
from radguard.gateway.acceptor import (
    EVICT_AFTER,
    OVERTIME,
    Acceptor,
    DimseLimits,
    StoreRequest,
    file_meta,
)
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
from tests.security.conftest import fill_disk, wait_until

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

    def start(handler=None, *, ssl_context=None, spool_dir=None, on_unwritable=None,
              host="127.0.0.1", **limits):
        acceptor = Acceptor("RADGUARD", _contexts(), handler or Recorder(),
                            ssl_context=ssl_context, limits=DimseLimits(**limits),
                            spool_dir=spool_dir or tmp_path / "incoming",
                            on_unwritable=on_unwritable)
        acceptor.start(host, 0)
        started.append(acceptor)
        return acceptor

    yield start
    for acceptor in started:
        acceptor.stop()


@pytest.fixture
def no_eviction(monkeypatch):
    """No association becomes idle enough to be evicted before half its ``idle_timeout``
    (pass a long one): a test that expects a reject with every slot taken must not see an
    eviction because a step took ``EVICT_AFTER`` seconds on a loaded machine."""
    monkeypatch.setattr(acceptor_module, "EVICT_AFTER", math.inf)


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


def _accepted(port: int) -> socket.socket:
    """An association the acceptor took (A-ASSOCIATE-AC)."""
    sock, kind, _ = _associate(port)
    assert kind == 2
    return sock


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
    """The gateway closed this connection without reading it: an A-ASSOCIATE-RQ sent on it
    gets no answer, only the end of the connection (one let in would answer at once)."""
    sock.settimeout(30)
    try:
        sock.sendall(_associate_rq())
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def _trickle(sock: socket.socket, pdu: bytes, every: float, limit: float,
             since: float | None = None) -> float | None:
    """Send ``pdu`` every ``every`` seconds (answers are read and ignored) until the gateway
    ends the connection; seconds from ``since`` (a monotonic time; default: now) until then,
    or None if it still stands ``limit`` seconds after ``since``."""
    start = time.monotonic() if since is None else since
    while time.monotonic() - start < limit:
        try:
            sock.sendall(pdu)
        except OSError:
            return time.monotonic() - start
        next_send = time.monotonic() + every
        while (left := next_send - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
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


def _answer(sock: socket.socket, data: bytes, *, message_id: int, sop_instance: str
            ) -> int | None:
    """A whole C-STORE (:func:`_store`) and its status; None if the association ended."""
    try:
        _store(sock, data, message_id=message_id, sop_instance=sop_instance)
        kind, body = _read_pdu(sock)
    except OSError:
        return None
    return _status(body) if kind == 4 else None


# -- time: trickles, half-finished requests, endless associations ---------------------------------

def test_a_trickle_of_tiny_complete_pdus_does_not_hold_an_association(server):
    """Item 5: two bytes of data set in a complete P-DATA PDU every 0.2 s kept the slot
    forever (the timeout restarted with every PDU); now too slow is too slow."""
    recorder = Recorder()
    acceptor = server(recorder, idle_timeout=1.0)
    start = time.monotonic()
    sock = _accepted(acceptor.port)
    sock.sendall(STORE_COMMAND)
    dropped = _trickle(sock, TWO_BYTES, every=0.2, limit=30, since=start)
    assert dropped is not None, "the trickling association was never dropped"
    assert dropped >= 1.0  # the allowance itself is honoured
    wait_until(lambda: acceptor.active == 0)
    assert not recorder.requests


def test_small_complete_stores_and_resends_earn_only_their_bytes(server):
    """Finding 4: every accepted C-STORE - an identical resend included - used to refill
    the whole idle allowance, so one 1 KB instance a little more often than ``idle_timeout``
    held a slot for ``max_association_time``. Now a resend earns what its bytes earn at
    ``min_rate`` (here 1 KiB: 1/16 s; only the first, new copy earned more), so the
    association runs out like any trickle."""
    recorder = Recorder()
    acceptor = server(recorder, idle_timeout=2.0)
    instance = _p_data_pdu(_pdv(1, 0x03, _command(0x0001, 1, data=True))) + \
        _p_data_pdu(_pdv(1, 0x02, b"\x11" * 1024))  # the same SOP Instance each time
    start = time.monotonic()
    sock = _accepted(acceptor.port)
    dropped = _trickle(sock, instance, every=1.0, limit=30, since=start)
    assert dropped is not None, "small accepted stores kept the association alive"
    assert dropped >= 2.0
    assert recorder.requests, "the stores themselves were accepted"
    assert all(r.sop_instance_uid == "1.2.3.4" for r in recorder.requests)


def test_a_steady_slow_sender_gets_through_and_a_slower_one_is_dropped(server):
    """The allowance refills with data: a sender above ``min_rate`` may take many times the
    idle limit for one data set (a real modality on a slow link); one below it may not.
    (The sender may stall up to ``idle_timeout``, 8 s, on a loaded machine.)"""
    keeper = Keeper()
    idle = 8.0
    acceptor = server(keeper, idle_timeout=idle, min_rate=32 << 10)
    data = bytes(range(256)) * (10 << 10)  # 2.5 MiB: 20 s at 128 KiB/s
    sock = _accepted(acceptor.port)
    sock.sendall(STORE_COMMAND)
    pieces = [data[at:at + (16 << 10)] for at in range(0, len(data), 16 << 10)]
    start = time.monotonic()
    for i, piece in enumerate(pieces):  # 16 KiB every 1/8 s: four times the minimum rate
        sock.sendall(_p_data_pdu(_pdv(1, 0x02 if i == len(pieces) - 1 else 0x00, piece)))
        time.sleep(0.125)
    assert time.monotonic() - start > 2 * idle
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0
    assert keeper.contents[0].endswith(data)
    sock.sendall(RELEASE_RQ)
    assert _read_pdu(sock)[0] == 6
    sock.close()
    # 4 KiB every 1/2 s is a quarter of the minimum rate: dropped, though bytes keep coming
    start = time.monotonic()
    slow, kind, _ = _associate(acceptor.port)
    assert kind == 2
    slow.sendall(STORE_COMMAND)
    dropped = _trickle(slow, _p_data_pdu(_pdv(1, 0x00, b"\x00" * 4096)), every=0.5, limit=90,
                       since=start)
    assert dropped is not None and dropped >= idle
    assert len(keeper.requests) == 1


def test_a_busy_association_ends_at_the_total_time_limit(server):
    """C-ECHOs are real traffic, but no association may last forever: it ends at the first
    moment between messages after ``max_association_time``."""
    acceptor = server(max_association_time=2.0)
    start = time.monotonic()
    sock = _accepted(acceptor.port)
    ended = None
    while time.monotonic() - start < 30:
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
    assert ended is not None and ended >= 2.0


def test_a_message_under_way_at_the_total_time_limit_may_finish(server):
    """Finding 13: ``max_association_time`` used to cut a long migration association in the
    middle of an object; now the object under way is received and answered, and the
    association ends right after it."""
    keeper = Keeper()
    acceptor = server(keeper, max_association_time=6.0)
    start = time.monotonic()
    sock = _accepted(acceptor.port)
    sock.sendall(STORE_COMMAND)
    piece = b"\x07" * 4096
    sent = 0
    while time.monotonic() - start < 6.5:  # 80 KiB/s, past the limit (cut at 9 s at last)
        sock.sendall(_p_data_pdu(_pdv(1, 0x00, piece)))
        sent += len(piece)
        time.sleep(0.05)
    sock.sendall(_p_data_pdu(_pdv(1, 0x02, piece)))
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0, "the object under way was cut off"
    assert keeper.contents[0].endswith(b"\x07" * (sent + len(piece)))
    assert _closed_within(sock, 30)  # and then, between messages, the association ends


def test_a_message_that_never_ends_is_cut_when_half_as_long_again_has_passed(server):
    """The overtime of a message under way is bounded too: data at eight times the minimum
    rate, never finished, is cut at ``max_association_time * (1 + OVERTIME)``."""
    recorder = Recorder()
    acceptor = server(recorder, max_association_time=2.0)
    start = time.monotonic()
    sock = _accepted(acceptor.port)
    sock.sendall(STORE_COMMAND)
    dropped = _trickle(sock, _p_data_pdu(_pdv(1, 0x00, b"\x00" * 6554)), every=0.05,
                       limit=30, since=start)
    assert dropped is not None and dropped >= 2.0 * (1 + OVERTIME)
    assert not recorder.requests


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
    assert dropped is not None, "the half-sent A-ASSOCIATE-RQ was never dropped"
    assert dropped >= 1.0 - 0.01  # the clock starts when the gateway accepts
    assert _closed_within(sock, 30)


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
    acceptor = server(ssl_context=tls_context, connect_timeout=5.0, max_per_ip=2)
    silent = [_connect(acceptor.port, OTHER_HOST) for _ in range(2)]
    wait_until(lambda: acceptor.active == 2)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca_cert_path))
    client.check_hostname = False
    with pytest.raises(OSError):  # closed before any handshake (one let in would complete it)
        client.wrap_socket(_connect(acceptor.port, OTHER_HOST))
    for sock in silent:
        assert _closed_within(sock, 30)
    # and TLS itself still works
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
    wait_until(lambda: acceptor.active == 3)
    extra = _connect(acceptor.port, OTHER_HOST)
    assert _closed_unread(extra)
    sock, kind, _ = _associate(acceptor.port, "127.0.0.1")
    assert kind == 2
    sock.sendall(ECHO)
    assert _status(_read_pdu(sock)[1]) == 0
    held.pop().close()
    wait_until(lambda: acceptor.active == 3)
    again, kind, _ = _associate(acceptor.port, OTHER_HOST)
    assert kind == 2
    for s in (*held, sock, again, extra):
        s.close()


def test_a_calling_ae_title_is_counted_per_peer(server):
    """Review 2, M6: ``max_per_ae`` counted a title across all peers, so an attacker holding
    16 associations as "CT01" blocked the real CT01 everywhere. Now it counts one title
    from one peer: the squatter's next CT01 is rejected, the real one from its own address
    gets in."""
    acceptor = server(max_per_ae=2, max_per_ip=8, max_associations=8)
    squat = [_associate(acceptor.port, OTHER_HOST, "CT01") for _ in range(2)]
    assert [kind for _, kind, _ in squat] == [2, 2]
    third, kind, body = _associate(acceptor.port, OTHER_HOST, "CT01")
    assert kind == 3 and tuple(body[1:4]) == (0x02, 0x03, 0x02)  # transient, local limit
    other, kind, _ = _associate(acceptor.port, OTHER_HOST, "CT02")  # its other titles: fine
    assert kind == 2
    real, kind, _ = _associate(acceptor.port, "127.0.0.1", "CT01")
    assert kind == 2, "a title squatted elsewhere blocked the real CT01"
    real.sendall(ECHO)
    assert _status(_read_pdu(real)[1]) == 0
    for sock in (*(s for s, _, _ in squat), third, other, real):
        sock.close()


def test_the_association_limit_counts_associations_not_half_open_connections(server,
                                                                               no_eviction):
    """Connections that never negotiate used to count against ``max_associations``, so a
    few silent sockets turned real modalities away; the limit itself still holds."""
    acceptor = server(max_associations=2, max_per_ip=4, idle_timeout=600)
    silent = [_connect(acceptor.port, OTHER_HOST) for _ in range(2)]
    wait_until(lambda: acceptor.active == 2)
    first, kind, _ = _associate(acceptor.port)
    assert kind == 2
    second, kind, _ = _associate(acceptor.port)
    assert kind == 2
    third, kind, body = _associate(acceptor.port)
    assert kind == 3 and tuple(body[1:4]) == (0x02, 0x03, 0x02)
    for s in (*silent, first, second, third):
        s.close()


@pytest.fixture
def ipv6_hosts() -> Iterator[list[str]]:
    """Three IPv6 addresses on the loopback interface for this test only: two in one /64,
    the third in another /64 of the same /48 (needs root, like the tmpfs tests; fails loudly
    rather than skip). The prefix is private (ULA) and derived from the process id, so
    parallel runs do not collide. They are removed after the test however it ends - and,
    should the test process be killed, by a guard process that waits for it to go."""
    base = f"fd72:6164:{os.getpid() & 0xFFFF:x}"
    addresses = [f"{base}:1::a", f"{base}:1::b", f"{base}:2::c"]
    guard = subprocess.Popen(  # first: nothing is added that it would not remove
        ["sh", "-c", 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; shift; '
                     'for a; do ip -6 addr del "$a/128" dev lo; done',
         "guard", str(os.getpid()), *addresses], start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    added: list[str] = []
    try:
        for address in addresses:
            done = subprocess.run(["ip", "-6", "addr", "add", f"{address}/128", "dev", "lo",
                                   "nodad"], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"cannot add {address} to lo (run as root): {done.stderr.strip()}")
            added.append(address)
        yield addresses
    finally:
        for address in added:
            subprocess.run(["ip", "-6", "addr", "del", f"{address}/128", "dev", "lo"],
                           capture_output=True)
        guard.kill()
        guard.wait(10)


def _connect6(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("::1", port))
    return sock


def _let_in(sock: socket.socket) -> bool:
    """The gateway reads this connection: an A-ASSOCIATE-RQ on it is accepted."""
    sock.sendall(_associate_rq())
    return _read_pdu(sock)[0] == 2


def test_an_ipv6_host_counts_as_one_peer_whatever_address_of_its_64_it_uses(server,
                                                                             ipv6_hosts):
    """Finding 4: with IPv6 one host owns a whole /64, so counting per address gave it
    2^64 times ``max_per_ip``. By default every address of a /64 counts against one
    limit."""
    acceptor = server(host="::1", max_per_ip=1)
    first = _connect6(acceptor.port, ipv6_hosts[0])
    wait_until(lambda: acceptor.active == 1)
    neighbour = _connect6(acceptor.port, ipv6_hosts[1])  # same /64, another address
    assert _closed_unread(neighbour)
    other = _connect6(acceptor.port, ipv6_hosts[2])  # another /64 is another peer
    assert _let_in(other)
    for sock in (first, neighbour, other):
        sock.close()


@pytest.mark.parametrize("prefix, together", [(128, ()), (48, (1, 2))])
def test_the_ipv6_grouping_prefix_is_configurable(server, ipv6_hosts, prefix, together):
    """Review 2, M5: on a hospital LAN a /64 is a whole VLAN, and every modality on it
    shared one ``max_per_ip``. ``ipv6_prefix`` sets how many leading bits make one peer:
    128 counts each address alone, 48 a whole site's /48. ``together``: which of the other
    two addresses count with the first."""
    acceptor = server(host="::1", max_per_ip=1, ipv6_prefix=prefix)
    first = _connect6(acceptor.port, ipv6_hosts[0])
    wait_until(lambda: acceptor.active == 1)
    others = []
    for i in (1, 2):
        sock = _connect6(acceptor.port, ipv6_hosts[i])
        others.append(sock)
        if i in together:
            assert _closed_unread(sock), f"/{prefix}: {ipv6_hosts[i]} counted alone"
        else:
            assert _let_in(sock), f"/{prefix}: {ipv6_hosts[i]} counted with the first"
    for sock in (first, *others):
        sock.close()


def test_a_peer_limits_network_groups_ipv6_addresses_counted_alone(server, ipv6_hosts):
    """With ``ipv6_prefix`` 128 (a LAN of many hosts per /64), a /64 that should still be
    one peer - a guest VLAN, say - is named in ``peer_limits``: its addresses share that
    limit, everyone else is counted alone."""
    guests = ipv6_hosts[0].rsplit("::", 1)[0] + "::/64"
    acceptor = server(host="::1", max_per_ip=1, ipv6_prefix=128, peer_limits=((guests, 1),))
    first = _connect6(acceptor.port, ipv6_hosts[0])
    wait_until(lambda: acceptor.active == 1)
    neighbour = _connect6(acceptor.port, ipv6_hosts[1])
    assert _closed_unread(neighbour)
    other = _connect6(acceptor.port, ipv6_hosts[2])
    assert _let_in(other)
    for sock in (first, neighbour, other):
        sock.close()


def test_the_gateway_setting_reaches_the_dicom_port(tmp_path, ipv6_hosts):
    """``ipv6_peer_prefix`` (top level: DICOM and logins) through the configuration file to
    a real DICOM server: with 128, two addresses of one /64 each get ``max_per_ip``."""
    from radguard.gateway.config import load_config
    from radguard.gateway.dimse import DicomServer
    from radguard.gateway.store import Store

    path = tmp_path / "radguard.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\nhost = "::1"\ndicom_port = 0\n'
                    "ipv6_peer_prefix = 128\n[dicom]\nmax_per_ip = 1\n")
    config = load_config(path)
    store = Store(config.data_dir)
    server = DicomServer(config, store)
    port = server.start()
    try:
        first, second = (_connect6(port, address) for address in ipv6_hosts[:2])
        assert _let_in(first) and _let_in(second)
        for sock in (first, second):
            sock.close()
    finally:
        server.stop()
        store.close()


def test_peer_limits_networks_count_as_one_peer_with_their_own_limits(server):
    """Finding 13: a PACS or a NAT with more parallel associations than ``max_per_ip`` /
    ``max_per_ae`` had connections closed unread; ``peer_limits`` sets both for the peers it
    names (the most specific entry wins). Review 2, M5: a network named there is one peer -
    all its addresses share its limit (before, each address had a limit of its own)."""
    acceptor = server(max_per_ip=2, max_per_ae=2, max_associations=16,
                      peer_limits=((OTHER_HOST, 4), ("127.0.0.0/29", 3)))
    pacs = [_associate(acceptor.port, OTHER_HOST, "PACS") for _ in range(4)]
    assert [kind for _, kind, _ in pacs] == [2, 2, 2, 2]
    fifth = _connect(acceptor.port, OTHER_HOST)
    assert _closed_unread(fifth)
    # 127.0.0.1, .3 and .4 are one peer, the /29: three connections in all, the same title
    # three times (its own count: the PACS's four elsewhere do not matter)
    lan = [_associate(acceptor.port, f"127.0.0.{n}", "PACS") for n in (1, 3, 4)]
    assert [kind for _, kind, _ in lan] == [2, 2, 2]
    neighbour = _connect(acceptor.port, "127.0.0.5")  # the /29's fourth
    assert _closed_unread(neighbour), "an address of a peer_limits network counted alone"
    outside, kind, _ = _associate(acceptor.port, "127.0.0.9", "PACS")  # no entry: defaults
    assert kind == 2
    for sock in (*(s for s, _, _ in (*pacs, *lan)), fifth, neighbour, outside):
        sock.close()


class Blocking(Recorder):
    """A handler that keeps working until ``release`` is set (a slow store)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, request: StoreRequest) -> int:
        self.started.set()
        self.release.wait(60)
        return super().__call__(request)


def test_a_newcomer_evicts_the_idlest_association_never_a_productive_one(server, monkeypatch):
    """Finding 4: with every slot taken the newcomer was turned away, so peers that merely
    held their slots starved real modalities. Now it takes the slot of the association
    furthest behind its allowance (silent here), once that is ``EVICT_AFTER`` seconds
    behind; a sender at many times ``min_rate`` keeps its slot and finishes its image, and
    when nobody is idle enough the newcomer still gets the reject."""
    keeper = Keeper()
    acceptor = server(keeper, max_associations=2, min_rate=1024)
    busy, kind, _ = _associate(acceptor.port, calling="BUSY")
    assert kind == 2
    idle, kind, _ = _associate(acceptor.port, calling="IDLE")
    assert kind == 2
    busy.sendall(STORE_COMMAND)
    piece = _p_data_pdu(_pdv(1, 0x00, b"\x05" * 4096))  # 4 s of allowance each
    until = time.monotonic() + EVICT_AFTER + 1.5
    while time.monotonic() < until:  # 16 KiB/s: sixteen times the minimum rate
        busy.sendall(piece)
        time.sleep(0.25)
    newcomer, kind, _ = _associate(acceptor.port, calling="NEW")
    assert kind == 2, "every slot was held and nobody was evicted"
    newcomer.sendall(_p_data_pdu(_pdv(1, 0x03, _command(0x0001, 1, data=True,
                                                         sop_instance="1.2.3.5"))))
    newcomer.sendall(_p_data_pdu(_pdv(1, 0x02, b"\x06" * 8192)))  # it starts its work
    assert _closed_within(idle, 30), "the idle association was not the one evicted"
    busy.sendall(_p_data_pdu(_pdv(1, 0x02, b"\x05" * 4096)))
    kind, body = _read_pdu(busy)
    assert kind == 4 and _status(body) == 0, "the productive association lost its image"
    kind, body = _read_pdu(newcomer)
    assert kind == 4 and _status(body) == 0
    # both slots productive (EVICT_AFTER lifted: a slow step must not make them idle)
    monkeypatch.setattr(acceptor_module, "EVICT_AFTER", math.inf)
    late, kind, body = _associate(acceptor.port, calling="LATE")
    assert kind == 3 and tuple(body[1:4]) == (0x02, 0x03, 0x02)
    assert sorted(r.calling_ae for r in keeper.requests) == ["BUSY", "NEW"]
    for sock in (busy, idle, newcomer, late):
        sock.close()


def test_an_association_whose_handler_is_at_work_is_never_evicted(server):
    """Time our side spends on a message (the handler: parse, fsync, commit) is not the
    peer's: however long it takes, the association keeps its slot and its answer."""
    handler = Blocking()
    acceptor = server(handler, max_associations=1)
    sock = _accepted(acceptor.port)
    _store(sock, b"\x09" * 1000)
    assert handler.started.wait(30)
    time.sleep(EVICT_AFTER + 1)  # longer than any idle association would be allowed
    newcomer, kind, _ = _associate(acceptor.port, calling="NEW")
    handler.release.set()
    assert kind == 3, "an association was evicted while its handler was at work"
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0
    for s in (sock, newcomer):
        s.close()


def _ended(sock: socket.socket) -> bool:
    """Without waiting: the gateway has ended this connection (end of stream, a reset, or
    an A-ABORT waiting to be read)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        data = sock.recv(65536, socket.MSG_PEEK)
    except OSError:
        return True
    return not data or data[0] == 7


def test_a_peer_that_keeps_many_slots_busy_cannot_evict_a_lone_modality(server):
    """Review 2, M6: with every other slot held by senders at ``min_rate``, their peer's
    reconnecting newcomers (or another address's) evicted a real modality the moment it had
    paused ``EVICT_AFTER`` seconds: it was the idlest association. Now only the peer holding
    the most slots gives one up, and only an idle one: the modality keeps its slot while the
    flood sends, and once the flood falls idle a newcomer takes one of the flood's slots -
    never the modality's, though it has waited longer."""
    acceptor = server(max_associations=4, min_rate=1024)
    modality, kind, _ = _associate(acceptor.port, "127.0.0.1", "US01")
    assert kind == 2
    flood = [_associate(acceptor.port, OTHER_HOST, f"FLOOD{i}")[0] for i in range(3)]
    stop = threading.Event()

    def send() -> None:  # 1 KiB every 1/4 s on each: four times min_rate
        try:
            for sock in flood:
                sock.sendall(STORE_COMMAND)
            while not stop.wait(0.25):
                for sock in flood:
                    sock.sendall(_p_data_pdu(_pdv(1, 0x00, b"\x01" * 1024)))
        except OSError:
            pass  # one was evicted after all (a stalled sender): the modality still counts

    sender = threading.Thread(target=send)
    sender.start()
    newcomers = []
    try:
        time.sleep(EVICT_AFTER + 1)  # the modality is far enough behind to be evicted
        for source in (OTHER_HOST, "127.0.0.3"):  # the flood's peer, and a third one
            newcomers.append(_attempt_associate(acceptor.port, source, "FLOOD")[0])
        modality.sendall(ECHO)
        kind, body = _read_pdu(modality)
        assert kind == 4 and _status(body) == 0, "the lone modality was evicted"
    finally:
        stop.set()
        sender.join(30)
    time.sleep(EVICT_AFTER + 1)  # now the flood is idle too
    newcomer, kind, _ = _associate(acceptor.port, "127.0.0.3", "NEW")
    assert kind == 2, "the idle flood kept every slot"
    wait_until(lambda: any(_ended(sock) for sock in flood), timeout=30,
               what="one of the flood's associations to be evicted")
    assert not _ended(modality)
    modality.sendall(ECHO)
    kind, body = _read_pdu(modality)
    assert kind == 4 and _status(body) == 0, "the modality was evicted, not the flood"
    for sock in (modality, *flood, *(s for s in newcomers if s is not None), newcomer):
        sock.close()


def test_new_instances_keep_an_association_alive_but_not_its_slot(server):
    """Review 2, M6: small instances sent sparsely on one association (a modality storing
    each image as it is taken) earned only their bytes and were dropped after a few. Now
    each new instance adds half the idle allowance: two associations storing a new 1 KiB
    instance every second outlive ``idle_timeout`` three times over. Slot pressure is left
    to eviction, which goes by the bytes alone: a newcomer from another peer still takes
    one of their slots."""
    idle = 4.0
    acceptor = server(max_associations=2, idle_timeout=idle)  # min_rate 16 KiB/s
    senders = [_associate(acceptor.port, OTHER_HOST, "US01")[0] for _ in range(2)]
    start, n = time.monotonic(), 0
    while time.monotonic() - start < 3 * idle:
        for sock in senders:
            n += 1
            status = _answer(sock, b"\x21" * 1024, message_id=n, sop_instance=f"1.2.3.{n}")
            assert status == 0, f"dropped after {time.monotonic() - start:.1f} s, {n} instances"
        time.sleep(1.0)
    newcomer, kind, _ = _associate(acceptor.port, "127.0.0.1", "NEW")
    assert kind == 2, "new instances kept a slot from a newcomer"
    wait_until(lambda: any(_ended(sock) for sock in senders), timeout=30,
               what="one of the senders to be evicted")
    for sock in (*senders, newcomer):
        sock.close()


# -- memory: the per-message size, the global budget, spool files ---------------------------------

def test_large_data_sets_are_spooled_and_arrive_whole(server, tmp_path):
    keeper = Keeper()
    acceptor = server(keeper, memory_per_message=1 << 20)
    large = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    small = large[:100_000]
    sock = _accepted(acceptor.port)
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
    wait_until(lambda: acceptor.memory_held == 0 and acceptor.spooled == 0)


def test_unfinished_data_sets_share_one_memory_budget_and_vanish_with_their_association(
        server, tmp_path):
    acceptor = server(memory_per_message=3 << 20, memory_budget=4 << 20)
    part = b"\x01" * (2 << 20)
    first, kind, _ = _associate(acceptor.port)
    assert kind == 2
    first.sendall(STORE_COMMAND + _p_data_pdu(_pdv(1, 0x00, part)))
    wait_until(lambda: acceptor.memory_held >= len(part))
    assert not _spool_files(tmp_path / "incoming")  # within both limits: in memory
    second, kind, _ = _associate(acceptor.port)
    assert kind == 2
    second.sendall(STORE_COMMAND + _p_data_pdu(_pdv(1, 0x00, part)))
    wait_until(lambda: len(_spool_files(tmp_path / "incoming")) == 1)
    assert acceptor.memory_held <= 4 << 20
    wait_until(lambda: _spool_files(tmp_path / "incoming")[0].stat().st_size > 1 << 20)
    second.close()  # the peer goes away: its spool file at once
    wait_until(lambda: not _spool_files(tmp_path / "incoming"))
    first.close()
    wait_until(lambda: acceptor.memory_held == 0)


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
        sock = _accepted(acceptor.port)
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


def test_spool_files_share_one_disk_budget(server, tmp_path):
    """Finding 6: 32 associations could each spool up to 4 GiB. Now the spool files of all
    unanswered messages share ``spool_budget``: a message that does not fit is read to its
    end and dropped (0xA700, its file deleted), the one already spooled arrives whole, and
    once it has been answered there is room again."""
    keeper = Keeper()
    acceptor = server(keeper, memory_per_message=1 << 20, spool_budget=5 << 20)
    spool = tmp_path / "incoming"
    first_data = b"\x0a" * (4 << 20)
    first, kind, _ = _associate(acceptor.port, calling="FIRST")
    assert kind == 2
    first.sendall(STORE_COMMAND)
    for at in range(0, len(first_data), 64 << 10):  # all of it, not finished
        first.sendall(_p_data_pdu(_pdv(1, 0x00, first_data[at:at + (64 << 10)])))
    wait_until(lambda: acceptor.spooled >= 3 << 20)
    second, kind, _ = _associate(acceptor.port, calling="SECOND")
    assert kind == 2
    _store(second, b"\x0b" * (4 << 20))
    kind, body = _read_pdu(second)
    assert kind == 4 and _status(body) == 0xA700, "a message beyond the spool budget was kept"
    assert len(_spool_files(spool)) == 1  # the first one's
    first.sendall(_p_data_pdu(_pdv(1, 0x02, b"\x0a" * 1024)))
    kind, body = _read_pdu(first)
    assert kind == 4 and _status(body) == 0
    assert keeper.contents[0].endswith(first_data + b"\x0a" * 1024)
    _store(second, b"\x0b" * (4 << 20), message_id=2)  # answered: its room is free again
    kind, body = _read_pdu(second)
    assert kind == 4 and _status(body) == 0
    assert [r.calling_ae for r in keeper.requests] == ["FIRST", "SECOND"]
    for sock in (first, second):
        sock.close()
    wait_until(lambda: acceptor.spooled == 0 and not _spool_files(spool))


def _leave_free(folder: Path, free: int) -> Path:
    """Fill ``folder``'s filesystem (a private tmpfs), then give back about ``free`` bytes;
    returns the filler file (delete it to give the rest back)."""
    filler = fill_disk(folder)
    os.truncate(filler, filler.stat().st_size - free)
    return filler


def test_below_the_free_space_reserve_stores_get_out_of_resources(server, small_disk):
    """Finding 6: spool files could fill the disk to the last byte (the database, the audit
    log and the workers with it). Now a spool write that would leave less than ``min_free``
    ends its message (0xA700, file deleted), a C-STORE that begins below the reserve is
    refused before anything is kept or handed on, the store's health hears of it once, and
    everything is taken again as soon as there is room."""
    keeper, reported = Keeper(), []
    spool = small_disk / "incoming"
    acceptor = server(keeper, spool_dir=spool, memory_per_message=1 << 20, min_free=1 << 20,
                      on_unwritable=reported.append)
    sock = _accepted(acceptor.port)
    filler = _leave_free(small_disk, 6 << 20)
    _store(sock, b"\x0c" * (12 << 20))  # would take the disk below the reserve mid-message
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0xA700
    assert not keeper.requests and not _spool_files(spool)
    filler.unlink()
    filler = _leave_free(small_disk, 512 << 10)  # below the reserve before it starts
    _store(sock, b"\x0d" * 10_000, message_id=2)  # small: would have stayed in memory
    kind, body = _read_pdu(sock)
    assert kind == 4 and _status(body) == 0xA700
    assert not keeper.requests, "a store below the reserve reached the handler"
    wait_until(lambda: len(reported) == 1, what="on_unwritable to hear of it")
    assert reported[0].errno == errno.ENOSPC and "reserve" in str(reported[0])
    filler.unlink()  # room again: the next ones are taken, small and spooled
    _store(sock, b"\x0e" * 10_000, message_id=3)
    assert _status(_read_pdu(sock)[1]) == 0
    _store(sock, b"\x0f" * (3 << 20), message_id=4)
    assert _status(_read_pdu(sock)[1]) == 0
    assert len(keeper.requests) == 2 and len(reported) == 1  # told once, not per refusal
    sock.close()
    wait_until(lambda: acceptor.spooled == 0 and acceptor.memory_held == 0)


# -- against a real gateway process ---------------------------------------------------------------

def _storescu(port: int, path: Path, *options: str, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk_tool("storescu"), *options, "-aet", "MODALITY", "-aec",
                           "RADGUARD", "127.0.0.1", str(port), str(path)],
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


def test_trickling_associations_take_every_slot_but_a_modality_evicts_the_idlest(
        gateway_process):
    """Item 5 as reported, and finding 4: 33 associations from one address (its
    ``peer_limits`` entry lets it open 32) each sending two bytes of data set in a complete
    PDU every 0.3 s take every slot. A real storescu from another address used to be turned
    away until the idle limit; now it gets in at its first attempt by evicting the idlest,
    and the others are dropped at the idle limit however diligently they trickle."""
    from pydicom import dcmread

    idle = 20.0
    gw = gateway_process(f'[dicom]\nidle_timeout = {idle}\n'
                         f'peer_limits = {{ "{OTHER_HOST}" = 32 }}\n')
    results: list[float | None | str] = [None] * 33
    associated = threading.Barrier(34, timeout=120)

    def attacker(i: int) -> None:  # a calling AE title each, so only time and slots help
        start = time.monotonic()
        sock, kind = _attempt_associate(gw.dicom_port, OTHER_HOST, f"TRICKLE{i}")
        if sock is None:
            results[i] = "refused"
            associated.wait()
            return
        sock.sendall(STORE_COMMAND)
        associated.wait()
        results[i] = _trickle(sock, TWO_BYTES, every=0.3, limit=idle + 60, since=start)
        sock.close()

    threads = [threading.Thread(target=attacker, args=(i,)) for i in range(33)]
    for t in threads:
        t.start()
    try:
        associated.wait()
        time.sleep(EVICT_AFTER + 1)  # every trickler is now far enough behind its allowance
        sent = _storescu(gw.dicom_port, NIH_DX)
    finally:
        for t in threads:
            t.join(idle + 90)
    assert sent.returncode == 0, "storescu turned away: " + sent.stdout + sent.stderr
    assert _stored_sha256(gw, dcmread(NIH_DX).SOPInstanceUID)
    assert results.count("refused") == 1  # the 33rd from that address was closed unread
    held = [r for r in results if r != "refused"]
    assert all(isinstance(r, float) for r in held), f"never dropped: {held}"
    evicted = [r for r in held if r < idle]  # the rest lasted the whole idle allowance
    assert len(held) == 32 and len(evicted) == 1, held  # storescu's took one slot
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
        wait_until(lambda: state["held"] >= 16 and state["refused"] >= 100,
                   what="the flood to hold 16 connections and be refused 100 times")
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


def test_store_as_you_go_keeps_its_association_while_resends_run_out(gateway_process,
                                                                      tmp_path):
    """Review 2, M6, through a real gateway: an ultrasound stores each image as it is taken,
    300 KB every 30 s, with ``idle_timeout`` 60 and 16 KiB/s - scaled here to 30 KB every
    3 s with ``idle_timeout`` 6 (the same ratios). Its bytes pay for about 60% of the time
    between images, so it used to be dropped at the fifth; now every new instance adds half
    the allowance and it keeps its association for all ten. The same cadence of resends
    (one instance again and again: a cheap way to hold a slot) still runs out."""
    from pydicom import dcmread

    idle, every, count = 6.0, 3.0, 10
    gw = gateway_process(f"[dicom]\nidle_timeout = {idle}\n")
    images, uids = [], []
    for i in range(count + 1):  # the last one is the resend
        images.append(_large_image(tmp_path / f"us{i}.dcm", rows=120, columns=128))
        uids.append(dcmread(tmp_path / f"us{i}.dcm", stop_before_pixels=True).SOPInstanceUID)
    assert all(30_000 < len(data) < 32_000 for data in images)
    modality, kind, _ = _associate(gw.dicom_port, "127.0.0.1", "US01")
    assert kind == 2
    replay, kind, _ = _associate(gw.dicom_port, OTHER_HOST, "REPLAY")
    assert kind == 2
    replayed, replay_alive = 0, True
    for i in range(count):
        tick = time.monotonic()
        status = _answer(modality, images[i], message_id=i + 1, sop_instance=uids[i])
        assert status == 0, f"store-as-you-go dropped at image {i + 1}"
        if replay_alive:
            replay_alive = _answer(replay, images[count], message_id=i + 1,
                                   sop_instance=uids[count]) == 0
            replayed += replay_alive
        time.sleep(max(0.0, tick + every - time.monotonic()))
    modality.sendall(ECHO)
    kind, body = _read_pdu(modality)
    assert kind == 4 and _status(body) == 0
    assert not replay_alive and replayed < count, "resends held their association"
    print(f"store-as-you-go: {count} images in {count * every:.0f} s kept; resends dropped "
          f"after {replayed} answers")
    assert all(_stored_sha256(gw, uid) for uid in uids)
    for sock in (modality, replay):
        sock.close()


def test_a_gateway_short_of_space_refuses_at_the_door_and_says_so(small_disk):
    """Finding 6 through a whole gateway: below the free-space reserve a real storescu gets
    0xA700 and nothing is stored or spooled; the gateway's problem (the web UI's banner)
    says intake is paused - not that the store is unwritable (review 2, H2) - and both
    recover by themselves once space returns."""
    from pydicom import dcmread

    from radguard.gateway import Gateway, GatewayConfig

    data = small_disk / "data"
    gateway = Gateway(GatewayConfig(data_dir=str(data), dicom_port=0, http_port=0,
                                    check_processes=0, dicom_min_free_mb=1).validate())
    gateway.start()
    try:
        filler = _leave_free(small_disk, 512 << 10)
        refused = _storescu(gateway.dicom.port, NIH_DX, "-v")
        assert "OutOfResources" in refused.stdout + refused.stderr, refused.stdout
        wait_until(lambda: gateway.problem is not None, what="the store to hear")
        assert gateway.problem.startswith("intake paused since "), gateway.problem
        assert "reserve" in gateway.problem
        assert not gateway.store.instances() and not _spool_files(data / "incoming")
        filler.unlink()
        wait_until(lambda: gateway.problem is None, what="the store to recover")
        sent = _storescu(gateway.dicom.port, NIH_DX)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        stored = [i.sop_uid for i in gateway.store.instances()]
    finally:
        gateway.stop()
    assert stored == [dcmread(NIH_DX).SOPInstanceUID]
    actions = [e.action for e in gateway.audit_log.entries()]
    assert actions.count("store.intake_paused") == 1, actions
    assert actions.count("store.intake_resumed") == 1 and "store.unavailable" not in actions


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
    wait_until(lambda: not _spool_files(spool), what="the spool files to go")
    assert gw.alive()


def test_the_dicom_table_configures_the_limits_and_rejects_impossible_ones(tmp_path):
    from radguard.gateway.config import ConfigError, load_config

    path = tmp_path / "radguard.toml"
    path.write_text("[dicom]\nmax_per_ip = 4\nidle_timeout = 2.5\nmemory_budget_mb = 64\n"
                    'peer_limits = { "10.0.0.5" = 32, "2001:db8:1::/64" = 8 }\n'
                    "spool_budget_mb = 4096\nmin_free_mb = 0\n")
    config = load_config(path)
    assert (config.dicom_max_per_ip, config.dicom_idle_timeout) == (4, 2.5)
    assert (config.dicom_memory_budget_mb, config.dicom_max_associations) == (64, 32)
    assert config.dicom_peer_limits == {"10.0.0.5": 32, "2001:db8:1::/64": 8}
    assert (config.dicom_spool_budget_mb, config.dicom_min_free_mb) == (4096, 0)
    defaults = load_config()
    assert (defaults.dicom_spool_budget_mb, defaults.dicom_min_free_mb) == (8192, 1024)
    assert defaults.ipv6_peer_prefix == 64
    for bad, message in [("max_per_ip = 40", "dicom.max_per_ip 40"),
                         ("idle_timeout = 0", "dicom.idle_timeout 0"),
                         ("min_rate_kib = true", "dicom.min_rate_kib True"),
                         ("memory_per_message_mb = 512", "dicom.memory_per_message_mb 512"),
                         ("max_association_time = 10\nidle_timeout = 60",
                          "max_association_time must not be below"),
                         ("max_data_set_mb = 'big'", "dicom.max_data_set_mb 'big'"),
                         ("spool_budget_mb = 1024", "spool_budget_mb must not be below"),
                         ("min_free_mb = -1", "dicom.min_free_mb -1"),
                         ('peer_limits = { "pacs.example" = 4 }', "not an IP address"),
                         ('peer_limits = { "10.0.0.5" = 64 }', "from 1 to max_associations"),
                         ("peer_limits = 4", "a table of address")]:
        path.write_text(f"[dicom]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config(path)
