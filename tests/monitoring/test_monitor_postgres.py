"""The drift monitor's state in PostgreSQL: the same results as on SQLite, and several
gateways (Monitor objects, each with its own connection) observing into one database at once
lose no study and no CUSUM step."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from radguard.monitoring import Monitor, MonitorError
from tests.governance.pgdb import fresh_database, run_sql
from tests.monitoring.test_monitor import NAMES, _row


@pytest.fixture()
def db(postgres_url) -> str:
    return fresh_database(postgres_url)


def _fit(monitor: Monitor, *, metadata: bool = False) -> None:
    """The reference of tests/monitoring/test_monitor.py's ``fitted`` fixture (and, with
    ``metadata``, scanners as in its metadata test)."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (400, 3))
    scores = rng.uniform(0, 1, 400)
    labels = (rng.uniform(0, 1, 400) < scores).astype(int)
    meta = [{"Manufacturer": "GE", "ViewPosition": "PA" if i % 2 else "AP"}
            for i in range(400)] if metadata else None
    monitor.fit_reference(ref, NAMES, scores=scores, labels=labels, metadata=meta,
                          false_alarms_per=10_000)


def _stream(n: int = 260) -> list[tuple[str, dict[str, float], float, dict[str, str], int]]:
    """Studies: in control, then shifted, a new scanner part-way, labels turning against the
    model (drift, metadata and performance alarms all fire)."""
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        p = float(rng.uniform())
        truth = int(rng.uniform() < p)
        shift = 2.5 if 150 <= i < 190 else 0.0
        maker = "Acme" if i >= 100 else "GE"
        rows.append((f"s{i}", _row(rng.normal(shift, 1, 3)), p,
                     {"Manufacturer": maker, "ViewPosition": "PA"},
                     1 - truth if i >= 120 else truth))
    return rows


def _replay(monitors: list[Monitor], rows: list) -> list[object]:
    """Observe and label ``rows`` through ``monitors`` in turn; everything they answered."""
    answers: list[object] = []
    for i, (study, features, score, metadata, label) in enumerate(rows):
        monitor = monitors[i % len(monitors)]
        answers.append([a.to_dict() for a in monitor.observe(study, features, score=score,
                                                             metadata=metadata)])
        answers.append([a.to_dict() for a in monitors[-1 - i % len(monitors)].add_label(
            study, label)])
    return answers


def _without_ts(alarms: list[dict[str, object]]) -> list[dict[str, object]]:
    """Alarms or episodes without their times (the two replays ran at different ones)."""
    times = ("ts", "start_ts", "end_ts", "summary")
    return [{k: v for k, v in a.items() if k not in times} for a in alarms]


def _state(monitor: Monitor) -> list[tuple[object, ...]]:
    return [tuple(r) for r in monitor.db.execute(
        "SELECT site, detector, upper, lower, extra FROM cusum ORDER BY site, detector"
    ).fetchall()]


def test_postgresql_gives_the_same_results_as_sqlite(db, tmp_path):
    lite, pg = Monitor(tmp_path / "m.db"), Monitor(db)
    assert lite.path is not None and pg.path is None
    for monitor in (lite, pg):
        _fit(monitor, metadata=True)
    rows = _stream()
    expected = _replay([lite], rows[:200])
    assert _replay([pg], rows[:200]) == expected
    kinds = {a["detector"] for batch in expected for a in batch}  # type: ignore[union-attr]
    assert {"drift", "metadata"} < kinds and kinds & {"sensitivity", "specificity"}
    pg.close()
    pg = Monitor(db)  # a restart in the middle of the stream resumes where it stopped
    assert pg.seq == 200
    assert _replay([pg], rows[200:]) == _replay([lite], rows[200:])
    assert _without_ts(pg.alarms(500)) == _without_ts(lite.alarms(500))
    assert _state(pg) == _state(lite)
    status_pg, status_lite = pg.status(window=200), lite.status(window=200)
    status_pg["alarms"] = _without_ts(status_pg["alarms"])  # type: ignore[arg-type]
    status_lite["alarms"] = _without_ts(status_lite["alarms"])  # type: ignore[arg-type]
    status_pg["episodes"] = _without_ts(status_pg["episodes"])  # type: ignore[arg-type]
    status_lite["episodes"] = _without_ts(status_lite["episodes"])  # type: ignore[arg-type]
    assert status_pg == status_lite and status_pg["studies"] == 260
    with pytest.raises(MonitorError, match="already observed"):
        pg.observe("s3", rows[3][1], score=0.5)
    assert pg.add_label("nobody", 1) == []  # waits for its study
    with pytest.raises(MonitorError, match="different label waiting"):
        pg.add_label("nobody", 0)
    with pytest.raises(MonitorError, match="pg_dump"):
        pg.copy(tmp_path / "copy.db")
    # the monitor keeps its tables apart from the store's, in its own schema
    tables = run_sql(db, "SELECT table_name FROM information_schema.tables WHERE "
                         "table_schema = 'radguard_monitor' ORDER BY table_name")
    assert [t[0] for t in tables] == ["alarms", "categories", "cusum", "episodes", "meta",
                                      "pending_labels", "reference", "refs", "studies"]


def test_two_monitors_on_one_database_take_turns(db, tmp_path):
    """Interleaved: each study's number and CUSUM step continue from the other gateway's."""
    first = Monitor(db)
    _fit(first, metadata=True)
    second = Monitor(db)  # a second gateway, started after the reference was fitted
    lite = Monitor(tmp_path / "m.db")
    _fit(lite, metadata=True)
    rows = _stream(200)
    assert _replay([first, second], rows) == _replay([lite], rows)
    assert _state(first) == _state(lite)
    assert first.status()["studies"] == second.status()["studies"] == 200


def test_concurrent_monitors_lose_no_update(db, tmp_path):
    """Two gateways observe at the same time. Every study has the same features, so the
    drift state after n studies depends on n alone: any lost read-modify-write of the CUSUM
    (or a study number given twice) shows as a difference from observing them in turn."""
    setup = Monitor(db)
    _fit(setup)
    row, n = _row([0.9, -0.7, 0.8]), 240
    lite = Monitor(tmp_path / "m.db")
    _fit(lite)
    expected = sum((lite.observe(f"s{i}", row, score=0.3) for i in range(n)), [])
    assert expected  # the state crosses the threshold (and resets) on the way
    gateways = [Monitor(db), Monitor(db)]
    raised: list[list[object]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def observe(k: int) -> None:
        try:
            start.wait(30)
            for i in range(k, n, 2):
                raised[k] += gateways[k].observe(f"s{i}", row, score=0.3)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=observe, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    count, seqs, top = setup.db.execute(
        "SELECT COUNT(*), COUNT(DISTINCT seq), MAX(seq) FROM studies").fetchone()
    assert count == seqs == top == n
    assert _state(setup) == _state(lite)
    assert sorted(a.seq for a in raised[0] + raised[1]) == [a.seq for a in expected]


def test_an_unreachable_database_is_a_clear_error():
    with pytest.raises(MonitorError, match="cannot reach the monitoring database") as caught:
        Monitor("postgresql://radguard:s3cret@127.0.0.1:9/radguard")
    assert "127.0.0.1:9" in str(caught.value) and "s3cret" not in str(caught.value)


def test_a_server_restart_loses_no_study(tmp_path):
    """The connection the server dropped is replaced before anything was sent on it."""
    from tests.conftest import running_postgres
    from tests.governance.test_auditlog_postgres import _wait_ready

    with running_postgres() as server:
        monitor = Monitor(server.url())
        _fit(monitor)
        rows = _stream(4)
        monitor.observe(rows[0][0], rows[0][1], score=rows[0][2])
        server.restart()
        _wait_ready(server.url())
        monitor.observe(rows[1][0], rows[1][1], score=rows[1][2])  # a write first
        monitor.add_label(rows[1][0], 1)
        server.restart()
        _wait_ready(server.url())
        assert monitor.status()["studies"] == 2  # a read first
        server.stop()
        with pytest.raises(MonitorError, match="cannot reach the monitoring database"):
            monitor.observe(rows[2][0], rows[2][1], score=rows[2][2])
        server.start()
        _wait_ready(server.url())
        monitor.observe(rows[2][0], rows[2][1], score=rows[2][2])
        assert monitor.seq == 3
