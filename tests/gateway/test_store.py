"""The store on both backends: the embedded SQLite default and a real PostgreSQL."""

from __future__ import annotations

import os
import threading

import pytest

from radguard.gateway.auth import AuthError, Users
from radguard.gateway.store import MIGRATIONS, Store, StoreError
from tests.conftest import NIH_DX
from tests.governance.pgdb import fresh_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield Store(tmp_path / "data")
        return
    s = Store(tmp_path / "data", fresh_database(request.getfixturevalue("postgres_url")))
    yield s
    s.close()


def _header(n: int) -> dict[str, str]:
    return {"sop_uid": f"1.2.3.{n}", "study_uid": "1.2.3", "series_uid": "1.2.3.0",
            "modality": "DX", "patient_id": "P1", "patient_name": "Test^One"}


def test_ingest_claim_finish_recover(store):
    data = NIH_DX.read_bytes()
    ids = [store.ingest(data + bytes([n]), _header(n), source="dimse") for n in range(3)]
    assert ids == sorted(ids) and store.counts() == {"queued": 3}
    first = store.claim()
    assert first.id == ids[0] and first.state == "processing" and first.attempts == 1
    store.finish(first.id, state="quarantined", verdict="tampered", trust="signature invalid",
                 details={"reasons": ["signature invalid"]})
    second = store.claim()
    assert store.recover()["requeued"] == 1  # a crash while the second was processing
    assert store.get(second.id).state == "queued"
    again = store.claim()
    assert again.id == second.id and again.attempts == 2
    released = store.decide(first.id, "done", "boss", "checked")
    assert released.decided_by == "boss" and released.detail == {
        "reasons": ["signature invalid"]}
    with pytest.raises(StoreError):
        store.decide(first.id, "done", "boss", "again")
    assert store.file(first).read_bytes() == data + b"\x00"
    assert store.schema_version == len(MIGRATIONS) >= 6


class _ReadsFail(Store):
    """A store whose row reads fail, as when a PostgreSQL connection drops after a commit."""

    def get(self, instance_id: int) -> None:
        raise StoreError("server closed the connection unexpectedly")


def test_a_claim_is_not_stranded_by_a_failed_read(store):
    """Finding 10: claiming committed ``processing`` and then read the row back; when that
    read failed, the row stayed claimed by nobody until a restart. The claim is one
    ``UPDATE ... RETURNING``: the row comes back with the commit."""
    row = store.ingest(b"one", _header(1), source="dimse")
    other = _ReadsFail(store.root, store.backend.target if store.backend.name == "postgresql"
                       else None)
    claimed = other.claim()
    assert (claimed.id, claimed.state, claimed.attempts) == (row, "processing", 1)
    assert claimed.sop_uid == "1.2.3.1" and claimed.modality == "DX"
    assert store.get(row).state == "processing" and other.claim() is None


def test_users_and_tokens(store):
    users = Users(store)
    users.add("alice", "radiologist", "long enough password")
    token = users.issue_token("alice")
    assert users.user_for_token(token).role == "radiologist"
    assert users.check_password("alice", "long enough password").name == "alice"
    with pytest.raises(AuthError):
        users.check_password("alice", "wrong password!!")
    users.add("alice", "admin", "another long password")  # reset
    assert users.check_password("alice", "another long password").role == "admin"
    users.revoke(token)
    with pytest.raises(AuthError):
        users.user_for_token(token)


def test_concurrent_claims_take_each_instance_once(store, tmp_path):
    for n in range(60):
        store.ingest(b"x" * (n + 1), _header(n), source="stow")
    if store.backend.name == "postgresql":  # two gateways sharing one queue
        stores = [store, Store(tmp_path / "other", store.backend.target)]
    else:
        stores = [store, store]
    claimed: list[int] = []
    lock = threading.Lock()

    def work(s: Store) -> None:
        while (inst := s.claim()) is not None:
            with lock:
                claimed.append(inst.id)
            s.finish(inst.id, state="done", verdict="authentic", trust="unsigned", details={})

    threads = [threading.Thread(target=work, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(claimed) == 60 and len(set(claimed)) == 60
    assert store.counts() == {"done": 60}


def test_only_claims_skip_the_disk_wait_and_the_connection_returns_to_full_sync(tmp_path):
    """SQLite: a claim commits with synchronous=NORMAL (a claim a power cut undoes leaves
    the instance queued); everything else, and the connection afterwards, is FULL (2)."""
    store = Store(tmp_path / "data")
    sync = []
    store._db().set_trace_callback(
        lambda sql: sync.append(sql) if sql.startswith(("PRAGMA synchronous", "COMMIT")) else 0)
    store.ingest(NIH_DX.read_bytes(), _header(1), source="test")
    assert sync == ["COMMIT"]
    sync.clear()
    assert store.claim() is not None
    assert sync == ["PRAGMA synchronous=NORMAL", "COMMIT", "PRAGMA synchronous=FULL"]
    with pytest.raises(RuntimeError), store.transaction(durable=False):
        raise RuntimeError("a failed claim is rolled back")
    assert store.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_bad_database_urls(tmp_path):
    with pytest.raises(StoreError, match="only postgresql"):
        Store(tmp_path / "d", "mysql://x/y")
    with pytest.raises(StoreError, match="not a usable database") as err:
        Store(tmp_path / "d", "postgresql://u:secret@127.0.0.1:9/db")
    assert "secret" not in str(err.value)


def test_gateway_on_postgresql(tmp_path, postgres_url):
    import subprocess

    from pydicom.uid import generate_uid

    from radguard.dicom.io import read_dataset, write_dataset
    from radguard.gateway import Gateway, GatewayConfig
    from tests.conftest import dcmtk_tool

    ds = read_dataset(NIH_DX)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_dataset(ds, tmp_path / "a.dcm")
    config = GatewayConfig(data_dir=str(tmp_path / "data"), db_url=fresh_database(postgres_url),
                           dicom_port=0,
                           http_port=0).validate()
    gateway = Gateway(config)
    gateway.start()
    try:
        sent = subprocess.run([dcmtk_tool("storescu"), "-aec", "RADGUARD", "127.0.0.1",
                               str(gateway.dicom.port), str(tmp_path / "a.dcm")],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert gateway.wait_idle(120)
        row = gateway.store.instances("sop_uid=?", (str(ds.SOPInstanceUID),))[0]
        assert row.state == "done" and row.processed_at
    finally:
        gateway.stop()


def test_a_superseded_copy_is_never_forwarded(store):
    """Second review M4: releasing a conflicting copy rejects the others, those being checked
    included, but the worker forwarded before it recorded its result (which then matched no
    row), so the copy the admin replaced still reached the PACS. A checked copy now becomes
    ``forwarding`` only if it is still ``processing``; while it is being sent, a release
    that would supersede it is refused (the PACS gets the admin's choice last); a crash or
    a failed send puts a forwarding copy back in the queue."""
    first = store.ingest(b"first copy", _header(7), source="dimse")
    second = store.ingest(b"other bytes", _header(7), source="dimse")
    assert store.get(second).duplicate_of == first
    checked, duplicate = store.claim(), store.claim()
    assert (checked.id, duplicate.id) == (first, second)
    store.finish(second, state="quarantined", verdict="conflict", trust="unknown", details={})
    # the admin releases the new copy while the first is being checked: not forwarded after
    store.decide(second, "done", "boss", "the new copy is right")
    assert store.get(first).state == "rejected"
    assert store.start_forwarding(checked) is False
    assert store.finish(first, state="done", verdict="clean", trust="unsigned",
                        details={}) is False
    assert store.get(first).state == "rejected"
    # a copy being sent cannot be superseded; it can once it is sent
    third = store.ingest(b"third bytes", _header(8), source="dimse")
    fourth = store.ingest(b"fourth bytes", _header(8), source="dimse")
    sending, conflicting = store.claim(), store.claim()
    assert (sending.id, conflicting.id) == (third, fourth)
    store.finish(fourth, state="quarantined", verdict="conflict", trust="unknown", details={})
    assert store.start_forwarding(sending) is True
    assert store.get(third).state == "forwarding"
    assert store.counts() == {"done": 1, "rejected": 1, "forwarding": 1, "quarantined": 1}
    with pytest.raises(StoreError, match="being sent to the PACS"):
        store.decide(fourth, "done", "boss", "too early")
    assert store.get(fourth).state == "quarantined"  # the refused release changed nothing
    store.requeue(third)  # the PACS was unreachable
    assert store.get(third).state == "queued"
    assert store.claim().id == third and store.start_forwarding(store.get(third))
    assert store.recover()["requeued"] == 1  # a crash while sending
    assert store.claim().id == third and store.start_forwarding(store.get(third))
    assert store.finish(third, state="done", verdict="clean", trust="unsigned", details={})
    released = store.decide(fourth, "done", "boss", "after it was sent")
    assert released.state == "done" and store.get(third).state == "rejected"


def test_calibration_scores_on_both_backends(store):
    """Migration 4: per-source known-real scores, each image once, read back exactly (double
    precision on PostgreSQL too), the oldest beyond the window pruned."""
    from radguard.forensics.calibration import CalibrationPolicy, SourceScores

    book = SourceScores(store, CalibrationPolicy(target=0.2, provisional=0.4, window=10))
    score = 0.123456789012345
    for i in range(14):
        assert book.record("DX_A", {"synthetic": score + i, "local_edit": 0.5}, item=f"h{i}",
                           origin="signature") == 2
    assert book.record("DX_A", {"synthetic": 9.0}, item="h0", origin="signature") == 0
    assert book.scores("DX_A")["synthetic"][0] == score + 4  # the 10 most recent, exactly
    assert book.point("DX_A").status == "calibrated"
    assert book.prune("DX_A") == 8
    assert book.counts() == {"DX_A": {"synthetic": 10, "local_edit": 10}}
    # held for review: recorded, not counted, not pruned; accepted, it counts
    assert book.record("DX_A", {"synthetic": 50.0}, item="odd", origin="signature",
                       held=True) == 1
    assert book.counts()["DX_A"]["synthetic"] == 10 and book.scores("DX_A")["synthetic"].max() < 50
    assert book.prune("DX_A") == 0
    assert [(h["item"], h["origin"], h["scores"]) for h in book.held()] == [
        ("odd", "signature", {"synthetic": 50.0})]
    assert book.accept("DX_A", "odd") == 1 and book.held() == []
    assert book.scores("DX_A")["synthetic"][-1] == 50.0
    assert book.record("DX_A", {"local_edit": 1.0}, item="x", origin="watermark", held=True)
    assert book.discard("DX_A", "x") == 1 and book.held("DX_A") == []


# -- several gateways on one PostgreSQL (issue 29) ---------------------------------------------

@pytest.fixture()
def pg(postgres_url):
    return fresh_database(postgres_url)


def _wait_lease(store: Store, row: int) -> None:
    """Until the database's clock has passed the row's lease."""
    import time

    until = store.execute("SELECT lease_until FROM instances WHERE id=?", (row,)).fetchone()[0]
    while store.now() <= until:
        time.sleep(0.05)


def test_a_dead_gateways_claims_are_reclaimed_after_its_lease(tmp_path, pg):
    """Gateway a claims and dies (no heartbeat). b's heartbeat extends only its own claims
    and, once a's lease is over, puts a's back in the queue; b processes it; a's late
    result (it was only slow) is refused, and a's forwarding is too."""
    shared = tmp_path / "objects"
    a = Store(tmp_path / "a", pg, gateway_id="a", objects_dir=shared, lease_seconds=2)
    b = Store(tmp_path / "b", pg, gateway_id="b", objects_dir=shared, lease_seconds=2)
    first = a.ingest(b"one", _header(1), source="dimse")
    second = b.ingest(b"two", _header(2), source="dimse")
    mine, theirs = a.claim(), b.claim()
    assert (mine.id, theirs.id) == (first, second)
    row = a.execute("SELECT owner, lease_until - ? FROM instances WHERE id=?",
                    (a.now(), first)).fetchone()
    assert row[0] == "a" and 1.0 < row[1] <= 2.0 * 3 / 4  # reclaimed within lease_seconds
    assert b.heartbeat() == {"extended": 1, "reclaimed": 0}  # b's own claim only
    _wait_lease(a, first)
    assert b.heartbeat() == {"extended": 1, "reclaimed": 1}  # a's, not b's (just extended)
    assert b.get(first).state == "queued" and b.get(second).state == "processing"
    again = b.claim()
    assert again.id == first and again.attempts == 2
    assert a.start_forwarding(mine) is False  # a no longer owns it
    assert a.finish(first, state="done", verdict="authentic", trust="unsigned",
                    details={}) is False
    a.requeue(first)  # a's requeue of a claim it lost changes nothing
    assert b.get(first).state == "processing"
    assert b.finish(first, state="done", verdict="authentic", trust="unsigned", details={})
    assert b.get(first).state == "done"
    # a claim no worker holds (its commit reached the server, the answer was lost): the
    # heartbeat extends only what the workers hold, so it lapses and is taken over
    third = b.ingest(b"three", _header(3), source="dimse")
    lost = b.claim()
    assert lost.id == third
    assert b.heartbeat(held={second}) == {"extended": 1, "reclaimed": 0}
    _wait_lease(b, third)
    assert b.heartbeat(held={second}) == {"extended": 1, "reclaimed": 1}
    assert b.get(third).state == "queued"
    a.close()
    b.close()


def test_recovery_touches_only_the_gateways_own_work(tmp_path, pg):
    """Start-up recovery of gateway a requeues a's claims, not b's; it deletes neither b's
    spooled objects (each gateway spools in its own data folder) nor any object a row
    references, nor a fresh unreferenced one (b may be about to commit its row)."""
    shared = tmp_path / "objects"
    a = Store(tmp_path / "a", pg, gateway_id="a", objects_dir=shared)
    b = Store(tmp_path / "b", pg, gateway_id="b", objects_dir=shared)
    ids = [a.ingest(f"object {n}".encode(), _header(n), source="dimse") for n in range(4)]
    claims = [a.claim(), b.claim(), b.claim()]
    assert [c.id for c in claims] == ids[:3]
    (b.incoming / "arriving.dcm").write_bytes(b"half")
    fresh = shared / "ab" / ("ab" + "0" * 62 + ".dcm")
    fresh.parent.mkdir(parents=True, exist_ok=True)
    fresh.write_bytes(b"written by b, row not yet committed")
    assert a.recover() == {"requeued": 1, "orphans_removed": 0, "spooled_removed": 0}
    assert [a.get(i).state for i in ids] == ["queued", "processing", "processing", "queued"]
    assert (b.incoming / "arriving.dcm").exists() and fresh.exists()
    assert all(a.file(a.get(i)).exists() for i in ids)
    # an hour later the orphan is swept, the referenced objects are not
    import os

    old = fresh.stat().st_mtime - 7200
    for path in [fresh, *(a.file(a.get(i)) for i in ids)]:
        os.utime(path, (old, old))
    assert a.sweep() == 1 and not fresh.exists()
    assert all(a.file(a.get(i)).read_bytes() == f"object {n}".encode()
               for n, i in enumerate(ids))
    a.close()
    b.close()


def test_objects_in_the_database(tmp_path, pg):
    """objects = "database": the bytes go in with the row (one transaction), any gateway
    reads them through its own cache, large ones in chunks, checked against their hash; a
    spooled object becomes the cached copy; a cache beyond its size is trimmed, never a
    copy just used."""
    import os

    from radguard.gateway.objects import CHUNK

    a = Store(tmp_path / "a", pg, gateway_id="a", objects="database", cache_mb=1)
    b = Store(tmp_path / "b", pg, gateway_id="b", objects="database", cache_mb=1)
    big = os.urandom(2 * CHUNK + 5)
    spool = a.incoming / "spooled"
    spool.write_bytes(big)
    first = a.ingest(spool, _header(1), source="dimse")
    small = a.ingest(b"small", _header(2), source="stow")
    assert not spool.exists() and a.file(a.get(first)).read_bytes() == big  # the cached spool
    assert b.execute("SELECT COUNT(*) FROM objects").fetchone()[0] == 4  # 3 chunks + 1
    assert not (tmp_path / "a" / "objects").exists() or not any(
        (tmp_path / "a" / "objects").rglob("*.dcm"))
    got = b.file(b.get(first))
    assert got.is_relative_to(tmp_path / "b" / "cache") and got.read_bytes() == big
    assert b.file(b.get(small)).read_bytes() == b"small"
    # a corrupted row is found out, not served
    b.execute("UPDATE objects SET data=? WHERE sha256=? AND chunk=1",
              (b"x" * CHUNK, b.get(first).sha256))
    got.unlink()
    with pytest.raises(OSError, match="does not match its SHA-256"):
        b.file(b.get(first))
    # the cache: 2 MiB of copies in a 1 MiB cache; the old one goes, the fresh one stays
    old = b.file(b.get(small))
    past = old.stat().st_mtime - 3600
    os.utime(old, (past, past))
    (b.root / "cache" / "ff").mkdir(exist_ok=True)
    recent = b.root / "cache" / "ff" / ("ff" * 32 + ".dcm")
    recent.write_bytes(big)
    assert b.sweep() == 1 and not old.exists() and recent.exists()
    assert b.file(b.get(small)).read_bytes() == b"small"  # fetched again
    with pytest.raises(StoreError, match="needs a PostgreSQL"):
        Store(tmp_path / "c", objects="database")
    a.close()
    b.close()


def test_a_gateway_that_cannot_read_the_others_objects_is_refused(tmp_path, pg):
    """The documented mistake of issue 29: one data folder per gateway on a shared
    database. The second gateway would claim instances whose files are on the other's disk;
    it is refused at start with what to do. Two gateways cannot share one id either."""
    a = Store(tmp_path / "a", pg, gateway_id="a")
    a.register(host="h", pid=1, version="t")
    b = Store(tmp_path / "b", pg, gateway_id="b")
    with pytest.raises(StoreError, match="every gateway must read every other's objects"):
        b.register(host="h", pid=2, version="t")
    shared = Store(tmp_path / "c", pg, gateway_id="c", objects_dir=tmp_path / "a" / "objects")
    shared.register(host="h", pid=3, version="t")  # the same folder: fine
    twin = Store(tmp_path / "d", pg, gateway_id="a", objects_dir=tmp_path / "a" / "objects",
                 lease_seconds=2)
    stop = threading.Event()

    def beat() -> None:  # a lives on (another host: its process cannot be looked at)
        while not stop.wait(0.3):
            a.heartbeat()

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(StoreError, match="in use by a running gateway"):
            twin.register(host="h2", pid=4, version="t")  # waited two leases in vain
        a.register(host="h", pid=1, version="t")  # the same process again: fine
    finally:
        stop.set()
        beating.join()
    # a gateway killed on this host (its process is gone) restarts under its id at once
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    a.register(host=here, pid=dead.pid, version="t")
    twin.register(host=here, pid=os.getpid(), version="t")
    assert [(g["id"], g["pid"]) for g in a.gateways()] == [("a", os.getpid()), ("c", 3)]
    db = Store(tmp_path / "e", pg, gateway_id="e", objects="database")
    with pytest.raises(StoreError, match="keep instance files in object folder"):
        db.register(host="h", pid=5, version="t")
    for s in (a, b, shared, twin, db):
        s.close()


def test_the_pool_bounds_connections_and_survives_a_lost_connection(tmp_path, pg):
    """Sixteen threads share a pool of three connections (PostgreSQL sees three, not
    sixteen); a connection the server kills is replaced, and the statement after works."""
    import psycopg

    store = Store(tmp_path / "a", pg, gateway_id="pooled", pool_size=3)
    for n in range(40):
        store.ingest(f"o{n}".encode(), _header(n), source="dimse")
    seen: list[int] = []

    def work() -> None:
        while (inst := store.claim()) is not None:
            store.finish(inst.id, state="done", verdict="authentic", trust="unsigned",
                         details={})
            seen.append(int(store.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name=?",
                ("radguard pooled",)).fetchone()[0]))

    from radguard.governance.auditlog import DatabaseAuditLog

    audit = DatabaseAuditLog(pg, gateway="pooled", connections=store.connection)

    def audited() -> None:  # the audit log borrows from the same pool: still three
        for n in range(10):
            audit.append("study.read", f"1.2.{n}")

    threads = [threading.Thread(target=work) for _ in range(16)] + \
        [threading.Thread(target=audited) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert store.counts() == {"done": 40} and max(seen) <= 3
    assert audit.verify().intact and audit.head()["entries"] == 40
    with psycopg.connect(pg, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                      "application_name='radguard pooled'")
    assert store.counts() == {"done": 40}  # checked on checkout: a fresh connection
    store.close()


def test_a_claim_is_fenced_by_its_attempt(tmp_path, pg):
    """Review of issue 29: a worker whose claim lapsed and was claimed again by another
    worker of the same gateway must not finish, forward or requeue the new claim."""
    store = Store(tmp_path / "a", pg, gateway_id="a", lease_seconds=2)
    row = store.ingest(b"one", _header(1), source="dimse")
    old = store.claim()
    store.heartbeat(held=set())  # the worker's claim is not extended...
    _wait_lease(store, row)
    assert store.heartbeat(held=set())["reclaimed"] == 1  # ...and lapses
    new = store.claim()
    assert (new.id, new.attempts) == (row, old.attempts + 1)
    assert store.start_forwarding(old) is False
    store.requeue(row, old.attempts)
    assert store.finish(row, state="done", verdict="authentic", trust="unsigned", details={},
                        attempt=old.attempts) is False
    assert store.get(row).state == "processing"
    assert store.finish(row, state="done", verdict="authentic", trust="unsigned", details={},
                        attempt=new.attempts) is True
    store.close()


def test_text_with_nul_and_a_busy_pool_are_no_store_failure(tmp_path, pg):
    """Review of issue 29: a NUL in a sender's text (PostgreSQL's text holds none) is
    stored, not a store outage; every connection busy is load: the statement fails
    (PoolBusy), the store's health stays good and /health's ping says busy, not down."""
    from radguard.gateway.store import PoolBusy

    store = Store(tmp_path / "a", pg, gateway_id="a", pool_size=2)
    row = store.ingest(b"nul", {**_header(1), "patient_name": "Doe\x00^Jane"}, source="dimse")
    assert store.get(row).patient_name == "Doe\ufffd^Jane"
    held = [store.connection() for _ in range(2)]
    for lent in held:
        lent.__enter__()
    try:
        with pytest.raises(PoolBusy):
            store.ping(wait=0.5)
        with pytest.raises(PoolBusy):
            store.ingest(b"more", _header(2), source="dimse")
        assert store.health.problem is None
    finally:
        for lent in held:
            lent.__exit__(None, None, None)
    assert store.ingest(b"more", _header(2), source="dimse") > row
    store.close()
