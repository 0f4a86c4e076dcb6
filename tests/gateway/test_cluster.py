"""Issue 29: several gateways (separate ``radguard serve`` processes) on one PostgreSQL.

Each test starts its gateways as processes with ``[cluster]`` settings (own gateway id and
data folder; instance files in the database, or in one folder they all share; short claim
leases; a bounded connection pool), a PostgreSQL server of this module's own (so it can be
restarted and stopped) and a DICOM Storage SCP in this process standing for the PACS, which
records every C-STORE it receives and from which gateway (each gateway has its own AE
title). Images are small synthetic secondary captures (32 x 32), sent with dcmtk's storescu,
several files per association; an image counts as acknowledged only when storescu logged
its Success response.

1. three gateways share 500 instances: each processed once (attempts = 1), forwarded once,
   every study listed by QIDO-RS on every gateway, an instance received by one gateway
   retrieved from the others with the same bytes;
2. kill -9 of one gateway mid-ingest: nothing acknowledged is lost, its claims are taken
   over by the others within the lease (the time is printed), double forwards counted;
3. a gateway restarted while the others ingest (shared object folder): no file deleted, no
   instance processed twice;
4. ``pg_ctl restart`` during ingest, then the database stopped for a while: C-STOREs
   refused with 0xA700 and /health 503 while it is away, both back by themselves within
   seconds of its return, nothing acknowledged lost, the workers still working;
5. two gateways x 30 associations + 40 concurrent QIDO-RS queries: PostgreSQL never runs
   out of connections and each gateway holds at most ``db_pool`` of them;
6. a claim no worker holds (its commit's answer lost) is not kept alive by the heartbeat;
7. a gateway whose object storage the others cannot read is refused at start.

Before issue 29's ``[cluster]`` settings exist, the gateways run without them (see
:func:`_cluster_settings_known`) and the tests fail on the issue's problems.

Figures (reclaim time, double forwards, recovery time, connections) are printed: run with
``-s`` to see them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import _free_port, dcmtk_tool, running_postgres
from tests.gateway.conftest import small_images

LEASE = 6.0  # seconds: [cluster] lease_seconds of every gateway here
POOL = 8  # [cluster] db_pool
FINAL = ("done", "quarantined", "rejected")
IN_PROGRESS = ("queued", "processing", "forwarding")
PASSWORD = "cluster test password"
TEST_APP = "radguard-cluster-test"  # application_name of this module's own connections


def _cluster_settings_known() -> bool:
    """Whether this radguard reads a ``[cluster]`` table. Before issue 29 it refuses one
    ("unknown setting(s)"); the gateways here then run without it, as the issue's sites do
    (each its own file folder, one shared PostgreSQL), so the tests show its problems
    instead of a configuration error."""
    import tempfile

    from radguard.gateway.config import ConfigError, load_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "probe.toml"
        path.write_text(f'data_dir = "{folder}"\n[cluster]\ngateway_id = "gw1"\n'
                        f'objects = "database"\nlease_seconds = {LEASE:g}\n'
                        f"db_pool = {POOL}\n")
        try:
            load_config(path)
        except ConfigError as exc:  # e.g. objects = "database" needs a db_url: known
            return "unknown setting" not in str(exc)
    return True


CLUSTER_SETTINGS = _cluster_settings_known()


# -- the pieces: database, images, PACS, gateways ------------------------------------------------

@pytest.fixture(scope="module")
def pg():
    """This module's own PostgreSQL (restarted and stopped by the tests): 100 connections,
    the default, so a gateway that opens one per thread runs out of them."""
    with running_postgres(max_connections=100) as server:
        yield server


@pytest.fixture
def db(pg, request) -> str:
    """A fresh database for one test; its URL."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50]
    return pg.create_database(name)


class Pacs:
    """A Storage SCP in this process: every C-STORE it receives, with the calling AE."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.received: list[tuple[str, str]] = []  # (calling AE, SOP Instance UID)
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.maximum_associations = 64
        self.port = _free_port()
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        calling = event.assoc.requestor.ae_title
        calling = calling.decode() if isinstance(calling, bytes) else calling
        with self._lock:
            self.received.append((calling.strip(), str(event.request.AffectedSOPInstanceUID)))
        return 0x0000

    @property
    def target(self) -> str:
        return f"PACS@127.0.0.1:{self.port}"

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(sop for _, sop in self.received)

    def by_gateway(self) -> Counter[str]:
        with self._lock:
            return Counter(ae for ae, _ in self.received)

    def close(self) -> None:
        self._server.shutdown()


@pytest.fixture
def pacs():
    server = Pacs()
    yield server
    server.close()


class GatewayProcess:
    """One ``radguard serve --config`` process of the cluster."""

    def __init__(self, root: Path, number: int, db_url: str, *, forward: str = "",
                 objects: str = "database", objects_dir: Path | None = None,
                 dicom: dict[str, object] | None = None, http: dict[str, object] | None = None
                 ) -> None:
        self.id = f"gw{number}"
        self.ae_title = f"GW{number}"
        self.db_url = db_url
        self.data = root / self.id
        self.data.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = _free_port(), _free_port()
        self.stderr_path = self.data / "stderr.log"
        self.proc: subprocess.Popen | None = None
        lines = [f'data_dir = "{self.data}"', f'db_url = "{db_url}"',
                 f'ae_title = "{self.ae_title}"', 'host = "127.0.0.1"',
                 f"dicom_port = {self.dicom_port}", f"http_port = {self.http_port}",
                 "workers = 2", "check_processes = 0", "login_max_failures = 50",
                 *(f"{k} = {json.dumps(v)}" for k, v in (http or {}).items())]
        if forward:
            lines += ["[forward]", f'dimse = "{forward}"']
        lines += ["[dicom]", "min_free_mb = 0",
                  *(f"{k} = {json.dumps(v)}" for k, v in (dicom or {}).items())]
        if CLUSTER_SETTINGS:
            lines += ["[cluster]", f'gateway_id = "{self.id}"', f'objects = "{objects}"',
                      f"lease_seconds = {LEASE:g}", f"db_pool = {POOL}"]
            if objects_dir is not None:
                lines.append(f'objects_dir = "{objects_dir}"')
        self.config = self.data / "radguard.toml"
        self.config.write_text("\n".join(lines) + "\n")

    # -- process -------------------------------------------------------------------------
    def start(self, timeout: float = 90) -> None:
        with self.stderr_path.open("a") as err:
            err.write(f"--- start {time.strftime('%H:%M:%S')}\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "radguard.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("a"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway {self.id} did not start (exit "
                                     f"{self.proc.returncode}): {self.stderr()[-2000:]}")
            if _listening(self.dicom_port) and _listening(self.http_port):
                return
            time.sleep(0.1)
        raise AssertionError(f"gateway {self.id} did not listen within {timeout:g} s: "
                             f"{self.stderr()[-2000:]}")

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"gateway {self.id} did not stop within {timeout:g} s "
                                 "of SIGTERM") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP ----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, path: str, *, token: str | None = None, data: bytes | None = None,
                accept: str | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
        """(status, headers, body); an HTTP error status is returned, not raised."""
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if accept:
            headers["Accept"] = accept
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, _lower(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, _lower(exc.headers), exc.read()

    def health(self) -> tuple[int, dict]:
        try:
            status, _, body = self.request("/health", timeout=5)
        except (OSError, urllib.error.URLError) as exc:
            return 0, {"error": str(exc)}
        try:
            return status, json.loads(body or b"{}")
        except ValueError:
            return status, {"body": body[:200].decode(errors="replace")}

    def login(self, user: str = "boss") -> str:
        status, _, body = self.request(
            "/auth/token", data=json.dumps({"user": user, "password": PASSWORD}).encode())
        assert status == 200, f"login on {self.id}: {status} {body[:300]!r}"
        return json.loads(body)["token"]

    def studies(self, token: str) -> set[str]:
        """Every Study Instance UID QIDO-RS lists here."""
        status, _, body = self.request("/dicom-web/studies?limit=1000", token=token,
                                       accept="application/dicom+json")
        assert status in (200, 204), f"QIDO-RS on {self.id}: {status} {body[:300]!r}"
        return {s["0020000D"]["Value"][0] for s in json.loads(body or b"[]")}

    def retrieve(self, token: str, study: str, series: str, sop: str) -> bytes:
        """WADO-RS of one instance: the DICOM part of the multipart answer."""
        status, headers, body = self.request(
            f"/dicom-web/studies/{study}/series/{series}/instances/{sop}", token=token,
            accept='multipart/related; type="application/dicom"', timeout=60)
        assert status == 200, f"WADO-RS on {self.id} of {sop}: {status} {body[:300]!r}"
        return _only_part(headers.get("content-type", ""), body)


def _lower(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _only_part(content_type: str, body: bytes) -> bytes:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    assert m, f"not multipart: {content_type}"
    parts = [p for p in body.split(b"--" + m.group(1).encode())[1:]
             if not p.startswith(b"--")]
    assert len(parts) == 1, f"{len(parts)} parts"
    payload = parts[0].split(b"\r\n\r\n", 1)[1]
    return payload[:-2] if payload.endswith(b"\r\n") else payload


class Cluster:
    """Gateways on one database, their users, the database seen from the test."""

    def __init__(self, root: Path, pg, db_url: str, count: int, **settings: object) -> None:
        self.pg, self.db_url, self.root = pg, db_url, root
        self.gateways = [GatewayProcess(root, n + 1, db_url, **settings)  # type: ignore[arg-type]
                         for n in range(count)]

    def start(self) -> None:
        self.gateways[0].start()  # the first one migrates the schema
        threads = [threading.Thread(target=g.start) for g in self.gateways[1:]]
        errors: list[BaseException] = []
        for t in threads:
            t.run = _catching(t.run, errors)  # type: ignore[method-assign]
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self._add_user()

    def _add_user(self) -> None:
        password = self.root / "password"
        password.write_text(PASSWORD + "\n")
        done = subprocess.run(
            [sys.executable, "-m", "radguard.cli", "user", "add", "boss", "--role", "admin",
             "--password-file", str(password), "--data-dir", str(self.root / "cli"),
             "--db-url", self.db_url], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    def stop(self) -> None:
        for g in self.gateways:
            with contextlib.suppress(Exception):
                g.stop()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.db_url, autocommit=True, connect_timeout=10,
                             application_name=TEST_APP) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def rows(self) -> dict[str, list[dict]]:
        """SOP Instance UID -> its rows (as dicts)."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.db_url, autocommit=True, row_factory=dict_row,
                             application_name=TEST_APP) as conn:
            found = conn.execute("SELECT * FROM instances ORDER BY id").fetchall()
        out: dict[str, list[dict]] = {}
        for row in found:
            out.setdefault(row["sop_uid"], []).append(row)
        return out

    def counts(self) -> dict[str, int]:
        return dict(self.query("SELECT state, count(*) FROM instances GROUP BY state"))

    def wait_settled(self, timeout: float) -> float:
        """Wait until nothing is queued, processing or forwarding; seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            try:
                counts = self.counts()
            except Exception:  # noqa: BLE001 - the database restarting
                counts = {"?": 1, "queued": 1}
            if not any(counts.get(s) for s in IN_PROGRESS):
                return time.monotonic() - start
            if time.monotonic() > deadline:
                dead = [g.id for g in self.gateways if not g.alive()]
                raise AssertionError(f"still in progress after {timeout:g} s: {counts} "
                                     f"(gateways not running: {dead}): {self.stuck()}")
            time.sleep(0.2)

    def stuck(self) -> str:
        """The rows in progress, and what the gateways logged about them (a diagnosis)."""
        try:
            rows = self.query(
                "SELECT id, sop_uid, state, owner, attempts, lease_until - extract(epoch from "
                "clock_timestamp()) FROM instances WHERE state IN ('queued', 'processing', "
                "'forwarding') ORDER BY id LIMIT 5")
        except Exception as exc:  # noqa: BLE001 - a diagnosis only
            return f"(rows not read: {exc})"
        out = [f"row {r[0]} {r[2]} owner={r[3]} attempts={r[4]} lease_left="
               f"{r[5] if r[5] is None else round(r[5], 1)}" for r in rows]
        for g in self.gateways:
            lines = g.stderr().splitlines()
            said = [line for line in lines if any(str(r[0]) in line or r[1] in line
                                                  for r in rows)]
            out.append(f"{g.id} stderr: " + " | ".join((said or lines[-6:])[-6:])[:1500])
        return "; ".join(out)

    def problems(self) -> list[str]:
        """Errors every component logged that no test here may cause."""
        out = []
        for g in self.gateways:
            for line in g.stderr().splitlines():
                if "too many clients" in line or "Traceback" in line:
                    out.append(f"{g.id}: {line[:300]}")
        return out


def _catching(run, errors):
    def wrapped() -> None:
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            errors.append(exc)
    return wrapped


@pytest.fixture
def cluster_factory(tmp_path, pg, db):
    made: list[Cluster] = []

    def make(count: int, **settings: object) -> Cluster:
        cluster = Cluster(tmp_path / "cluster", pg, db, count, **settings)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
    if not pg.running():  # a test that failed while the database was stopped
        pg.start()


class Sender:
    """dcmtk storescu sending ``files`` to one gateway over one association (several in a
    row when ``per_association`` is set), in the background; which SOPs got Success."""

    def __init__(self, gateway: GatewayProcess, files: list[Path], sops: dict[Path, str],
                 *, per_association: int = 0, pause: float = 0.0) -> None:
        self.gateway, self.files, self.sops = gateway, files, sops
        self.per_association = per_association or len(files)
        self.pause = pause
        self.acked: list[str] = []
        self.refused: list[tuple[str, str]] = []  # (SOP, status text)
        self.failed_runs = 0
        self.log: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i in range(0, len(self.files), self.per_association):
            batch = self.files[i:i + self.per_association]
            done = subprocess.run(
                [dcmtk_tool("storescu"), "-v", "-aet", "MODALITY", "-aec",
                 self.gateway.ae_title, "127.0.0.1", str(self.gateway.dicom_port),
                 *map(str, batch)], capture_output=True, text=True, timeout=600)
            out = done.stdout + done.stderr
            self.log.append(out)
            self.failed_runs += done.returncode != 0
            self._parse(out)
            if self.pause:
                time.sleep(self.pause)

    def _parse(self, out: str) -> None:
        current = None
        for line in out.splitlines():
            m = re.search(r"Sending file: (\S+)", line)
            if m:
                current = self.sops.get(Path(m.group(1)))
            m = re.search(r"Received Store Response \(([^)]*)\)", line)
            if m and current:
                if m.group(1) == "Success":
                    self.acked.append(current)
                else:
                    self.refused.append((current, m.group(1)))
                current = None

    def join(self, timeout: float = 600) -> Sender:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "storescu did not finish"
        return self

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


def send_one(gateway: GatewayProcess, path: Path) -> str:
    """storescu of one file; the status it got (e.g. "Success"), or the error it printed."""
    done = subprocess.run([dcmtk_tool("storescu"), "-v", "-aet", "MODALITY", "-aec",
                           gateway.ae_title, "127.0.0.1", str(gateway.dicom_port), str(path)],
                          capture_output=True, text=True, timeout=60)
    out = done.stdout + done.stderr
    m = re.search(r"Received Store Response \(([^)]*)\)", out)
    return m.group(1) if m else f"no response (exit {done.returncode}): {out[-300:]}"


def wait_for(predicate, timeout: float, what: str, step: float = 0.1) -> float:
    """Poll until ``predicate()`` is true; seconds it took (AssertionError after timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(step)
    return time.monotonic() - start


def report(**figures: object) -> None:
    print("\nCLUSTER " + " ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


def assert_all_final(cluster: Cluster, acked: list[str]) -> dict[str, list[dict]]:
    """Every acknowledged SOP has exactly one row, in a final state; the rows."""
    rows = cluster.rows()
    lost = [sop for sop in acked if sop not in rows]
    assert not lost, f"{len(lost)} acknowledged instances lost, e.g. {lost[:3]}"
    stored_twice = {sop: len(rows[sop]) for sop in acked if len(rows[sop]) != 1}
    assert not stored_twice, f"stored more than once: {list(stored_twice.items())[:3]}"
    unfinished = [(sop, rows[sop][0]["state"]) for sop in acked
                  if rows[sop][0]["state"] not in FINAL]
    assert not unfinished, f"{len(unfinished)} acknowledged instances not finished: " \
                           f"{unfinished[:3]}"
    return rows


def assert_checked_properly(rows: dict[str, list[dict]], sops: list[str]) -> None:
    """Each instance was judged on its content - not quarantined because its file could
    not be read where the worker ran (a file another gateway keeps in its own folder)."""
    bad = [(sop, r["state"], r["verdict"], (r["details"] or "")[:200])
           for sop in sops for r in rows[sop]
           if r["state"] != "done" or r["verdict"] == "unverifiable" and "error" in
           (r["details"] or "")]
    assert not bad, f"{len(bad)} instances not processed cleanly, e.g. {bad[:2]}"


# -- 1. three gateways share the work ------------------------------------------------------------

def test_three_gateways_share_500_instances(cluster_factory, pacs, tmp_path):
    sops = small_images(tmp_path / "images", 500)
    files = sorted(sops)
    cluster = cluster_factory(3, forward=pacs.target)
    cluster.start()
    gws = cluster.gateways
    for g in gws:
        status, body = g.health()
        assert status == 200 and body.get("status") == "ready" and body.get("gateway") == g.id, \
            f"/health of {g.id}: {status} {body}"
    start = time.monotonic()
    # each gateway gets a third, over 2 storescu processes of 10 files per association
    senders = [Sender(gws[i % 3], files[i::6], sops, per_association=10) for i in range(6)]
    for s in senders:
        s.join()
    acked = [sop for s in senders for sop in s.acked]
    assert not any(s.failed_runs for s in senders), senders[0].log[-1][-1500:]
    assert len(acked) == 500, f"{len(acked)} of 500 acknowledged"
    settled = cluster.wait_settled(240)
    elapsed = time.monotonic() - start
    rows = assert_all_final(cluster, acked)
    attempts = Counter(r["attempts"] for sop in acked for r in rows[sop])
    forwards = pacs.counts()
    report(test="share", instances=500, seconds=f"{elapsed:.1f}",
           rate=f"{500 / elapsed:.1f}/s", settle_after_send=f"{settled:.1f}",
           attempts=dict(attempts), forwarded_by=dict(pacs.by_gateway()),
           owners=dict(Counter(r.get("owner") for sop in acked for r in rows[sop])))
    assert attempts == {1: 500}, f"processed more than once: attempts {dict(attempts)}"
    assert_checked_properly(rows, acked)
    assert {sop: n for sop, n in forwards.items() if n != 1} == {}, "forwarded twice"
    assert set(forwards) == set(acked), f"{len(set(acked) - set(forwards))} never forwarded"
    # the work was shared: every gateway forwarded some
    assert set(pacs.by_gateway()) == {g.ae_title for g in gws}, dict(pacs.by_gateway())
    # a login on one gateway is good on all; each lists every study
    token = gws[0].login()
    studies = {r[0]["study_uid"] for r in rows.values()}
    for g in gws:
        assert g.studies(token) == studies, f"QIDO-RS on {g.id} does not list every study"
    status, _, body = gws[2].request("/dicom-web/instances?limit=1000", token=token,
                                     accept="application/dicom+json")
    assert status == 200 and len(json.loads(body)) == 500, f"{status}: {body[:200]!r}"
    # an instance received by gw1 (and one by gw3) retrieved from the others: same bytes
    for receiver, others in ((gws[0], gws[1:]), (gws[2], gws[:2])):
        row = rows[_acked_by(senders, receiver)[0]][0]
        there = receiver.retrieve(token, row["study_uid"], row["series_uid"], row["sop_uid"])
        assert hashlib.sha256(there).hexdigest() == row["sha256"]
        for other in others:
            got = other.retrieve(token, row["study_uid"], row["series_uid"], row["sop_uid"])
            assert got == there, f"{other.id} serves other bytes than {receiver.id}"
    assert not cluster.problems(), cluster.problems()[:5]


def _acked_by(senders: list[Sender], gateway: GatewayProcess) -> list[str]:
    return [sop for s in senders if s.gateway is gateway for sop in s.acked]


# -- 2. kill -9 of one gateway -------------------------------------------------------------------

def test_kill_9_of_one_gateway_mid_ingest(cluster_factory, pacs, tmp_path):
    sops = small_images(tmp_path / "images", 450, seed=2)
    files = sorted(sops)
    cluster = cluster_factory(3, forward=pacs.target)
    cluster.start()
    gws = cluster.gateways
    senders = [Sender(gws[i % 3], files[i::3], sops, per_association=10) for i in range(3)]
    victim = gws[0]
    # kill it once it holds claims: some of its instances are being processed
    wait_for(lambda: len(senders[0].acked) >= 30 and _claims(cluster, victim) > 0, 60,
             "gw1 holding claims after 30 instances in", step=0.02)
    killed_at = time.monotonic()
    victim.kill()
    held = _claims_snapshot(cluster, victim)
    # every row claimed when it died is taken over: out of gw1's claim (reclaimed by
    # another gateway, or finished by one) within the lease, plus polling slack
    def reclaimed() -> bool:
        still = cluster.query(
            "SELECT count(*) FROM instances WHERE id = ANY(%s) AND state IN "
            "('processing', 'forwarding') AND (owner IS NULL OR owner = %s)",
            (list(held), victim.id)) if _has_owner(cluster) else cluster.query(
            "SELECT count(*) FROM instances WHERE id = ANY(%s) AND state IN "
            "('processing', 'forwarding')", (list(held),))
        return still[0][0] == 0
    # lease_seconds is the bound (a lease of 3/4 of it from the last extension, at most a
    # heartbeat - 1/4 - before the kill, is reclaimed by the next heartbeat of another
    # gateway, at most 1/4 after it lapses), plus a second of polling slack
    bound = LEASE + 1
    try:
        wait_for(reclaimed, 30, f"the {len(held)} claims of the killed gateway taken over")
    finally:
        reclaim = time.monotonic() - killed_at
    for s in senders:
        s.join()
    acked = [sop for s in senders for sop in s.acked]
    acked_by_victim = len(senders[0].acked)
    cluster.wait_settled(240)
    rows = assert_all_final(cluster, acked)
    forwards = pacs.counts()
    doubles = sum(1 for n in forwards.values() if n > 1)
    attempts = Counter(r["attempts"] for sop in acked for r in rows[sop])
    report(test="kill9", acked=len(acked), acked_by_killed=acked_by_victim,
           claims_at_kill=len(held), reclaim_seconds=f"{reclaim:.1f}", lease=LEASE,
           double_forwards=doubles, attempts=dict(attempts))
    assert reclaim <= bound, f"claims taken over {reclaim:.1f} s after the kill (lease " \
                             f"{LEASE:g} s)"
    assert held, "the kill should land while gw1 holds claims"
    assert 0 < acked_by_victim < len(senders[0].files), "the kill should land mid-run"
    done = [sop for sop in acked if rows[sop][0]["state"] == "done"]
    assert not set(done) - set(forwards), "done but never forwarded"
    # at-least-once: only what the dead gateway held may have gone twice
    held_sops = {r[0] for r in cluster.query("SELECT sop_uid FROM instances WHERE id = ANY(%s)",
                                             (list(held),))}
    assert {s for s, n in forwards.items() if n > 1} <= held_sops
    assert {sop for sop in acked if rows[sop][0]["attempts"] > 1} <= held_sops
    assert_checked_properly(rows, acked)
    # started again on the same host at once (the old process is gone: no need to wait
    # for its heartbeat to lapse), it takes work again
    victim.start()
    wait_for(lambda: victim.health()[0] == 200, 30, f"{victim.id} ready after its restart")
    assert send_one(victim, next(iter(small_images(tmp_path / "late", 1, seed=22)))) == "Success"
    cluster.wait_settled(60)


def _has_owner(cluster: Cluster) -> bool:
    return bool(cluster.query("SELECT 1 FROM information_schema.columns WHERE table_name = "
                              "'instances' AND column_name = 'owner'"))


def _claims(cluster: Cluster, gateway: GatewayProcess) -> int:
    return len(_claims_snapshot(cluster, gateway))


def _claims_snapshot(cluster: Cluster, gateway: GatewayProcess) -> set[int]:
    """Row ids ``gateway`` has claimed (every claimed row if claims have no owner)."""
    if _has_owner(cluster):
        found = cluster.query("SELECT id FROM instances WHERE state IN ('processing', "
                              "'forwarding') AND owner = %s", (gateway.id,))
    else:
        found = cluster.query("SELECT id FROM instances WHERE state IN ('processing', "
                              "'forwarding')")
    return {r[0] for r in found}


# -- 3. a gateway restarted while the others ingest ----------------------------------------------

def test_restart_of_one_gateway_while_the_others_ingest(cluster_factory, pacs, tmp_path):
    sops = small_images(tmp_path / "images", 300, seed=3)
    files = sorted(sops)
    shared = tmp_path / "shared-objects"
    shared.mkdir()
    cluster = cluster_factory(3, forward=pacs.target, objects="folder", objects_dir=shared)
    cluster.start()
    gws = cluster.gateways
    # gw2 and gw3 take everything, in small associations, while gw1 restarts
    senders = [Sender(gws[1 + i % 2], files[i::4], sops, per_association=5) for i in range(4)]
    wait_for(lambda: sum(len(s.acked) for s in senders) >= 40, 60, "40 instances in")
    before = _files(shared, *(g.data for g in gws))
    gws[0].stop()
    # at once, as systemctl restart does; if it is refused, the rest is still checked (once
    # it starts) and the refusal reported at the end
    refused, restarted = None, time.monotonic()
    while True:
        try:
            gws[0].start()
            break
        except AssertionError as exc:
            refused = refused or str(exc).strip().splitlines()[-1][:300]
            if time.monotonic() - restarted > 4 * LEASE:
                raise
            time.sleep(0.5)
    restart_took = time.monotonic() - restarted
    after_restart = _files(shared, *(g.data for g in gws))
    for s in senders:
        s.join()
    acked = [sop for s in senders for sop in s.acked]
    assert len(acked) == 300 and not any(s.failed_runs for s in senders)
    cluster.wait_settled(240)
    rows = assert_all_final(cluster, acked)
    deleted = before - after_restart
    forwards = pacs.counts()
    attempts = Counter(r["attempts"] for sop in acked for r in rows[sop])
    report(test="restart", acked=len(acked), files_before=len(before), deleted=len(deleted),
           restart_seconds=f"{restart_took:.1f}", restart_refused_at_first=bool(refused),
           attempts=dict(attempts), double_forwards=sum(1 for n in forwards.values() if n > 1))
    assert not deleted, f"the restart deleted {len(deleted)} files, e.g. {sorted(deleted)[:3]}"
    # a clean restart leaves nothing to a lease: nothing processed twice
    assert attempts == {1: len(acked)}, f"processed more than once: {dict(attempts)}"
    assert {s: n for s, n in forwards.items() if n != 1} == {}, "forwarded twice"
    assert_checked_properly(rows, acked)
    # everything still there, from any gateway, gw1 included
    token = gws[0].login()
    for sop in acked[::50]:
        row = rows[sop][0]
        data = gws[0].retrieve(token, row["study_uid"], row["series_uid"], sop)
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    assert refused is None, f"a cleanly stopped gateway could not start again at once: {refused}"


def _files(*folders: Path) -> set[str]:
    """Every stored instance file under ``folders`` (not temporary or spooled ones)."""
    out = set()
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith(".") and "incoming" not in \
                    path.parts and path.suffix not in (".log", ".toml", ".jsonl", ".db",
                                                       ".db-wal", ".db-shm"):
                out.add(str(path))
    return out


# -- 4. the database restarted, then away for a while --------------------------------------------

def test_gateways_recover_by_themselves_from_a_database_restart(cluster_factory, pacs, pg,
                                                                tmp_path):
    sops = small_images(tmp_path / "images", 400, seed=4)
    files = sorted(sops)
    probes = list(small_images(tmp_path / "probes", 8, seed=44))
    cluster = cluster_factory(2, forward=pacs.target)
    cluster.start()
    gws = cluster.gateways
    accepted: list[Path] = []

    def takes_one(g: GatewayProcess) -> bool:
        if send_one(g, probes[-1]) == "Success":  # a refused probe is tried again
            accepted.append(probes.pop())
            return True
        return False

    def back(since: float) -> tuple[dict[str, float], dict[str, float]]:
        """Seconds from ``since`` to each gateway's first accepted C-STORE, and to its
        /health 200 (polled by turns, so each is at most ~0.3 s late)."""
        stored: dict[str, float] = {}
        ready: dict[str, float] = {}
        deadline = time.monotonic() + 30
        while len(stored) + len(ready) < 2 * len(gws):
            for g in gws:
                if g.id not in ready and g.health()[0] == 200:
                    ready[g.id] = time.monotonic() - since
                if g.id not in stored and takes_one(g):
                    stored[g.id] = time.monotonic() - since
            assert time.monotonic() < deadline, \
                f"not back within 30 s: C-STORE accepted {stored}, /health ready {ready}"
            time.sleep(0.1)
        return stored, ready

    # a) pg_ctl restart while both ingest
    senders = [Sender(gws[i % 2], files[i:300:2], sops, per_association=5, pause=0.05)
               for i in range(2)]
    wait_for(lambda: sum(len(s.acked) for s in senders) >= 40, 60, "40 instances in")
    restarted = time.monotonic()
    pg.restart()
    restart_took = time.monotonic() - restarted
    stored_after_restart, ready_after_restart = back(restarted)
    for s in senders:
        s.join()
    # b) the database away for longer than a lease while both ingest: refused, not lost
    busy = [Sender(gws[i % 2], files[300 + i::2], sops, per_association=5, pause=0.2)
            for i in range(2)]
    wait_for(lambda: sum(len(s.acked) for s in busy) >= 10, 60, "10 instances in")
    pg.stop()
    stopped = time.monotonic()
    try:
        time.sleep(1.0)
        away_health = [g.health() for g in gws]
        refusing = time.monotonic()
        away_store = send_one(gws[0], probes[-1])
        refusal_took = time.monotonic() - refusing
        time.sleep(max(0.0, stopped + LEASE + 2 - time.monotonic()))
    finally:
        pg.start()
    started = time.monotonic()
    stored_after_start, ready_after_start = back(started)
    for s in busy:
        s.join()
    senders += busy
    acked = [sop for s in senders for sop in s.acked] + [sops_of(p) for p in accepted]
    refused = Counter(status for s in senders for _, status in s.refused)
    settled = cluster.wait_settled(60)
    rows = assert_all_final(cluster, acked)
    forwards = pacs.counts()
    twice = {sop for sop in acked if rows[sop][0]["attempts"] > 1} | \
        {sop for sop, n in forwards.items() if n > 1}
    report(test="pg_restart", acked=len(acked), refused=dict(refused),
           pg_restart_seconds=f"{restart_took:.1f}",
           first_store_after_restart=_seconds(stored_after_restart),
           health_after_restart=_seconds(ready_after_restart),
           away_seconds=f"{started - stopped:.1f}", refusal_took=f"{refusal_took:.1f}",
           first_store_after_start=_seconds(stored_after_start),
           health_after_start=_seconds(ready_after_start), settled=f"{settled:.1f}",
           processed_or_forwarded_twice=len(twice))
    for status, body in away_health:
        assert status == 503 and body.get("status") == "unavailable" and body.get("problem"), \
            f"/health while the database is stopped: {status} {body}"
    assert "OutOfResources" in away_store or "A700" in away_store.upper(), \
        f"C-STORE while the database is stopped: {away_store}"
    assert not set(refused) - {"Refused: OutOfResources"}, dict(refused)
    # the workers kept working: everything that came in, before and after, processed
    assert_checked_properly(rows, acked)
    assert set(acked) <= set(forwards), "done but never forwarded"
    # only what was in hand when the database went away (a lease expired meanwhile) may
    # have been processed twice: 2 workers x 2 gateways
    assert len(twice) <= 4, f"{len(twice)} instances processed or forwarded twice"
    for g in gws:
        assert g.alive(), f"{g.id} exited: {g.stderr()[-1500:]}"
    assert not cluster.problems(), cluster.problems()[:5]
    # refused promptly (docs/gateway.md: "after a second, not a timeout"), not after the
    # connection pool's wait: a modality's own timeout may be shorter
    assert refusal_took <= 3.0, f"C-STORE refused only after {refusal_took:.1f} s"


def _seconds(figures: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:.1f}" for k, v in sorted(figures.items()))


def sops_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- 5. connections stay bounded under load ------------------------------------------------------

def test_connections_stay_bounded_under_60_associations_and_40_queries(cluster_factory, pg,
                                                                       tmp_path):
    sops = small_images(tmp_path / "images", 240, seed=5)
    files = sorted(sops)
    limits = {"max_associations": 64, "max_per_ip": 64, "max_per_ae": 64}
    cluster = cluster_factory(2, dicom=limits, http={"http_max_per_client": 128})
    cluster.start()
    gws = cluster.gateways
    token = gws[0].login()
    dbname = cluster.db_url.rsplit("/", 1)[1]
    log_start = len(pg.log())
    seen: list[int] = []  # connections of everything but this test, per sample
    most: Counter[str] = Counter()  # the most seen at once, per application_name
    unnamed: set[str] = set()  # statements of connections without an application_name
    stop = threading.Event()

    def sample() -> None:
        import psycopg

        with psycopg.connect(cluster.db_url, autocommit=True,
                             application_name=TEST_APP) as conn:
            while not stop.is_set():
                now = dict(conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = "
                    "%s AND application_name <> %s GROUP BY 1", (dbname, TEST_APP)).fetchall())
                seen.append(sum(now.values()))
                for app, n in now.items():
                    most[app] = max(most[app], n)
                if len(unnamed) < 3 and now.get(""):  # whose: their statements say
                    unnamed.update(r[0] for r in conn.execute(
                        "SELECT left(query, 70) FROM pg_stat_activity WHERE datname = %s "
                        "AND application_name = ''", (dbname,)).fetchall())
                time.sleep(0.05)

    answers: list[object] = []

    def query(g: GatewayProcess) -> None:
        for _ in range(5):
            try:
                answers.append(g.request("/dicom-web/studies?limit=100", token=token,
                                         accept="application/dicom+json", timeout=60)[0])
            except OSError as exc:
                answers.append(f"{type(exc).__name__}: {exc}")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # 30 associations per gateway at once, 4 files each; 40 query threads, 5 queries each
    senders = [Sender(gws[i % 2], files[i::60], sops) for i in range(60)]
    queries = [threading.Thread(target=query, args=(gws[i % 2],)) for i in range(40)]
    for t in queries:
        t.start()
    for t in queries:
        t.join(300)
    for s in senders:
        s.join()
    cluster.wait_settled(120)
    stop.set()
    sampler.join(10)
    acked = [sop for s in senders for sop in s.acked]
    pg_log = pg.log()[log_start:]
    too_many = [line for line in pg_log.splitlines() if "too many clients" in line]
    report(test="connections", max_connections_seen=max(seen, default=0), samples=len(seen),
           most_per_application=",".join(f"{k.replace(' ', '_')}:{v}" for k, v in most.items()),
           limit=2 * POOL, acked=len(acked), queries_ok=answers.count(200),
           too_many_clients=len(too_many))
    assert not too_many, f"PostgreSQL ran out of connections: {too_many[:2]}"
    assert not cluster.problems(), cluster.problems()[:5]
    for g in gws:  # each gateway within its pool (they name themselves "radguard <id>")
        assert most[f"radguard {g.id}"] <= POOL, dict(most)
    assert max(seen) <= 2 * POOL + 2, f"{max(seen)} connections (db_pool = {POOL} x 2): " \
        f"{dict(most)}; unnamed ones ran {sorted(unnamed)[:3]}"
    assert len(acked) == len(files), f"{len(acked)} of {len(files)} acknowledged; " \
        f"{[s.log[-1][-600:] for s in senders if s.failed_runs][:1]}"
    assert answers.count(200) == len(answers), Counter(map(str, answers))
    assert_all_final(cluster, acked)


# -- 6. a claim no worker holds --------------------------------------------------------------------

def test_a_claim_no_worker_holds_does_not_stay_claimed(cluster_factory, pacs, tmp_path):
    """A claim whose commit reached the database while its answer did not (the connection
    cut at that moment: a database restart, a network failure) is held by no worker of the
    live gateway it names. Its lease must run out all the same, or the instance stays
    ``processing`` until that gateway restarts. Made here by claiming a row in the
    gateway's name from outside (the statement :meth:`Store.claim` runs), as if its reply
    had been lost; seen once in test 4 as one row left ``processing`` for 120 s with both
    gateways running."""
    sops = small_images(tmp_path / "images", 3, seed=6)
    cluster = cluster_factory(2, forward=pacs.target)
    cluster.start()
    gws = cluster.gateways
    for path in sops:
        assert send_one(gws[0], path) == "Success"
    cluster.wait_settled(60)
    orphan = cluster.query("SELECT id FROM instances ORDER BY id LIMIT 1")[0][0]
    cluster.query("UPDATE instances SET state = 'processing', attempts = attempts + 1, "
                  "owner = %s, lease_until = extract(epoch from clock_timestamp()) + %s "
                  "WHERE id = %s", (gws[0].id, LEASE, orphan))
    start = time.monotonic()
    try:
        wait_for(lambda: cluster.query("SELECT state FROM instances WHERE id = %s",
                                       (orphan,))[0][0] in FINAL, 3 * LEASE + 10,
                 f"row {orphan}, claimed in {gws[0].id}'s name by no worker, processed")
    finally:
        took = time.monotonic() - start
        state = cluster.query("SELECT state, owner, attempts FROM instances WHERE id = %s",
                              (orphan,))[0]
        report(test="orphan_claim", seconds=f"{took:.1f}", row=state)


# -- 7. a gateway whose objects the others cannot read ------------------------------------------

def test_a_gateway_with_objects_of_its_own_is_refused(cluster_factory, tmp_path):
    """The issue's first problem: gateways on one database, each with its own object
    folder, claimed instances whose files were on another's disk. A gateway whose object
    storage differs from the cluster's must not start (and say why)."""
    cluster = cluster_factory(1)
    cluster.start()
    stray = GatewayProcess(tmp_path / "stray", 9, cluster.db_url, objects="folder")
    try:
        with pytest.raises(AssertionError, match="did not start") as failed:
            stray.start(timeout=60)
    finally:
        stray.stop()
    assert "objects" in str(failed.value).splitlines()[-1], str(failed.value)[-500:]
    assert cluster.gateways[0].health()[0] == 200


# -- 8. a gateway frozen for longer than a lease ------------------------------------------------

def test_a_frozen_gateway_does_not_overwrite_the_work_taken_over(cluster_factory, pacs,
                                                                  tmp_path):
    """SIGSTOP (a VM paused, a long GC pause, a swap storm) for two leases mid-ingest: the
    others take its claims over; resumed, it must not record results over theirs, and it
    goes on working."""
    sops = small_images(tmp_path / "images", 200, seed=8)
    files = sorted(sops)
    cluster = cluster_factory(2, forward=pacs.target)
    cluster.start()
    frozen, other = cluster.gateways
    # everything goes to the other gateway, so the frozen one's claims are all that is
    # in its hands
    sender = Sender(other, files, sops, per_association=10)
    wait_for(lambda: _claims(cluster, frozen) > 0, 60, f"{frozen.id} holding claims",
             step=0.01)
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    held = _claims_snapshot(cluster, frozen)
    try:
        wait_for(lambda: not cluster.query(
            "SELECT 1 FROM instances WHERE id = ANY(%s) AND owner = %s AND state IN "
            "('processing', 'forwarding')", (list(held), frozen.id)), 30,
            f"the claims of the frozen {frozen.id} taken over")
        took = time.monotonic() - stopped
        time.sleep(max(0.0, stopped + 2 * LEASE - time.monotonic()))
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    sender.join()
    cluster.wait_settled(120)
    rows = assert_all_final(cluster, sender.acked)
    forwards = pacs.counts()
    by_id = {r["id"]: r for rs in rows.values() for r in rs}
    report(test="frozen", held=len(held), taken_over_after=f"{took:.1f}",
           held_rows=[(by_id[i]["state"], by_id[i]["owner"], by_id[i]["attempts"])
                      for i in sorted(held) if i in by_id],
           double_forwards=sum(1 for n in forwards.values() if n > 1))
    assert held, f"{frozen.id} should be frozen while it holds claims"
    for row_id in held:  # finished by the one that took it over, not by the frozen one
        assert by_id[row_id]["owner"] != frozen.id, (row_id, by_id[row_id]["owner"])
    twice = {s for s, n in forwards.items() if n > 1}
    assert twice <= {by_id[i]["sop_uid"] for i in held}, "forwarded twice beyond the lease"
    assert_checked_properly(rows, sender.acked)
    wait_for(lambda: frozen.health()[0] == 200, 30, f"{frozen.id} ready after SIGCONT")
    late = small_images(tmp_path / "late", 1, seed=88)
    assert send_one(frozen, next(iter(late))) == "Success"
    cluster.wait_settled(60)
    assert not cluster.problems(), cluster.problems()[:5]
