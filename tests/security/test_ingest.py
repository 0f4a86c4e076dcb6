"""Ingest and store under attack (issue 21, items 6, 7, 8 and part of 11).

* decompression bombs: a 261 KB deflated data set inflating to a 16384 x 16384 image, and
  JPEG / JPEG 2000 / RLE streams declaring a 16384 x 16384 frame, sent by dcmtk ``storescu``
  to a real ``radguard serve`` with a check process - refused before anything is inflated
  or decoded beyond the limits, peak RSS bounded, the server still works; the same objects
  already in the store are quarantined by the check process without decoding them; limits
  set in the configuration apply at the door and in the check processes; real large images
  still get in;
* UIDs at the door (PS3.5 9.1): a stored-XSS Study Instance UID is refused;
* shadowing: the same SOP Instance UID with other bytes never replaces the first copy;
* a full disk (a real, small tmpfs): new objects are refused with 0xA700, the workers live
  on, ``Gateway.problem`` says so, and everything resumes when space returns;
* sequences nested deeper than radguard follows get their own error, everywhere;
* large spooled objects are moved into the store, never read into memory.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import resource
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from radguard.dicom.io import read_dataset, read_dataset_bytes, write_dataset
from radguard.dicom.pixels import pixel_array, validate_pixel_data
from radguard.errors import DicomReadError
from radguard.gateway.dimse import header_of
from radguard.gateway.store import Store
from tests.conftest import DICOM_DIR, NIH_DX, dcmtk_tool
from tests.security.conftest import start_gateway

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on hostile values

HUGE = 16384  # a 16384 x 16384 frame: 268 M pixels
FRAME_LIMIT = "pixels per frame at most"  # how the refusal reads
MAX_NESTING = 64  # radguard.dicom.io.MAX_NESTING (imported in the tests: the regression
                  # tests must run, and fail, on code without it)


# -- objects ---------------------------------------------------------------------------------

def _image(rows: int = 64, columns: int = 64, syntax: str = ExplicitVRLittleEndian,
           bits: int = 8, frames: int = 1) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "ATTACK", "Attack^Test", "OT"
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    return ds


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _meta_end(data: bytes) -> int:
    return 144 + int.from_bytes(data[140:144], "little")


def _small(rows: int = 64, columns: int = 64) -> np.ndarray:
    return (np.arange(rows * columns) % 251).astype(np.uint8).reshape(rows, columns)


def deflate_bomb(side: int = HUGE) -> bytes:
    """Deflated Explicit VR Little Endian: a header declaring side x side 8-bit pixels and
    that many zero bytes, deflated to about 261 KB (deflate's limit is ~1032:1)."""
    ds = _image(side, side)
    plain = _part10(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = _part10(ds)  # the File Meta Information naming the deflated syntax
    size = side * side
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [head[:_meta_end(head)], deflate.compress(
        plain[_meta_end(plain):] + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, size))]
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        out.append(deflate.compress(zeros))
    out.append(deflate.compress(bytes(size & ((1 << 20) - 1))))
    out.append(deflate.flush())
    return b"".join(out)


def _patch_sof(stream: bytes, side: int) -> bytes:
    """A JPEG stream whose frame header (SOF) declares side x side."""
    s, at = bytearray(stream), 2
    while s[at + 1] not in (0xC0, 0xC1, 0xC2, 0xC3):
        at += 2 + int.from_bytes(s[at + 2:at + 4], "big")
    s[at + 5:at + 9] = side.to_bytes(2, "big") * 2
    return bytes(s)


def _patch_siz(stream: bytes, side: int) -> bytes:
    """A JPEG 2000 codestream whose SIZ marker declares one side x side tile."""
    s = bytearray(stream)
    at = s.index(b"\xff\x51")
    for offset in (6, 10, 22, 26):  # Xsiz, Ysiz, XTsiz, YTsiz
        s[at + offset:at + offset + 4] = side.to_bytes(4, "big")
    return bytes(s)


def compressed_bomb(kind: str, side: int = HUGE) -> bytes:
    """A few KB of JPEG, JPEG 2000 or RLE whose header and stream declare side x side."""
    pixels = _small()
    buf = io.BytesIO()
    if kind == "jpeg":
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        frame, syntax = _patch_sof(buf.getvalue(), side), JPEGBaseline8Bit
    elif kind == "j2k":
        Image.fromarray(pixels).save(buf, "JPEG2000", no_jp2=True)
        frame, syntax = _patch_siz(buf.getvalue(), side), JPEG2000Lossless
    else:
        small = _image()
        small.PixelData = pixels.tobytes()
        small.compress(RLELossless)
        frame, syntax = next(generate_frames(small.PixelData, number_of_frames=1)), RLELossless
    ds = _image(side, side, syntax)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return _part10(ds)


BOMBS = {"deflate": ("-xd", deflate_bomb), "jpeg": ("-xy", lambda: compressed_bomb("jpeg")),
         "j2k": ("-xv", lambda: compressed_bomb("j2k")),
         "rle": ("-xr", lambda: compressed_bomb("rle"))}


def _header(data: bytes) -> dict[str, str]:
    """What the store indexes, read without any check (to plant objects behind the door)."""
    ds = read_dataset_bytes(data, stop_before_pixels=True)
    return {"sop_uid": str(ds.SOPInstanceUID), "study_uid": str(ds.StudyInstanceUID),
            "series_uid": str(ds.SeriesInstanceUID), "sop_class": str(ds.SOPClassUID),
            "modality": "OT", "patient_id": "ATTACK", "patient_name": "Attack^Test"}


def _storescu(port: int, *paths: Path, options: tuple[str, ...] = (), aet: str = "ATTACKER"
              ) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk_tool("storescu"), *options, "-aet", aet, "-aec", "RADGUARD",
                           "127.0.0.1", str(port), *map(str, paths)], capture_output=True,
                          text=True, timeout=300)


def _wait(predicate, timeout: float = 120.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# -- decompression bombs against a real gateway process ----------------------------------------

@pytest.fixture(scope="module", params=[True, False], ids=["decode-at-door", "no-decode"])
def bomb_gateway(request, tmp_path_factory):
    """A ``radguard serve`` process with one check process, decoding compressed pixel data
    at the door or not (then only the check process would decode it)."""
    folder = tmp_path_factory.mktemp("bombs")
    gw = start_gateway(folder, f"validate_compressed_pixels = "
                               f"{'true' if request.param else 'false'}\n", check_processes=1)
    yield gw, folder
    gw.stop()


def test_bombs_are_refused_at_the_door_with_bounded_memory(bomb_gateway):
    gw, folder = bomb_gateway
    time.sleep(1.0)
    idle = gw.rss_mb()
    for name, (option, make) in BOMBS.items():
        path = folder / f"{name}.dcm"
        path.write_bytes(make())
        gw.reset_peak()
        sent = _storescu(gw.dicom_port, path, options=(option,))
        peak = gw.peak_mb()
        print(f"{name}: {path.stat().st_size} bytes sent, peak {peak:.0f} MB, idle {idle:.0f}")
        assert sent.returncode != 0, f"{name} was accepted: {sent.stdout}{sent.stderr}"
        assert peak - idle < 500, f"{name}: peak RSS {peak:.0f} MB, idle {idle:.0f} MB"
    assert gw.alive()
    assert gw.stderr_text().count(FRAME_LIMIT) >= len(BOMBS), gw.stderr_text()[-3000:]
    assert "Traceback" not in gw.stderr_text()
    assert not Store(gw.data_dir).instances("patient_id='ATTACK'")
    # the server still works: a real radiograph goes in
    assert _storescu(gw.dicom_port, NIH_DX, aet="DX1").returncode == 0
    _wait(lambda: Store(gw.data_dir).instances("state='done' OR state='quarantined'"),
          what="the radiograph to be checked")


def test_bombs_already_stored_are_quarantined_by_the_check_process(bomb_gateway):
    """Objects that got into the store some other way (an older version, lowered limits)
    meet the same limits in the check process: quarantined as unverifiable, not decoded."""
    gw, _ = bomb_gateway
    store = Store(gw.data_dir)
    time.sleep(1.0)
    idle = gw.rss_mb()
    gw.reset_peak()
    planted = []
    for _name, (_option, make) in BOMBS.items():
        data = make()
        planted.append(store.ingest(data, _header(data), source="planted"))
    _wait(lambda: all(store.get(i).state not in ("queued", "processing") for i in planted),
          what="the planted bombs to be checked")
    peak = gw.peak_mb()
    print(f"planted bombs: peak {peak:.0f} MB, idle {idle:.0f}")
    assert peak - idle < 500
    for row_id in planted:
        row = store.get(row_id)
        assert (row.state, row.verdict) == ("quarantined", "unverifiable"), row.detail
        assert any(FRAME_LIMIT in r for r in row.detail["reasons"]), row.detail["reasons"]
        assert "error" not in row.detail  # a verdict with its reason, not a crash
    assert gw.alive()


def test_configured_limits_hold_at_the_door_and_in_the_check_process(tmp_path):
    """``max_frame_pixels`` (2 M) from the TOML file: the door refuses a 2048 x 2048 image, and
    the check process (which gets the configuration when spawned) quarantines one planted
    behind the door, with the configured number in the reason."""
    gw = start_gateway(tmp_path, "max_frame_pixels = 2000000\n", check_processes=1)
    try:
        ds = _image(2048, 2048)
        ds.PixelData = np.zeros((2048, 2048), np.uint8).tobytes()
        data = _part10(ds)
        (tmp_path / "big.dcm").write_bytes(data)
        assert _storescu(gw.dicom_port, tmp_path / "big.dcm").returncode != 0
        assert "2,000,000 pixels per frame at most" in gw.stderr_text()
        store = Store(gw.data_dir)
        row_id = store.ingest(data, _header(data), source="planted")
        _wait(lambda: store.get(row_id).state == "quarantined", what="the check")
        reasons = store.get(row_id).detail["reasons"]
        assert any("2,000,000 pixels per frame at most" in r for r in reasons), reasons
        assert _storescu(gw.dicom_port, NIH_DX, aet="DX1").returncode == 0  # 1024 x 1024
    finally:
        gw.stop()


# -- decode limits, in process -----------------------------------------------------------------

@pytest.fixture
def limits():
    """The decode limits' setter; the process's limits are restored afterwards."""
    from radguard.dicom.limits import decode_limits, set_decode_limits

    saved = decode_limits()
    yield set_decode_limits
    set_decode_limits(saved)


@pytest.mark.parametrize("kind", ["jpeg", "j2k", "rle"])
def test_every_decode_path_checks_the_limits_first(kind, tmp_path):
    from radguard.forensics.scan import scan_file
    from radguard.images import display_frame

    data = compressed_bomb(kind)
    ds = read_dataset_bytes(data, "bomb")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for decode in (lambda: pixel_array(ds), lambda: display_frame(ds),
                   lambda: validate_pixel_data(ds, decode_compressed=False),
                   lambda: header_of(data, "bomb", decode_compressed=False)):
        with pytest.raises(DicomReadError, match=FRAME_LIMIT):
            decode()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start < 100_000  # kB
    (tmp_path / "bomb.dcm").write_bytes(data)
    scan = scan_file(tmp_path / "bomb.dcm")
    assert scan.verdict == "unverifiable" and any(FRAME_LIMIT in r for r in scan.reasons)


def test_raster_images_meet_the_same_limits(tmp_path):
    """PNG (the CLI's raster input): a 64 x 64 file whose header declares a huge image -
    beyond radguard's limit (11000 x 11000), or beyond Pillow's own (16384 x 16384)."""
    from radguard.images import read_for_analysis, read_grey

    buf = io.BytesIO()
    Image.fromarray(_small()).save(buf, "PNG")
    for side, why in ((11000, FRAME_LIMIT), (HUGE, "too large")):
        png = bytearray(buf.getvalue())
        png[16:24] = struct.pack(">II", side, side)  # IHDR width, height
        png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
        (tmp_path / "bomb.png").write_bytes(bytes(png))
        for read in (read_grey, read_for_analysis):
            with pytest.raises(DicomReadError, match=why):
                read(tmp_path / "bomb.png")


def test_real_large_images_are_within_the_defaults(tmp_path):
    """A 4096 x 5120 16-bit mammogram is checked, decoded and displayed; a 1 GB multi-frame
    (tomosynthesis, CT) is within the limits; 16384 x 16384 is not."""
    from radguard.dicom.limits import decoded_size
    from radguard.images import display_frame

    ds = _image(5120, 4096, bits=16)
    ds.BitsStored, ds.HighBit = 14, 13
    ds.PixelData = (np.arange(5120 * 4096, dtype=np.uint32) % 16000).astype(np.uint16).tobytes()
    data = _part10(ds)
    assert header_of(data, "mammogram")["sop_uid"] == ds.SOPInstanceUID
    parsed = read_dataset_bytes(data)
    assert pixel_array(parsed).shape == (5120, 4096)
    assert display_frame(parsed).shape == (5120, 4096)
    assert decoded_size("tomo", 2457, 1890, 110, 1, 16) > 1e9  # 1.02 GB: fine
    assert decoded_size("ct", 512, 512, 2000, 1, 16) > 1e9
    with pytest.raises(DicomReadError, match="decode to"):
        decoded_size("huge", 8192, 8192, 40, 1, 16)  # 5.4 GB
    with pytest.raises(DicomReadError, match="impossible"):
        decoded_size("negative", 512, 512, -3, 1, 16)


def test_gateway_defaults_are_the_library_defaults():
    from radguard.dicom.limits import DecodeLimits
    from radguard.gateway import GatewayConfig

    assert GatewayConfig().decode_limits() == DecodeLimits()


def test_encapsulated_data_must_fit_the_header(limits):
    """A cheap look at the fragments: one per frame at least, and no ratio beyond reason."""
    frame = compressed_bomb("rle", 64)  # a real 64 x 64 RLE frame
    stream = next(generate_frames(read_dataset_bytes(frame).PixelData, number_of_frames=1))
    ds = _image(64, 64, RLELossless, frames=10)
    ds.PixelData = encapsulate([stream] * 3)  # 3 fragments for 10 frames
    ds["PixelData"].VR = "OB"
    with pytest.raises(DicomReadError, match="10 frames declared but .* 3 fragment"):
        header_of(_part10(ds), "short", decode_compressed=False)
    ds = _image(4096, 4096, RLELossless, frames=8)  # 256 MB decoded from a few KB
    ds.PixelData = encapsulate([stream] * 8)
    ds["PixelData"].VR = "OB"
    with pytest.raises(DicomReadError, match="cannot hold"):
        header_of(_part10(ds), "ratio", decode_compressed=False)
    from radguard.dicom.limits import DecodeLimits

    limits(DecodeLimits(max_compression_ratio=0))  # the check can be switched off
    header_of(_part10(ds), "ratio", decode_compressed=False)


def test_deflated_data_sets_are_inflated_with_a_bound(tmp_path, limits):
    # an ordinary deflated image still reads exactly as pydicom reads it
    ds = read_dataset(NIH_DX)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    write_dataset(ds, tmp_path / "deflated.dcm")
    ours = read_dataset(tmp_path / "deflated.dcm")
    from pydicom import dcmread

    theirs = dcmread(tmp_path / "deflated.dcm")
    assert [e.tag for e in ours] == [e.tag for e in theirs]
    assert all(ours[e.tag].value == e.value for e in theirs if e.tag != 0x7FE00010)
    assert np.array_equal(pixel_array(ours), theirs.pixel_array)
    assert header_of(tmp_path / "deflated.dcm")["sop_uid"] == ds.SOPInstanceUID
    # the bomb: with a lower inflate limit it is refused while counting, holding nothing
    from radguard.dicom.limits import DecodeLimits

    limits(DecodeLimits(max_inflated_bytes=64 << 20))
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DicomReadError, match="inflates to more than 67,108,864 bytes"):
        read_dataset_bytes(deflate_bomb(), "bomb")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start < 100_000  # kB
    data = (tmp_path / "deflated.dcm").read_bytes()
    with pytest.raises(DicomReadError, match="truncated"):
        read_dataset_bytes(data[:len(data) // 2], "cut")


# -- UIDs at the door ---------------------------------------------------------------------------

XSS = "1'><img src=x onerror=alert(document.cookie)>"


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID",
                                     "SOPInstanceUID", "SOPClassUID"])
@pytest.mark.parametrize("value, why", [
    (XSS, "characters other than digits and dots"), ("1." + "2" * 70, "at most 64"),
    ("", "is empty"), ("1..2", "empty component")])
def test_malformed_uids_are_refused(keyword, value, why):
    ds = _image()
    ds.PixelData = _small().tobytes()
    setattr(ds, keyword, value)
    with pytest.raises(DicomReadError, match=why):
        header_of(_part10(ds), "C-STORE from X")


def test_harmless_uid_flaws_and_real_files_get_in():
    ds = _image()
    ds.PixelData = _small().tobytes()
    ds.StudyInstanceUID = "1.2.840.0113619.2.55.3.0604688119"  # leading zeros: tolerated
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # odd length: encoded with a NUL pad
    data = _part10(ds)
    assert b"1.2.826.0.1.3680043.8.498.1\x00" in data
    header = header_of(data)
    assert header["study_uid"] == "1.2.840.0113619.2.55.3.0604688119"
    assert header["sop_uid"] == "1.2.826.0.1.3680043.8.498.1"
    files = sorted(DICOM_DIR.rglob("*.dcm"))
    assert len(files) >= 10
    for path in files:
        header_of(path.read_bytes(), str(path), decode_compressed=False)
        header_of(path, str(path), decode_compressed=False)


def test_xss_uid_over_c_store_is_refused_and_not_stored(tmp_path):
    from radguard.gateway import Gateway, GatewayConfig

    ds = read_dataset(NIH_DX)
    ds.StudyInstanceUID = XSS
    write_dataset(ds, tmp_path / "xss.dcm")
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0).validate())
    gateway.start()
    try:
        assert _storescu(gateway.dicom.port, tmp_path / "xss.dcm").returncode != 0
        assert gateway.dicom.refused == 1 and gateway.store.instances() == []
        refused = [e for e in gateway.audit_log.entries() if e.action == "dimse.refused"]
        assert "Study Instance UID holds characters other than digits and dots" in \
            refused[0].details["reason"]
        assert "onerror" not in json.dumps(refused[0].details)  # the value is not echoed
    finally:
        gateway.stop()


# -- shadowing ---------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return Store(tmp_path / "data")
    s = Store(tmp_path / "data", request.getfixturevalue("postgres_url"))
    s.execute("DELETE FROM instances")
    return s


def _header_for(sop: str) -> dict[str, str]:
    return {"sop_uid": sop, "study_uid": "1.2.3", "series_uid": "1.2.3.4", "modality": "OT"}


def test_store_keeps_the_first_copy_of_a_sop_instance_uid(store, tmp_path):
    first = store.ingest(b"original", _header_for("1.2.3.4.5"), source="dimse",
                         calling_ae="DX1")
    assert store.ingest(b"original", _header_for("1.2.3.4.5"), source="dimse",
                        calling_ae="DX1") == first  # a resend: no second row
    other = store.ingest(b"forged", _header_for("1.2.3.4.5"), source="dimse",
                         calling_ae="ATTACKER")
    rows = store.instances("sop_uid=?", ("1.2.3.4.5",))
    assert [(r.id, r.duplicate_of) for r in rows] == [(first, None), (other, first)]
    store.execute("UPDATE instances SET state='done' WHERE id=?", (first,))
    store.execute("UPDATE instances SET state='quarantined' WHERE id=?", (other,))
    assert store.served("1.2.3.4.5").id == first  # the conflicting copy shadows nothing
    # an admin's release accepts the conflicting copy as the replacement: one served copy
    store.decide(other, "done", "admin", "corrected by the modality")
    assert store.served("1.2.3.4.5").id == other
    superseded = store.get(first)
    assert superseded.state == "rejected" and "superseded by row" in superseded.decision_note
    # concurrent senders of one UID (two gateways on PostgreSQL): exactly one first copy
    stores = [store, Store(tmp_path / "other", store.backend.target)] \
        if store.backend.name == "postgresql" else [store, store]
    barrier = threading.Barrier(8)

    def send(n: int) -> None:
        barrier.wait()
        stores[n % 2].ingest(f"copy {n}".encode(), _header_for("9.8.7"), source="dimse")

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    rows = store.instances("sop_uid=?", ("9.8.7",))
    assert len(rows) == 8 and [r.duplicate_of for r in rows].count(None) == 1


def test_a_modified_copy_from_another_ae_cannot_shadow_the_original(tmp_path):
    from radguard.gateway import Gateway, GatewayConfig
    from radguard.gateway.auth import Users

    original = tmp_path / "original.dcm"
    ds = read_dataset(NIH_DX)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_dataset(ds, original)
    pixels = pixel_array(ds).copy()
    pixels[100:300, 100:300] = 0  # the attacker's edit
    ds.PixelData = pixels.tobytes()
    write_dataset(ds, tmp_path / "forged.dcm")
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0).validate())
    Users(gateway.store).add("rad", "radiologist", "a long radiologist password")
    token = Users(gateway.store).issue_token("rad")
    gateway.start()
    try:
        for path, aet in ((original, "DX1"), (tmp_path / "forged.dcm", "ATTACKER"),
                          (original, "DX1")):
            assert _storescu(gateway.dicom.port, path, aet=aet).returncode == 0
            assert gateway.wait_idle(120)
        rows = gateway.store.instances("sop_uid=?", (str(ds.SOPInstanceUID),))
        assert len(rows) == 2  # the resend added nothing
        first, forged = rows
        assert first.state == "done" and first.calling_ae == "DX1"
        assert forged.state == "quarantined" and forged.duplicate_of == first.id
        reason = forged.detail["reasons"][0]
        assert reason.startswith(f"conflicting duplicate of SOP Instance UID {ds.SOPInstanceUID}")
        assert "first received" in reason and "from DX1" in reason
        assert forged.forwarded is None
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway.http_port}/dicom-web/studies/{first.study_uid}/series/"
            f"{first.series_uid}/instances/{first.sop_uid}",
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = answer.read()
        served = gateway.store.file(first).read_bytes()
        assert served in body and gateway.store.file(forged).read_bytes() not in body
        assert gateway.store.served(first.sop_uid).id == first.id
        actions = [(e.action, e.details.get("duplicate_of")) for e in gateway.audit_log.entries()]
        assert ("instance.quarantined", first.id) in actions
    finally:
        gateway.stop()


# -- a full disk -------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 48 MB filesystem (tmpfs) to fill. CI runs as root; anywhere a mount is not
    allowed this fails loudly rather than skip."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs to fill (run as root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Write zeros until the filesystem says ENOSPC; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            chunk = bytes(size)
            while True:
                try:
                    if os.write(fd, chunk) < size:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def test_full_disk_refuses_new_images_and_workers_resume(small_disk, tmp_path, caplog):
    """Item 8: queued instances when the disk fills up. The claim or the result cannot be
    written: the worker keeps the instance for the queue and waits; C-STORE gets 0xA700;
    ``problem`` says "disk full"; the transition is audited once; freeing space resumes
    everything without a restart."""
    from radguard.gateway import Gateway, GatewayConfig

    caplog.set_level("DEBUG", logger="radguard.gateway")
    data = small_disk / "data"
    store = Store(data)
    queued = []
    for n in range(24):
        ds = read_dataset(NIH_DX)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        write_dataset(ds, tmp_path / f"q{n}.dcm")
        payload = (tmp_path / f"q{n}.dcm").read_bytes()
        queued.append(store.ingest(payload, header_of(payload), source="dimse",
                                   calling_ae="DX1"))
    later = tmp_path / "later.dcm"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_dataset(ds, later)
    gateway = Gateway(GatewayConfig(data_dir=str(data), dicom_port=0, http_port=0,
                                    check_processes=0, workers=1).validate())
    gateway.start()
    try:
        # the write-ahead log emptied, then every free byte taken: the next claim or result
        # needs space the disk no longer has
        with sqlite3.connect(data / "radguard.db", timeout=30) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        filler = _fill(small_disk)
        refused = _storescu(gateway.dicom.port, later, aet="DX1", options=("-v",))
        assert refused.returncode != 0, refused.stdout
        assert "Refused: OutOfResources" in refused.stdout + refused.stderr, refused.stdout
        _wait(lambda: gateway.problem is not None, 30, "the problem to be reported")
        assert gateway.problem.startswith("disk full since ")
        assert "new images refused" in gateway.problem
        time.sleep(3)  # the worker meets the full disk (claim or result) and must live on
        unfinished = [i for i in queued if gateway.store.get(i).state != "done"]
        assert unfinished, "the worker finished everything before the disk filled up"
        met = [r.getMessage() for r in caplog.records if r.getMessage().startswith(
            ("worker waits for the store", "instance "))]
        print("\n".join(met[:5]))
        assert met, "the worker never met the full disk"
        workers = [t for t in gateway._threads if t.name.startswith("radguard-worker")]
        assert workers and all(t.is_alive() for t in workers)
        filler.unlink()  # space returns
        _wait(lambda: gateway.problem is None, 60, "the store to recover by itself")
        assert gateway.wait_idle(180)
        assert _storescu(gateway.dicom.port, later, aet="DX1").returncode == 0
        assert gateway.wait_idle(120)
    finally:
        gateway.stop()
    states = {r.id: r.state for r in gateway.store.instances()}
    assert all(states[i] in ("done", "quarantined") for i in queued)
    assert len(states) == len(queued) + 1
    actions = [e.action for e in gateway.audit_log.entries()]
    assert actions.count("store.recovered") == 1
    assert actions.count("store.unavailable") <= 1  # once, if the full disk let it be written
    recovered = next(e for e in gateway.audit_log.entries() if e.action == "store.recovered")
    assert recovered.details["failing_since"] and recovered.details["failed_writes"] >= 1


# -- deep nesting ------------------------------------------------------------------------------

def _nested(depth: int, *, implicit: bool = False, undefined: bool = True) -> bytes:
    """A Part 10 file whose Content Sequence nests ``depth`` levels, built flat (pydicom's
    own writer would recurse)."""
    ds = _image()
    ds.PixelData = _small().tobytes()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    head = io.BytesIO()
    dcmwrite(head, ds, enforce_file_format=True, implicit_vr=implicit)

    def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
        size = len(value) if length is None else length
        if implicit:
            return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, size) + value
        if vr == b"SQ":
            return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, size) + value
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, size) + value

    leaf = element(0x00080100, b"SH", b"X ")
    if undefined:
        opening = element(0x0040A730, b"SQ", b"", 0xFFFFFFFF) + struct.pack(
            "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        sequence = opening * depth + leaf + closing * depth
    else:
        sequence = leaf
        for _ in range(depth):
            sequence = element(0x0040A730, b"SQ", struct.pack("<HHL", 0xFFFE, 0xE000,
                                                              len(sequence)) + sequence)
    data = head.getvalue()
    at = data.index(b"\xe0\x7f\x10\x00")  # before the pixel data: elements stay in order
    return data[:at] + sequence + data[at:]


@pytest.mark.parametrize("implicit, undefined", [(False, True), (False, False), (True, True),
                                                 (True, False)])
def test_deep_nesting_is_its_own_clear_error(implicit, undefined):
    from radguard.dicom import io as dicom_io

    assert dicom_io.MAX_NESTING == MAX_NESTING
    too_deep = f"sequences nested deeper than {MAX_NESTING} levels"
    fine = read_dataset_bytes(_nested(MAX_NESTING, implicit=implicit, undefined=undefined))
    assert len(list(fine.iterall())) > MAX_NESTING
    for depth in (MAX_NESTING + 1, 5000):
        data = _nested(depth, implicit=implicit, undefined=undefined)
        with pytest.raises(DicomReadError, match=too_deep):
            read_dataset_bytes(data, "deep")
        with pytest.raises(DicomReadError, match=too_deep):
            header_of(data, "C-STORE from X")


def test_deep_nesting_in_verify_scan_and_over_c_store(tmp_path):
    from radguard.gateway import Gateway, GatewayConfig

    too_deep = f"sequences nested deeper than {MAX_NESTING} levels"
    files = {}
    for depth in (MAX_NESTING, MAX_NESTING + 1, 5000):
        files[depth] = tmp_path / f"deep{depth}.dcm"
        files[depth].write_bytes(_nested(depth, undefined=depth != 5000))
    for command in ("verify", "scan"):
        done = subprocess.run([sys.executable, "-m", "radguard.cli", command, "--json",
                               *map(str, files.values())], capture_output=True, text=True,
                              timeout=300)
        assert "Traceback" not in done.stderr and "RecursionError" not in done.stdout
        reports = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        assert len(reports) == 3
        text = [json.dumps(r) for r in reports]
        assert too_deep not in text[0] and all(too_deep in t for t in text[1:]), text
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0).validate())
    gateway.start()
    try:
        assert _storescu(gateway.dicom.port, files[5000]).returncode != 0
        assert _storescu(gateway.dicom.port, files[MAX_NESTING]).returncode == 0
        assert gateway.wait_idle(120)
        refused = [e for e in gateway.audit_log.entries() if e.action == "dimse.refused"]
        assert too_deep in refused[0].details["reason"]
        assert len(gateway.store.instances()) == 1
    finally:
        gateway.stop()


# -- large objects arrive as files ---------------------------------------------------------------

def test_spooled_objects_are_parsed_in_place_and_moved_into_the_store(tmp_path):
    from radguard.gateway import GatewayConfig
    from radguard.gateway.acceptor import StoreRequest
    from radguard.gateway.dimse import DicomServer

    store = Store(tmp_path / "data")
    frames = 64  # 64 frames of 2048 x 1024 16-bit: 256 MiB of native pixel data
    ds = _image(2048, 1024, bits=16, frames=frames)
    ds.PixelData = b""  # written by hand below: the test never holds the pixels either
    head = _part10(ds)
    size = 2048 * 1024 * 2 * frames
    at = head.index(b"\xe0\x7f\x10\x00")
    spooled = store.incoming / "large.spool"
    digest = hashlib.sha256()
    with open(spooled, "wb") as fh:
        for piece in (head[:at], struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, size)):
            fh.write(piece)
            digest.update(piece)
        block = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(size >> 20):
            fh.write(block)
            digest.update(block)
    inode = spooled.stat().st_ino
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    header = header_of(spooled, "C-STORE from BIG")
    row = store.ingest(spooled, header, source="dimse", calling_ae="BIG")
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    assert grew < 64_000, f"{grew} kB more resident for a 256 MiB object"  # kB
    stored = store.get(row)
    assert not spooled.exists() and store.file(stored).stat().st_ino == inode  # renamed
    assert stored.sha256 == digest.hexdigest() and stored.size == store.file(stored).stat().st_size
    # through the C-STORE handler: a refused spooled object is deleted, an identical resend
    # is acknowledged without a second row
    server = DicomServer(GatewayConfig(data_dir=str(tmp_path / "data")), store)
    bad = store.incoming / "bad.spool"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + b"garbage")
    request = StoreRequest("BIG", str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                           ExplicitVRLittleEndian, b"", bad)
    assert server._handle_store(request) == 0xC000 and not bad.exists()
    again = store.incoming / "again.spool"
    os.link(store.file(stored), again)
    request = StoreRequest("BIG", str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                           ExplicitVRLittleEndian, b"", again)
    assert server._handle_store(request) == 0x0000 and not again.exists()
    assert len(store.instances()) == 1
    (store.incoming / "left-by-a-crash.spool").write_bytes(b"x")
    assert store.recover()["spooled_removed"] == 1
