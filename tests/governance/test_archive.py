"""Archive audit on Dask: results, resumption, an existing scheduler, bad files."""

from __future__ import annotations

import shutil

from click.testing import CliRunner

from radguard.cli import main
from radguard.dicom.io import read_dataset, write_dataset
from radguard.governance.archive import ResultsTable, audit_archive
from tests.conftest import NIH_DX, SHARED


def _new_uid(ds) -> None:
    from pydicom.uid import generate_uid

    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()


def _archive(tmp_path, pki):
    root = tmp_path / "archive"
    (root / "2024" / "03").mkdir(parents=True)
    for name in sorted((SHARED / "cxr-nih" / "images").glob("*.jpg"))[:5]:
        shutil.copy(name, root / "2024" / name.name)
    from radguard.provenance.sign import sign_file

    sign_file(NIH_DX, root / "2024" / "03" / "signed.dcm", pki.signer)
    shutil.copy(root / "2024" / "03" / "signed.dcm", root / "2024" / "03" / "tampered.dcm")
    ds = read_dataset(root / "2024" / "03" / "tampered.dcm")
    ds.PatientName = "Someone^Else"
    _new_uid(ds)  # distinct instances, as a PACS keeps one copy per SOP Instance UID
    write_dataset(ds, root / "2024" / "03" / "tampered.dcm")
    ds = read_dataset(NIH_DX)
    ds.SyntheticData = "YES"
    _new_uid(ds)
    write_dataset(ds, root / "2024" / "03" / "synthetic.dcm")
    (root / "2024" / "broken.dcm").write_bytes(NIH_DX.read_bytes()[:2000])
    return root


def test_audit_resumes_and_reports_verdicts(tmp_path, pki):
    root = _archive(tmp_path, pki)
    results = tmp_path / "results.sqlite"
    first = audit_archive(root, results, workers=2, trust_paths=[str(pki.ca_cert_path)],
                          limit=4, chunk=2)
    assert first.audited == 4 and first.workers == 2
    second = audit_archive(root, results, workers=1, trust_paths=[str(pki.ca_cert_path)])
    assert second.skipped == 4 and second.audited == 5 and second.files == 9
    verdicts = {row["path"].rsplit("/", 1)[-1]: row for row in ResultsTable(results).rows()}
    assert len(verdicts) == 9
    assert verdicts["signed.dcm"]["signature"] == "valid"
    assert verdicts["tampered.dcm"]["signature"] == "invalid"
    assert verdicts["tampered.dcm"]["verdict"] == "tampered"
    assert verdicts["synthetic.dcm"]["verdict"] == "synthetic"
    assert verdicts["broken.dcm"]["verdict"] == "unverifiable"
    attention = {a["path"].rsplit("/", 1)[-1] for a in second.attention}
    assert {"tampered.dcm", "synthetic.dcm", "broken.dcm"} <= attention
    third = audit_archive(root, results, workers=1)
    assert third.audited == 0 and third.skipped == 9  # nothing new: no cluster started
    (root / "2024" / "03" / "signed.dcm").touch()  # changed since: audited again
    assert audit_archive(root, results, workers=1).audited == 1


def test_existing_scheduler_and_cli(tmp_path, pki):
    from dask.distributed import LocalCluster

    root = _archive(tmp_path, pki)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        result = CliRunner().invoke(main, [
            "audit-archive", str(root), "--scheduler", cluster.scheduler_address,
            "--results", str(tmp_path / "r.sqlite"), "--json", str(tmp_path / "s.json"),
            "--audit-log", str(tmp_path / "audit.jsonl")])
    assert result.exit_code == 1, result.output  # some images need attention
    assert "9 files: 9 audited now on 1 Dask workers" in result.output
    assert "tampered" in result.output and (tmp_path / "s.json").exists()
    bad = CliRunner().invoke(main, ["audit-archive", str(root), "--scheduler",
                                    "tcp://127.0.0.1:9", "--results",
                                    str(tmp_path / "r2.sqlite")])
    assert bad.exit_code == 2 and "cannot reach the Dask scheduler" in bad.output
    missing = CliRunner().invoke(main, ["audit-archive", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such folder" in missing.output


def test_audit_of_a_dicomweb_archive_in_orthanc(tmp_path, pki, orthanc):
    root = _archive(tmp_path, pki)
    for name in ("signed.dcm", "tampered.dcm", "synthetic.dcm"):
        orthanc.upload(root / "2024" / "03" / name)
    results = tmp_path / "web.sqlite"
    summary = audit_archive(orthanc.dicomweb, results, workers=1,
                            trust_paths=[str(pki.ca_cert_path)])
    assert summary.files >= 3 and summary.audited == summary.files
    assert orthanc.password not in summary.source  # credentials never shown
    rows = list(ResultsTable(results).rows())
    verdicts = sorted(r["verdict"] for r in rows)
    assert verdicts.count("tampered") == 1 and verdicts.count("synthetic") == 1
    assert all(r["path"].startswith("studies/") for r in rows)
    again = audit_archive(orthanc.dicomweb, results, workers=1)
    assert again.audited == 0 and again.skipped == summary.files
    wrong = orthanc.dicomweb.replace(orthanc.password, "wrong")
    from radguard.dicom.web import DicomWebError

    try:
        audit_archive(wrong, tmp_path / "w.sqlite", workers=1)
    except DicomWebError as exc:
        assert "401" in str(exc) and "wrong" not in str(exc)
    else:
        raise AssertionError("a wrong password must be a clear error")
