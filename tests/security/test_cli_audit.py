"""Covering tracks and breaking outputs (issue 21 item 11, the CLI part).

An attacker who deletes the audit log together with its head file must not get "intact,
0 entries"; a log never written is accepted only when the operator says so (``--new``). A
command whose output cannot be written (no permission, not a folder, file too large) ends
with a one-line error and exit 2, not "internal error" (3), and leaves nothing half-written.
Read-only folders are made real for root by dropping CAP_DAC_OVERRIDE (setpriv), and "file too
large" by RLIMIT_FSIZE in the child process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from radguard.cli import main
from radguard.governance.auditlog import AuditLog
from tests.conftest import NIH_DX, SHARED

REPO = Path(__file__).resolve().parents[2]


def _radguard(*args: str | Path, limit_bytes: int | None = None, without_root_override: bool =
              False, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """The real command line in a child process (run from the checkout under test)."""
    command = [sys.executable, "-m", "radguard.cli", *map(str, args)]
    if without_root_override:  # root, but bound by file permissions like any user
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("setpriv (util-linux) not found")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]

    def limit() -> None:
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          preexec_fn=limit, timeout=300)


def _audit(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["audit", "verify", *map(str, args)])
    return result.exit_code, result.output


# -- audit verify ----------------------------------------------------------------------------

def test_deleting_the_log_and_its_head_is_not_an_intact_log(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", actor="alice")
    for i in range(3):
        log.append("study.read", f"1.2.3.{i}")
    assert _audit("--log", log.path)[0] == 0
    log.path.unlink()
    log.head_path.unlink()  # the attacker's clean-up
    code, output = _audit("--log", log.path)
    assert code == 1 and "MISSING, 0 entries" in output and "both were deleted" in output
    code, output = _audit("--log", log.path, "--json")
    report = json.loads(output)
    assert code == 1 and report["intact"] is False and report["missing"] is True
    assert not log.verify().intact and log.verify(new=True).intact


def test_a_log_that_is_new_is_accepted_only_when_said(tmp_path):
    path = tmp_path / "never-written.jsonl"
    assert _audit("--log", path)[0] == 1
    code, output = _audit("--log", path, "--new")
    assert code == 0 and "intact, 0 entries" in output
    path.write_bytes(b"")  # emptied: the same as deleted unless new
    code, output = _audit("--log", path)
    assert code == 1 and "TAMPERED" in output and "empty and has no head file" in output
    assert _audit("--log", path, "--new")[0] == 0
    log = AuditLog(path, actor="alice")
    log.append("study.read", "1.2.3")
    assert _audit("--log", path)[0] == 0
    log.head_path.unlink()  # --new never excuses a log with entries
    code, output = _audit("--log", path, "--new")
    assert code == 1 and "head file is missing" in output


def test_an_append_that_does_not_fit_leaves_no_half_entry(tmp_path):
    """File too large in the middle of an entry (a process with RLIMIT_FSIZE): the entry is
    taken back with a clear error, and the chain stays intact."""
    log = AuditLog(tmp_path / "audit.jsonl", actor="alice")
    log.append("study.read", "1.2.3")
    size = log.path.stat().st_size
    code = (
        "import sys\n"
        "from radguard.governance.auditlog import AuditLog, AuditLogError\n"
        f"log = AuditLog({str(log.path)!r}, actor='mallory')\n"
        "try:\n"
        "    log.append('study.read', 'x' * 400)\n"
        "except AuditLogError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(2)\n"
    )

    def limit() -> None:  # room for part of the entry only
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, size + 100))

    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           cwd=REPO, preexec_fn=limit, timeout=120)
    assert child.returncode == 2, child.stdout + child.stderr
    assert "cannot write audit entry (File too large); nothing was logged" in child.stdout
    assert log.path.stat().st_size == size
    report = log.verify()
    assert report.intact and report.entries == 1, report.problems


# -- outputs that cannot be written ------------------------------------------------------------

def test_output_under_a_regular_file_is_a_clear_error(tmp_path):
    (tmp_path / "plain").write_text("not a folder")
    key = tmp_path / "wm.key"
    assert CliRunner().invoke(main, ["watermark", "keygen", "-o", str(key)]).exit_code == 0
    target = tmp_path / "plain" / "sub" / "marked.dcm"
    result = _radguard("watermark", "embed", NIH_DX, "-o", target, "--key", key)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"radguard: error: {target.parent}: Not a directory (ENOTDIR)"


def test_a_read_only_folder_is_a_clear_error_and_nothing_is_left(tmp_path, pki):
    folder = tmp_path / "read-only"
    folder.mkdir()
    key = tmp_path / "wm.key"
    assert CliRunner().invoke(main, ["watermark", "keygen", "-o", str(key)]).exit_code == 0
    folder.chmod(0o555)
    try:
        embedded = _radguard("watermark", "embed", NIH_DX, "-o", folder / "marked.dcm",
                             "--key", key, without_root_override=True)
        signed = _radguard("sign", NIH_DX, "-o", folder / "signed.dcm", "--key", pki.key_path,
                           "--cert", pki.cert_path, without_root_override=True)
    finally:
        folder.chmod(0o755)
    assert embedded.returncode == 2, embedded.stderr
    assert embedded.stderr.strip() == (f"radguard: error: {folder / 'marked.dcm'}: "
                                       "Permission denied (EACCES)")
    assert signed.returncode == 2, signed.stderr
    assert f"{folder / 'signed.dcm'}: cannot write (Permission denied)" in signed.stderr
    assert "internal error" not in embedded.stderr + signed.stderr
    assert list(folder.iterdir()) == []


def test_file_too_large_is_a_clear_error_and_nothing_half_written(tmp_path, pki):
    out = tmp_path / "out"
    out.mkdir()
    key = tmp_path / "wm.key"
    assert CliRunner().invoke(main, ["watermark", "keygen", "-o", str(key)]).exit_code == 0
    limit = NIH_DX.stat().st_size // 2  # the output cannot fit
    embedded = _radguard("watermark", "embed", NIH_DX, "-o", out / "marked.dcm", "--key", key,
                         limit_bytes=limit)
    signed = _radguard("sign", NIH_DX, "-o", out / "signed.dcm", "--key", pki.key_path,
                       "--cert", pki.cert_path, limit_bytes=limit)
    assert embedded.returncode == 2, embedded.stderr
    assert embedded.stderr.strip() == ("radguard: error: cannot read or write a file: File too "
                                       "large (EFBIG); nothing half-written was left")
    assert signed.returncode == 2, signed.stderr
    assert f"{out / 'signed.dcm'}: cannot write (File too large)" in signed.stderr
    assert list(out.iterdir()) == []  # no partial output, no temporary file


def test_a_results_database_that_cannot_grow_is_a_clear_error(tmp_path):
    """SQLite hits the size limit while committing results: exit 2, not internal error."""
    result = _radguard("audit-archive", SHARED / "synthetic-dcgan64", "--workers", "1",
                       "--results", tmp_path / "results.sqlite", limit_bytes=40_000)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("radguard: error: ") and "internal error" not in \
        result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_reader_that_goes_away_is_not_an_internal_error(tmp_path, pki):
    """``radguard verify ... | head -1``: the pipe closes; exit 141 quietly."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = _radguard("verify", NIH_DX, NIH_DX, "--trust", pki.ca_cert_path,
                           stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""
