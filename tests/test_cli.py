"""The command line: walkthrough commands, JSON output, and bad input without tracebacks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from radguard.cli import main
from radguard.demo import flip_pixel_bit
from radguard.dicom import read_dataset, write_dataset
from tests.conftest import NIH_DX, RG1_J2K, RG2_JPLY, run_dcmsign


def run(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert "Traceback" not in (result.output + (result.stderr or ""))
    return result


@pytest.fixture()
def keys(tmp_path):
    """A CA and a device key made through the CLI, as the README walkthrough does."""
    pki = tmp_path / "pki"
    assert run("keys", "ca", "--name", "Walkthrough CA", "--algorithm", "rsa2048",
               "-o", pki / "ca").exit_code == 0
    pw = tmp_path / "pw.txt"
    pw.write_text("s3cret passphrase\n")
    result = run("keys", "device", "--station", "DX Room 3", "--serial", "SN-1",
                 "--ca-key", pki / "ca.key.pem", "--ca-cert", pki / "ca.cert.pem",
                 "--passphrase-file", pw, "-o", pki / "dx3")
    assert result.exit_code == 0, result.output
    return pki, pw


def test_walkthrough_sign_tamper_verify(keys, tmp_path):
    pki, pw = keys
    signed = tmp_path / "signed.dcm"
    result = run("sign", NIH_DX, "-o", signed, "--key", pki / "dx3.key.pem",
                 "--cert", pki / "dx3.cert.pem", "--profile", "creator",
                 "--passphrase-file", pw)
    assert result.exit_code == 0, result.output + result.stderr
    ok = run("verify", signed, "--trust", pki / "ca.cert.pem", "--json")
    assert ok.exit_code == 0
    record = json.loads(ok.output)
    assert record["status"] == "valid" and "DX Room 3" in record["signer"]
    assert {"path", "status", "signer", "uncovered"} <= set(record)

    ds = read_dataset(signed)
    flip_pixel_bit(ds)
    write_dataset(ds, tmp_path / "tampered.dcm")
    bad = run("verify", tmp_path / "tampered.dcm", "--trust", pki / "ca.cert.pem")
    assert bad.exit_code == 1 and "INVALID" in bad.output

    _, other = tmp_path / "o", tmp_path / "other"
    assert run("keys", "ca", "--name", "Other", "--algorithm", "rsa2048",
               "-o", other).exit_code == 0
    untrusted = run("verify", signed, "--trust", f"{other}.cert.pem", "--json")
    assert untrusted.exit_code == 1 and json.loads(untrusted.output)["status"] == "untrusted"


def test_folder_batch_reports_bad_files_and_signs_the_rest(keys, tmp_path):
    pki, pw = keys
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(NIH_DX, src / "a.dcm")
    shutil.copy(RG1_J2K, src / "b.dcm")
    (src / "notes.txt").write_text("not dicom")
    shutil.copy(RG2_JPLY, src / "corrupt.dcm")
    out = tmp_path / "out"
    result = run("sign", src, "-o", out, "--key", pki / "dx3.key.pem",
                 "--cert", pki / "dx3.cert.pem", "--passphrase-file", pw)
    assert result.exit_code == 1
    assert "2 signed, 2 failed" in result.output
    assert sorted(p.name for p in (out / "in").iterdir()) == ["a.dcm", "b.dcm"]
    verify = run("verify", out, "--trust", pki / "ca.cert.pem", "--json")
    assert verify.exit_code == 0
    assert [json.loads(line)["status"] for line in verify.output.splitlines()] == ["valid"] * 2


@pytest.mark.parametrize("case", ["truncated", "not dicom", "corrupt jpeg"])
def test_bad_dicom_input_is_one_line_and_writes_nothing(keys, tmp_path, case):
    pki, pw = keys
    bad = tmp_path / "bad.dcm"
    if case == "truncated":
        bad.write_bytes(RG1_J2K.read_bytes()[:300_000])
    elif case == "not dicom":
        bad.write_bytes(b"%PDF-1.7 this is a report, not an image\n" * 10)
    else:
        shutil.copy(RG2_JPLY, bad)
    out = tmp_path / "out.dcm"
    result = run("sign", bad, "-o", out, "--key", pki / "dx3.key.pem",
                 "--cert", pki / "dx3.cert.pem", "--passphrase-file", pw)
    assert result.exit_code != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("radguard: error:")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == \
        ["bad.dcm", "pki", "pw.txt"]
    verify = run("verify", bad, "--json", "--trust", pki / "ca.cert.pem")
    assert verify.exit_code == 1
    status = json.loads(verify.output)["status"]
    assert status == ("unsigned" if case == "corrupt jpeg" else "error")


def test_wrong_passphrase_and_mismatched_certificate(keys, tmp_path):
    pki, _ = keys
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("guess\n")
    out = tmp_path / "out.dcm"
    result = run("sign", NIH_DX, "-o", out, "--key", pki / "dx3.key.pem",
                 "--cert", pki / "dx3.cert.pem", "--passphrase-file", wrong)
    assert result.exit_code == 2 and "wrong passphrase" in result.stderr
    result = run("sign", NIH_DX, "-o", out, "--key", pki / "ca.key.pem",
                 "--cert", pki / "dx3.cert.pem")
    assert result.exit_code == 2 and "does not match" in result.stderr
    result = run("sign", NIH_DX, "-o", out, "--key", pki / "dx3.key.pem",
                 "--cert", pki / "dx3.cert.pem")
    assert result.exit_code == 2 and "passphrase-protected" in result.stderr
    assert not out.exists()


def test_passphrase_from_environment(keys, tmp_path):
    pki, pw = keys
    out = tmp_path / "env.dcm"
    result = run("sign", NIH_DX, "-o", out, "--key", pki / "dx3.key.pem",
                 "--cert", pki / "dx3.cert.pem",
                 env={"RADGUARD_KEY_PASSPHRASE": pw.read_text().strip()})
    assert result.exit_code == 0 and out.exists()


def test_keys_refuse_to_overwrite(keys):
    pki, _ = keys
    result = run("keys", "ca", "--name", "Again", "-o", pki / "ca")
    assert result.exit_code == 2 and "refusing to overwrite" in result.stderr


def test_tag_option_and_uncovered_in_text_output(keys, tmp_path):
    pki, pw = keys
    out = tmp_path / "subset.dcm"
    result = run("sign", NIH_DX, "-o", out, "--key", pki / "dx3.key.pem",
                 "--cert", pki / "dx3.cert.pem", "--passphrase-file", pw,
                 "--tag", "SOPInstanceUID", "--tag", "7fe0,0010")
    assert result.exit_code == 0, result.stderr
    text = run("verify", out, "--trust", pki / "ca.cert.pem")
    assert text.exit_code == 0 and "NOT covered by any signature: SOPClassUID" in text.output
    bad = run("sign", NIH_DX, "-o", out, "--key", pki / "dx3.key.pem",
              "--cert", pki / "dx3.cert.pem", "--passphrase-file", pw, "--tag", "NoSuchThing")
    assert bad.exit_code == 2


def test_dcmsign_verifies_a_cli_signed_file(dcmsign, keys, tmp_path):
    pki, pw = keys
    out = tmp_path / "cli.dcm"
    assert run("sign", RG1_J2K, "-o", out, "--key", pki / "dx3.key.pem", "--cert",
               pki / "dx3.cert.pem", "--passphrase-file", pw).exit_code == 0
    assert run_dcmsign("--verify", "+cf", pki / "ca.cert.pem", "+rc", out).returncode == 0


def test_dicom_info_and_demo(tmp_path):
    info = run("dicom", "info", NIH_DX, RG2_JPLY)
    assert info.exit_code == 1 and "1024x1024" in info.output
    assert "cannot decode pixel data" in info.stderr
    demo = run("demo", "--walkthrough", "--workdir", tmp_path / "demo", "--input", NIH_DX)
    assert demo.exit_code == 0 and "all verdicts as expected" in demo.output


def test_installed_entry_point_never_shows_a_traceback(tmp_path):
    """The real console script, with a missing file and garbage key material."""
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    proc = subprocess.run([sys.executable, "-m", "radguard.cli", "sign", str(NIH_DX), "-o",
                           str(tmp_path / "o.dcm"), "--key", str(junk), "--cert", str(junk)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("radguard: error:")


@pytest.mark.parametrize("tty_stderr", [False, True], ids=["stderr-pipe", "stderr-terminal"])
def test_closed_output_pipe_is_a_quiet_exit(tty_stderr):
    """`radguard verify ... | head -1` (issue 27): like git, a quiet exit 141 (128 + SIGPIPE)
    without 'internal error' or a traceback; also when stderr is a terminal, where the
    progress bar is drawn (on stderr: it used to go to stdout, and rich turned the closed
    pipe into its own exit 1)."""
    import os
    import pty
    import select

    master = slave = None
    if tty_stderr:
        master, slave = pty.openpty()
    # 200 reports of ~800 bytes: well past a pipe's 64 KiB, so the pipe closes mid-output
    producer = subprocess.Popen(
        [sys.executable, "-m", "radguard.cli", "verify", "--json", *[str(NIH_DX)] * 200],
        stdout=subprocess.PIPE, stderr=slave if tty_stderr else subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=producer.stdout, stdout=subprocess.PIPE)
    producer.stdout.close()  # only head reads it now
    first, _ = head.communicate(timeout=120)
    assert json.loads(first)["path"] == str(NIH_DX)
    if tty_stderr:
        os.close(slave)
        assert producer.wait(timeout=120) == 141
        chunks = []
        while select.select([master], [], [], 5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        err = b"".join(chunks).decode(errors="replace")
    else:
        err = producer.stderr.read().decode()
        assert producer.wait(timeout=120) == 141
        producer.stderr.close()
    assert "error" not in err and "Traceback" not in err and "Broken" not in err, err


def test_triage_card_is_text_and_json_on_request():
    """Issue 27: a readable card; --json keeps the raw JSON."""
    text = run("triage", "card")
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[0] == "chest 1.0-cxr-nih"
    assert not text.output.lstrip().startswith("{")
    for needle in ("intended use:", "Triage of adult frontal chest radiographs",
                   "modalities:       CR, DX", "training data:    cxr-nih training split",
                   "measured (by scripts/train_triage_chest.py):",
                   "operating point:  threshold 0.319 (chosen for sensitivity): sensitivity "
                   "0.909, specificity 0.316", "limitations:"):
        assert needle in text.output, needle
    internal = next(x for x in lines if x.strip().startswith("internal test AUC:"))
    assert "0.851 (95% CI 0.792-0.910); 73 positive, 79 negative" in internal
    external = next(x for x in lines if "cxr-kermany" in x and "AUC" in x)
    assert "0.502 (95% CI 0.462-0.542)" in external
    assert any("cxr-kermany" in x and "no better than chance" in x for x in lines)
    assert max(len(x) for x in lines) <= 100
    raw = run("triage", "card", "--model", "mammo", "--json")
    card = json.loads(raw.output)
    assert card["name"] == "mammo" and card["operating_threshold"] > 0
    assert "test_auc" in card["metrics"]
    bad = run("triage", "card", "--model", "nope")
    assert bad.exit_code == 2 and "unknown model 'nope'" in bad.stderr


def test_card_text_renders_subgroups_and_plug_in_fields():
    from radguard.triage.model import card_text

    auc = {"auc": 0.9, "low": 0.85, "high": 0.95, "positives": 10, "negatives": 20}
    text = card_text({
        "name": "knee", "version": "2", "intended_use": "Knee effusion triage.",
        "training_data": "site A", "modalities": ["DX"],
        "metrics": {"test_auc": auc,
                    "by_site": {"site_b": {**auc, "low": 0.45}, "site_c": auc},
                    "calibration_slope": 1.02},
        "operating_threshold": 0.4, "limitations": ["Not for paediatric knees."],
        "contact": "ai-team@example.org"})
    lines = text.splitlines()
    assert "  test AUC:" in text and "  by site:" in lines
    assert any(x.startswith("    site b:") and "AUC 0.900" in x for x in lines)
    assert any("calibration slope:" in x and "1.020" in x for x in lines)
    assert "threshold in use: 0.400" in text and "contact:" in text
    tail = lines[lines.index("limitations:") + 1:]
    assert tail[0] == "  - Not for paediatric knees."
    assert any("by site site b" in x and "no better than chance" in x for x in tail)
