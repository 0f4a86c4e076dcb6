"""Every modality through the gateway (issue item 5): a CT, an MR, an NM, a
colour US (JPEG) and radguard's own SR and SEG, sent with dcmtk's dcmsend, reach the worklist
when intact - no content detector covers them, and a readable image or a non-image object
is never "unreadable"; each is still checked for what applies to it (a signed SR changed
after signing is quarantined)."""

from __future__ import annotations

import contextlib
import subprocess

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from radguard.dicom.io import read_dataset, write_dataset
from radguard.gateway import Gateway, GatewayConfig
from tests.conftest import NIH_DX, copy_dicom, dcmtk_tool


def _radguard_results(tmp_path):
    """An SR and a SEG as radguard writes them for a scored DX."""
    from radguard.dicom.results import TriageFinding, saliency_segmentation, triage_report

    source = read_dataset(NIH_DX)
    finding = TriageFinding("Pneumonia", ("233604007", "SCT"), True, 0.8, 4, 0.5, "chest",
                            "1.0")
    sr = tmp_path / "sr.dcm"
    write_dataset(triage_report(source, finding), sr)
    heat = np.linspace(0, 1, int(source.Rows) * int(source.Columns), dtype=np.float32)
    seg = tmp_path / "seg.dcm"
    write_dataset(saliency_segmentation(source, heat.reshape(int(source.Rows), -1),
                                        model="chest", version="1.0"), seg)
    return sr, seg


@pytest.fixture
def objects(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    out = {
        "CT": copy_dicom(get_testdata_file("CT_small.dcm"), folder / "ct.dcm"),
        "MR": copy_dicom(get_testdata_file("MR_small.dcm"), folder / "mr.dcm"),
        "US": copy_dicom(get_testdata_file("examples_ybr_color.dcm"), folder / "us.dcm"),
        "NM": copy_dicom(get_testdata_file("MR_small.dcm"), folder / "nm.dcm", Modality="NM",
                    SOPClassUID="1.2.840.10008.5.1.4.1.1.20"),
        "SR-other": copy_dicom(get_testdata_file("test-SR.dcm"), folder / "other-sr.dcm"),
        # uncompressed YBR_FULL_422: two pixels share their chroma (2/3 of RGB's bytes)
        "SC-YBR422": copy_dicom(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"),
                           folder / "ybr422.dcm"),
    }
    out["SR"], out["SEG"] = _radguard_results(folder)
    return out


@contextlib.contextmanager
def _sent(tmp_path, pki, paths):
    """A gateway (checks on its own threads) that dcmtk's dcmsend sent ``paths`` to and
    that has checked them; dcmsend negotiates each file's own transfer syntax (the US is
    JPEG Baseline)."""
    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           trust=[str(pki.ca_cert_path)], check_processes=0)
    gateway = Gateway(config)
    gateway.start()
    try:
        result = subprocess.run([dcmtk_tool("dcmsend"), "-aet", "MODALITY", "-aec",
                                 "RADGUARD", "127.0.0.1", str(gateway.dicom.port),
                                 *map(str, paths)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert gateway.wait_idle(120)
        yield gateway
    finally:
        gateway.stop()


def test_every_modality_reaches_the_worklist_when_intact(tmp_path, objects, pki):
    with _sent(tmp_path, pki, objects.values()) as gateway:
        rows = {r.sop_uid: r for r in gateway.store.instances()}
        for name, path in objects.items():
            row = rows[str(read_dataset(path).SOPInstanceUID)]
            reasons = row.detail.get("reasons", [])
            assert row.state == "done", (name, row.verdict, reasons)
            assert not any("unreadable" in r for r in reasons), (name, reasons)
        sr = rows[str(read_dataset(objects["SR"]).SOPInstanceUID)]
        assert any("non-image object" in r for r in sr.detail["reasons"])


def test_a_non_image_object_still_gets_its_signature_checked(tmp_path, objects, pki):
    from radguard.provenance.sign import sign_file

    signed = tmp_path / "signed-sr.dcm"
    sign_file(objects["SR"], signed, pki.signer)
    ds = read_dataset(signed)
    ds.PatientName = "Someone^Else"  # changed after signing
    write_dataset(ds, signed)
    with _sent(tmp_path, pki, [signed]) as gateway:
        (row,) = gateway.store.instances()
        assert row.state == "quarantined" and row.verdict == "tampered", row.detail
