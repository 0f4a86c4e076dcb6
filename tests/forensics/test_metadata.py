"""Header consistency checks on hand-made anomalies and on the shared real files."""

from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import pytest

from radguard.demo import synthetic_radiograph
from radguard.dicom import read_dataset
from radguard.forensics import check_collection, check_metadata
from tests.conftest import DICOM_DIR, RG1_J2K

NOW = dt.datetime(2026, 11, 23, 12, 0)


def _device_dx():
    """A plausible DX instance as a modality writes it (no findings expected)."""
    ds = synthetic_radiograph(128, 128, bits=12)
    del ds.SyntheticData
    root = "1.2.840.113619.2.55.3"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{root}.1.1", f"{root}.1.1.2"
    ds.SOPInstanceUID = f"{root}.1.1.2.3"
    ds.Manufacturer, ds.ManufacturerModelName = "Acme Medical", "DR-9000"
    ds.StationName, ds.DeviceSerialNumber, ds.SoftwareVersions = "DX3", "SN-3", "4.2"
    ds.KVP = "110"
    ds.PatientBirthDate = "19600101"
    ds.StudyDate = ds.AcquisitionDate = ds.ContentDate = "20261120"
    ds.StudyTime, ds.AcquisitionTime, ds.ContentTime = "101500", "101700", "101705"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


def codes(ds, **kw):
    return {f.code for f in check_metadata(ds, now=NOW, **kw)}


def test_a_plausible_device_image_is_clean():
    assert codes(_device_dx()) == set()


@pytest.mark.parametrize(("change", "expected"), [
    (lambda ds: setattr(ds, "SOPInstanceUID", "1.2.03.x"), "uid-malformed"),
    (lambda ds: setattr(ds, "SOPInstanceUID", "2.25.12345678901234567890"), "uid-roots-differ"),
    (lambda ds: setattr(ds, "PatientBirthDate", "20300101"), "date-before-birth"),
    (lambda ds: setattr(ds, "AcquisitionDate", "20271231"), "date-in-future"),
    (lambda ds: setattr(ds, "ContentDate", "20240101"), "dates-out-of-order"),
    (lambda ds: setattr(ds, "SyntheticData", "YES"), "synthetic-data"),
    (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"), "secondary-capture"),
    (lambda ds: [delattr(ds, k) for k in ("Manufacturer", "ManufacturerModelName",
                                            "StationName", "DeviceSerialNumber")],
     "acquisition-attributes-missing"),
    (lambda ds: setattr(ds, "ImageType", ["DERIVED", "SECONDARY"]), "derived-image"),
])
def test_each_anomaly_is_reported(change, expected):
    ds = _device_dx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the malformed UID we set
        change(ds)
    assert expected in codes(ds)


def test_pixels_that_contradict_the_header():
    ds = _device_dx()
    values = np.frombuffer(ds.PixelData, "<u2").copy()
    values[0] = 8000  # beyond 12 stored bits
    ds.PixelData = values.tobytes()
    assert "values-beyond-bits-stored" in codes(ds)
    eight_bit = _device_dx()
    eight_bit.BitsStored, eight_bit.HighBit = 16, 15
    eight_bit.PixelData = (np.frombuffer(eight_bit.PixelData, "<u2") >> 4).astype("<u2").tobytes()
    assert "eight-bit-in-deep-container" in codes(eight_bit)
    assert "values-beyond-bits-stored" not in codes(eight_bit)


def test_real_files():
    rg1 = check_metadata(read_dataset(RG1_J2K))
    assert not [f for f in rg1 if f.severity in ("medium", "high")]
    colour = read_dataset(DICOM_DIR / "pydicom-data-SC_rgb_16bit.dcm")
    colour.Modality = "DX"
    assert "colour-in-grey-modality" in {f.code for f in check_metadata(colour)}
    corrupt = read_dataset(DICOM_DIR / "pylibjpeg-data" / "RG2_JPLY.dcm")
    assert "pixels-unreadable" in {f.code for f in check_metadata(corrupt)}


def test_collection_reuse_of_uids():
    a, b, c = _device_dx(), _device_dx(), _device_dx()
    a.PatientID, b.PatientID, c.PatientID = "P1", "P2", "P3"
    b.SOPInstanceUID = a.SOPInstanceUID  # same instance UID, another patient
    c.StudyInstanceUID = "1.2.840.113619.2.55.3.9"
    c.SOPInstanceUID = "1.2.840.113619.2.55.3.9.1.1"
    found = check_collection([("a", a), ("b", b), ("c", c)])
    assert {(name, f.code) for name, f in found} >= {("a", "uid-reused"), ("b", "uid-reused"),
                                                    ("a", "study-uid-shared")}
    assert not [f for name, f in found if name == "c"]


def test_cli_audit(tmp_path):
    import json

    from click.testing import CliRunner

    from radguard.cli import main
    from radguard.dicom import write_dataset

    a, b = _device_dx(), _device_dx()
    a.PatientID, b.PatientID = "P1", "P2"
    write_dataset(a, tmp_path / "a.dcm")
    write_dataset(b, tmp_path / "b.dcm")
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    result = CliRunner().invoke(main, ["dicom", "audit", str(tmp_path), "--json"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    rows = {json.loads(line)["path"].split("/")[-1]: json.loads(line)["findings"]
            for line in result.output.splitlines()}
    assert {f["code"] for f in rows["a.dcm"]} == {"study-uid-shared", "uid-reused"}
    assert rows["junk.dcm"][0]["code"] == "unreadable"
    clean = CliRunner().invoke(main, ["dicom", "audit", str(tmp_path / "a.dcm")])
    assert clean.exit_code == 0 and "no finding" in clean.output
