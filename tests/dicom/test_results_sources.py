"""AI results (SR, SC, SEG: radguard.dicom.results) from sources with empty, missing or odd
optional attributes and unusual pixel formats: every object is built, and dciodvfy finds
no error in it; a result set is all or nothing (radguard.triage.results)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radguard.dicom.io import read_dataset, write_dataset
from radguard.dicom.results import (
    TriageFinding,
    overlay_capture,
    patient_orientation,
    saliency_segmentation,
    triage_report,
)
from radguard.errors import RadguardError
from tests.conftest import DICOM_DIR, NIH_DX, RG1_J2K

FINDING = TriageFinding("Pneumonia", ("233604007", "SCT"), True, 0.71, 7, 0.5, "chest", "1.0")
DX = "1.2.840.10008.5.1.4.1.1.1.1"
MULTIFRAME_SC = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
OPTIONAL = ("StudyID", "AccessionNumber", "ReferringPhysicianName", "PatientBirthDate",
            "PatientSex", "StudyDate", "StudyTime", "SeriesNumber", "InstanceNumber")


def _source(*, rows: int = 64, cols: int = 48, bits: int = 8, photometric: str = "MONOCHROME2",
            frames: int = 1, sop_class: str = DX, **changes: object) -> Dataset:
    """A small, complete source image; ``changes`` set (None: delete) attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "DX", "Doe^Jane", "P1"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20240101", "101010", "A1"
    ds.ReferringPhysicianName, ds.StudyID = "Ref^Doc", "S1"
    ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = 3, 1, ["A", "F"]
    samples = 3 if photometric == "RGB" else 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    dtype = np.uint8 if bits == 8 else np.uint16
    ds.PixelData = np.zeros((frames, rows, cols, samples), dtype).tobytes()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


SOURCES = {
    "complete": lambda: _source(),
    "empty orientation": lambda: _source(PatientOrientation=""),
    "no orientation": lambda: _source(PatientOrientation=None),
    "one orientation value": lambda: _source(PatientOrientation="L"),
    "lowercase orientation": lambda: _source(PatientOrientation=["l", "f"]),
    "odd orientation": lambda: _source(PatientOrientation=["X", "Y"]),
    "contradictory orientation": lambda: _source(PatientOrientation=["AL", "FH"]),
    "oblique orientation": lambda: _source(PatientOrientation=["LP", "FA"]),
    "optional attributes missing": lambda: _source(**dict.fromkeys(OPTIONAL)),
    "optional attributes empty": lambda: _source(**dict.fromkeys(OPTIONAL, "")),
    "no modality, odd sex, odd age": lambda: _source(Modality="", PatientSex="X",
                                                     PatientAge="81"),
    "multi-frame": lambda: _source(frames=3, sop_class=MULTIFRAME_SC),
    "MONOCHROME1": lambda: _source(photometric="MONOCHROME1"),
    "16-bit": lambda: _source(bits=16),
    "RGB": lambda: _source(photometric="RGB"),
    "real 8-bit DX, minimal header": lambda: read_dataset(NIH_DX),
    "real 15-bit CR, JPEG 2000": lambda: read_dataset(RG1_J2K),
    "real 16-bit RGB": lambda: read_dataset(DICOM_DIR / "pydicom-data-SC_rgb_16bit.dcm"),
}


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy not found: run scripts/install.sh (apt-get install dicom3tools)")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_result_object_is_built_and_valid(name, tmp_path):
    source = SOURCES[name]()
    rows, cols = int(source.Rows), int(source.Columns)
    heat = np.random.default_rng(0).random((rows, cols))
    objects = {
        "sr": triage_report(source, FINDING),
        "sc": overlay_capture(source, np.zeros((rows, cols, 3), np.uint8), description="x"),
    }
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        with pytest.raises(RadguardError, match="multi-frame"):
            saliency_segmentation(source, heat, model="chest", version="1.0")
    else:
        objects["seg"] = saliency_segmentation(source, heat, model="chest", version="1.0")
    for kind, ds in objects.items():
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.get("PatientID", "")
        path = tmp_path / f"{kind}.dcm"
        write_dataset(ds, path)
        assert _dciodvfy_errors(path) == [], f"{name}: {kind}"
    orientation = patient_orientation(source)
    for kind in ("sc", "seg"):
        if kind in objects:  # the source's orientation when valid, else unknown
            written = pydicom.dcmread(tmp_path / f"{kind}.dcm")
            assert list(written.PatientOrientation or []) == list(orientation or [])


@pytest.mark.parametrize("value, expected", [
    (["A", "F"], ("A", "F")), (["l", "f"], ("L", "F")), (["LP", "FA"], ("LP", "FA")),
    ("", None), ("L", None), (["X", "Y"], None), (["AL", "FH"], None), (["LL", "F"], None),
])
def test_patient_orientation_is_kept_only_when_valid(value, expected):
    assert patient_orientation(_source(PatientOrientation=value)) == expected


def test_a_multi_frame_source_is_referenced_at_its_first_frame(tmp_path):
    source = _source(frames=3, sop_class=MULTIFRAME_SC)
    sc = overlay_capture(source, np.zeros((64, 48, 3), np.uint8), description="x")
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 1
    sr = triage_report(source, FINDING)
    refs = [item for item in _items(sr.ContentSequence) if item.ValueType == "IMAGE"]
    assert refs and all(r.ReferencedSOPSequence[0].ReferencedFrameNumber == 1 for r in refs)


def _items(seq):
    for item in seq:
        yield item
        yield from _items(getattr(item, "ContentSequence", []))


# -- a result set is all or nothing ------------------------------------------------------

class _Model:
    """Enough of a triage model for build_results: a card, a threshold, a saliency map."""

    class card:  # mimics TriageModel.card
        name, version = "chest", "1.0"

    threshold = 0.5

    def saliency(self, pixels):
        return np.linspace(0, 1, pixels.size).reshape(pixels.shape)


def _prediction():
    from radguard.triage.model import Prediction

    return Prediction("x", 0.3, 0.71, 7, True, "chest", "1.0")


def test_write_results_writes_the_whole_set(tmp_path):
    from radguard.triage.results import write_results

    source = _source(PatientOrientation="")
    written = write_results(_Model(), _prediction(), np.zeros((64, 48), np.uint8), source,
                            tmp_path / "img")
    assert set(written) == {"overlay_png", "sr", "overlay_dicom", "seg"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(p).name
                                                                for p in written.values())


def test_a_set_whose_last_object_fails_leaves_no_file(tmp_path, monkeypatch):
    import radguard.dicom.results as results
    from radguard.triage.results import write_results

    def cannot(*_args, **_kwargs):
        raise RadguardError("cannot build the saliency segmentation (forced)")

    monkeypatch.setattr(results, "saliency_segmentation", cannot)
    with pytest.raises(RadguardError, match="forced"):
        write_results(_Model(), _prediction(), np.zeros((64, 48), np.uint8), _source(),
                      tmp_path / "img")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_removes_what_the_set_had_written(tmp_path, monkeypatch):
    import radguard.fileio as fileio
    from radguard.triage.results import write_results

    real, calls = fileio.atomic_write_bytes, []

    def third_fails(path, data, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr(fileio, "atomic_write_bytes", third_fails)
    with pytest.raises(RadguardError, match="No space left"):
        write_results(_Model(), _prediction(), np.zeros((64, 48), np.uint8), _source(),
                      tmp_path / "img")
    assert list(tmp_path.iterdir()) == []


def test_a_seeded_set_has_the_same_uids_when_built_again():
    from radguard.triage.results import build_results

    pixels, source = np.zeros((64, 48), np.uint8), _source()
    first, again, other = (build_results(_Model(), _prediction(), pixels, source, uid_seed=s)
                           for s in ("image-a", "image-a", "image-b"))
    uids = [{k: (d.SOPInstanceUID, d.SeriesInstanceUID) for k, d in s.datasets.items()}
            for s in (first, again, other)]
    assert uids[0] == uids[1] and set(uids[0]) == {"sr", "overlay_dicom", "seg"}
    assert not {u for pair in uids[0].values() for u in pair} & \
        {u for pair in uids[2].values() for u in pair}
