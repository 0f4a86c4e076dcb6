"""The gateway with real peers: dcmtk storescu in front, a real Orthanc behind."""

from __future__ import annotations

import subprocess

import pytest
from pydicom.uid import generate_uid

from radguard.dicom.io import read_dataset, write_dataset
from radguard.gateway import Gateway, GatewayConfig
from tests.conftest import NIH_DX, RG2_JPLY, copy_dicom, dcmtk_tool


@pytest.fixture
def files(tmp_path, pki):
    from radguard.provenance.sign import sign_file

    folder = tmp_path / "in"
    folder.mkdir()
    intact = folder / "intact.dcm"
    sign_file(copy_dicom(NIH_DX, tmp_path / "a.dcm"), intact, pki.signer)
    tampered = folder / "tampered.dcm"
    sign_file(copy_dicom(NIH_DX, tmp_path / "b.dcm"), tampered, pki.signer)
    ds = read_dataset(tampered)
    ds.PatientName = "Someone^Else"
    write_dataset(ds, tampered)
    synthetic = copy_dicom(NIH_DX, folder / "synthetic.dcm", SyntheticData="YES")
    unsigned = copy_dicom(NIH_DX, folder / "unsigned.dcm")
    return {"intact": intact, "tampered": tampered, "synthetic": synthetic,
            "unsigned": unsigned}


def _storescu(port: int, *paths, aet: str = "DX_ROOM3", options: tuple[str, ...] = ()
              ) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk_tool("storescu"), *options, "-aet", aet, "-aec", "RADGUARD",
                           "127.0.0.1", str(port), *map(str, paths)], capture_output=True,
                          text=True, timeout=120)


def _orthanc_sops(orthanc) -> set[str]:
    from radguard.dicom.web import DicomWebClient

    return {r.instance for r in DicomWebClient(orthanc.dicomweb).search_instances()}


def test_storescu_to_radguard_to_orthanc(tmp_path, files, pki, orthanc):
    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           trust=[str(pki.ca_cert_path)], must_sign=["DX_ROOM3"],
                           forward_dimse=f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                           triage={"DX": "chest"}).validate()
    gateway = Gateway(config)
    gateway.start()
    try:
        result = _storescu(gateway.dicom.port, *files.values())
        assert result.returncode == 0, result.stderr
        assert gateway.wait_idle(120)
    finally:
        gateway.stop()
    by_name = {}
    for inst in gateway.store.instances():
        name = next(k for k, p in files.items() if read_dataset(p).SOPInstanceUID == inst.sop_uid)
        by_name[name] = inst
    assert by_name["intact"].state == "done" and by_name["intact"].trust == "signed"
    assert by_name["intact"].forwarded == "dimse:ORTHANC"
    assert by_name["intact"].ai_suspicion is not None  # the chest model scored it
    # the room is not calibrated yet: the detectors scored the signed image for its source's
    # calibration, and did not judge it (its pixels are provably the device's)
    intact = by_name["intact"].detail
    assert intact["calibration"]["as"] == "signature" and intact["calibration"]["recorded"]
    assert any("do not judge an image its signature vouches for" in r
               for r in intact["reasons"])
    assert by_name["intact"].verdict == "authentic"
    assert by_name["tampered"].state == "quarantined"
    assert "signature invalid" in by_name["tampered"].detail["reasons"][0]
    assert by_name["synthetic"].state == "rejected"
    assert by_name["unsigned"].state == "quarantined"  # DX_ROOM3 must sign
    in_orthanc = _orthanc_sops(orthanc)
    assert by_name["intact"].sop_uid in in_orthanc
    # the PACS's copy still carries a valid signature (forwarded in its own transfer syntax)
    from radguard.dicom.web import DicomWebClient
    from radguard.provenance.trust import TrustStore
    from radguard.provenance.verify import verify_file

    client = DicomWebClient(orthanc.dicomweb)
    ref = next(r for r in client.search_instances() if r.instance == by_name["intact"].sop_uid)
    (tmp_path / "from_pacs.dcm").write_bytes(client.retrieve(ref))
    assert verify_file(tmp_path / "from_pacs.dcm",
                       TrustStore.from_paths([pki.ca_cert_path])).status == "valid"
    for name in ("tampered", "synthetic", "unsigned"):
        assert by_name[name].sop_uid not in in_orthanc
    actions = [e.action for e in gateway.audit_log.entries()]
    assert actions.count("instance.quarantined") == 2 and "instance.rejected" in actions


def test_bad_instances_get_an_error_status_and_nothing_is_stored(tmp_path):
    from pydicom import dcmread
    from pynetdicom import AE

    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0))
    gateway.start()
    try:
        ae = AE(ae_title="FUZZ")
        ae.add_requested_context(dcmread(NIH_DX, stop_before_pixels=True).SOPClassUID)
        assoc = ae.associate("127.0.0.1", gateway.dicom.port, ae_title="RADGUARD")
        assert assoc.is_established
        ds = dcmread(NIH_DX)
        ds.PixelData = ds.PixelData[:1000]  # truncated pixel data
        status = assoc.send_c_store(ds)
        assert status.Status == 0xC000
        ds = dcmread(NIH_DX)
        ds.Rows = 2 * ds.Rows  # a header that promises more pixels than were sent
        assert assoc.send_c_store(ds).Status == 0xC000
        assoc.release()
        echo = AE(ae_title="ECHO")
        echo.add_requested_context("1.2.840.10008.1.1")
        a = echo.associate("127.0.0.1", gateway.dicom.port, ae_title="RADGUARD")
        assert a.send_c_echo().Status == 0
        a.release()
        # a corrupt (but complete) JPEG stream is decoded at the door and refused
        result = _storescu(gateway.dicom.port, RG2_JPLY, aet="CR1",
                           options=("-xx",))  # propose JPEG 12-bit lossy, as the file is
        assert result.returncode != 0  # storescu reports the refusal (exit 192: failed store)
    finally:
        gateway.stop()
    assert gateway.store.instances() == []
    assert gateway.dicom.refused == 3
    assert list((tmp_path / "data" / "objects").glob("*/*")) == []


def test_forwarding_over_stow_to_orthanc(tmp_path, files, pki, orthanc):
    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           trust=[str(pki.ca_cert_path)], forward_stow=orthanc.dicomweb)
    gateway = Gateway(config.validate())
    gateway.start()
    try:
        result = _storescu(gateway.dicom.port, files["intact"], files["tampered"], aet="CR1")
        assert result.returncode == 0, result.stderr
        assert gateway.wait_idle(120)
    finally:
        gateway.stop()
    states = {r.sop_uid: r for r in gateway.store.instances()}
    intact = states[str(read_dataset(files["intact"]).SOPInstanceUID)]
    tampered = states[str(read_dataset(files["tampered"]).SOPInstanceUID)]
    assert intact.forwarded == "stow" and tampered.state == "quarantined"
    in_orthanc = _orthanc_sops(orthanc)
    assert intact.sop_uid in in_orthanc and tampered.sop_uid not in in_orthanc


def test_signed_8bit_image_from_storescu_keeps_its_transfer_syntax_and_signature(tmp_path, pki):
    """A requestor lists its data's syntax first (storescu -xs: JPEG Lossless, then Explicit,
    then Implicit VR). Accepting one it put later makes it convert, and 8-bit pixel data
    (OB in Explicit, OW in Implicit VR) would then break the signature."""
    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian

    from radguard.provenance.sign import sign_file

    ds = read_dataset(NIH_DX)
    pixels = (np.arange(256 * 256) % 251).astype(np.uint8).reshape(256, 256)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 256, 256, 8, 8, 7
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_dataset(ds, tmp_path / "raw8.dcm")
    sign_file(tmp_path / "raw8.dcm", tmp_path / "signed8.dcm", pki.signer)
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                                    trust=[str(pki.ca_cert_path)]).validate())
    gateway.start()
    try:
        for options in ((), ("-xs",)):
            result = _storescu(gateway.dicom.port, tmp_path / "signed8.dcm", options=options)
            assert result.returncode == 0, result.stderr
        assert gateway.wait_idle(120)
    finally:
        gateway.stop()
    for row in gateway.store.instances():
        assert read_dataset(gateway.store.file(row)).file_meta.TransferSyntaxUID == \
            ExplicitVRLittleEndian
        assert (row.state, row.trust) == ("done", "signed"), row.detail


def test_tls_associations(tmp_path, pki):
    """With tls_cert/tls_key the SCP speaks DICOM over TLS only."""
    import ssl

    from pynetdicom import AE

    from radguard.provenance.keys import Identity, create_signer, save_certificate, save_private_key

    key, cert = create_signer(Identity("radguard gateway", "device", "Test Hospital"),
                              ca_key=pki.ca_key, ca_cert=pki.ca_cert)
    save_private_key(key, tmp_path / "tls.key")
    save_certificate(cert, tmp_path / "tls.crt")
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, tls_cert=str(tmp_path / "tls.crt"),
                                    tls_key=str(tmp_path / "tls.key")).validate())
    gateway.start()
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                            cafile=str(pki.ca_cert_path))
        client.check_hostname = False  # the certificate names the gateway, not 127.0.0.1
        ae = AE(ae_title="TLSCLIENT")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", gateway.dicom.port, ae_title="RADGUARD",
                             tls_args=(client, None))
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        plain = AE(ae_title="PLAIN")
        plain.add_requested_context("1.2.840.10008.1.1")
        plain.acse_timeout = plain.network_timeout = 5
        refused = plain.associate("127.0.0.1", gateway.dicom.port, ae_title="RADGUARD")
        assert not refused.is_established
    finally:
        gateway.stop()


def test_checks_in_separate_processes_route_the_same(tmp_path, files, pki):
    """check_processes = 1: the same decisions as in-process checks, triage scores come
    back, and a check process that dies costs only the instance it had; the pool restarts."""
    import os
    import signal

    config = GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0, http_port=0,
                           trust=[str(pki.ca_cert_path)], must_sign=["DX_ROOM3"],
                           triage={"DX": "chest"}, check_processes=1).validate()
    gateway = Gateway(config)
    gateway.start()
    try:
        pids = gateway.checks.pids
        assert pids and all(pid != os.getpid() for pid in pids)
        result = _storescu(gateway.dicom.port, *files.values())
        assert result.returncode == 0, result.stderr
        assert gateway.wait_idle(120)
        by_sop = {i.sop_uid: i for i in gateway.store.instances()}
        state = {name: by_sop[str(read_dataset(p).SOPInstanceUID)]
                 for name, p in files.items()}
        assert state["intact"].state == "done" and state["intact"].ai_suspicion is not None
        assert state["tampered"].state == "quarantined"
        assert state["synthetic"].state == "rejected"
        assert state["unsigned"].state == "quarantined"
        for pid in pids:  # the check process dies (out of memory, a decoder crash...)
            os.kill(pid, signal.SIGKILL)
        from radguard.provenance.sign import sign_file

        again = []
        for i in range(2):
            again.append(tmp_path / f"again{i}.dcm")
            sign_file(copy_dicom(NIH_DX, tmp_path / f"raw{i}.dcm"), again[-1], pki.signer)
        for path in again:  # one at a time: the first meets the dead pool
            assert _storescu(gateway.dicom.port, path, aet="CR1").returncode == 0
            assert gateway.wait_idle(120)
        after = {i.sop_uid: i for i in gateway.store.instances()}
        first, second = (after[str(read_dataset(p).SOPInstanceUID)] for p in again)
        assert first.state == "quarantined" and "check process died" in first.detail["error"]
        assert "error" not in second.detail and second.ai_suspicion is not None
        assert len(gateway.checks.pids) == 1 and set(gateway.checks.pids).isdisjoint(pids)
    finally:
        gateway.stop()
