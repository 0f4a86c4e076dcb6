"""Ingest and store under attack (issue 21 items 6, 7, 8 and part of 11; review findings 3,
7, 10, 11 and 13).

* decompression bombs: a 261 KB deflated data set inflating to a 16384 x 16384 image, and
  JPEG / JPEG 2000 / RLE streams declaring a 16384 x 16384 frame, sent by dcmtk ``storescu``
  to a real ``radguard serve`` with a check process - refused before anything is inflated
  or decoded beyond the limits, peak RSS bounded, the server still works; the same objects
  already in the store are quarantined by the check process without decoding them; limits
  set in the configuration apply at the door and in the check processes; real large images
  still get in; native pixel data beyond ``max_decoded_mb`` (it cannot expand) gets in and
  is quarantined as too large to check;
* deflated data sets: inflating never copies the rest of the compressed input (linear),
  and concurrent deflated C-STOREs hold no more inflated data than the decode budget;
* refused C-STOREs: one log line and audit entry per peer address, not per calling AE;
* UIDs at the door (PS3.5 9.1): a stored-XSS Study Instance UID is refused;
* shadowing: the same SOP Instance UID with other bytes never replaces the first copy, a
  released copy supersedes every other, a rejected copy makes no later one a duplicate;
* a full disk (a real, small tmpfs): new objects are refused with 0xA700, the workers live
  on, ``Gateway.problem`` says so, and everything resumes when space returns, every queued
  instance ending ``done``; a full disk under the drift monitor requeues, never judges;
* sequences nested deeper than radguard follows get their own error, everywhere;
* large spooled objects are moved into the store, never read into memory.

Memory is measured as the kernel counts it: the peak resident set of a real gateway
process, or of a fresh subprocess doing the work (``peak_in_subprocess``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable
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
from radguard.gateway.store import Store, StoreError
from tests.conftest import DICOM_DIR, NIH_DX, dcmtk_tool
from tests.security.conftest import (
    fill_disk,
    leave_free,
    peak_in_subprocess,
    scale_back_off,
    start_gateway,
    wait_until,
)

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


def deflate_bomb(side: int = HUGE, *, level: int = 9) -> bytes:
    """Deflated Explicit VR Little Endian: a header declaring side x side 8-bit pixels and
    that many zero bytes, deflated to about 261 KB (deflate's limit is ~1032:1) - or, at
    zlib ``level`` 0, stored as they are (as large as inflated)."""
    ds = _image(side, side)
    plain = _part10(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = _part10(ds)  # the File Meta Information naming the deflated syntax
    size = side * side
    deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
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
        sent = _storescu(gw.dicom_port, path, options=(option, "-v"))
        peak = gw.peak_mb()
        print(f"{name}: {path.stat().st_size} bytes sent, peak {peak:.0f} MB, idle {idle:.0f}")
        assert "Store Response (Error: CannotUnderstand)" in sent.stdout + sent.stderr, \
            f"{name} was not refused: {sent.stdout}{sent.stderr}"
        assert peak - idle < 500, f"{name}: peak RSS {peak:.0f} MB, idle {idle:.0f} MB"
    assert gw.alive()
    # one log line a minute per peer address: the first refusal's (finding 7)
    assert FRAME_LIMIT in gw.stderr_text(), gw.stderr_text()[-3000:]
    assert "Traceback" not in gw.stderr_text()
    assert not Store(gw.data_dir).instances("patient_id='ATTACK'")
    # the server still works: a real radiograph goes in
    assert _storescu(gw.dicom_port, NIH_DX, aet="DX1").returncode == 0
    wait_until(lambda: Store(gw.data_dir).instances("state='done' OR state='quarantined'"),
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
    wait_until(lambda: all(store.get(i).state not in ("queued", "processing") for i in planted),
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
        wait_until(lambda: store.get(row_id).state == "quarantined", what="the check")
        reasons = store.get(row_id).detail["reasons"]
        assert any("2,000,000 pixels per frame at most" in r for r in reasons), reasons
        assert _storescu(gw.dicom_port, NIH_DX, aet="DX1").returncode == 0  # 1024 x 1024
    finally:
        gw.stop()


def test_native_pixel_data_beyond_the_decode_limit_gets_in_and_is_quarantined(tmp_path):
    """Finding 13: native pixel data cannot expand - it is as large as what arrived, within
    ``max_data_set_mb`` - so ``max_decoded_mb`` (16 here) does not refuse it at the door
    (before: 0xC000, permanent, for a real 2-4 GiB object); the checks cannot decode it and
    say so: quarantined as unverifiable, "too large to check"."""
    gw = start_gateway(tmp_path, "max_decoded_mb = 16\n")
    try:
        ds = _image(3072, 4096, bits=16)  # 24 MiB of native pixel data
        ds.PixelData = np.zeros((3072, 4096), np.uint16).tobytes()
        (tmp_path / "large.dcm").write_bytes(_part10(ds))
        sent = _storescu(gw.dicom_port, tmp_path / "large.dcm")
        assert sent.returncode == 0, sent.stdout + sent.stderr + gw.stderr_text()[-2000:]
        store = Store(gw.data_dir)
        wait_until(lambda: [r.state for r in store.instances()] == ["quarantined"],
                   what="the large image to be checked")
        row = store.instances()[0]
        assert row.verdict == "unverifiable"
        assert any("too large to check" in r for r in row.detail["reasons"]), row.detail
    finally:
        gw.stop()


# -- deflated data sets under concurrency -------------------------------------------------------

def slow_deflated(mib: int) -> bytes:
    """A deflated data set of about ``mib`` MiB (some 150 KB on the wire) whose check takes
    seconds: a Content Sequence of a million small items, the last one nesting deeper than
    radguard reads, so it is refused - after the whole sequence was walked."""
    ds = _image()
    plain = _part10(ds)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = _part10(ds)

    def element(tag: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value

    def sequence(items: bytes) -> bytes:
        return struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, len(items)) + items

    def item(body: bytes) -> bytes:
        return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body

    code = item(element(0x00080100, b"SH", b"CODE01") + element(0x00080102, b"SH", b"DCM ")
                + element(0x00080104, b"LO", b"Meaning"))
    deep = element(0x00080100, b"SH", b"X ")
    for _ in range(MAX_NESTING + 6):
        deep = sequence(item(deep))
    content = sequence(code * ((mib << 20) // len(code)) + item(deep))
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    # (0040,A730) follows every element of _image(): the data set stays in tag order
    return head[:_meta_end(head)] + deflate.compress(plain[_meta_end(plain):] + content) \
        + deflate.flush()


def _store_as_is(port: int, path: Path, aet: str) -> int:
    """C-STORE a file's data set exactly as stored (pynetdicom's chunked mode, which the
    caller switches on): a deflated data set arrives deflated, not re-encoded. The status."""
    from pynetdicom import AE

    from radguard.gateway.dimse import open_association

    ae = AE(ae_title=aet)
    ae.add_requested_context(SecondaryCaptureImageStorage, DeflatedExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 600
    assoc = open_association(ae, "127.0.0.1", port, "RADGUARD")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_concurrent_deflated_stores_hold_no_more_than_the_decode_budget(tmp_path, monkeypatch):
    """Finding 3: six C-STOREs at once, each ~150 KB inflating to 48 MiB that takes seconds
    to check. The inflated copy counts against ``decode_budget_mb`` (64 here) until the
    door's check of it is done, so they take turns: +64 MB at the peak. Before, the
    reservation ended when inflating did and all six were held at once (+293 MB; 32
    associations x 512 MiB with the defaults). Refusals from one address are also logged
    once, not once per calling AE (finding 7)."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    gw = start_gateway(tmp_path, "decode_budget_mb = 64\nmax_inflated_mb = 64\n")
    try:
        files = []
        for n in range(6):
            files.append(tmp_path / f"deflated{n}.dcm")
            files[-1].write_bytes(slow_deflated(48))
        time.sleep(1.0)  # settle before measuring (not a synchronisation)
        idle = gw.rss_mb()
        gw.reset_peak()
        statuses: dict[int, int] = {}
        senders = [threading.Thread(target=lambda n=n: statuses.__setitem__(
            n, _store_as_is(gw.dicom_port, files[n], f"SENDER{n}"))) for n in range(6)]
        began = time.monotonic()
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(900)
        minutes = int((time.monotonic() - began) // 60)  # one line a minute per peer
        peak = gw.peak_mb()
        print(f"6 deflated C-STOREs of 48 MiB: peak {peak - idle:+.0f} MB (idle {idle:.0f})")
        assert statuses == dict.fromkeys(range(6), 0xC000), statuses
        assert peak - idle < 150, f"peak {peak:.0f} MB, idle {idle:.0f} MB"
        log = gw.stderr_text()
        assert f"sequences nested deeper than {MAX_NESTING} levels" in log
        refusals = [line for line in log.splitlines() if line.startswith("C-STORE from ")]
        assert 1 <= len(refusals) <= 1 + minutes, refusals
        assert gw.alive() and "Traceback" not in log
    finally:
        gw.stop()


def test_one_thread_at_a_time_may_go_over_the_decode_budget():
    """Second review H1: a thread already holding part of the budget never waited, so
    every thread holding a small reservation (a deflated data set's few KB) could add a
    whole image beyond the budget (ByteBudget(100): 90 held, then 1 + 100: 191 of 100,
    and every further such thread another 100). Now one thread at a time may go over (the
    overdraft, kept until it holds nothing); another holder waits for it or for room."""
    from radguard.dicom.limits import ByteBudget

    budget = ByteBudget(100)
    steps = {f"{name}:{step}": threading.Event() for name in "ab"
             for step in ("small", "go", "over", "drop")}
    over: list[int] = []

    def holder(name: str) -> None:
        budget.acquire(1)  # a small reservation first: the thread is a holder
        steps[f"{name}:small"].set()
        steps[f"{name}:go"].wait(60)
        budget.acquire(100)
        over.append(budget.used)
        steps[f"{name}:over"].set()
        steps[f"{name}:drop"].wait(60)
        budget.release(100)
        budget.release(1)

    budget.acquire(90)  # this thread (a long check) holds most of the budget
    threads = [threading.Thread(target=holder, args=(name,), daemon=True) for name in "ab"]
    for thread in threads:
        thread.start()
    assert steps["a:small"].wait(60) and steps["b:small"].wait(60)
    steps["a:go"].set()
    assert steps["a:over"].wait(60)  # the first holder over the budget: the overdraft
    assert budget.used == 192
    steps["b:go"].set()
    # the second holder must not go over as well: it waits (before: 292 of 100 at once)
    assert not steps["b:over"].wait(2), f"two threads over the budget: {budget.used} of 100"
    steps["a:drop"].set()  # the first gives everything back: the overdraft passes on
    assert steps["b:over"].wait(60)
    assert over == [192, 191]
    steps["b:drop"].set()
    for thread in threads:
        thread.join(60)
    budget.release(90)
    assert budget.used == 0


def deflated_bitmap(side: int = 1024, frames: int = 64) -> bytes:
    """A deflated data set of 1-bit native pixels (as a segmentation holds): it inflates to
    side x side x frames / 8 bytes (8 MiB), and its pixels decode to eight times that, one
    byte per pixel (64 MiB)."""
    ds = _image(side, side, DeflatedExplicitVRLittleEndian, bits=1, frames=frames)
    ds.PixelData = np.packbits(np.indices((frames, side, side)).sum(axis=0) % 3 == 0,
                               bitorder="little").tobytes()
    ds["PixelData"].VR = "OB"
    return _part10(ds)


def test_concurrent_renderings_hold_at_most_the_decode_budget_and_one_image(tmp_path):
    """Second review H1 through a real gateway: 16 viewers render the same deflated 1-bit
    image at once, three times each (each rendering inflates 8 MiB, a small first
    reservation, then decodes 64 MiB) with ``decode_budget_mb`` = 64. Before, every thread
    that had inflated decoded without waiting: 7 x 64 MiB at once (+400-500 MB); now the
    budget plus one image."""
    from radguard.gateway.auth import Users

    gw = start_gateway(tmp_path, "decode_budget_mb = 64\n")
    try:
        data = deflated_bitmap()
        store = Store(gw.data_dir)
        row = store.ingest(data, header_of(data, "bitmap"), source="planted")
        wait_until(lambda: store.get(row).state not in ("queued", "processing"),
                   what="the planted image to be checked")
        Users(store).add("rad", "radiologist", "a long radiologist password")
        token = Users(store).issue_token("rad")
        url = f"{gw.url}/instances/{row}/image.png"

        def render() -> int:
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(request, timeout=600) as answer:
                return answer.status if answer.read(8) == b"\x89PNG\r\n\x1a\n" else 0

        assert render() == 200
        time.sleep(1.0)  # settle before measuring (not a synchronisation)
        idle = gw.rss_mb()
        gw.reset_peak()
        statuses: list[int] = []
        start = threading.Barrier(8)
        viewers = [threading.Thread(target=lambda: (start.wait(60), statuses.extend(
            render() for _ in range(4)))) for _ in range(8)]
        for viewer in viewers:
            viewer.start()
        for viewer in viewers:
            viewer.join(900)
        peak = gw.peak_mb()
        print(f"8 x 4 renderings of a deflated 1-bit image: peak {peak - idle:+.0f} MB "
              f"(idle {idle:.0f})")
        assert statuses == [200] * 32
        assert peak - idle < 64 + 64 + 150, f"peak {peak:.0f} MB, idle {idle:.0f} MB"
        assert gw.alive() and "Traceback" not in gw.stderr_text()
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


def _decode_every_path(reset_peak: Callable[[], None], kind: str) -> list[str]:
    """(In a subprocess, see ``peak_in_subprocess``.) What each decode path raises for a
    compressed bomb of ``kind``."""
    from radguard.images import display_frame

    data = compressed_bomb(kind)
    ds = read_dataset_bytes(data, "bomb")
    reset_peak()
    outcomes = []
    for decode in (lambda: pixel_array(ds), lambda: display_frame(ds),
                   lambda: validate_pixel_data(ds, decode_compressed=False),
                   lambda: header_of(data, "bomb", decode_compressed=False)):
        try:
            decode()
            outcomes.append("decoded")
        except DicomReadError as exc:
            outcomes.append(str(exc))
    return outcomes


@pytest.mark.parametrize("kind", ["jpeg", "j2k", "rle"])
def test_every_decode_path_checks_the_limits_first(kind, tmp_path):
    from radguard.forensics.scan import scan_file

    peak, outcomes = peak_in_subprocess(f"{__name__}:_decode_every_path", kind)
    print(f"{kind} bomb through every decode path: peak +{peak:.0f} MB")
    assert len(outcomes) == 4 and all(FRAME_LIMIT in o for o in outcomes), outcomes
    assert peak < 100, f"{peak:.0f} MB"
    data = compressed_bomb(kind)
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
    """A cheap look at the fragments: no ratio beyond reason. How many fragments hold the
    frames is the decoder's business (finding 13: a fragment-per-frame rule refused files
    that do not follow PS3.5 A.4 to the letter; the decoded size is bounded anyway)."""
    frame = compressed_bomb("rle", 64)  # a real 64 x 64 RLE frame
    stream = next(generate_frames(read_dataset_bytes(frame).PixelData, number_of_frames=1))
    ds = _image(64, 64, RLELossless, frames=10)
    ds.PixelData = encapsulate([stream] * 3)  # 3 fragments for 10 frames
    ds["PixelData"].VR = "OB"
    assert header_of(_part10(ds), "short", decode_compressed=False)["sop_uid"]
    with pytest.raises(DicomReadError, match="cannot decode pixel data"):
        header_of(_part10(ds), "short")  # what decoding says, when the door decodes
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
    data = (tmp_path / "deflated.dcm").read_bytes()
    with pytest.raises(DicomReadError, match="truncated"):
        read_dataset_bytes(data[:len(data) // 2], "cut")


def _refuse_deflated(reset_peak: Callable[[], None], level: str) -> str:
    """(In a subprocess.) Read a 100 MiB deflated data set, compressed at zlib ``level``,
    with ``max_inflated_mb`` = 64; what it raised."""
    from radguard.dicom.limits import DecodeLimits, set_decode_limits

    set_decode_limits(DecodeLimits(max_inflated_bytes=64 << 20))
    data = deflate_bomb(10240, level=int(level))
    reset_peak()
    try:
        read_dataset_bytes(data, "deflated")
    except DicomReadError as exc:
        return str(exc)
    return "read"


@pytest.mark.parametrize("level", ["9", "0"], ids=["bomb", "stored"])
def test_inflating_holds_neither_the_output_nor_a_copy_of_the_input(level):
    """Over ``max_inflated_mb``: refused while counting, at a cost of about one 1 MiB chunk.
    Level 0 (stored blocks: the input is as large as the output) is finding 3: zlib was
    handed the whole stream and copied what it had not consumed yet for every MiB of
    output - about 100 MB at once here, and quadratic time (a 128 MiB stored stream: 4.8 s
    before, 0.02 s now). It gets fixed 64 KiB input slices."""
    peak, refused = peak_in_subprocess(f"{__name__}:_refuse_deflated", level)
    print(f"100 MiB deflated at level {level}, refused while counting: +{peak:.0f} MB")
    assert "inflates to more than 67,108,864 bytes" in refused, refused
    assert peak < 32, f"{peak:.0f} MB to refuse a deflated data set"


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


def test_refusals_are_logged_and_audited_per_peer_not_per_calling_ae(tmp_path, caplog):
    """Finding 7: refusals were throttled per calling AE title, which the sender chooses: a
    new title per C-STORE made every refusal an fsync'd audit entry and a log line, and the
    throttle's tables grew without bound. Now one entry and one line per peer (an IPv4
    address, an IPv6 /64) a minute, and a summary of what was held back."""
    from radguard.gateway import GatewayConfig
    from radguard.gateway.acceptor import StoreRequest
    from radguard.gateway.dimse import DicomServer
    from radguard.governance.auditlog import AuditLog

    caplog.set_level(logging.WARNING, logger="radguard.gateway")
    audit = AuditLog(tmp_path / "audit.jsonl", actor="test")
    server = DicomServer(GatewayConfig(data_dir=str(tmp_path / "data")),
                         Store(tmp_path / "data"), audit=audit.append)
    junk = b"\0" * 128 + b"DICM" + b"junk"
    peers = ["192.0.2.7"] * 300 + [f"2001:db8:1:2::{n:x}" for n in range(1, 301)]
    for n, peer in enumerate(peers):
        request = StoreRequest(f"AE{n}", SecondaryCaptureImageStorage, generate_uid(),
                               ExplicitVRLittleEndian, junk, peer=peer)
        assert server._handle_store(request) == 0xC000
    assert server.refused == 600
    entries = [e for e in audit.entries() if e.action == "dimse.refused"]
    assert sorted(e.details["peer"] for e in entries) == ["192.0.2.7", "2001:db8:1:2::/64"]
    assert all("truncated DICOM file" in e.details["reason"] for e in entries)
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 2
    server.summarise()
    server.summarise()  # nothing new: no second summary
    summaries = [e for e in audit.entries() if e.action == "dimse.refused_summary"]
    assert [(s.details["held_back"], s.details["refused_total"]) for s in summaries] == \
        [(598, 600)]


# -- shadowing ---------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return Store(tmp_path / "data")
    s = Store(tmp_path / "data", request.getfixturevalue("postgres_url"))
    s.execute("DELETE FROM instances")
    return s


def _header_for(sop: str, study: str = "1.2.3") -> dict[str, str]:
    return {"sop_uid": sop, "study_uid": study, "series_uid": "1.2.3.4", "modality": "OT"}


def _served(store: Store, sop: str) -> list[int]:
    return [r.id for r in store.clinical_instances("sop_uid=?", (sop,))]


def _set_state(store: Store, row: int, state: str) -> None:
    store.execute("UPDATE instances SET state=? WHERE id=?", (state, row))


@pytest.mark.parametrize("first_state", ["queued", "processing", "quarantined"])
def test_a_released_copy_supersedes_every_other_copy(store, first_state):
    """Finding 11: releasing a conflicting copy rejected only a *served* first copy. One
    still queued, being checked or in quarantine became served later (or was released
    later), beside the admin's choice: two clinical copies of one SOP Instance UID."""
    first = store.ingest(b"original", _header_for("1.2.3.4.6"), source="dimse")
    other = store.ingest(b"corrected", _header_for("1.2.3.4.6"), source="dimse")
    _set_state(store, first, first_state)
    _set_state(store, other, "quarantined")
    store.decide(other, "done", "admin", "the corrected copy")
    superseded = store.get(first)
    assert superseded.state == "rejected" and "superseded by row" in superseded.decision_note
    # the first copy's check ends now: its result no longer makes it clinical
    if first_state == "processing":
        store.finish(first, state="done", verdict="authentic", trust="unsigned", details={})
    with pytest.raises(StoreError, match="not in quarantine"):
        store.decide(first, "done", "admin", "the original after all")
    assert _served(store, "1.2.3.4.6") == [other]
    assert [r.state for r in store.instances("sop_uid=?", ("1.2.3.4.6",))] == \
        ["rejected", "done"]


def test_a_rejected_copy_makes_no_later_copy_a_duplicate(store):
    """Finding 11: an attacker who predicts a UID and sends junk first must not turn every
    later real copy into a "conflicting duplicate". ``duplicate_of`` names the earliest copy
    not rejected; a copy rejected after a later one arrived stops counting when that one is
    checked."""
    junk = store.ingest(b"junk", _header_for("1.2.3.4.7", "6.6.6"), source="dimse",
                        calling_ae="ATTACKER")
    _set_state(store, junk, "rejected")
    real = store.ingest(b"real", _header_for("1.2.3.4.7"), source="dimse", calling_ae="DX1")
    later = store.ingest(b"later", _header_for("1.2.3.4.7"), source="dimse")
    assert [store.get(i).duplicate_of for i in (junk, real, later)] == [None, None, real]
    # a copy that arrived while the first was still queued, which was then rejected
    queued = store.ingest(b"queued", _header_for("1.2.3.4.8"), source="dimse")
    second = store.ingest(b"second", _header_for("1.2.3.4.8"), source="dimse")
    assert store.get(second).duplicate_of == queued
    assert store.recheck_original(store.get(second)).id == queued  # still queued: conflicts
    _set_state(store, queued, "rejected")
    assert store.recheck_original(store.get(second)) is None
    assert store.get(second).duplicate_of is None


def test_the_served_copy_is_chosen_among_all_copies(store):
    """``Store.clinical_instances``: per SOP Instance UID the first ``done`` copy, chosen
    before the caller's condition applies - a second done copy claiming another study does
    not appear under that study."""
    first = store.ingest(b"one", _header_for("1.2.3.4.9", "1.1"), source="dimse")
    second = store.ingest(b"two", _header_for("1.2.3.4.9", "2.2"), source="dimse")
    third = store.ingest(b"three", _header_for("1.2.3.4.10", "2.2"), source="dimse")
    for row in (first, second, third):
        _set_state(store, row, "done")
    assert [r.id for r in store.clinical_instances("study_uid=?", ("2.2",))] == [third]
    assert [r.id for r in store.clinical_instances()] == [first, third]
    assert [r.id for r in store.clinical_instances(order="id DESC")] == [third, first]


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
    assert _served(store, "1.2.3.4.5") == [first]  # the conflicting copy shadows nothing
    # an admin's release accepts the conflicting copy as the replacement: one served copy
    store.decide(other, "done", "admin", "corrected by the modality")
    assert _served(store, "1.2.3.4.5") == [other]
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
        assert _served(gateway.store, first.sop_uid) == [first.id]
        actions = [(e.action, e.details.get("duplicate_of")) for e in gateway.audit_log.entries()]
        assert ("instance.quarantined", first.id) in actions
    finally:
        gateway.stop()


def test_a_copy_superseded_while_it_is_checked_never_reaches_the_pacs(tmp_path, pacs,
                                                                      monkeypatch):
    """Second review M4, through a gateway forwarding to a real PACS (dcmtk's storescp).
    The first copy of a SOP Instance UID is being checked when an admin releases a
    conflicting copy as its replacement, which rejects the first as superseded: the worker
    must not send it after all. Before, it forwarded it anyway, then recorded nothing (its
    result matched no row). The test sets the admin's moment: right after the checks."""
    from radguard.gateway import Gateway, GatewayConfig
    from radguard.gateway.pipeline import Pipeline

    ds = read_dataset(NIH_DX)
    ds.PatientName = "Replacement^Copy"
    write_dataset(ds, tmp_path / "replacement.dcm")
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0, workers=1,
                                    forward_dimse=pacs.target).validate())
    store = gateway.store
    first, second = (store.ingest(data, header_of(data), source="dimse", calling_ae="DX1")
                     for data in (NIH_DX.read_bytes(),
                                  (tmp_path / "replacement.dcm").read_bytes()))
    # the conflicting copy was checked and quarantined; the first waits for its check
    assert store.claim().id == first and store.claim().id == second
    store.finish(second, state="quarantined", verdict="conflict", trust="unknown",
                 details={"reasons": ["conflicting duplicate"]})
    store.requeue(first)
    route, routed = Pipeline.route, []

    def route_then_release(self: Pipeline, instance: object) -> object:
        routing = route(self, instance)  # type: ignore[arg-type]
        routed.append(routing.state)
        store.decide(second, "done", "boss", "the replacement is right")
        return routing

    monkeypatch.setattr(Pipeline, "route", route_then_release)
    gateway.start()
    try:
        assert gateway.wait_idle(180)
    finally:
        gateway.stop()
    assert routed == ["done"]  # it would have been forwarded
    row = store.get(first)
    assert (row.state, row.forwarded) == ("rejected", None)
    assert row.decision_note.startswith(f"superseded by row {second}")
    assert pacs.received() == [], "the superseded copy reached the PACS"


# -- a full disk -------------------------------------------------------------------------------

def _nih_copy(path: Path) -> Path:
    """The NIH radiograph under a new SOP Instance UID, written to ``path``."""
    ds = read_dataset(NIH_DX)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    write_dataset(ds, path)
    return path


def _queue_copies(store: Store, folder: Path, count: int) -> list[int]:
    """``count`` copies of the NIH radiograph under new SOP Instance UIDs, ingested (queued)."""
    rows = []
    for n in range(count):
        payload = _nih_copy(folder / f"q{n}.dcm").read_bytes()
        rows.append(store.ingest(payload, header_of(payload), source="dimse",
                                 calling_ae="DX1"))
    return rows


def _messages(caplog: pytest.LogCaptureFixture, *starts: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(starts)]


def test_full_disk_refuses_new_images_and_workers_resume(small_disk, tmp_path, caplog):
    """Item 8: queued instances when the disk fills up. No claim and no result can be
    written: the worker waits and lives on; C-STORE gets 0xA700; ``problem`` says "disk
    full"; the transition is audited once; freeing space resumes everything without a
    restart, and every queued instance ends checked and ``done``."""
    from radguard.gateway import Gateway, GatewayConfig

    caplog.set_level("DEBUG", logger="radguard.gateway")
    data = small_disk / "data"
    queued = _queue_copies(Store(data), tmp_path, 24)
    later = _nih_copy(tmp_path / "later.dcm")
    gateway = Gateway(GatewayConfig(data_dir=str(data), dicom_port=0, http_port=0,
                                    check_processes=0, workers=1).validate())
    # the write-ahead log emptied, then every free byte taken - before the worker starts,
    # so it cannot have finished the queue first: its first claim needs space
    with sqlite3.connect(data / "radguard.db", timeout=30) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    filler = fill_disk(small_disk)
    gateway.start()
    try:
        refused = _storescu(gateway.dicom.port, later, aet="DX1", options=("-v",))
        assert refused.returncode != 0, refused.stdout
        assert "Refused: OutOfResources" in refused.stdout + refused.stderr, refused.stdout
        wait_until(lambda: gateway.problem is not None, 60, "the problem to be reported")
        assert gateway.problem.startswith("disk full since ")
        assert "new images refused" in gateway.problem
        wait_until(lambda: _messages(caplog, "worker waits for the store"), 60,
                   "the worker to meet the full disk")
        assert all(gateway.store.get(i).state == "queued" for i in queued)
        workers = [t for t in gateway._threads if t.name.startswith("radguard-worker")]
        assert workers and all(t.is_alive() for t in workers)
        filler.unlink()  # space returns
        wait_until(lambda: gateway.problem is None, 120, "the store to recover by itself")
        assert gateway.wait_idle(300)
        assert _storescu(gateway.dicom.port, later, aet="DX1").returncode == 0
        assert gateway.wait_idle(120)
    finally:
        gateway.stop()
    states = {r.id: r.state for r in gateway.store.instances()}
    assert [states[i] for i in queued] == ["done"] * len(queued)
    assert len(states) == len(queued) + 1
    actions = [e.action for e in gateway.audit_log.entries()]
    assert actions.count("store.recovered") == 1
    assert actions.count("store.unavailable") <= 1  # once, if the full disk let it be written
    recovered = next(e for e in gateway.audit_log.entries() if e.action == "store.recovered")
    assert recovered.details["failing_since"] and recovered.details["failed_writes"] >= 1


def test_a_full_disk_inside_the_pipeline_requeues_and_never_judges(small_disk, tmp_path,
                                                                   caplog):
    """Finding 10: the drift monitor's SQLite on a full disk (the store's disk is fine). Its
    "database or disk is full" is a write that failed, not a verdict on the image: the
    claimed instances go back to the queue (before: quarantined as "pipeline failed"), and
    when space returns they are checked and end ``done``."""
    from radguard.gateway import Gateway, GatewayConfig
    from tests.gateway.conftest import fitted_monitor

    caplog.set_level("DEBUG", logger="radguard.gateway")
    store = Store(tmp_path / "data")
    queued = _queue_copies(store, tmp_path, 3)
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0, workers=1,
                                    monitor_db=str(fitted_monitor(small_disk))).validate())
    filler = fill_disk(small_disk)
    gateway.start()
    try:
        wait_until(lambda: len(_messages(caplog, "instance ")) >= 2, 90,
                   "an instance to go back to the queue twice")
        assert [gateway.store.get(i).state for i in queued] != ["done"] * 3
        assert not gateway.store.instances("state='quarantined'")
        assert "database or disk is full" in _messages(caplog, "instance ")[0]
        filler.unlink()
        assert gateway.wait_idle(180)
    finally:
        gateway.stop()
    rows = [store.get(i) for i in queued]
    assert [r.state for r in rows] == ["done"] * 3, [r.details for r in rows]
    assert all(r.attempts >= 1 for r in rows) and rows[0].attempts >= 2
    assert all(isinstance(r.detail["monitoring"], list) for r in rows)  # observed after all


def test_below_the_reserve_intake_pauses_and_the_workers_go_on(small_disk, tmp_path):
    """Second review H2: below the free-space reserve the door and ingest refuse new objects
    - and used to mark the store unwritable, whose write probe demanded the reserve too, so
    the workers stopped: nothing already received was checked or forwarded while the
    reserve that exists to give them room sat unused. Now only intake pauses, with its own
    banner and audit entries; the queue is worked off meanwhile; intake resumes by itself
    once there is room again."""
    from radguard.gateway import Gateway, GatewayConfig

    data = small_disk / "data"
    queued = _queue_copies(Store(data), tmp_path, 3)
    later = _nih_copy(tmp_path / "later.dcm")
    gateway = Gateway(GatewayConfig(data_dir=str(data), dicom_port=0, http_port=0,
                                    check_processes=0, workers=1,
                                    dicom_min_free_mb=2).validate())
    filler = leave_free(small_disk, 1 << 20)  # below the 2 MiB reserve: room for the workers
    payload = later.read_bytes()
    with pytest.raises(OSError, match="reserve"):  # before the workers start
        gateway.store.ingest(payload, header_of(payload), source="stow")
    gateway.start()
    try:
        refused = _storescu(gateway.dicom.port, later, aet="DX1", options=("-v",))
        assert "Refused: OutOfResources" in refused.stdout + refused.stderr, refused.stdout
        problem = gateway.problem or ""
        assert problem.startswith("intake paused since "), problem
        assert "reserve" in problem and "disk full" not in problem
        wait_until(lambda: [gateway.store.get(i).state for i in queued] == ["done"] * 3, 240,
                   "the queue to be worked off below the reserve")
        assert (gateway.problem or "").startswith("intake paused")  # still below it
        filler.unlink()
        wait_until(lambda: gateway.problem is None, 120, "intake to resume by itself")
        sent = _storescu(gateway.dicom.port, later, aet="DX1")
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert gateway.wait_idle(120)
    finally:
        gateway.stop()
    assert len(gateway.store.instances("state='done'")) == 4
    actions = [e.action for e in gateway.audit_log.entries()]
    assert actions.count("store.intake_paused") == 1, actions
    assert actions.count("store.intake_resumed") == 1, actions
    assert "store.unavailable" not in actions


def test_a_long_storage_outage_in_the_pipeline_never_quarantines(small_disk, tmp_path,
                                                                  monkeypatch):
    """Second review H3: after MAX_ATTEMPTS claims an instance whose processing failed was
    quarantined "unverifiable" if the store's probe passed - but the probe checks the store,
    not what failed: a drift monitor out of space quarantined good images. And every claim
    reset the worker's back-off, so the whole check re-ran every second. Now a storage
    error (no room, read-only, a locked or full SQLite) never condemns an instance: with the
    monitor's disk full for more than MAX_ATTEMPTS retries it stays queued, the waits
    double across claims, and it ends ``done`` once space returns."""
    from radguard.gateway import Gateway, GatewayConfig
    from radguard.gateway.service import MAX_ATTEMPTS
    from tests.gateway.conftest import fitted_monitor

    waits = scale_back_off(monkeypatch)
    store = Store(tmp_path / "data")
    (row,) = _queue_copies(store, tmp_path, 1)
    gateway = Gateway(GatewayConfig(data_dir=str(tmp_path / "data"), dicom_port=0,
                                    http_port=0, check_processes=0, workers=1,
                                    monitor_db=str(fitted_monitor(small_disk))).validate())
    filler = fill_disk(small_disk)
    gateway.start()
    try:
        wait_until(lambda: store.get(row).attempts > MAX_ATTEMPTS + 1
                   or store.get(row).state == "quarantined", 300,
                   "more retries than MAX_ATTEMPTS")
        assert store.get(row).state in ("queued", "processing"), store.get(row).detail
        filler.unlink()
        assert gateway.wait_idle(180)
    finally:
        gateway.stop()
    assert store.get(row).state == "done", store.get(row).detail
    # doubling up to STORE_WAIT (5 s): a worker probes that often, so work resumes within
    # seconds of the storage coming back (issue 29: a database restart)
    assert waits[:MAX_ATTEMPTS + 1] == pytest.approx([1, 2, 4, 5, 5, 5]), waits


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

def _ingest_spooled(reset_peak: Callable[[], None], data_dir: str, spooled: str) -> int:
    """(In a subprocess.) The door's check and the store's ingest of a spooled object."""
    store = Store(data_dir)
    reset_peak()
    header = header_of(Path(spooled), "C-STORE from BIG")
    return store.ingest(Path(spooled), header, source="dimse", calling_ae="BIG")


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
    peak, row = peak_in_subprocess(f"{__name__}:_ingest_spooled",
                                   str(tmp_path / "data"), str(spooled))
    print(f"256 MiB spooled object checked and stored: peak +{peak:.0f} MB")
    assert peak < 64, f"{peak:.0f} MB more resident for a 256 MiB object"
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
