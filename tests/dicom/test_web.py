"""The DICOMweb client against a real Orthanc, and its multipart parser on bad bodies."""

from __future__ import annotations

import pytest

from radguard.dicom.web import DicomWebClient, DicomWebError, redact, split_multipart
from tests.conftest import NIH_DX


def test_stow_qido_wado_round_trip(orthanc):
    client = DicomWebClient(orthanc.dicomweb)
    client.store([NIH_DX.read_bytes()])
    refs = list(client.search_instances(page=1))  # paging, one instance per page
    assert refs and len({r.instance for r in refs}) == len(refs)
    from pydicom import dcmread

    ds = dcmread(NIH_DX, stop_before_pixels=True)
    ref = next(r for r in refs if r.instance == ds.SOPInstanceUID)
    assert client.retrieve(ref)[128:132] == b"DICM"


def test_bad_urls_and_unreachable_servers_are_clear_errors():
    with pytest.raises(DicomWebError, match="not an http"):
        DicomWebClient("ftp://example.org/")
    client = DicomWebClient("http://user:secret@127.0.0.1:9/dicom-web/", timeout=2)
    with pytest.raises(DicomWebError, match="cannot connect") as err:
        list(client.search_instances())
    assert "secret" not in str(err.value)
    assert redact("http://u:p@h:1/x?y=1") == "http://h:1/x?y=1"


@pytest.mark.parametrize("body,ctype", [
    (b"", "multipart/related; boundary=b"),
    (b"--b\r\nContent-Type: application/dicom\r\n\r\nDATA\r\n", "multipart/related; boundary=b"),
    (b"--b\r\nno header end--b--", "multipart/related; boundary=b"),
    (b"whatever", "application/json"),
    (b"--b\r\n\r\nX\r\n--b--", "multipart/related"),
])
def test_malformed_multipart_is_refused(body, ctype):
    with pytest.raises(DicomWebError):
        split_multipart(body, ctype)


def test_multipart_parts():
    body = (b"--xyz\r\nContent-Type: application/dicom\r\n\r\nAB\r\n--xyz\r\n"
            b"Content-Type: application/dicom\r\n\r\nCD\r\n--xyz--\r\n")
    parts = split_multipart(body, 'multipart/related; type="application/dicom"; boundary=xyz')
    assert [p[1] for p in parts] == [b"AB", b"CD"]
    assert parts[0][0]["content-type"] == "application/dicom"
