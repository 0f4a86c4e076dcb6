"""The web side as an attacker who can reach the HTTP port sees it (issue 21, items 3, 4, 9,
11 and the CSRF note): huge and endless bodies, login floods, forged cross-site forms, stored
markup in DICOM values, ids beyond 64 bits, a store that cannot write, a full disk, a STOW-RS
with more parts than open files - against a real gateway (in-process, or a ``radguard
serve`` process where memory or descriptors are limited). Requests go through httpx; raw
sockets only where a client library cannot send the hostile bytes (trickles, bogus or
unkept ``Content-Length``)."""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import resource
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from radguard.dicom.web import split_multipart
from radguard.gateway import Gateway, GatewayConfig
from radguard.gateway.auth import Users
from radguard.gateway.store import Store
from tests.conftest import NIH_DX, dcmtk_tool
from tests.security.conftest import fill_disk, wait_until

PASSWORD = "correct horse battery"
MB = 1 << 20
XSS = ["1'><img src=x onerror=alert(1)>", '"><script>document.title="pwned"</script>',
       "<b onmouseover=alert(2)>x</b>"]


# -- helpers -----------------------------------------------------------------------------------

def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, *, token: str | None = None,
            cookie: str | None = None, source: str = "127.0.0.1"
            ) -> tuple[int, bytes, httpx.Headers]:
    """One HTTP request on its own connection (optionally from another loopback address);
    redirects are not followed."""
    head = dict(headers or {})
    if token:
        head["Authorization"] = f"Bearer {token}"
    if cookie:
        head["Cookie"] = f"radguard_session={cookie}"
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, trust_env=False, timeout=60) as client:
        resp = client.request(method, f"http://127.0.0.1:{port}{path}", content=body,
                              headers=head)
        return resp.status_code, resp.content, resp.headers


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def login_cookie(port: int, user: str, password: str = PASSWORD) -> str:
    """Sign in through the login form; returns the session cookie's value."""
    body = urllib.parse.urlencode({"user": user, "password": password}).encode()
    status, _, headers = request(port, "POST", "/login", body, FORM)
    assert status == 303, status
    return re.search(r"radguard_session=([^;]+)", headers["set-cookie"]).group(1)


def csrf_of(page: bytes) -> str:
    """The CSRF token in a page's forms ("" if there is none)."""
    found = re.search(rb'name="csrf" value="([0-9a-f]+)"', page)
    return found.group(1).decode() if found else ""


def insert_instance(store: Store, *, state: str = "done", sop_uid: str, study_uid: str,
                    patient_name: str = "Doe^Jane", modality: str = "DX",
                    reasons: list[str] | None = None, trust: str = "unsigned",
                    verdict: str = "authentic", source_file: Path = NIH_DX) -> int:
    """A row written straight into the store, as an instance received before the door
    validated anything would be (the web layer must be safe regardless)."""
    data = source_file.read_bytes()
    rel = Path("objects") / "xx" / f"{secrets.token_hex(8)}.dcm"
    (store.root / rel).parent.mkdir(parents=True, exist_ok=True)
    (store.root / rel).write_bytes(data)
    details = json.dumps({"reasons": reasons or [], "scan": {"signature": "unsigned"}})
    with store.transaction():
        row = store.execute(
            "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class, patient_id, "
            "patient_name, modality, study_date, path, sha256, size, received_at, source, "
            "calling_ae, state, verdict, trust, details, processed_at) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (sop_uid, study_uid, "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.1", "P1", patient_name,
             modality, "20260101", str(rel), "0" * 64, len(data), "2026-12-01T10:00:00+00:00",
             "dimse", "EVIL", state, verdict, trust, details,
             "2026-12-01T10:00:01+00:00")).fetchone()
    return int(row[0])


@contextlib.contextmanager
def running(tmp_path: Path, **settings: object) -> Iterator[Gateway]:
    """An in-process gateway (checks in-process) with users tech, rad, boss (admin), aud."""
    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           check_processes=0)
    for name, value in settings.items():
        setattr(config, name, value)
    gw = Gateway(config.validate())
    users = Users(gw.store)
    for name, role in (("tech", "technologist"), ("rad", "radiologist"), ("boss", "admin"),
                       ("aud", "auditor")):
        users.add(name, role, PASSWORD)
    gw.tokens = {name: users.issue_token(name) for name in ("tech", "rad", "boss", "aud")}
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def flood(port: int, path: str, total: int, *, chunked: bool, headers: str = "") -> int | None:
    """POST ``total`` bytes of zeros (declared up front, or chunked) as fast as the server
    takes them, stopping as soon as it answers; returns the status, or None when the server
    cut the connection before its answer could be read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    block = b"\0" * MB
    frame = b"100000\r\n" + block + b"\r\n" if chunked else block
    reply = b""
    try:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}{framing}\r\n\r\n"
                     .encode())
        sent, wait = 0, 0.5  # a moment for an answer to the headers alone
        while sent < total and not select.select([sock], [], [], wait)[0]:
            sock.sendall(frame)
            sent, wait = sent + MB, 0
        if chunked and sent >= total:
            sock.sendall(b"0\r\n\r\n")
        reply = sock.recv(64)
    except OSError:  # the server closed while we were sending: its answer may be there
        with contextlib.suppress(OSError):
            reply = sock.recv(64)
    finally:
        sock.close()
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", reply)
    return int(match.group(1)) if match else None


# -- item 4: bodies are limited before they are read -------------------------------------------

def test_huge_bodies_keep_the_gateway_small(gateway_process):
    """3 x 1 GB to the login endpoints (declared and chunked) and two big STOW-RS requests:
    the gateway process never grows by 500 MB (it read each whole body into memory)."""
    gw = gateway_process()
    Users(Store(gw.data_dir)).add("tech", "technologist", PASSWORD)
    token = json.loads(request(gw.http_port, "POST", "/auth/token", json.dumps(
        {"user": "tech", "password": PASSWORD}).encode())[1])["token"]
    auth = f"Authorization: Bearer {token}\r\n"
    stow = auth + "Content-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n"
    # warm up (first STOW imports the DICOM stack), then measure from idle
    status, _, _ = request(gw.http_port, "POST", "/dicom-web/studies",
                           b"--b\r\nContent-Type: application/dicom\r\n\r\nx\r\n--b--\r\n",
                           {"Content-Type": "multipart/related; boundary=b"}, token=token)
    assert status == 409
    idle = gw.rss_mb()
    gw.reset_peak()
    attacks = [("/login", True, ""), ("/auth/token", False, ""), ("/auth/token", True, "")]
    results: dict[int, int | None] = {}
    threads = [threading.Thread(target=lambda n=n, a=a: results.__setitem__(
        n, flood(gw.http_port, a[0], 1 << 30, chunked=a[1], headers=a[2])))
        for n, a in enumerate(attacks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    # STOW: 1 GB chunked is cut at the 512 MB default; 400 MB in 40 parts is spooled to disk
    results[3] = flood(gw.http_port, "/dicom-web/studies", 1 << 30, chunked=True, headers=stow)
    part = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * (10 * MB) + b"\r\n"
    body = part * 40 + b"--b--\r\n"
    status, answer, _ = request(gw.http_port, "POST", "/dicom-web/studies", body,
                                {"Content-Type": "multipart/related; boundary=b"},
                                token=token)
    del body
    peak = gw.peak_mb()
    assert gw.alive()
    assert peak - idle < 500, f"gateway grew from {idle:.0f} MB to a peak of {peak:.0f} MB"
    assert results[1] == 413  # a declared 1 GB body: refused before a byte is read
    assert results[0] in (413, None) and results[2] in (413, None) and results[3] in (413, None)
    assert status == 409 and len(json.loads(answer)["00081198"]["Value"]) == 40
    assert not list((gw.data_dir / "http-spool").iterdir())  # spool files are cleaned up
    # still serving
    assert request(gw.http_port, "GET", "/login")[0] == 200


def test_declared_oversize_bodies_are_refused_unread(tmp_path):
    with running(tmp_path) as gw:
        for path, token in (("/login", None), ("/auth/token", None), ("/logout", None),
                            ("/quarantine/1/release", gw.tokens["boss"]),
                            ("/dicom-web/studies", gw.tokens["tech"])):
            sock = socket.create_connection(("127.0.0.1", gw.http_port), timeout=10)
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: multipart/"
                         f"related; boundary=x\r\nContent-Length: {600 * MB}\r\n\r\n".encode())
            reply = sock.recv(300)  # nothing of the body was sent: the answer comes at once
            sock.close()
            assert reply.startswith(b"HTTP/1.1 413 "), (path, reply)
            assert b"connection: close" in reply.lower()
        # a chunked login body is counted as it arrives and refused past the limit
        chunk = b"x" * 4096
        body = b"".join(b"1000\r\n" + chunk + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
        sock = socket.create_connection(("127.0.0.1", gw.http_port), timeout=10)
        sock.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + body)
        assert sock.recv(300).startswith(b"HTTP/1.1 413 ")
        sock.close()
        assert request(gw.http_port, "GET", "/login")[0] == 200


def test_multipart_parser_streams_any_chunking():
    from radguard.dicom.web import MultipartParser

    body = b"".join(b"--bd\r\nContent-Type: application/dicom\r\n\r\n" + bytes([n]) * (n * 97)
                    + b"\r\n--b\r\n" + b"\r\n" for n in range(1, 6)) + b"--bd--\r\n"
    whole = split_multipart(body, "multipart/related; boundary=bd")
    for size in (1, 3, 7, 64, 1000):
        parser = MultipartParser("multipart/related; boundary=bd", lambda _h: io.BytesIO())
        for i in range(0, len(body), size):
            parser.feed(body[i:i + size])
        assert [p.sink.getvalue() for p in parser.finish()] == [w[1] for w in whole]
    assert whole[2][1] == bytes([3]) * 291 + b"\r\n--b\r\n"


def test_idle_and_trickling_connections_are_closed_and_capped(tmp_path):
    """uvicorn waits forever for a request's headers, so idle or trickling connections held
    every slot (limit_concurrency) for good; now they are closed, and one address may hold
    only so many."""
    with running(tmp_path, http_header_seconds=2.0, http_max_per_client=8) as gw:
        port = gw.http_port
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert extra.recv(100).startswith(b"HTTP/1.1 503 ")  # a ninth from that address
        extra.close()
        assert request(port, "GET", "/login", source="127.0.0.2")[0] == 200  # others: served
        trickle = socket.create_connection(("127.0.0.1", port), timeout=10,
                                           source_address=("127.0.0.3", 0))
        start, closed = time.monotonic(), False
        for byte in b"GET /login HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 60:
            try:
                trickle.send(bytes([byte]))
                if select.select([trickle], [], [], 0.5)[0] and trickle.recv(100) == b"":
                    closed = True
                    break
            except OSError:
                closed = True
                break
        assert closed and time.monotonic() - start < 8  # a byte now and then buys nothing
        # a login body that stalls is answered 408 and the connection closed
        stall = socket.create_connection(("127.0.0.1", port), timeout=10,
                                         source_address=("127.0.0.4", 0))
        stall.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nuser=")
        answer = b""
        while chunk := stall.recv(4096):  # read to the end: the server closes
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
        stall.close()
        for sock in idle:
            assert sock.recv(10) == b""  # closed by the server
            sock.close()
        assert request(port, "GET", "/login")[0] == 200


# -- item 9 and review finding 8: logins ------------------------------------------------------

# waits far longer than any test step takes on a loaded machine: a lock asserted is a lock
# that holds (when a wait ends is checked with LoginGuard's clock, below)
LONG_WAITS = {"login_max_failures": 5, "login_backoff_seconds": 60.0,
              "login_backoff_max_seconds": 120.0}


def token_for(port: int, user: str, password: str, source: str = "127.0.0.1"
              ) -> tuple[int, httpx.Headers]:
    """``POST /auth/token`` from a loopback address: (status, headers)."""
    status, _, headers = request(port, "POST", "/auth/token", json.dumps(
        {"user": user, "password": password}).encode(), source=source)
    return status, headers


def test_login_backoff_refuses_even_the_right_password(tmp_path):
    with running(tmp_path, **LONG_WAITS) as gw:
        port = gw.http_port
        statuses = [token_for(port, "boss", f"guess-{n:03d}-wrong")[0] for n in range(100)]
        assert statuses == [401] * 5 + [429] * 95  # no password checked once locked
        status, headers = token_for(port, "boss", PASSWORD)
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 60  # locked: refused
        # an address that guesses at many names waits too (per client: 20 failures)
        spray = [token_for(port, f"user{n}", "wrong-password", "127.0.0.3")[0]
                 for n in range(21)]
        assert spray == [401] * 20 + [429]
        assert token_for(port, "rad", PASSWORD, source="127.0.0.3")[0] == 429
        assert token_for(port, "rad", PASSWORD, source="127.0.0.4")[0] == 200
        # the login form says the same to a browser
        body = urllib.parse.urlencode({"user": "aud", "password": "nope"}).encode()
        for _ in range(5):
            request(port, "POST", "/login", body, FORM, source="127.0.0.5")
        status, page, headers = request(port, "POST", "/login", body,
                                        {**FORM, "Accept": "text/html"}, source="127.0.0.5")
        assert status == 429 and b"too many failed logins" in page and headers["retry-after"]
    entries = list(gw.audit_log.entries())
    failed = [e for e in entries if e.action == "auth.failed"]
    lockouts = {e.target for e in entries if e.action == "auth.lockout"}
    assert failed
    assert {"user from client:boss from 127.0.0.1", "client:127.0.0.3",
            "user from client:aud from 127.0.0.5"} <= lockouts
    # a flood is a handful of audit entries, not one fsync per attempt
    assert len([e for e in entries if e.action.startswith("auth.")]) < 25


def test_an_attackers_failures_do_not_lock_the_admin_out_of_their_own_address(tmp_path):
    """Five wrong passwords for ``boss`` from anywhere used to lock the right password out
    everywhere (one request every 15 minutes kept an admin out for good)."""
    with running(tmp_path, **LONG_WAITS) as gw:
        port = gw.http_port
        attacker, admin = "127.0.0.2", "127.0.0.1"
        assert [token_for(port, "boss", "wrong-password", attacker)[0]
                for _ in range(6)] == [401] * 5 + [429]
        assert token_for(port, "boss", PASSWORD, attacker)[0] == 429  # the attacker waits
        assert token_for(port, "boss", PASSWORD, admin)[0] == 200  # the admin does not
        assert login_cookie(port, "boss")


def test_distributed_guessing_locks_the_name_everywhere(tmp_path):
    """Guesses at one name from many addresses add up (``login_max_failures_all_clients``):
    past it the name waits from every address."""
    with running(tmp_path, login_max_failures_all_clients=10, **LONG_WAITS) as gw:
        port = gw.http_port
        for source in ("127.0.0.2", "127.0.0.3"):
            assert [token_for(port, "boss", "wrong-password", source)[0]
                    for _ in range(5)] == [401] * 5
        status, headers = token_for(port, "boss", PASSWORD, "127.0.0.4")
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert token_for(port, "rad", PASSWORD, "127.0.0.4")[0] == 200  # other names: fine
    assert "user:boss" in {e.target for e in gw.audit_log.entries()
                           if e.action == "auth.lockout"}


def test_the_overall_threshold_is_validated():
    from radguard.gateway.config import ConfigError

    for value in (3, 0, "100", 10**6):  # below login_max_failures (5), or not a count
        with pytest.raises(ConfigError, match="login_max_failures_all_clients"):
            GatewayConfig(login_max_failures_all_clients=value).validate()
    assert GatewayConfig().validate().login_max_failures_all_clients == 100


def test_a_right_password_does_not_reset_the_addresss_spray_count(tmp_path):
    """An insider who guesses at other names used to reset their address's count by logging
    in as themselves."""
    with running(tmp_path, **LONG_WAITS) as gw:
        port, insider = gw.http_port, "127.0.0.6"
        assert [token_for(port, f"victim{n}", "wrong-password", insider)[0]
                for n in range(19)] == [401] * 19
        assert token_for(port, "rad", PASSWORD, insider)[0] == 200
        assert token_for(port, "victim19", "wrong-password", insider)[0] == 401  # the 20th
        assert token_for(port, "victim20", "wrong-password", insider)[0] == 429
        assert token_for(port, "rad", PASSWORD, insider)[0] == 429  # the address waits
        # a right password does clear that name's own count from that address
        for _ in range(4):
            assert token_for(port, "aud", "wrong-password", "127.0.0.7")[0] == 401
        assert token_for(port, "aud", PASSWORD, "127.0.0.7")[0] == 200
        assert [token_for(port, "aud", "wrong-password", "127.0.0.7")[0]
                for _ in range(5)] == [401] * 5


class _Clock:
    """A clock the test moves by hand (LoginGuard's ``clock``): waits end exactly when
    the test says, however loaded the machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_wait_ends_and_the_next_failure_doubles_it():
    from radguard.gateway.httpguard import LoginGuard

    clock = _Clock()
    guard = LoginGuard(5, 20, 2.0, 4.0, clock=clock)
    for _ in range(5):
        guard.failed("boss", "10.0.0.1")
    assert guard.wait("boss", "10.0.0.1")[0] == 2.0
    clock.now += 2.01
    assert guard.wait("boss", "10.0.0.1")[0] == 0.0
    guard.failed("boss", "10.0.0.1")
    assert guard.wait("boss", "10.0.0.1")[0] == 4.0
    clock.now += 4.01
    guard.failed("boss", "10.0.0.1")
    assert guard.wait("boss", "10.0.0.1")[0] == 4.0  # the maximum
    clock.now += 3601
    assert guard.failed("boss", "10.0.0.1") == []  # an hour without failures: afresh


def test_one_address_adds_at_most_its_own_threshold_to_a_names_count():
    """Else one patient address (5 guesses, an hour's pause, 5 more...) would lock a name
    out everywhere by itself."""
    from radguard.gateway.httpguard import LockReason, LoginGuard

    clock = _Clock()
    guard = LoginGuard(5, 1000, 1.0, 1.0, max_failures_all_clients=10, clock=clock)
    for _ in range(5):
        guard.failed("boss", "10.0.0.1")
    clock.now += 3000
    guard.failed("boss", "10.0.0.9")  # another address keeps the name's count alive
    clock.now += 700  # 10.0.0.1's own count is forgotten: it may guess 5 times again
    assert guard.wait("boss", "10.0.0.1") == (0.0, None)
    for _ in range(5):
        guard.failed("boss", "10.0.0.1")
    assert guard.wait("boss", "10.0.0.3") == (0.0, None)  # still 6, not 11: not locked
    lockouts = [guard.failed("boss", "10.0.0.2") for _ in range(4)]
    assert [LockReason.USER in {lock.reason for lock in found} for found in lockouts] == \
        [False, False, False, True]  # 5 + 1 + 4: everywhere
    assert guard.wait("boss", "10.0.0.3")[1] is LockReason.USER


def test_a_flood_of_random_names_does_not_unlock_a_locked_name():
    """The counters are bounded, but eviction used to drop locked records: failures under
    random names from many addresses unlocked the target."""
    from radguard.gateway.httpguard import LoginGuard

    guard = LoginGuard(5, 20, 600.0, 900.0, capacity=100)
    for _ in range(5):
        guard.failed("boss", "10.0.0.1")
    assert guard.wait("boss", "10.0.0.1")[0] > 0
    for n in range(2000):
        guard.failed(f"user{n}", f"10.1.{n // 200}.{n % 200}")
    assert guard.wait("boss", "10.0.0.1")[0] > 0
    assert len(guard) <= 101  # still bounded: only the locked record is kept beyond


def test_an_ipv6_64_counts_as_one_address():
    """With IPv6 an attacker has a whole /64 of addresses: its counters are per /64."""
    from radguard.gateway.httpguard import LockReason, LoginGuard

    guard = LoginGuard(5, 20, 600.0, 900.0)
    for n in range(20):
        guard.failed(f"user{n}", f"2001:db8:0:1::{n + 1:x}")
    assert guard.wait("rad", "2001:db8:0:1::ffff")[1] is LockReason.CLIENT
    assert guard.wait("rad", "2001:db8:0:2::1") == (0.0, None)
    for n in range(5):
        guard.failed("boss", f"2001:db8:0:3::{n + 1:x}")
    assert guard.wait("boss", "2001:db8:0:3::abcd")[1] is LockReason.USER_CLIENT


def test_password_reset_revoke_and_remove_end_sessions(tmp_path):
    with running(tmp_path) as gw:
        port, users = gw.http_port, Users(gw.store)
        cookie = login_cookie(port, "rad")
        script = gw.tokens["rad"]
        assert request(port, "GET", "/", cookie=cookie)[0] == 200
        users.add("rad", "radiologist", "a brand new password")  # reset
        assert request(port, "GET", "/dicom-web/studies", token=script)[0] == 401
        assert request(port, "GET", "/", cookie=cookie)[0] == 401

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "radguard.cli", "user", *args,
                                   "--data-dir", str(gw.store.root)], capture_output=True,
                                  text=True, timeout=120)

        cookie = login_cookie(port, "aud")
        script = users.issue_token("aud")
        result = cli("revoke", "aud")
        # the fixture's token, the login form's and the script's
        assert result.returncode == 0 and "3 token(s) revoked" in result.stdout
        assert request(port, "GET", "/audit", cookie=cookie)[0] == 401
        assert request(port, "GET", "/audit", token=script)[0] == 401

        cookie = login_cookie(port, "boss")
        assert request(port, "GET", "/quarantine", cookie=cookie)[0] == 200
        result = cli("remove", "boss")
        assert result.returncode == 0 and "removed" in result.stdout
        status, _, headers = request(port, "GET", "/quarantine", cookie=cookie,
                                     headers={"Accept": "text/html"})
        assert status == 303 and headers["location"] == "/login"  # at once
        assert request(port, "POST", "/auth/token", json.dumps(
            {"user": "boss", "password": PASSWORD}).encode())[0] == 401
        result = cli("remove", "boss")
        assert result.returncode == 2 and "no user 'boss'" in result.stderr
        assert "Traceback" not in result.stderr
    actions = {(e.action, e.target) for e in gw.audit_log.entries()}
    assert {("user.revoke", "aud"), ("user.remove", "boss")} <= actions


# -- the CSRF note: state-changing forms need the session's token and our origin ---------------

def test_cross_origin_form_posts_are_refused(tmp_path):
    with running(tmp_path) as gw:
        port = gw.http_port
        held = insert_instance(gw.store, state="quarantined", sop_uid="1.2.3.9.1",
                               study_uid="1.2.3.9")
        cookie = login_cookie(port, "boss")
        status, page, _ = request(port, "GET", "/quarantine", cookie=cookie)
        token = csrf_of(page)
        attempts = [
            # another origin (same site: SameSite=Strict cookies are still sent)
            ({"Origin": "http://127.0.0.1:1"}, f"note=x&csrf={token}"),
            ({"Origin": "https://evil.example"}, "note=x"),
            ({"Referer": "http://evil.example/page"}, "note=x"),
            ({"Origin": "null"}, "note=x"),
            ({}, "note=x"),  # no token
            ({}, "note=x&csrf=" + "0" * 32),  # a wrong token
        ]
        for extra, form in attempts:
            status, body, _ = request(port, "POST", f"/quarantine/{held}/release",
                                      form.encode(), {**FORM, **extra}, cookie=cookie)
            assert status == 403, (extra, form, status)
            assert gw.store.get(held).state == "quarantined"
        # logging out is a state change too
        assert request(port, "POST", "/logout", b"", {**FORM, "Origin": "http://evil.example"},
                       cookie=cookie)[0] == 403
        assert request(port, "GET", "/quarantine", cookie=cookie)[0] == 200
        # the page's own form works
        status, _, _ = request(port, "POST", f"/quarantine/{held}/release",
                               f"note=checked&csrf={token}".encode(),
                               {**FORM, "Origin": f"http://127.0.0.1:{port}"}, cookie=cookie)
        assert status == 303 and gw.store.get(held).state == "done"
        # bearer-token clients send no cookie and no origin: not subject to it
        other = insert_instance(gw.store, state="quarantined", sop_uid="1.2.3.9.2",
                                study_uid="1.2.3.9")
        assert request(port, "POST", f"/quarantine/{other}/reject", b"note=bad", FORM,
                       token=gw.tokens["boss"])[0] == 303
        # a cross-site login is refused too (login CSRF)
        assert request(port, "POST", "/login", f"user=rad&password={PASSWORD}".encode(),
                       {**FORM, "Origin": "https://evil.example"})[0] == 403
    assert any(e.action == "http.csrf_refused" for e in gw.audit_log.entries())


# -- item 3 (HTTP side): escaping and the browser hardening headers ----------------------------

def test_dicom_values_are_text_and_pages_are_hardened(tmp_path):
    with running(tmp_path) as gw:
        port = gw.http_port
        insert_instance(gw.store, sop_uid=XSS[0], study_uid=XSS[1], patient_name=XSS[2],
                        modality=XSS[0])
        insert_instance(gw.store, sop_uid=XSS[1], study_uid="1.2.3.5", patient_name=XSS[1],
                        reasons=XSS)
        insert_instance(gw.store, state="quarantined", sop_uid=XSS[2], study_uid=XSS[0],
                        patient_name=XSS[0], reasons=XSS, verdict=XSS[1], trust=XSS[2])
        gw.audit_log.append("instance.quarantined", XSS[1], {"study": XSS[0]})
        cookie = login_cookie(port, "boss")
        for path in ("/", "/studies/1.2.3.5", "/quarantine", "/audit", "/login"):
            status, page, headers = request(port, "GET", path, cookie=cookie)
            assert status == 200, path
            for payload in XSS:
                assert payload.encode() not in page, (path, payload)
            assert b"<script" not in page
            assert b"style=" not in page and b"<style" not in page
            csp = headers["content-security-policy"]
            for rule in ("default-src 'none'", "img-src 'self'", "style-src 'self'",
                         "form-action 'self'", "frame-ancestors 'none'", "base-uri 'none'"):
                assert rule in csp, (path, rule)
            assert "unsafe-inline" not in csp and "script-src" not in csp
            assert headers["x-content-type-options"] == "nosniff"
            assert headers["x-frame-options"] == "DENY"
            assert headers["referrer-policy"] == "same-origin"
        page = request(port, "GET", "/", cookie=cookie)[1]
        escaped = b"&#34;&gt;&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;"
        assert b'data-study="' + escaped + b'"' in page  # text inside a double-quoted attribute
        # the style sheet is a file (no inline styles), public, and not sniffed
        status, css, headers = request(port, "GET", "/static/radguard.css")
        assert status == 200 and headers["content-type"].startswith("text/css")
        assert b".badge" in css
        # JSON answers get the headers too
        status, _, headers = request(port, "GET", "/dicom-web/studies", token=gw.tokens["rad"])
        assert status == 200 and headers["x-content-type-options"] == "nosniff"


# -- item 11 (HTTP side) and item 8 ("/auth/token answers 500") ------------------------------

def test_ids_beyond_64_bits_are_not_found(tmp_path):
    with running(tmp_path) as gw:
        port, boss = gw.http_port, gw.tokens["boss"]
        huge = "99999999999999999999999"
        for method, path in (("GET", f"/instances/{huge}/image.png"),
                             ("GET", f"/instances/-{huge}/image.png"),
                             ("GET", "/instances/0/image.png"),
                             ("POST", f"/quarantine/{huge}/release"),
                             ("POST", f"/quarantine/{1 << 63}/reject")):
            status, body, _ = request(port, method, path, b"note=x" if method == "POST" else None,
                                      FORM, token=boss)
            assert status == 404, (path, status, body)
            assert json.loads(body)["error"]
        status, body, _ = request(port, "GET", f"/dicom-web/instances?offset={huge}", token=boss)
        assert status in (200, 400, 422), status  # QIDO-RS: a paging value beyond 64 bits is 400
        status, body, _ = request(port, "GET", "/instances/abc/image.png", token=boss)
        assert status == 422 and b"Traceback" not in body


def test_a_store_that_cannot_write_answers_503(gateway_process):
    """A gateway whose files cannot grow (RLIMIT_FSIZE, as a full disk or a quota would)
    answers 503 with a short message on every route that writes, and recovers."""
    gw = gateway_process()
    Users(Store(gw.data_dir)).add("boss", "admin", PASSWORD)
    port = gw.http_port
    creds = json.dumps({"user": "boss", "password": PASSWORD}).encode()
    status, body, _ = request(port, "POST", "/auth/token", creds)
    assert status == 200
    token = json.loads(body)["token"]
    soft, hard = resource.prlimit(gw.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (1, hard))
    try:
        stow = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + NIH_DX.read_bytes() + \
            b"\r\n--b--\r\n"
        for method, path, body, headers in (
                ("POST", "/auth/token", creds, {}),
                ("GET", "/", None, {}),
                ("GET", "/dicom-web/studies", None, {}),
                ("POST", "/dicom-web/studies", stow, {"Content-Type":
                                                      "multipart/related; boundary=b"})):
            status, answer, reply = request(port, method, path, body, headers,
                                             token=None if path == "/auth/token" else token)
            assert status == 503, (path, status, answer)
            assert b"Traceback" not in answer and len(answer) < 300
            assert "store" in json.loads(answer)["error"] and reply["retry-after"]
    finally:
        resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (soft, hard))
    assert request(port, "POST", "/auth/token", creds)[0] == 200
    assert request(port, "GET", "/", token=token)[0] == 200
    assert gw.alive()


# -- review finding 12: one STOW-RS part file open at a time -----------------------------------

def tiny_instance(study: str, series: str, n: int) -> bytes:
    """A small valid Part 10 secondary capture (8 x 8, 8-bit) with a fresh SOP UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, n + 1
    ds.PatientID, ds.PatientName, ds.Modality = "P400", "Many^Parts", "OT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes((n + i) % 256 for i in range(64))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_stow_with_more_parts_than_open_files_is_stored(gateway_process):
    """Every part's spool file stayed open until the request ended: under a 1,024 open-file
    limit a 1,000-slice series in one STOW-RS failed with EMFILE, leaving the process
    without descriptors. 400 parts into a gateway allowed 256 open files: all stored."""
    from pydicom.uid import generate_uid

    from radguard.gateway.web import STOW_MAX_PARTS

    gw = gateway_process()
    Users(Store(gw.data_dir)).add("tech", "technologist", PASSWORD)
    status, body, _ = request(gw.http_port, "POST", "/auth/token", json.dumps(
        {"user": "tech", "password": PASSWORD}).encode())
    token = json.loads(body)["token"]
    study, series = generate_uid(), generate_uid()
    boundary = "radguard-test-" + secrets.token_hex(8)
    files = [tiny_instance(study, series, n) for n in range(400)]
    stow = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + f
                    + b"\r\n" for f in files) + f"--{boundary}--\r\n".encode()
    soft, hard = resource.prlimit(gw.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(gw.pid, resource.RLIMIT_NOFILE, (256, hard))
    try:
        status, answer, _ = request(
            gw.http_port, "POST", "/dicom-web/studies", stow,
            {"Content-Type": f'multipart/related; type="application/dicom"; '
                             f"boundary={boundary}"}, token=token)
        assert status == 200, answer[:300]
        result = json.loads(answer)
        assert "00081198" not in result  # no failed part
        stored = {item["00081155"]["Value"][0] for item in result["00081199"]["Value"]}
        sent = {read_sop_uid(f) for f in files}
        assert stored == sent and len(sent) == 400
        assert len({r.sop_uid for r in Store(gw.data_dir).instances("study_uid=?",
                                                                      (study,))}) == 400
        assert request(gw.http_port, "GET", "/login")[0] == 200  # descriptors left over
        # and the number of parts is capped (each is a file and a check)
        empty = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\nx\r\n".encode()
        status, answer, _ = request(
            gw.http_port, "POST", "/dicom-web/studies",
            empty * (STOW_MAX_PARTS + 1) + f"--{boundary}--\r\n".encode(),
            {"Content-Type": f"multipart/related; boundary={boundary}"}, token=token)
        assert status == 400 and f"more than {STOW_MAX_PARTS} parts".encode() in answer
        assert not list((gw.data_dir / "http-spool").iterdir())
    finally:
        if gw.alive():
            resource.prlimit(gw.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert gw.alive()


def read_sop_uid(part10: bytes) -> str:
    import pydicom

    return str(pydicom.dcmread(io.BytesIO(part10), stop_before_pixels=True).SOPInstanceUID)


# -- review finding 9: a real full disk, as a browser sees it -------------------------------------

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # what browsers send


def test_a_full_disk_shows_browsers_the_problem_on_a_503_page(small_disk, tmp_path):
    """Every authenticated request writes ``http.access`` to the audit log, so on a full
    disk all pages and logins fail (closed: nothing unaudited); a browser used to get bare
    JSON. Now it gets a page with the gateway's problem as its banner and Retry-After."""
    with running(tmp_path, data_dir=str(small_disk / "data")) as gw:
        port = gw.http_port
        cookie = login_cookie(port, "boss")
        filler = fill_disk(small_disk)
        try:
            status, page, headers = request(port, "GET", "/", headers=HTML, cookie=cookie)
            assert status == 503 and headers["content-type"].startswith("text/html")
            assert int(headers["retry-after"]) >= 1
            assert "default-src 'none'" in headers["content-security-policy"]
            assert b'id="problem"' in page and b"audit log" in page  # the store has not
            assert b'id="unavailable"' in page  # noticed yet: the banner says what failed
            assert b"Traceback" not in page and str(small_disk).encode() not in page
            # a C-STORE the store cannot take: now the gateway itself reports the problem
            sent = subprocess.run([dcmtk_tool("storescu"), "-aet", "DX1", "-aec", "RADGUARD",
                                   "127.0.0.1", str(gw.dicom.port), str(NIH_DX)],
                                  capture_output=True, text=True, timeout=120)
            assert sent.returncode != 0
            wait_until(lambda: gw.problem is not None, 60, "the store to report the problem")
            assert gw.problem.startswith(("disk full since ", "intake paused since "))
            status, page, headers = request(port, "GET", "/quarantine", headers=HTML,
                                            cookie=cookie)
            assert status == 503 and html.escape(gw.problem).encode() in page
            assert b"audit log" not in page.split(b'id="problem"')[1].split(b"</p>")[0]
            # the login page shows the banner; signing in fails closed with the same page
            status, page, _ = request(port, "GET", "/login", headers=HTML)
            assert status == 200 and html.escape(gw.problem).encode() in page
            form = urllib.parse.urlencode({"user": "rad", "password": PASSWORD}).encode()
            status, page, headers = request(port, "POST", "/login", form, {**FORM, **HTML})
            assert status == 503 and b'id="problem"' in page and headers["retry-after"]
            assert "set-cookie" not in headers
            # scripts keep their JSON answer
            status, body, headers = request(port, "GET", "/dicom-web/studies",
                                            token=gw.tokens["rad"])
            assert status == 503 and "store" in json.loads(body)["error"]
            assert headers["retry-after"]
        finally:
            filler.unlink()
        wait_until(lambda: request(port, "GET", "/", headers=HTML, cookie=cookie)[0] == 200,
                 60, "pages to be served again")
    assert not [e for e in gw.audit_log.entries() if e.action == "auth.login"
                and e.target == "rad"]  # no login went unaudited


# -- item 7 (WADO side): the first checked copy of a SOP Instance UID is served --------------

def test_wado_serves_the_first_clinical_copy(tmp_path):
    from radguard.gateway.web import _worklist_rows
    from tests.conftest import MR_NATIVE

    with running(tmp_path) as gw:
        first = insert_instance(gw.store, sop_uid="1.2.3.7.1", study_uid="1.2.3.7")
        insert_instance(gw.store, sop_uid="1.2.3.7.1", study_uid="1.2.3.7",
                        source_file=MR_NATIVE)  # a later copy with the same UID
        rad = gw.tokens["rad"]
        status, body, headers = request(  # as stored (the default answer is transcoded)
            gw.http_port, "GET", "/dicom-web/studies/1.2.3.7/series/1.2.3.4/instances/1.2.3.7.1",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
            token=rad)
        assert status == 200
        parts = split_multipart(body, headers["content-type"])
        assert [p[1] for p in parts] == [gw.store.file(gw.store.get(first)).read_bytes()]
        status, body, headers = request(gw.http_port, "GET", "/dicom-web/studies/1.2.3.7",
                                        token=rad)
        assert len(split_multipart(body, headers["content-type"])) == 1
        # the searches and the worklist count it once too
        found = json.loads(request(gw.http_port, "GET", "/dicom-web/instances", token=rad)[1])
        assert [i["00080018"]["Value"] for i in found] == [["1.2.3.7.1"]]
        studies = json.loads(request(gw.http_port, "GET", "/dicom-web/studies", token=rad)[1])
        assert [s["00201208"]["Value"] for s in studies] == [[1]]
        assert [len(item["rows"]) for item in _worklist_rows(gw.store)] == [1]


