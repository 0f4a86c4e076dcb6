"""The hash-chained audit log: appends, and detection of every kind of tampering."""

from __future__ import annotations

import json
import multiprocessing

from click.testing import CliRunner

from radguard.cli import main
from radguard.governance.auditlog import AuditLog


def _log(tmp_path, n: int = 5) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", actor="alice")
    for i in range(n):
        log.append("study.read", f"1.2.3.{i}", {"n": i})
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines(keepends=True)


def test_appends_chain_and_verify(tmp_path):
    log = _log(tmp_path)
    report = log.verify()
    assert report.intact and report.entries == 5
    entries = list(log.entries())
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[1].prev == entries[0].hash and entries[0].actor == "alice"
    assert log.verify(expect_head=report.head).intact


def test_edit_is_detected(tmp_path):
    log = _log(tmp_path)
    lines = _lines(log)
    lines[2] = lines[2].replace('"n":2', '"n":7')
    log.path.write_text("".join(lines))
    report = log.verify()
    assert not report.intact and "edited" in " ".join(report.problems)


def test_edit_with_recomputed_hash_breaks_the_chain(tmp_path):
    from radguard.governance.auditlog import _entry_hash

    log = _log(tmp_path)
    lines = _lines(log)
    record = json.loads(lines[1])
    record["actor"] = "mallory"
    record["hash"] = _entry_hash(record)
    lines[1] = json.dumps(record) + "\n"
    log.path.write_text("".join(lines))
    problems = " ".join(log.verify().problems)
    assert "chain broken" in problems


def test_deletion_insertion_reordering_truncation(tmp_path):
    log = _log(tmp_path)
    original = _lines(log)
    for tampered in (original[:2] + original[3:],                # deletion
                     original[:2] + [original[1]] + original[2:],  # insertion (replay)
                     [original[1], original[0]] + original[2:],    # reordering
                     original[:4]):                                # truncation at the end
        log.path.write_text("".join(tampered))
        assert not log.verify().intact, tampered
    log.path.write_text("".join(original))
    assert log.verify().intact
    head = log.verify().head
    log.path.write_text("".join(original[:4]))
    log.head_path.write_text(json.dumps({"entries": 4, "head": json.loads(original[3])["hash"]}))
    assert log.verify().intact  # log and head rewritten together: only an outside head tells
    assert not log.verify(expect_head=head).intact
    log.path.unlink()
    assert not log.verify().intact  # a deleted log with its head left behind


def test_garbage_line_is_reported(tmp_path):
    log = _log(tmp_path)
    with log.path.open("a") as fh:
        fh.write("not json\n")
    assert "not a valid audit entry" in " ".join(log.verify().problems)


def _append_many(path: str, who: str) -> None:
    log = AuditLog(path, actor=who)
    for i in range(25):
        log.append("study.read", str(i))


def test_concurrent_appenders_keep_one_chain(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(path, w))
             for w in ("a", "b", "c")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    report = AuditLog(path).verify()
    assert report.intact and report.entries == 75


def test_cli_audit_verify_and_show(tmp_path):
    log = _log(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", "--log", str(log.path)])
    assert ok.exit_code == 0 and "intact, 5 entries" in ok.output
    shown = runner.invoke(main, ["audit", "show", "--log", str(log.path), "--last", "2"])
    assert shown.exit_code == 0 and shown.output.count("study.read") == 2
    lines = _lines(log)
    log.path.write_text("".join(lines[:1] + lines[2:]))
    bad = runner.invoke(main, ["audit", "verify", "--log", str(log.path), "--json"])
    assert bad.exit_code == 1 and json.loads(bad.output)["intact"] is False


def test_recent_reads_only_the_tail(tmp_path):
    log = _log(tmp_path, 30)
    log.append("monitoring.alarm", "site/drift", {})
    assert [e.seq for e in log.recent(3)] == [29, 30, 31]
    assert [e.action for e in log.recent(5, ("monitoring.alarm",))] == ["monitoring.alarm"]
    small = log.recent(100, window=600)  # a window that cuts into the middle of a line
    assert small and small[-1].seq == 31 and all(e.seq > 20 for e in small)
    assert AuditLog(tmp_path / "none.jsonl").recent() == []
