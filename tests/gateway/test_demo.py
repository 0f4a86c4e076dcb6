"""`radguard demo` (the README's main command) on free ports, exiting after the batch."""

from __future__ import annotations

from click.testing import CliRunner

from radguard.cli import main


def test_demo_routes_every_image_as_the_policy_says(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "demo"),
                                       "--no-wait", "--dicom-port", "0", "--http-port", "0"])
    assert result.exit_code == 0, result.output
    assert "every image landed where the policy says" in result.output
    assert "worklist: http://127.0.0.1:" in result.output
    assert result.output.count(" done ") == 5 and "rejected" in result.output
    from radguard.governance.auditlog import AuditLog

    assert AuditLog(tmp_path / "demo" / "data" / "audit.jsonl").verify().intact
