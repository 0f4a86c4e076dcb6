"""Fuzzing the front door: over 10,000 malformed DICOM objects (truncated, flipped bytes,
wrong and huge lengths, bad VRs, corrupt compressed pixel streams) over C-STORE and STOW-RS.
The gateway stays up, answers every malformed object with an error status, and stores
nothing for it; an object the mutation happened to leave valid is stored whole."""

from __future__ import annotations

import hashlib
import json
import random
import urllib.error
import urllib.request

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from radguard.gateway import Gateway, GatewayConfig
from radguard.gateway.auth import Users
from tests.gateway.conftest import fitted_monitor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on mangled values

VRS = [b"UI", b"CS", b"US", b"OB", b"OW", b"LO", b"PN", b"DA", b"SH", b"IS"]


def _base(compressed: bool) -> bytes:
    import io

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality, ds.StudyDate = "FUZZ", "Fuzz^Test", "OT", "20260101"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.random.default_rng(1).integers(0, 255, (32, 32), np.uint8).tobytes()
    if compressed:
        ds.compress(RLELossless)
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _meta_end(data: bytes) -> int:
    """Offset of the first data-set byte (after preamble, DICM and the file meta group)."""
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


def _mutate(data: bytes, rng: random.Random, compressed: bool) -> bytes:
    start = _meta_end(data)
    body = bytearray(data[start:])
    pixels_at = bytes(body).rfind(b"\xe0\x7f\x10\x00")
    kind = rng.randrange(6)
    if kind == 4 and not compressed:
        kind = 0  # corrupting native pixel values leaves a valid object: truncate instead
    if kind == 0:  # truncated
        body = body[: rng.randrange(0, len(body) - 1)]
    elif kind == 1:  # flipped bytes in the header (flips in native pixels stay valid)
        for _ in range(rng.randint(1, 8)):
            body[rng.randrange(pixels_at + 12)] ^= 1 << rng.randrange(8)
    elif kind == 2:  # a wrong or huge length (or other garbage) in the header
        at = rng.randrange(0, pixels_at + 8)
        body[at:at + 4] = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, rng.randrange(1 << 32)]).to_bytes(
            4, "little")
    elif kind == 3:  # a bad VR
        spots = [i for i in range(0, min(len(body), 600) - 1) if bytes(body[i:i + 2]) in VRS]
        at = rng.choice(spots)
        body[at:at + 2] = bytes(rng.choice(b"ABEHJKMQRVXYZ") for _ in range(2))
    elif kind == 4:  # corrupt pixel stream (the last bytes hold the pixel data)
        for _ in range(rng.randint(4, 40)):
            body[len(body) - 1 - rng.randrange(min(900, len(body) - 1))] = rng.randrange(256)
    else:  # the pixel data length field itself
        at = pixels_at
        body[at + 8:at + 12] = rng.choice([0x7FFFFFFF, 0xFFFFFFF0, 1000]).to_bytes(4, "little")
    return data[:start] + bytes(body)


def _rows(gateway) -> int:
    return sum(gateway.store.counts().values())


def _objects(gateway) -> int:
    return sum(1 for _ in gateway.store.objects.glob("*/*"))


def _watermark_key(tmp_path):
    from radguard.watermark import generate_key_file

    generate_key_file(tmp_path / "wm.key")
    return tmp_path / "wm.key"


def test_ten_thousand_malformed_objects(tmp_path):
    from pynetdicom import AE, _config

    # every layer on, so the mutations that stay valid meet the watermark check and the
    # drift monitor too
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, workers=1,
                                    watermark_key=str(_watermark_key(tmp_path)),
                                    monitor_db=str(fitted_monitor(tmp_path)),
                                    triage={"OT": "chest"}))
    Users(gateway.store).add("tech", "technologist", "fuzzing password")
    token = Users(gateway.store).issue_token("tech")
    gateway.start()
    rng = random.Random(2026)
    bases = {False: _base(False), True: _base(True)}
    refused = accepted = 0
    try:
        # -- C-STORE: the raw (mutated) bytes go on the wire as they are ----------------------
        _config.STORE_SEND_CHUNKED_DATASET = True
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(SecondaryCaptureImageStorage, RLELossless)
        assoc = ae.associate("127.0.0.1", gateway.dicom.port, ae_title="RADGUARD")
        path = tmp_path / "fuzz.dcm"
        stored_rows = 0
        resent: set[str] = set()
        for _ in range(3000):
            compressed = rng.random() < 0.3
            data = _mutate(bases[compressed], rng, compressed)
            path.write_bytes(data)
            if not assoc.is_established:
                assoc = ae.associate("127.0.0.1", gateway.dicom.port, ae_title="RADGUARD")
            status = assoc.send_c_store(path)
            assert status and "Status" in status, "no answer: the gateway must always answer"
            rows = _rows(gateway)
            if status.Status == 0:
                accepted += 1
                digest = hashlib.sha256(data[_meta_end(data):]).hexdigest()
                if digest in resent:  # the same bytes again: a resend, no second row
                    assert rows == stored_rows
                else:
                    assert rows == stored_rows + 1
                    last = gateway.store.get(rows)
                    stored = gateway.store.file(last).read_bytes()
                    assert stored.endswith(data[_meta_end(data):])  # whole, as sent
                    resent.add(digest)
            else:
                refused += 1
                assert status.Status in (0xC000, 0xC001, 0xA700)
                assert rows == stored_rows
            stored_rows = rows
        assoc.release()
        dimse_refused = refused

        # -- STOW-RS: requests of 200 parts until 10,000 malformed objects were refused -------
        url = f"http://127.0.0.1:{gateway.http_port}/dicom-web/studies"
        for _ in range(60):
            if refused >= 10_000:
                break
            parts = [_mutate(bases[c], rng, c) for c in (rng.random() < 0.3 for _ in range(200))]
            body = b"".join(b"--fz\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                            for p in parts) + b"--fz--\r\n"
            before = _rows(gateway)
            held = {r.sha256 for r in gateway.store.instances()}
            digests = [hashlib.sha256(p).hexdigest() for p in parts]
            # a part whose bytes are already stored (or repeat in this request) is a resend
            resends = sum(d in held for d in digests) + len(digests) - len(set(digests))
            req = urllib.request.Request(url, data=body, method="POST", headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=fz'})
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    answer = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                assert exc.code == 409
                answer = json.loads(exc.read())
            ok = len(answer.get("00081199", {}).get("Value", []))
            failed = len(answer.get("00081198", {}).get("Value", []))
            assert ok + failed == 200
            assert before + ok - resends <= _rows(gateway) <= before + ok
            refused += failed
            accepted += ok

        # -- still up, still correct -----------------------------------------------------------
        echo = AE(ae_title="ECHO")
        echo.add_requested_context("1.2.840.10008.1.1")
        a = echo.associate("127.0.0.1", gateway.dicom.port, ae_title="RADGUARD")
        assert a.send_c_echo().Status == 0
        a.release()
        assert gateway.wait_idle(300)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        gateway.stop()
    print(f"fuzz: {refused} malformed objects refused ({dimse_refused} over C-STORE), "
          f"{accepted} mutations that stayed valid were stored")
    assert refused >= 10_000
    assert _objects(gateway) == len({r.sha256 for r in gateway.store.instances()})
    # every stored mutation got a verdict with reasons from the layers, none a bare exception
    # caught by the pipeline's last resort
    errors = [r.detail["error"] for r in gateway.store.instances() if "error" in r.detail]
    assert not errors, errors[:5]
    assert not list(gateway.store.objects.glob("*/.*.tmp"))
