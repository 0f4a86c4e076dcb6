"""What a signature vouches for, as an attacker would test it (issue 21 items 1, 2 and 10;
review findings 1 and 5).

(a) A validly signed data set, signatures included, pasted into an item of a forged image's
ReferencedImageSequence must not make the forgery valid: PS3.15 C.12.1.1.3, a signature in
an item covers that item only. (b) A signature over SOPInstanceUID alone must not let
blacked-out pixels through as "signed" with the content detectors skipped; nor may a real
signature vouch for an image inverted, rescaled or overlaid after signing, or one signed over
its pixels only and then relabelled to another patient, study or side. (c) The algorithm
policy: dcmsign-made signatures with every MAC it offers, RSA-1024 and EC keys come out as
the policy says, RIPEMD-160 (dcmtk's default) verifies, also without OpenSSL's RIPEMD-160.
(d) The cost of verifying: signature items beyond the caps make a file invalid unhashed,
cheap checks come before any hash, signatures over the same elements share one hash, and a
file costs at most two different hashes (review 2 M8). (e) What routers add or leave empty
does not stop a device signature vouching, and the coverage levels: a signature over the
Creator RSA profile's minimum vouches for what the image shows, not whose it is (review 2
M7).

The gateway is a real ``radguard serve`` process fed by dcmtk's storescu.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from radguard.cli import main
from radguard.dicom.io import read_dataset, stored_element, write_dataset
from radguard.dicom.pixels import pixel_array
from radguard.dicom.splice import explicit_header, header_size
from radguard.forensics.scan import scan_file
from radguard.gateway.config import ConfigError, load_config
from radguard.provenance import TrustStore, verify_file
from radguard.provenance.sign import sign_file
from radguard.provenance.verify import MAX_SIGNATURES_PER_ITEM
from tests.conftest import NIH_DX, dcmtk_tool

DCMSIGN = "/usr/bin/dcmsign"


# -- making the attack files ---------------------------------------------------------------

def _new_instance(src: Path, dst: Path, *, paste: bool = False) -> Path:
    """A copy of ``src`` with fresh UIDs; ``paste`` adds a bright disc (a forged finding)."""
    ds = read_dataset(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    if paste:
        pixels = pixel_array(ds).copy()
        h, w = pixels.shape[:2]
        yy, xx = np.ogrid[:h, :w]
        disc = (yy - h // 2) ** 2 + (xx - w // 3) ** 2 < (min(h, w) // 12) ** 2
        pixels[disc] = pixels.max()
        ds.PixelData = pixels.tobytes()
    write_dataset(ds, dst)
    return dst


def _signed(pki, tmp_path: Path, name: str, **options: object) -> Path:
    raw = _new_instance(NIH_DX, tmp_path / f"{name}.raw.dcm")
    out = tmp_path / f"{name}.dcm"
    sign_file(raw, out, pki.signer, **options)
    return out


def _transplant(signed: Path, dst: Path) -> Path:
    """A forged image carrying ``signed``'s whole data set (signatures too) in an item of its
    ReferencedImageSequence: the attack of issue 21 item 1."""
    forged = read_dataset(_new_instance(NIH_DX, dst, paste=True))
    item = Dataset()
    for element in read_dataset(signed):
        item.add(element)
    forged.ReferencedImageSequence = Sequence([item])
    write_dataset(forged, dst)
    return dst


def _uncovered_blackout(pki, tmp_path: Path, name: str) -> Path:
    """Signed over SOPInstanceUID only, then a region of the pixels blacked out (item 2)."""
    signed = _signed(pki, tmp_path, name, tags=[0x00080018])
    ds = read_dataset(signed)
    pixels = pixel_array(ds).copy()
    h, w = pixels.shape[:2]
    pixels[h // 3 : h // 3 + h // 5, w // 3 : w // 3 + w // 5] = 0
    ds.PixelData = pixels.tobytes()
    write_dataset(ds, signed)
    return signed


def _verify_json(*args: str | Path) -> tuple[int, dict[str, dict]]:
    result = CliRunner().invoke(main, ["verify", "--json", *map(str, args)])
    reports = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    return result.exit_code, {Path(r["path"]).name: r for r in reports}


# -- (a) transplanted signatures -----------------------------------------------------------

def test_a_transplanted_signature_does_not_make_a_forgery_valid(pki, tmp_path):
    signed = _signed(pki, tmp_path, "genuine")
    forged = _transplant(signed, tmp_path / "forged.dcm")
    code, reports = _verify_json(forged, signed, "--trust", pki.ca_cert_path)
    assert code == 1  # exit 0 only if every file is validly signed
    report = reports["forged.dcm"]
    assert report["status"] == "unsigned" and report["signer"] is None
    assert report["pixels_covered"] is False and report["covered"] == []
    [nested] = report["signatures"]  # still verified and reported, with where it sits
    assert nested["location"] == "ReferencedImageSequence[0]" and nested["status"] == "valid"
    genuine = reports["genuine.dcm"]
    assert genuine["status"] == "valid" and genuine["pixels_covered"] is True
    assert "PixelData" in genuine["covered"] and genuine["uncovered"] == []
    text = CliRunner().invoke(main, ["verify", str(forged), "--trust", str(pki.ca_cert_path)])
    assert text.exit_code == 1 and text.output.startswith("UNSIGNED")
    assert "vouches for that item only" in text.output


def test_an_item_signature_made_by_dcmsign_verifies_in_its_item_only(pki, tmp_path):
    """dcmsign --sign-item signs inside an item; in an Explicit VR file (what the gateway
    stores) it must verify where it sits (item values are not at file offsets)."""
    forged = read_dataset(_transplant(_signed(pki, tmp_path, "genuine"), tmp_path / "f.dcm"))
    write_dataset(forged, tmp_path / "explicit.dcm", transfer_syntax="1.2.840.10008.1.2.1")
    result = subprocess.run([DCMSIGN, "--sign-item", str(pki.key_path), str(pki.cert_path),
                             "ReferencedImageSequence[0]", "-pw", "+m2",
                             str(tmp_path / "explicit.dcm"), str(tmp_path / "item.dcm")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = verify_file(tmp_path / "item.dcm", TrustStore.from_paths([pki.ca_cert_path]))
    assert report.status == "unsigned" and not report.pixels_covered
    assert [(s.location, s.status) for s in report.signatures] == [
        ("ReferencedImageSequence[0]", "valid")] * 2  # the transplanted one and dcmsign's


def test_a_nested_signature_that_no_longer_matches_is_weak_evidence(pki, tmp_path):
    """Decided for nested signatures: an invalid one does not make the file invalid (it
    vouched for nothing at file level) but makes the scan verdict at least suspicious."""
    forged = read_dataset(_transplant(_signed(pki, tmp_path, "genuine"), tmp_path / "f.dcm"))
    forged.ReferencedImageSequence[0].PatientName = "Changed^InTheItem"
    write_dataset(forged, tmp_path / "f.dcm")
    trust = TrustStore.from_paths([pki.ca_cert_path])
    report = verify_file(tmp_path / "f.dcm", trust)
    assert report.status == "unsigned"
    assert [(s.location, s.status) for s in report.signatures] == [
        ("ReferencedImageSequence[0]", "invalid")]
    scan = scan_file(tmp_path / "f.dcm", trust=trust, trust_signed_pixels=True)
    assert scan.verdict in ("suspicious", "tampered", "synthetic")
    assert any("ReferencedImageSequence[0] does not match its item" in r for r in scan.reasons)
    assert scan.synthetic is not None  # the content detectors ran


# -- (b) signatures that leave the pixels out ----------------------------------------------

def test_pixels_covered_needs_the_pixel_data_and_how_to_read_it(pki, tmp_path):
    trust = TrustStore.from_paths([pki.ca_cert_path])
    everything = verify_file(_signed(pki, tmp_path, "all"), trust)
    assert everything.status == "valid" and everything.pixels_covered
    assert everything.pixels_uncovered == []
    uid_only = verify_file(_signed(pki, tmp_path, "uid", tags=[0x00080018]), trust)
    assert uid_only.status == "valid" and not uid_only.pixels_covered
    assert uid_only.covered == ["SOPInstanceUID"]
    assert {"PixelData", "Rows", "Columns", "BitsStored"} <= set(uid_only.pixels_uncovered)
    ds = read_dataset(NIH_DX)  # pixels signed, but not the Rows that say how to cut them
    tags = [int(t) for t in ds.keys() if int(t) != 0x00280010 and (int(t) >> 16) >= 0x0008]
    no_rows = verify_file(_signed(pki, tmp_path, "norows", tags=tags), trust)
    assert no_rows.status == "valid" and "PixelData" in no_rows.covered
    assert not no_rows.pixels_covered and no_rows.pixels_uncovered == ["Rows"]
    assert no_rows.to_dict()["pixels_covered"] is False
    untrusted = verify_file(_signed(pki, tmp_path, "untrusted"), None)
    assert untrusted.status == "untrusted" and not untrusted.pixels_covered


def test_scan_runs_the_detectors_when_the_signature_leaves_the_pixels_out(pki, tmp_path):
    attack = _uncovered_blackout(pki, tmp_path, "blackout")
    trust = TrustStore.from_paths([pki.ca_cert_path])
    result = scan_file(attack, trust=trust, trust_signed_pixels=True)
    assert result.signature == "valid" and not result.pixels_vouched
    assert not any("detectors skipped" in r for r in result.reasons)
    assert result.synthetic is not None and result.tamper is not None
    assert any("does not vouch for the image" in r for r in result.reasons)
    control = scan_file(_signed(pki, tmp_path, "control"), trust=trust,
                        trust_signed_pixels=True)
    assert control.pixels_vouched and control.synthetic is None  # skipped when covered
    assert any("detectors skipped" in r for r in control.reasons)


# -- (b) continued: changes after signing, and signatures over the pixels only ---------------

#: What a signature over "the pixels and how to read them" lists
PIXEL_ONLY = [int(tag_for_keyword(k)) for k in (  # type: ignore[arg-type]
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "PixelData")]


def _invert(ds: Dataset) -> None:
    ds.PresentationLUTShape = "INVERSE"


def _rescale(ds: Dataset) -> None:
    ds.RescaleSlope, ds.RescaleIntercept = "4", "-1024"


def _overlay(ds: Dataset) -> None:
    """A graphic overlay (group 6000) drawing a filled box: a "finding" on the image."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = np.zeros((rows, cols), np.uint8)
    bits[rows // 3 : rows // 2, cols // 3 : cols // 2] = 1
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60000022, "LO", "annotation")
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", np.packbits(bits.ravel(), bitorder="little").tobytes())


def _relabel_patient(ds: Dataset) -> None:
    ds.PatientName, ds.PatientID = "Other^Patient", "OTHER-0001"


def _move_study(ds: Dataset) -> None:
    ds.StudyInstanceUID = generate_uid()


def _set_laterality(ds: Dataset) -> None:
    ds.ImageLaterality = "L"


def _calibrate(ds: Dataset) -> None:
    """An ultrasound region calibration: every distance measured in it is now 5 cm/pixel."""
    region = Dataset()
    region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
    region.RegionLocationMinX0 = region.RegionLocationMinY0 = 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = int(ds.Columns) - 1, int(ds.Rows) - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 5.0
    ds.SequenceOfUltrasoundRegions = Sequence([region])


def _subtract(ds: Dataset) -> None:
    """XA: show every frame minus a mask frame (digital subtraction)."""
    mask = Dataset()
    mask.MaskOperation, mask.ApplicableFrameRange, mask.MaskFrameNumbers = "AVG_SUB", [1, 1], 1
    ds.MaskSubtractionSequence = Sequence([mask])
    ds.RecommendedViewingMode = "SUB"


def _time(ds: Dataset) -> None:
    ds.FrameTime = "33.3"  # ms per frame: what every cine time measurement is scaled by


#: name: (signed elements (None: all), change after signing, elements it leaves uncovered)
CHANGED_AFTER_SIGNING = {
    "inverted": (None, _invert, {"PresentationLUTShape"}),
    "rescaled": (None, _rescale, {"RescaleSlope", "RescaleIntercept"}),
    "overlaid": (None, _overlay, {"OverlayData", "OverlayRows", "OverlayDescription"}),
    "calibrated": (None, _calibrate, {"SequenceOfUltrasoundRegions"}),
    "subtracted": (None, _subtract, {"MaskSubtractionSequence", "RecommendedViewingMode"}),
    "timed": (None, _time, {"FrameTime"}),
    "relabelled": (PIXEL_ONLY, _relabel_patient, {"PatientName", "PatientID"}),
    "moved": (PIXEL_ONLY, _move_study, {"StudyInstanceUID", "SOPInstanceUID"}),
    "lateral": (PIXEL_ONLY, _set_laterality, {"ImageLaterality"}),
}


def _changed(pki, tmp_path: Path, name: str) -> Path:
    tags, change, _ = CHANGED_AFTER_SIGNING[name]
    signed = _signed(pki, tmp_path, name, tags=tags)
    ds = read_dataset(signed)
    change(ds)
    write_dataset(ds, signed)
    return signed


def test_a_signature_does_not_vouch_for_what_it_leaves_out_or_what_was_added(pki, tmp_path):
    """Review finding 1: the signature still matches (status valid), but the image now
    shows or means something else, so it vouches for nothing: pixels_covered is false and
    pixels_uncovered names what changed."""
    files = [_changed(pki, tmp_path, name) for name in CHANGED_AFTER_SIGNING]
    genuine = _signed(pki, tmp_path, "genuine")  # radguard sign's default: every element
    dcmsigned = _dcmsign(pki, _new_instance(NIH_DX, tmp_path / "d.raw.dcm"),
                         tmp_path / "dcmsigned.dcm")  # dcmsign's default: every element
    code, reports = _verify_json(*files, genuine, dcmsigned, "--trust", pki.ca_cert_path)
    assert code == 0  # every signature holds: the data they list did not change
    for name, (_, _, gaps) in CHANGED_AFTER_SIGNING.items():
        report = reports[f"{name}.dcm"]
        assert report["status"] == "valid", (name, report)
        assert report["pixels_covered"] is False, (name, report)
        assert gaps <= set(report["pixels_uncovered"]), (name, report["pixels_uncovered"])
    for control in ("genuine.dcm", "dcmsigned.dcm"):
        report = reports[control]
        assert report["status"] == "valid" and report["pixels_covered"] is True, report
        assert report["pixels_uncovered"] == [] and report["uncovered"] == [], report
    text = CliRunner().invoke(main, ["verify", str(files[0]), "--trust", str(pki.ca_cert_path)])
    assert "image NOT vouched for" in text.output and "PresentationLUTShape" in text.output


def test_scan_runs_the_detectors_on_an_image_changed_after_signing(pki, tmp_path):
    trust = TrustStore.from_paths([pki.ca_cert_path])
    for name in ("overlaid", "relabelled"):
        result = scan_file(_changed(pki, tmp_path, name), trust=trust, trust_signed_pixels=True)
        assert result.signature == "valid" and not result.pixels_vouched, name
        assert result.synthetic is not None and result.tamper is not None, name
        assert not any("detectors skipped" in r for r in result.reasons), name
        assert any("does not vouch for the image" in r for r in result.reasons), name


# -- (b) continued: what routers add, and how much a signature must cover (review 2 M7) ----

def _edit(path: Path, *changes: Callable[[Dataset], None]) -> Path:
    ds = read_dataset(path)
    for change in changes:
        change(ds)
    write_dataset(ds, path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _through_routers(ds: Dataset) -> None:
    """What routers, PACSs and a RIS commonly add on the way without changing what the
    image shows or whose it is: empty type-2 elements (some of them ones that would matter
    if they held a value), the issuer and other IDs of the patient (a master patient index),
    the institution, a character set for the ASCII name, an accession number, a weight and a
    body part from the order, a private block."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstitutionName = "General Hospital"
    ds.IssuerOfPatientID = "HOSP-A"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "77", "REGION", "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.AccessionNumber = "A-2026-0001"
    ds.StudyDate = ds.StudyTime = ds.StudyID = ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ds.Laterality = ds.ViewPosition = ""  # empty: say nothing
    ds.ViewCodeSequence = Sequence([])
    ds.PatientWeight, ds.BodyPartExamined = "80", "CHEST"
    ds.add_new(0x00110010, "LO", "ROUTER X")
    ds.add_new(0x00111001, "LO", "routed")


def _born(ds: Dataset) -> None:
    ds.PatientBirthDate = "19700101"


def _weigh(ds: Dataset) -> None:
    ds.PatientWeight = "80"


def _add_cyrillic(path: Path) -> Path:
    """Add Specific Character Set = ISO_IR 144 (Cyrillic) as a router that copies every
    other byte would (pydicom would re-encode the name in the new character set)."""
    ds = read_dataset(path)
    raw = stored_element(ds, min(int(t) for t in ds.keys() if int(t) > 0x00080005))
    at = raw.value_tell - header_size(raw.VR)
    data = path.read_bytes()
    path.write_bytes(data[:at] + explicit_header(0x00080005, "CS", 10) + b"ISO_IR 144"
                     + data[at:])
    return path


def _pet(ds: Dataset) -> None:
    ds.Modality = "PT"


def _latin1_name(ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "M\u00fcller^J\u00f6rg"


def _no_character_set(ds: Dataset) -> None:
    """The name's Latin-1 bytes stay, unlabelled (as some modalities write them)."""
    del ds.SpecificCharacterSet


def _signed_after(pki, tmp_path: Path, name: str, *changes: Callable[[Dataset], None]
                  ) -> Path:
    """NIH_DX as a new instance, changed (each change saved before the next), then signed
    by radguard's default (every element)."""
    raw = _new_instance(NIH_DX, tmp_path / f"{name}.raw.dcm")
    for change in changes:
        _edit(raw, change)
    sign_file(raw, tmp_path / f"{name}.dcm", pki.signer)
    return tmp_path / f"{name}.dcm"


def test_what_routers_add_or_leave_empty_does_not_stop_a_signature_vouching(pki, tmp_path):
    """Review 2 M7 (c), (d): a device signature (radguard's default, dcmsign's with and
    without the Creator profile: every element) still vouches after routers added empty type-2
    elements, patient ID issuers, an institution, a character set... Values that do change
    whose image it is still count: a birth date, a weight in a PET (its SUVs), a character
    set that reads a signed non-ASCII name differently."""
    routed = [_edit(_signed(pki, tmp_path, "genuine"), _through_routers)] + [
        _edit(_dcmsign(pki, _new_instance(NIH_DX, tmp_path / f"d{i}.raw.dcm"),
                       tmp_path / f"dcmsigned{i}.dcm", *flags), _through_routers)
        for i, flags in enumerate([(), ("+pc",)])]
    born = _edit(_signed(pki, tmp_path, "born"), _through_routers, _born)
    pet = _edit(_signed_after(pki, tmp_path, "pet", _pet), _weigh)
    latin = _add_cyrillic(_signed_after(pki, tmp_path, "latin", _latin1_name,
                                        _no_character_set))
    code, reports = _verify_json(*routed, born, pet, latin, "--trust", pki.ca_cert_path)
    assert code == 0, reports  # every signature holds
    for path in routed:
        report = reports[path.name]
        assert report["pixels_covered"] is True, report["pixels_uncovered"]
        assert {"InstitutionName", "IssuerOfPatientID", "PatientBirthDate"} <= set(
            report["uncovered"])  # uncovered, and reported, but changing nothing shown
    for path, gap in ((born, "PatientBirthDate"), (pet, "PatientWeight"),
                      (latin, "SpecificCharacterSet")):
        report = reports[path.name]
        assert report["status"] == "valid", report
        assert report["pixels_covered"] is False and report["pixels_uncovered"] == [gap]


#: dcmsign's Creator RSA profile over the elements it requires (+pc adds the Image Pixel
#: module): what a device signs when it signs as little as the profile allows.
CREATOR_MINIMUM = ("+pc", "-t", "SOPClassUID", "-t", "SOPInstanceUID", "-t",
                   "StudyInstanceUID", "-t", "SeriesInstanceUID", "-t", "PixelData")


def test_a_creator_profile_signature_vouches_for_the_pixels_not_whose_they_are(pki, tmp_path):
    """Review 2 M7 (b): the Creator RSA profile does not ask for the Patient module, so a
    signature over its minimum vouches for what the image shows (coverage "pixels") but
    not whose it is (coverage "image", the default); at both levels an inverting LUT
    shape, a rescale or an overlay added after signing still breaks the vouching."""
    creator = _dcmsign(pki, _new_instance(NIH_DX, tmp_path / "c.raw.dcm"),
                       tmp_path / "creator.dcm", *CREATOR_MINIMUM)
    routed = _edit(_copy(creator, tmp_path / "routed.dcm"), _through_routers)
    changed = {name: _edit(_copy(creator, tmp_path / f"{name}.dcm"), change)
               for name, change in (("inverted", _invert), ("rescaled", _rescale),
                                    ("overlaid", _overlay))}
    trust = ("--trust", pki.ca_cert_path)
    code, image = _verify_json(creator, *trust)
    assert code == 0 and image["creator.dcm"]["status"] == "valid"
    assert image["creator.dcm"]["signatures"][0]["profiles"] == ["base", "creator"]
    assert image["creator.dcm"]["pixels_covered"] is False
    assert image["creator.dcm"]["pixels_uncovered"] == ["Modality", "PatientName", "PatientID",
                                                        "PatientSex"]
    code, pixels = _verify_json(creator, routed, *changed.values(), *trust,
                                "--coverage", "pixels")
    assert code == 0, pixels
    for path in (creator, routed):
        assert pixels[path.name]["pixels_covered"] is True, pixels[path.name]
    for name, path in changed.items():
        assert pixels[path.name]["pixels_covered"] is False, name
        assert set(CHANGED_AFTER_SIGNING[name][2]) <= set(pixels[path.name]["pixels_uncovered"])
    scan = CliRunner().invoke(main, ["scan", "--json", str(creator), *map(str, trust),
                                     "--coverage", "pixels"])
    assert not any("does not vouch" in r
                   for r in json.loads(scan.output.splitlines()[-1])["reasons"])
    scan = CliRunner().invoke(main, ["scan", "--json", str(creator), *map(str, trust)])
    assert any("does not vouch for the image: not covered Modality, PatientName" in r
               for r in json.loads(scan.output.splitlines()[-1])["reasons"])
    refused = CliRunner().invoke(main, ["verify", str(creator), "--coverage", "everything"])
    assert refused.exit_code == 2 and "everything" in refused.output


# -- the gateway: real DIMSE in, routing read from its database ----------------------------

def _storescu(port: int, aet: str, *paths: Path, options: tuple[str, ...] = ()) -> None:
    result = subprocess.run([dcmtk_tool("storescu"), *options, "-aet", aet, "-aec",
                             "RADGUARD", "127.0.0.1", str(port), *map(str, paths)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _routed(gw, paths: list[Path], timeout: float = 180) -> dict[str, dict]:
    """state / trust / details of each file's instance once the gateway has decided."""
    want = {str(read_dataset(p, stop_before_pixels=True).SOPInstanceUID): p.stem
            for p in paths}
    deadline = time.monotonic() + timeout
    while True:
        db = sqlite3.connect(f"file:{gw.data_dir / 'radguard.db'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT sop_uid, state, trust, details FROM instances").fetchall()
        finally:
            db.close()
        done = {want[sop]: {"state": state, "trust": trust,
                            "details": json.loads(details) if details else {}}
                for sop, state, trust, details in rows
                if sop in want and state in ("done", "quarantined", "rejected")}
        if len(done) == len(want):
            return done
        assert time.monotonic() < deadline, f"not routed in time: {done}"
        assert gw.alive(), gw.stderr_text()[-2000:]
        time.sleep(0.2)


def _detectors_ran(row: dict) -> bool:
    """The content detectors ran and spoke for the verdict: no signature vouched for the
    image (on a vouched image they may run, but only to calibrate its source)."""
    scan = row["details"]["scan"]
    vouched = any("detectors skipped" in r or "content detectors do not judge" in r
                  for r in row["details"]["reasons"])
    return scan["synthetic_score"] is not None and scan["tamper"] is not None and not vouched


def _dcmsign(pki, src: Path, dst: Path, *flags: str) -> Path:
    result = subprocess.run([DCMSIGN, "--sign", str(pki.key_path), str(pki.cert_path), "-pw",
                             *flags, str(src), str(dst)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return dst


def test_gateway_quarantines_transplants_uncovered_pixels_and_weak_signatures(
        pki, tmp_path, gateway_process):
    files = {
        "transplant_must": _transplant(_signed(pki, tmp_path, "g1"), tmp_path / "t1.dcm"),
        "transplant_other": _transplant(_signed(pki, tmp_path, "g2"), tmp_path / "t2.dcm"),
        "blackout_must": _uncovered_blackout(pki, tmp_path, "b1"),
        "blackout_other": _uncovered_blackout(pki, tmp_path, "b2"),
        "sha1_must": _dcmsign(pki, _new_instance(NIH_DX, tmp_path / "s.raw.dcm"),
                              tmp_path / "s.dcm", "+ms"),
        "ripemd_must": _dcmsign(pki, _new_instance(NIH_DX, tmp_path / "r.raw.dcm"),
                                tmp_path / "r.dcm", "+mr"),
        "control_must": _signed(pki, tmp_path, "control"),
    }
    names = {path.stem: name for name, path in files.items()}
    gw = gateway_process(f'trust = ["{pki.ca_cert_path}"]\nmust_sign = ["DX_ROOM3"]\n')
    for aet, suffix in (("DX_ROOM3", "_must"), ("CR_ROOM1", "_other")):
        # the transplants as they were made (Implicit VR), as the attacker sent them
        _storescu(gw.dicom_port, aet, *[p for n, p in files.items()
                                        if n.endswith(suffix) and n.startswith("transplant")],
                  options=("-xi",))
        _storescu(gw.dicom_port, aet, *[p for n, p in files.items()
                                        if n.endswith(suffix) and not n.startswith("transplant")])
    rows = {names[stem]: row for stem, row in _routed(gw, list(files.values())).items()}

    t = rows["transplant_must"]  # must_sign: a signature in an item does not satisfy it
    assert (t["state"], t["trust"]) == ("quarantined", "unsigned"), t
    assert t["details"]["reasons"][0] == "unsigned, but DX_ROOM3 must sign"
    assert any("vouches for that item only" in r for r in t["details"]["reasons"]), t
    assert _detectors_ran(t)
    t = rows["transplant_other"]  # no must_sign: judged on content, never "signed"
    assert t["trust"] == "unsigned" and _detectors_ran(t), t

    b = rows["blackout_must"]
    assert (b["state"], b["trust"]) == ("quarantined", "pixels unsigned"), b
    assert b["details"]["reasons"][0].startswith(
        "signed, but the signature does not vouch for the image")
    assert _detectors_ran(b)
    b = rows["blackout_other"]
    assert b["trust"] == "pixels unsigned" and _detectors_ran(b), b

    w = rows["sha1_must"]  # item 10: weak by default, quarantined with the reason
    assert (w["state"], w["trust"]) == ("quarantined", "signature weak"), w
    assert w["details"]["reasons"][0] == "signature weak"
    assert any("SHA1 MAC" in r for r in w["details"]["reasons"])
    r = rows["ripemd_must"]  # dcmtk's default MAC: a real modality's files go through
    assert (r["state"], r["trust"]) == ("done", "signed"), r
    c = rows["control_must"]  # the pixel-covering signature still skips the detectors
    assert (c["state"], c["trust"]) == ("done", "signed"), c
    assert not _detectors_ran(c)


def test_gateway_accepts_weak_signatures_only_when_configured(pki, tmp_path, gateway_process):
    sha1 = _dcmsign(pki, _new_instance(NIH_DX, tmp_path / "s.raw.dcm"), tmp_path / "s.dcm",
                    "+ms")
    gw = gateway_process(f'trust = ["{pki.ca_cert_path}"]\nmust_sign = ["DX_ROOM3"]\n'
                         "[signatures]\nallow_weak = true\n")
    _storescu(gw.dicom_port, "DX_ROOM3", sha1)
    row = _routed(gw, [sha1])["s"]
    assert (row["state"], row["trust"]) == ("done", "signed"), row
    assert any("weak algorithm accepted by policy" in r for r in row["details"]["reasons"])


def test_gateway_does_not_vouch_for_images_changed_or_relabelled_after_signing(
        pki, tmp_path, gateway_process):
    """Review findings 1 and 5 at the gateway: a real signed X-ray inverted, rescaled,
    overlaid, or signed over its pixels only and relabelled to another patient, study or
    side is not `signed`, gets the content detectors and does not satisfy must_sign; a file
    with more signature items than are verified is invalid. Review 2 M7: device signatures
    still vouch after routers added elements; one over the Creator profile's minimum does
    not vouch for whose the image is (the default coverage "image")."""
    attacks = {name: _changed(pki, tmp_path, name) for name in CHANGED_AFTER_SIGNING}
    (tmp_path / "other").mkdir()
    other = _changed(pki, tmp_path / "other", "inverted")  # sent by an AE that need not sign
    many = _copies(_signed(pki, tmp_path, "many"), MAX_SIGNATURES_PER_ITEM + 1)
    genuine = _signed(pki, tmp_path, "genuine")
    dcmsigned = _dcmsign(pki, _new_instance(NIH_DX, tmp_path / "d.raw.dcm"),
                         tmp_path / "dcmsigned.dcm")
    routed = _edit(_signed(pki, tmp_path, "routed"), _through_routers)
    creator = _dcmsign(pki, _new_instance(NIH_DX, tmp_path / "c.raw.dcm"),
                       tmp_path / "creator.dcm", *CREATOR_MINIMUM)
    gw = gateway_process(f'trust = ["{pki.ca_cert_path}"]\nmust_sign = ["DX_ROOM3"]\n')
    sent = [*attacks.values(), many, genuine, dcmsigned, routed, creator]
    _storescu(gw.dicom_port, "DX_ROOM3", *sent)
    _storescu(gw.dicom_port, "CR_ROOM1", other)
    rows = _routed(gw, sent)
    for name in attacks:
        row = rows[name]
        assert (row["state"], row["trust"]) == ("quarantined", "pixels unsigned"), (name, row)
        assert row["details"]["reasons"][0].startswith(
            "signed, but the signature does not vouch for the image"), (name, row)
        assert _detectors_ran(row), (name, row)
    row = _routed(gw, [other])["inverted"]  # no must_sign: judged on content, not "signed"
    assert row["trust"] == "pixels unsigned" and _detectors_ran(row), row
    row = rows["many"]
    assert (row["state"], row["trust"]) == ("quarantined", "signature invalid"), row
    assert any(f"{MAX_SIGNATURES_PER_ITEM + 1} signatures in the top-level data set" in r
               for r in row["details"]["reasons"]), row
    for control in ("genuine", "dcmsigned", "routed"):  # real device signatures vouch
        row = rows[control]
        assert (row["state"], row["trust"]) == ("done", "signed"), row
        assert not _detectors_ran(row), row
    row = rows["creator"]
    assert (row["state"], row["trust"]) == ("quarantined", "pixels unsigned"), row
    assert any("not covered Modality, PatientName, PatientID, PatientSex" in r
               for r in row["details"]["reasons"]), row


def test_gateway_coverage_pixels_takes_creator_profile_signatures(pki, tmp_path,
                                                                   gateway_process):
    """Review 2 M7: with [signatures] coverage = "pixels", a device signature over the
    Creator profile's minimum satisfies must_sign (badge signed, detectors skipped); an
    inverting LUT shape added after signing still does not."""
    creator = _dcmsign(pki, _new_instance(NIH_DX, tmp_path / "c.raw.dcm"),
                       tmp_path / "creator.dcm", *CREATOR_MINIMUM)
    inverted = _edit(_dcmsign(pki, _new_instance(NIH_DX, tmp_path / "i.raw.dcm"),
                              tmp_path / "inverted.dcm", *CREATOR_MINIMUM), _invert)
    gw = gateway_process(f'trust = ["{pki.ca_cert_path}"]\nmust_sign = ["DX_ROOM3"]\n'
                         '[signatures]\ncoverage = "pixels"\n')
    _storescu(gw.dicom_port, "DX_ROOM3", creator, inverted)
    rows = _routed(gw, [creator, inverted])
    row = rows["creator"]
    assert (row["state"], row["trust"]) == ("done", "signed"), row
    assert not _detectors_ran(row), row
    row = rows["inverted"]
    assert (row["state"], row["trust"]) == ("quarantined", "pixels unsigned"), row
    assert any("not covered PresentationLUTShape" in r for r in row["details"]["reasons"])
    assert _detectors_ran(row), row


def test_signature_settings_are_validated(tmp_path):
    from radguard.provenance.policy import AlgorithmPolicy, AlgorithmPolicyError
    from radguard.provenance.profiles import Coverage

    config = tmp_path / "gw.toml"
    for text, message in (("min_rsa_bits = 512", "signatures.min_rsa_bits 512"),
                          ("min_ec_bits = 1000", "signatures.min_ec_bits 1000"),
                          ('allow_weak = "yes"', "signatures.allow_weak"),
                          ('coverage = "everything"', "signatures.coverage 'everything'"),
                          ("strength = 3", "unknown setting(s) signatures_strength")):
        config.write_text(f"[signatures]\n{text}\n")
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_config(config)
    config.write_text("[signatures]\nmin_rsa_bits = 3072\nmin_ec_bits = 384\n")
    assert load_config(config).signature_policy() == AlgorithmPolicy(
        min_rsa_bits=3072, min_ec_bits=384)
    assert load_config(None).signature_policy() == AlgorithmPolicy()  # safe default
    assert load_config(None).signature_coverage() is Coverage.IMAGE
    config.write_text('[signatures]\ncoverage = "pixels"\n')
    assert load_config(config).signature_coverage() is Coverage.PIXELS
    with pytest.raises(AlgorithmPolicyError):
        AlgorithmPolicy(min_rsa_bits=True)


# -- (c) the algorithm policy against dcmsign-made signatures -------------------------------

def _openssl_signer(folder: Path, name: str, *newkey: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    result = subprocess.run(["openssl", "req", "-x509", "-newkey", *newkey, "-nodes",
                             "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
                             "-days", "30"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return key, cert


#: (name, signer, dcmsign MAC flag, status under the default policy, MAC recorded)
CASES = [
    ("rsa-ripemd160", "rsa2048", "+mr", "valid", "RIPEMD160"),
    ("rsa-sha256", "rsa2048", "+m2", "valid", "SHA256"),
    ("rsa-sha384", "rsa2048", "+m3", "valid", "SHA384"),
    ("rsa-sha512", "rsa2048", "+m5", "valid", "SHA512"),
    ("rsa-sha1", "rsa2048", "+ms", "weak", "SHA1"),
    ("rsa-md5", "rsa2048", "+mm", "weak", "MD5"),
    ("rsa1024-sha256", "rsa1024", "+m2", "weak", "SHA256"),
    ("ec256-sha256", "ec256", "+m2", "valid", "SHA256"),
    ("ec256-ripemd160", "ec256", "+mr", "valid", "RIPEMD160"),
    ("ec224-sha256", "ec224", "+m2", "weak", "SHA256"),
]


@pytest.fixture(scope="module")
def dcmsign_files(tmp_path_factory):
    """NIH_DX signed by dcmsign once per case, with openssl-made keys, and the certs."""
    folder = tmp_path_factory.mktemp("dcmsign-policy")
    signers = {
        "rsa2048": _openssl_signer(folder, "rsa2048", "rsa:2048"),
        "rsa1024": _openssl_signer(folder, "rsa1024", "rsa:1024"),
        "ec256": _openssl_signer(folder, "ec256", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"),
        "ec224": _openssl_signer(folder, "ec224", "ec", "-pkeyopt",
                                 "ec_paramgen_curve:secp224r1"),
    }
    files = {}
    for name, signer, flag, _, _ in CASES:
        key, cert = signers[signer]
        files[name] = folder / f"{name}.dcm"
        result = subprocess.run([DCMSIGN, "--sign", str(key), str(cert), "-pw", flag,
                                 str(NIH_DX), str(files[name])], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
    trust = [str(cert) for _, cert in signers.values()]
    return files, [arg for cert in trust for arg in ("--trust", cert)]


def test_dcmsign_signatures_get_the_policy_status(dcmsign_files):
    files, trust = dcmsign_files
    code, reports = _verify_json(*files.values(), *trust)
    assert code == 1
    for name, _, _, status, mac in CASES:
        report = reports[f"{name}.dcm"]
        sig = report["signatures"][0]
        assert (report["status"], sig["mac_algorithm"]) == (status, mac), (name, report)
        assert sig["algorithm"] == ("accepted" if status == "valid" else "weak"), name
        assert report["pixels_covered"] is (status == "valid"), name
    assert "RSA key of 1024 bits" in reports["rsa1024-sha256.dcm"]["signatures"][0]["reason"]
    assert reports["ec224-sha256.dcm"]["signatures"][0]["key_bits"] == 224
    code, allowed = _verify_json(*files.values(), *trust, "--allow-weak")
    assert code == 0, allowed
    for name, _, _, status, _ in CASES:
        sig = allowed[f"{name}.dcm"]["signatures"][0]
        assert allowed[f"{name}.dcm"]["status"] == "valid"
        assert sig["algorithm"] == ("accepted" if status == "valid" else "weak-allowed"), name
    code, lowered = _verify_json(files["rsa1024-sha256"], *trust, "--min-rsa-bits", "1024")
    assert code == 0 and lowered["rsa1024-sha256.dcm"]["status"] == "valid"
    refused = CliRunner().invoke(main, ["verify", str(files["rsa-sha256"]), "--min-rsa-bits",
                                        "512"])
    assert refused.exit_code == 2 and "512" in refused.output


def test_ripemd160_signatures_catch_tampering(dcmsign_files, tmp_path):
    files, trust = dcmsign_files
    tampered = []
    for name in ("rsa-ripemd160", "ec256-ripemd160"):
        ds = read_dataset(files[name])
        pixels = pixel_array(ds).copy()
        pixels[10, 10] ^= 1
        ds.PixelData = pixels.tobytes()
        tampered.append(tmp_path / f"{name}.dcm")
        write_dataset(ds, tampered[-1])
    code, reports = _verify_json(*tampered, *trust)
    assert code == 1
    for report in reports.values():
        assert report["status"] == "invalid", report
        assert "changed after signing" in report["signatures"][0]["reason"]


def test_scan_takes_the_policy_flags(dcmsign_files):
    files, trust = dcmsign_files
    weak = CliRunner().invoke(main, ["scan", "--json", str(files["rsa-md5"]), *trust])
    assert json.loads(weak.output.splitlines()[-1])["signature"] == "weak"
    allowed = CliRunner().invoke(main, ["scan", "--json", str(files["rsa-md5"]), *trust,
                                        "--allow-weak"])
    assert json.loads(allowed.output.splitlines()[-1])["signature"] == "valid"


def test_ripemd160_verifies_where_openssl_lacks_it(dcmsign_files, tmp_path):
    """An OpenSSL configured with only its base provider has no RIPEMD-160 (as on builds
    that keep it in the legacy provider): the pure-Python fallback is used, for real."""
    files, trust = dcmsign_files
    conf = tmp_path / "openssl.cnf"
    conf.write_text("openssl_conf = init\n[init]\nproviders = providers\n"
                    "[providers]\nbase = base\n[base]\nactivate = 1\n")
    env = {**os.environ, "OPENSSL_CONF": str(conf)}
    probe = subprocess.run([sys.executable, "-c", "import hashlib; hashlib.new('ripemd160')"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "ripemd160" in probe.stderr  # really unavailable
    result = subprocess.run([sys.executable, "-m", "radguard.cli", "verify", "--json",
                             str(files["rsa-ripemd160"]), str(files["ec256-ripemd160"]),
                             *trust], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [json.loads(line)["status"] for line in result.stdout.splitlines()] == ["valid"] * 2


def test_pure_python_ripemd160_matches_the_published_vectors_and_hashlib():
    from radguard.provenance.ripemd160 import RIPEMD160

    vectors = {  # Dobbertin, Bosselaers, Preneel: RIPEMD-160 test vectors
        b"": "9c1185a5c5e9fc54612808977ee8f548b2258d31",
        b"a": "0bdc9d2d256b3ee9daae347be6f4dc835a467ffe",
        b"abc": "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc",
        b"message digest": "5d0689ef49d2fae572b881b123a85ffa21595f36",
        b"abcdefghijklmnopqrstuvwxyz": "f71c27109c692c1b56bbdceb5b9d2865b3708dbc",
        b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq":
            "12a053384a9c0c88e405a06c27dcf49ada62eb2b",
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789":
            "b0e20b6e3116640286ed3a87a5713079b21f5189",
        b"1234567890" * 8: "9b752e45573d4b39f4dbd3323cab82bf63326bfb",
        b"a" * 1_000_000: "52783243c1697bdbe16d37f97f68f08325dc1528",
    }
    for message, expected in vectors.items():
        assert RIPEMD160(message).hexdigest() == expected, message[:20]
    rng = np.random.default_rng(21)
    for size in (*range(0, 130), 1000, 65536 + 7):  # every padding case, several blocks
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        ours = RIPEMD160()
        for start in range(0, size, 37):  # fed in odd pieces, as a MAC stream does
            ours.update(data[start : start + 37])
        assert ours.digest() == hashlib.new("ripemd160", data).digest(), size
        assert ours.copy().hexdigest() == ours.hexdigest()


# -- (d) what verifying may cost -------------------------------------------------------------

def _copies(signed: Path, n: int, *, into: str = "") -> Path:
    """``signed`` with its signature item repeated ``n`` times, at the top level or (with
    ``into``) in a new item of that sequence that holds the whole signed data set."""
    ds = read_dataset(signed)
    target = ds
    if into:
        target = Dataset()
        for element in read_dataset(signed):
            target.add(element)
        setattr(ds, into, Sequence([target]))
    item = target.DigitalSignaturesSequence[0]
    target.DigitalSignaturesSequence = Sequence([item] * n)
    write_dataset(ds, signed)
    return signed


@pytest.fixture
def hashed(monkeypatch) -> list[int]:
    """One entry per pass over a data set's signed elements during verification (the real
    MacStream, counted), so a test can tell how much was hashed without timing it."""
    from radguard.provenance import verify as verify_module

    passes: list[int] = []

    class Counted(verify_module.MacStream):
        def add_elements(self, ds: Dataset, tags) -> None:
            tags = list(tags)
            passes.append(len(tags))
            super().add_elements(ds, tags)

    monkeypatch.setattr(verify_module, "MacStream", Counted)
    return passes


def test_too_many_signature_items_make_a_file_invalid_unhashed(pki, tmp_path, hashed):
    trust = TrustStore.from_paths([pki.ca_cert_path])
    top = verify_file(_copies(_signed(pki, tmp_path, "top"), 1000), trust)
    assert top.status == "invalid" and top.signatures == [] and not top.pixels_covered
    assert top.error == ("1000 signatures in the top-level data set: more than the 8 "
                         "verified per data set or item, so none was checked")
    nested = verify_file(_copies(_signed(pki, tmp_path, "nested"), 9,
                                 into="ReferencedImageSequence"), trust)
    assert nested.status == "invalid" and nested.signatures == []
    assert nested.error.startswith("9 signatures in ReferencedImageSequence[0]")
    assert hashed == []  # nothing was hashed for any of them
    spread = _signed(pki, tmp_path, "spread")  # 1 + 5 items x 7: 36 in the file
    items = []
    for _ in range(5):
        item = Dataset()
        for element in read_dataset(spread):
            item.add(element)
        item.DigitalSignaturesSequence = Sequence([item.DigitalSignaturesSequence[0]] * 7)
        items.append(item)
    ds = read_dataset(spread)
    ds.ReferencedImageSequence = Sequence(items)
    write_dataset(ds, spread)
    report = verify_file(spread, trust)
    assert report.status == "invalid" and report.error.startswith("36 signatures in the file")
    assert hashed == []
    code, reports = _verify_json(tmp_path / "top.dcm", "--trust", pki.ca_cert_path)
    assert code == 1 and reports["top.dcm"]["status"] == "invalid"
    assert reports["top.dcm"]["error"].startswith("1000 signatures")


def test_signatures_over_the_same_elements_share_one_hash(pki, tmp_path, hashed):
    at_cap = verify_file(_copies(_signed(pki, tmp_path, "eight"), MAX_SIGNATURES_PER_ITEM),
                         TrustStore.from_paths([pki.ca_cert_path]))
    assert at_cap.status == "valid" and at_cap.pixels_covered
    assert [s.status for s in at_cap.signatures] == ["valid"] * MAX_SIGNATURES_PER_ITEM
    assert len(hashed) == 1  # the pixel data was hashed once for all eight


def test_a_file_costs_at_most_a_few_different_hashes(pki, tmp_path, hashed):
    """Review 2 M8: eight signatures from a self-signed certificate over eight different
    element lists were eight passes over the pixel data (an untrusted signer is hashed to
    tell invalid from untrusted). Now MAX_HASH_PASSES_PER_FILE are hashed; the others are
    invalid unhashed."""
    from radguard.provenance.keys import Identity, Signer, create_signer
    from radguard.provenance.verify import MAX_HASH_PASSES_PER_FILE as cap

    key, cert = create_signer(Identity("Anyone"))  # self-signed: costs nothing to make
    path = _new_instance(NIH_DX, tmp_path / "eight.dcm")
    header = [int(t) for t in read_dataset(path).keys() if int(t) != 0x7FE00010]
    for left_out in header[:8]:  # every list holds the pixel data
        sign_file(path, path, Signer(key, cert),
                  tags=[t for t in header if t != left_out] + [0x7FE00010])
    trust = TrustStore.from_paths([pki.ca_cert_path])
    hashed.clear()
    report = verify_file(path, trust)
    assert 2 <= cap < 8 and len(hashed) == cap
    assert report.status == "invalid" and not report.pixels_covered
    assert [s.status for s in report.signatures] == ["untrusted"] * cap + ["invalid"] * (8 - cap)
    assert all(s.reason.startswith("not checked: a hash over other elements")
               for s in report.signatures[cap:])
    assert report.error == (f"{8 - cap} signature(s) not checked: they need more than the "
                            f"{cap} different hashes made per file")
    code, reports = _verify_json(path, "--trust", pki.ca_cert_path)
    assert code == 1 and reports["eight.dcm"]["error"].startswith(
        f"{8 - cap} signature(s) not checked")
    two = _signed(pki, tmp_path, "two")  # a device's signature and a gateway's: both checked
    sign_file(two, two, pki.signer, mac="sha512")
    hashed.clear()
    assert verify_file(two, trust).status == "valid" and len(hashed) == 2


def _ed25519_certificate() -> bytes:
    """A self-signed Ed25519 certificate (DER): a key type DICOM signatures do not use."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.x509.oid import NameOID

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed25519")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, None))
    return cert.public_bytes(serialization.Encoding.DER)


def test_cheap_checks_come_before_any_hash(pki, tmp_path, hashed):
    """Review finding 5: a signature item that fails a check needing no hash costs no pass
    over the pixel data (before: the hash had often started, and was waited for)."""
    trust = TrustStore.from_paths([pki.ca_cert_path])
    cases = [  # (what the reason says, how the signature item is spoilt)
        ("certificate type", lambda sig: setattr(sig, "CertificateType", "X509_BOGUS")),
        ("malformed signature item", lambda sig: setattr(sig, "CertificateOfSigner",
                                                         b"\x30\x03not a certificate")),
        ("not RSA or ECDSA", lambda sig: setattr(sig, "CertificateOfSigner",
                                                 _ed25519_certificate())),
        ("malformed signature item", lambda sig: setattr(sig, "DigitalSignatureDateTime",
                                                         "20261301")),
        ("no MAC Parameters item", lambda sig: setattr(sig, "MACIDNumber", 99)),
    ]
    for i, (reason, spoil) in enumerate(cases):
        path = _signed(pki, tmp_path, f"spoilt{i}")
        ds = read_dataset(path)
        with warnings.catch_warnings():  # pydicom warns about the invalid values, rightly
            warnings.simplefilter("ignore")
            spoil(ds.DigitalSignaturesSequence[0])
            write_dataset(ds, path)
        report = verify_file(path, trust)
        assert report.status == "invalid", report
        assert reason in report.signatures[0].reason, report.signatures[0].reason
    assert hashed == []  # none of them cost a pass over the pixel data
    assert verify_file(_signed(pki, tmp_path, "untrusted"), None).status == "untrusted"
    assert len(hashed) == 1  # an untrusted signer is hashed: invalid ranks above untrusted
