"""State several gateways on one PostgreSQL database share (issue 29): the bulk-read counts
and their once-per-window alarm. (The audit chain and the drift monitor in PostgreSQL are
tested in tests/governance/test_auditlog_postgres.py and
tests/monitoring/test_monitor_postgres.py.)"""

from __future__ import annotations

import logging
import threading

import pytest

from radguard.dicom.web import DicomWebClient
from radguard.gateway.store import Store
from radguard.gateway.web import _BulkReads
from tests.gateway.conftest import web_gateway
from tests.gateway.test_web import _instance
from tests.governance.pgdb import fresh_database


@pytest.fixture()
def two_stores(postgres_url, tmp_path):
    """Two gateways' stores (each its own data folder) on one fresh database."""
    url = fresh_database(postgres_url)
    stores = [Store(tmp_path / "gw1", url), Store(tmp_path / "gw2", url)]
    yield stores
    for store in stores:
        store.close()


def test_gateways_count_bulk_reads_together(two_stores):
    first, second = (_BulkReads(store, 10) for store in two_stores)
    raised = [first.add("rad", 1) for _ in range(6)]
    raised += [second.add("rad", 1) for _ in range(6)]
    # 6 + 6 > 10: one alarm in all, on the 11th read (each alone would never alarm)
    assert raised == [False] * 10 + [True, False]
    assert not any(first.add("rad", 50) or second.add("rad", 5) for _ in range(3))
    assert not second.add("boss", 10) and second.add("boss", 1)  # counted per user


def test_gateways_reading_at_once_raise_one_alarm(two_stores):
    bulks = [_BulkReads(store, 10) for store in two_stores]
    raised: list[bool] = []
    start = threading.Barrier(2)

    def read(bulk: _BulkReads) -> None:
        start.wait(30)
        for _ in range(30):
            raised.append(bulk.add("rad", 1))

    threads = [threading.Thread(target=read, args=(bulk,)) for bulk in bulks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(raised) == 60 and raised.count(True) == 1
    total = two_stores[0].execute("SELECT SUM(count) FROM bulk_reads WHERE name = 'rad'")
    assert total.fetchone()[0] == 60  # no count lost either


def test_the_window_slides_and_old_counts_are_deleted(two_stores):
    store = two_stores[0]
    bulk = _BulkReads(store, 10)
    now = store.now()
    with store.transaction():  # reads and an alarm from eleven minutes ago
        store.execute("INSERT INTO bulk_reads (name, at, count) VALUES ('rad', ?, 100)",
                      (now - 660,))
        store.execute("INSERT INTO bulk_alarms (name, at) VALUES ('rad', ?)", (now - 660,))
    assert not bulk.add("rad", 10)  # the old reads are out of the window
    # the first add purged what left the window
    assert store.execute("SELECT COUNT(*) FROM bulk_reads").fetchone()[0] == 1
    assert store.execute("SELECT COUNT(*) FROM bulk_alarms").fetchone()[0] == 0
    assert bulk.add("rad", 1)  # and the old alarm no longer silences a new one
    with store.transaction():  # the alarm, ten minutes on: the next crossing alarms again
        store.execute("UPDATE bulk_alarms SET at = at - 601")
        store.execute("UPDATE bulk_reads SET at = at - 601")
    assert not bulk.add("rad", 10) and bulk.add("rad", 1)


def test_one_gateway_on_sqlite_still_alarms(tmp_path):
    store = Store(tmp_path / "data")
    bulk = _BulkReads(store, 10)
    assert [bulk.add("rad", 1) for _ in range(12)] == [False] * 10 + [True, False]
    assert [bulk.add("rad", 5) for _ in range(3)] == [False] * 3  # once per window
    store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_store_that_cannot_count_lets_the_read_through(backend, tmp_path, request, caplog):
    url = fresh_database(request.getfixturevalue("postgres_url")) \
        if backend == "postgresql" else None
    store = Store(tmp_path / "data", url)
    bulk = _BulkReads(store, 1)
    store.execute("DROP TABLE bulk_reads")  # every count now fails in the database
    with caplog.at_level(logging.ERROR, logger="radguard.gateway"):
        assert bulk.add("rad", 5) is False
    assert any(r.levelno == logging.ERROR and "read allowed uncounted" in r.getMessage()
               for r in caplog.records)
    with store.transaction():  # the connection is usable again afterwards
        store.execute("SELECT 1")
    store.close()


def test_a_retrieval_is_not_a_server_error_when_counting_fails(tmp_path, caplog):
    gw = web_gateway(tmp_path / "data", bulk_read_limit=1)
    try:
        root = f"http://127.0.0.1:{gw.http_port}/dicom-web/"
        DicomWebClient(root, token=gw.tokens["tech"]).store([_instance(tmp_path, "a.dcm")])
        assert gw.wait_idle(60)
        gw.store.execute("DROP TABLE bulk_reads")
        reader = DicomWebClient(root, token=gw.tokens["rad"])
        ref = next(iter(reader.search_instances()))
        with caplog.at_level(logging.ERROR, logger="radguard.gateway"):
            for _ in range(3):
                assert reader.retrieve(ref)  # 200 with the instance, though uncounted
    finally:
        gw.stop()
    assert [e for e in gw.audit_log.entries() if e.action == "alarm.bulk_read"] == []
    assert sum("read allowed uncounted" in r.getMessage() for r in caplog.records) >= 3
