"""The store on both backends: the embedded SQLite default and a real PostgreSQL."""

from __future__ import annotations

import threading

import pytest

from radguard.gateway.auth import AuthError, Users
from radguard.gateway.store import MIGRATIONS, Store, StoreError
from tests.conftest import NIH_DX


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        yield Store(tmp_path / "data")
        return
    url = request.getfixturevalue("postgres_url")
    s = Store(tmp_path / "data", url)
    s.execute("DELETE FROM instances")
    s.execute("DELETE FROM tokens")
    s.execute("DELETE FROM users")
    s.execute("DELETE FROM calibration_scores")
    yield s


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
    assert store.schema_version == len(MIGRATIONS) == 5


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
    config = GatewayConfig(data_dir=str(tmp_path / "data"), db_url=postgres_url, dicom_port=0,
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
