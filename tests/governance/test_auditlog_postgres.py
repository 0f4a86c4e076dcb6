"""The audit chain in PostgreSQL (several gateways, one chain): concurrent appends from two
processes, detection of edited and deleted rows, the CLI, a server that is away."""

from __future__ import annotations

import json
import multiprocessing

import pytest
from click.testing import CliRunner

from radguard.cli import main
from radguard.governance.auditlog import AuditLog, AuditLogError, DatabaseAuditLog
from tests.governance.pgdb import fresh_database, run_sql

PER_PROCESS = 200


def _append_many(url: str, gateway: str, ready: object) -> None:
    """A gateway process: once the other one is ready too, append as fast as it can."""
    log = DatabaseAuditLog(url, actor="radguard-gateway", gateway=gateway)
    log.recent(1)  # connected, tables made: both start appending at the same moment
    ready.wait(60)  # type: ignore[attr-defined]
    for i in range(PER_PROCESS):
        log.append("study.read", f"1.2.3.{i}", {"n": i, "by": gateway})
    log.close()


@pytest.fixture()
def db(postgres_url) -> str:
    return fresh_database(postgres_url)


def _appended(url: str, n: int = 5, gateway: str = "gw-1") -> DatabaseAuditLog:
    log = DatabaseAuditLog(url, actor="alice", gateway=gateway)
    for i in range(n):
        log.append("study.read", f"1.2.3.{i}", {"n": i})
    return log


def test_two_processes_append_one_chain_then_tampering_is_found(db):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(db, name, ready))
             for name in ("gw-a", "gw-b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]

    log = DatabaseAuditLog(db)
    report = log.verify()
    assert report.intact, report.problems
    assert report.entries == 2 * PER_PROCESS
    entries = list(log.entries())
    assert [e.seq for e in entries] == list(range(1, 2 * PER_PROCESS + 1))
    by = [e.gateway for e in entries]
    assert by.count("gw-a") == by.count("gw-b") == PER_PROCESS
    # they really ran side by side: the chain switches between the gateways many times
    assert sum(a != b for a, b in zip(by, by[1:], strict=False)) > 10
    assert log.head() == {"entries": 2 * PER_PROCESS, "head": entries[-1].hash}

    # an edited row is named by its entry
    (original,) = run_sql(db, "SELECT details FROM radguard_audit WHERE seq = 123")[0]
    run_sql(db, "UPDATE radguard_audit SET details = %s WHERE seq = 123", ('{"n":999}',))
    problems = log.verify().problems
    assert problems == ["row 123 (entry 123): content was edited after it was written"]
    run_sql(db, "UPDATE radguard_audit SET details = %s WHERE seq = 123", (original,))
    assert log.verify().intact

    # so is the gateway's name: it is part of the hash
    run_sql(db, "UPDATE radguard_audit SET gateway = 'gw-x' WHERE seq = 7")
    assert any("(entry 7): content was edited" in p for p in log.verify().problems)
    run_sql(db, "UPDATE radguard_audit SET gateway = %s WHERE seq = 7", (entries[6].gateway,))
    assert log.verify().intact

    # a deleted row breaks the sequence and the chain where it was
    run_sql(db, "DELETE FROM radguard_audit WHERE seq = 200")
    report = log.verify()
    assert not report.intact and report.entries == 2 * PER_PROCESS - 1
    assert "row 200: sequence 201 where 200 was expected" in report.problems[0]
    assert "row 200 (entry 201): does not follow the previous entry" in report.problems[1]


def test_rows_cut_off_the_end_and_a_wiped_table_are_found(db):
    log = _appended(db, 5)
    assert log.verify().intact
    run_sql(db, "DELETE FROM radguard_audit WHERE seq = 5")
    problems = log.verify().problems
    assert problems == ["the log ends at entry 4 but its head record records 5 entries "
                        "(entries were removed from the end or the log was replaced)"]
    run_sql(db, "DELETE FROM radguard_audit")
    run_sql(db, "DELETE FROM radguard_audit_head")
    report = log.verify()
    assert not report.intact and "empty and has no head record" in report.problems[0]
    assert log.verify(new=True).intact  # ... unless nothing was ever logged there


def test_cli_verify_show_head_on_the_database(db):
    log = _appended(db, 6)
    # a password in the URL never reaches the output (trust authentication ignores it)
    url = db.replace("radguard@", "radguard:s3cret@")
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", "--db-url", url])
    assert ok.exit_code == 0, ok.output
    assert "intact, 6 entries" in ok.output and "s3cret" not in ok.output
    head = runner.invoke(main, ["audit", "head"], env={"RADGUARD_AUDIT_DB_URL": url})
    assert head.exit_code == 0 and head.output.startswith(log.head()["head"])
    shown = runner.invoke(main, ["audit", "show", "--db-url", url, "--last", "2"])
    assert shown.exit_code == 0 and shown.output.count("alice@gw-1") == 2

    run_sql(db, "UPDATE radguard_audit SET details = '{\"n\":42}' WHERE seq = 3")
    bad = runner.invoke(main, ["audit", "verify", "--db-url", url])
    assert bad.exit_code == 1
    assert "TAMPERED" in bad.output and "(entry 3): content was edited" in bad.output
    as_json = runner.invoke(main, ["audit", "verify", "--db-url", url, "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.output)["intact"] is False

    both = runner.invoke(main, ["audit", "verify", "--db-url", url, "--log", "x.jsonl"])
    assert both.exit_code == 2 and "give one" in both.output


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    url = "postgresql://radguard:s3cret@127.0.0.1:9/radguard"  # nothing listens on port 9
    log = DatabaseAuditLog(url, gateway="gw-1", connect_timeout=3)
    with pytest.raises(AuditLogError, match="cannot reach the audit database") as caught:
        log.append("study.read", "1.2.3")
    assert "127.0.0.1:9" in str(caught.value) and "s3cret" not in str(caught.value)
    with pytest.raises(AuditLogError, match="cannot reach"):
        log.verify()
    result = CliRunner().invoke(main, ["audit", "verify", "--db-url", url])
    assert result.exit_code == 2
    assert "cannot reach the audit database" in result.output
    assert "Traceback" not in result.output and "s3cret" not in result.output
    with pytest.raises(AuditLogError, match="postgresql://"):
        DatabaseAuditLog(str(tmp_path / "audit.db"))


def test_recent_and_odd_values(db):
    log = _appended(db, 30)
    log.append("monitoring.alarm", "site/drift", {"p": 0.1, "path": tmp_path_like()})
    log.append("study.read", "a\x00b")  # PostgreSQL text holds no NUL: stored as U+FFFD
    assert [e.seq for e in log.recent(3)] == [30, 31, 32]
    (alarm,) = log.recent(5, ("monitoring.alarm",))
    assert alarm.seq == 31 and alarm.details == {"p": 0.1, "path": "/tmp/x"}
    assert log.recent(1)[0].target == "a\ufffdb"
    assert log.verify().intact


def tmp_path_like() -> object:
    """A value JSON cannot hold as such (logged as its text, as in the file log)."""
    from pathlib import PurePosixPath

    return PurePosixPath("/tmp/x")


def _wait_ready(url: str) -> None:
    """Until the server accepts connections (pg_ctl may return a moment before, under load)."""
    import time

    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg.connect(url, connect_timeout=5).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_connections_survive_a_server_restart(tmp_path):
    """Idle connections the server dropped are replaced, not reported as errors."""
    from tests.conftest import running_postgres

    with running_postgres() as server:
        log = _appended(server.url(), 2)
        server.restart()
        _wait_ready(server.url())  # (the idle connections are dropped all the same)
        log.append("study.read", "after the restart")
        assert log.verify().intact and log.head()["entries"] == 3
        server.stop()
        with pytest.raises(AuditLogError, match="cannot reach"):
            log.append("study.read", "while it is down")
        server.start()
        _wait_ready(server.url())
        log.append("study.read", "back")
        assert log.verify().entries == 4


def test_file_entries_with_and_without_a_gateway_verify(tmp_path):
    """Existing logs (entries without a gateway) go on verifying when gateways are named."""
    path = tmp_path / "audit.jsonl"
    AuditLog(path, actor="alice").append("study.read", "old")
    named = AuditLog(path, actor="alice", gateway="gw-2")
    named.append("study.read", "new")
    old, new = named.entries()
    assert old.gateway is None and "gateway" not in old.to_dict() and new.gateway == "gw-2"
    assert named.verify().intact
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1].replace('"gw-2"', '"gw-3"'))
    assert "(entry 2): content was edited" in " ".join(named.verify().problems)
