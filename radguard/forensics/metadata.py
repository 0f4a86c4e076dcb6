"""DICOM header anomalies that suggest manipulation or fabrication.

Each check returns findings with a code, a severity and a sentence a radiologist or PACS
administrator can act on. None of them proves forgery on its own (real archives are messy);
together they explain why an image deserves a second look:

* UIDs: malformed, not sharing one organisational root, or (across a collection) one
  instance or study UID shared by different patients or different pixel content;
* dates and times in an impossible order or in the future;
* pixels contradicting the header: values beyond Bits Stored, 8-bit data in a 16-bit
  container, colour pixels claimed by a grey modality;
* missing acquisition attributes that a real modality writes;
* provenance flags: Synthetic Data (0008,001C) = YES, Image Type DERIVED, Secondary Capture
  for a modality image, burned-in annotation, lossy compression, files written by a toolkit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import cast

import numpy as np
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

from radguard.dicom.io import peek, source_view
from radguard.dicom.pixels import pixel_array, pixel_info
from radguard.dicom.uids import is_valid_uid
from radguard.errors import RadguardError

__all__ = ["Finding", "audit_files", "check_collection", "check_metadata"]

SEVERITIES = ("info", "low", "medium", "high")
_ACQUISITION_MODALITIES = {"CR", "DX", "MG", "CT", "MR", "XA", "RF", "US", "NM", "PT", "IO"}
_XRAY = {"CR", "DX", "MG", "XA", "RF", "IO", "CT"}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_TOOLKITS = ("PYDICOM", "GDCM", "DCMTK", "OFFIS", "FO-DICOM", "DCM4CHE", "DICOMWEB")


@dataclass(frozen=True)
class Finding:
    """One header anomaly."""

    code: str
    severity: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return asdict(self)


def _text(ds: Dataset, keyword: str) -> str:
    value = peek(ds, keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or (hasattr(value, "__iter__")
                                           and not isinstance(value, str | bytes)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _date_time(ds: Dataset, date_kw: str, time_kw: str | None) -> dt.datetime | None:
    date = _text(ds, date_kw)
    if len(date) < 8 or not date[:8].isdigit():
        return None
    raw_time = _text(ds, time_kw) if time_kw else ""
    digits = "".join(ch for ch in raw_time.split(".")[0] if ch.isdigit())[:6].ljust(6, "0")
    try:
        return dt.datetime.strptime(date[:8] + digits, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def _uid_findings(ds: Dataset) -> list[Finding]:
    out = []
    uids = {kw: _text(ds, kw) for kw in ("StudyInstanceUID", "SeriesInstanceUID",
                                         "SOPInstanceUID", "FrameOfReferenceUID")}
    for kw, uid in uids.items():
        if uid and not is_valid_uid(uid):
            out.append(Finding("uid-malformed", "high", f"{kw} '{uid}' is not a valid UID"))
    present = [u.split(".") for kw, u in uids.items()
               if u and is_valid_uid(u) and kw != "FrameOfReferenceUID"]
    if len(present) >= 2:
        shared = 0
        for parts in zip(*present, strict=False):
            if len(set(parts)) > 1:
                break
            shared += 1
        if shared < 3:
            out.append(Finding("uid-roots-differ", "medium",
                               "Study, Series and SOP Instance UIDs share no organisational "
                               "root: they were not all issued by one system"))
    return out


def _date_findings(ds: Dataset, now: dt.datetime) -> list[Finding]:
    out = []
    stamps = {
        "birth": _date_time(ds, "PatientBirthDate", None),
        "study": _date_time(ds, "StudyDate", "StudyTime"),
        "series": _date_time(ds, "SeriesDate", "SeriesTime"),
        "acquisition": _date_time(ds, "AcquisitionDate", "AcquisitionTime"),
        "content": _date_time(ds, "ContentDate", "ContentTime"),
        "creation": _date_time(ds, "InstanceCreationDate", "InstanceCreationTime"),
    }
    for name, value in stamps.items():
        if value is not None and value > now + dt.timedelta(days=1):
            out.append(Finding("date-in-future", "high", f"{name} date {value:%Y-%m-%d} is in "
                               "the future"))
    birth = stamps["birth"]
    for name in ("study", "acquisition", "content"):
        value = stamps[name]
        if birth is not None and value is not None and value.date() < birth.date():
            out.append(Finding("date-before-birth", "high",
                               f"{name} date {value:%Y-%m-%d} precedes the patient's birth "
                               f"{birth:%Y-%m-%d}"))
    ordered = [("study", "acquisition"), ("acquisition", "content"),
               ("acquisition", "creation")]
    for first, then in ordered:
        a, b = stamps[first], stamps[then]
        if a is not None and b is not None and b < a - dt.timedelta(days=1):
            out.append(Finding("dates-out-of-order", "medium",
                               f"{then} ({b:%Y-%m-%d %H:%M}) is more than a day before "
                               f"{first} ({a:%Y-%m-%d %H:%M})"))
    return out


def _pixel_findings(ds: Dataset, modality: str, pixels: np.ndarray | None) -> list[Finding]:
    out: list[Finding] = []
    try:
        info = pixel_info(ds)
        arr = pixel_array(ds) if pixels is None else pixels
    except RadguardError as exc:
        return [Finding("pixels-unreadable", "high", str(exc))]
    if info.samples_per_pixel > 1 and modality in _ACQUISITION_MODALITIES - {"US", "NM"}:
        out.append(Finding("colour-in-grey-modality", "medium",
                           f"{modality} image stored as {info.photometric}: grey modalities "
                           "do not produce colour pixels"))
    if arr.dtype.kind in "uib":  # integers: min and max in place, no int64 copy
        lo, hi = int(arr.min()), int(arr.max())
    else:
        values = arr.astype(np.int64)
        lo, hi = int(values.min()), int(values.max())
    raw_max = _raw_unsigned_max(ds, info)  # decoders mask the bits above Bits Stored
    if lo < info.min_value or hi > info.max_value or (raw_max is not None
                                                       and raw_max > info.max_value):
        shown = f"up to {raw_max}" if raw_max is not None else f"{lo}..{hi}"
        out.append(Finding("values-beyond-bits-stored", "high",
                           f"stored values {shown} do not fit Bits Stored {info.bits_stored}: "
                           "the header understates the data, or bits hide something"))
    used = max(1, int(hi - min(lo, 0)).bit_length())
    if info.bits_stored >= 12 and used <= 8 and hi - lo > 16:
        out.append(Finding("eight-bit-in-deep-container", "medium",
                           f"Bits Stored {info.bits_stored} but the values span only {used} "
                           "bits: typical of an 8-bit picture (a screenshot, a generated "
                           "image) wrapped as DICOM"))
    if modality == "CT":
        intercept = peek(ds, "RescaleIntercept")
        if intercept is None:
            out.append(Finding("ct-without-rescale", "low",
                               "CT image without Rescale Intercept: Hounsfield units unknown"))
    if hi == lo:
        out.append(Finding("constant-image", "medium", "every pixel has the same value"))
    return out


def _raw_unsigned_max(ds: Dataset, info: object) -> int | None:
    """Largest raw stored word of native unsigned pixel data, before any masking."""
    # pydicom types get_item as DataElement; keep_deferred=True may give the raw element
    raw = cast(DataElement | RawDataElement | None,
               ds.get_item(0x7FE00010, keep_deferred=True) if 0x7FE00010 in ds else None)
    allocated = getattr(info, "bits_allocated", 0)
    if raw is None or getattr(info, "signed", True) or allocated not in (8, 16, 32) or \
            getattr(raw, "length", None) == 0xFFFFFFFF or getattr(raw, "is_undefined_length",
                                                                   False):
        return None
    value = raw.value
    if value is None:  # deferred: read it in place from the mapped file, without converting
        view = source_view(ds)
        if view is None or not isinstance(raw, RawDataElement):
            return None
        value = view[raw.value_tell : raw.value_tell + raw.length]
    size = allocated // 8
    data = np.frombuffer(value, dtype=f"<u{size}", count=len(value) // size)
    return int(data.max()) if data.size else None


def _acquisition_findings(ds: Dataset, modality: str) -> list[Finding]:
    if modality not in _ACQUISITION_MODALITIES:
        return []
    expected = ["Manufacturer", "ManufacturerModelName", "StationName", "DeviceSerialNumber",
                "SoftwareVersions"]
    if modality in _XRAY:
        expected.append("KVP")
    if not (_text(ds, "AcquisitionDate") or _text(ds, "AcquisitionDateTime")
            or _text(ds, "ContentDate")):
        expected.append("AcquisitionDate")
    missing = [kw for kw in expected if not _text(ds, kw)]
    if not missing:
        return []
    severity = "medium" if len(missing) >= 4 else "low"
    return [Finding("acquisition-attributes-missing", severity,
                    f"{len(missing)} attributes a {modality} device normally writes are absent: "
                    + ", ".join(missing))]


def _provenance_findings(ds: Dataset, modality: str) -> list[Finding]:
    out = []
    if _text(ds, "SyntheticData").upper() == "YES":
        out.append(Finding("synthetic-data", "high", "Synthetic Data (0008,001C) is YES: the "
                           "image is declared artificial"))
    image_type = _text(ds, "ImageType").upper().split("\\")
    if image_type and image_type[0] == "DERIVED":
        out.append(Finding("derived-image", "info", "Image Type DERIVED: pixels were "
                           "processed after acquisition"))
    if _text(ds, "SOPClassUID") == _SECONDARY_CAPTURE and modality in _ACQUISITION_MODALITIES:
        out.append(Finding("secondary-capture", "medium",
                           f"Secondary Capture object claiming modality {modality}: "
                           "re-captured or converted, not written by the modality"))
    if _text(ds, "BurnedInAnnotation").upper() == "YES":
        out.append(Finding("burned-in-annotation", "info", "burned-in annotation present"))
    if _text(ds, "LossyImageCompression") == "01":
        out.append(Finding("lossy-compressed", "info", "lossy compression was applied"))
    meta = getattr(ds, "file_meta", None)
    version = str(meta.get("ImplementationVersionName", "")) if meta is not None else ""
    if version and any(version.upper().startswith(t) for t in _TOOLKITS) \
            and modality in _ACQUISITION_MODALITIES and not _text(ds, "Manufacturer"):
        out.append(Finding("written-by-toolkit", "low",
                           f"file written by '{version}' with no manufacturer recorded"))
    return out


def check_metadata(ds: Dataset, *, now: dt.datetime | None = None,
                   check_pixels: bool = True, pixels: np.ndarray | None = None
                   ) -> list[Finding]:
    """Every single-instance check, most severe first. ``pixels``: the already decoded
    pixel array, so callers that need it too decode a compressed image only once."""
    modality = _text(ds, "Modality").upper()
    findings = (_uid_findings(ds) + _date_findings(ds, now or dt.datetime.now())
                + _acquisition_findings(ds, modality) + _provenance_findings(ds, modality))
    if check_pixels and ("PixelData" in ds or "FloatPixelData" in ds):
        findings += _pixel_findings(ds, modality, pixels)
    return sorted(findings, key=lambda f: -SEVERITIES.index(f.severity))


def check_collection(datasets: Iterable[tuple[str, Dataset]]) -> list[tuple[str, Finding]]:
    """Cross-instance checks: one UID shared by different patients or different pixels."""
    by_instance: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    by_study: dict[str, set[str]] = defaultdict(set)
    study_files: dict[str, list[str]] = defaultdict(list)
    for name, ds in datasets:
        patient = _text(ds, "PatientID")
        sop, study = _text(ds, "SOPInstanceUID"), _text(ds, "StudyInstanceUID")
        digest = ""
        raw = ds.get_item(0x7FE00010, keep_deferred=True) if 0x7FE00010 in ds else None
        if raw is not None and getattr(raw, "value", None) is not None:
            digest = hashlib.sha256(bytes(raw.value)).hexdigest()
        if sop:
            by_instance[sop].append((name, patient, digest))
        if study:
            by_study[study].add(patient)
            study_files[study].append(name)
    out = []
    for sop, entries in by_instance.items():
        if len(entries) < 2:
            continue
        patients = {p for _n, p, _d in entries}
        pixels = {d for _n, _p, d in entries if d}
        if len(patients) > 1 or len(pixels) > 1:
            what = "patients" if len(patients) > 1 else "pixel contents"
            for name, _p, _d in entries:
                out.append((name, Finding("uid-reused", "high",
                                          f"SOP Instance UID {sop} appears in {len(entries)} "
                                          f"files with different {what}")))
    for study, patients in by_study.items():
        if len({p for p in patients if p}) > 1:
            for name in study_files[study]:
                out.append((name, Finding("study-uid-shared", "high",
                                          f"Study Instance UID {study} is shared by "
                                          f"{len(patients)} different patients")))
    return out


def audit_files(files: Iterable[str | os.PathLike[str]], *,
                on_file: Callable[[str], None] | None = None
                ) -> dict[str, list[dict[str, str]]]:
    """Header findings (as dicts) of each file, by path: its own checks, then those across
    all the files (:func:`check_collection`); a file that cannot be read has one high
    ``unreadable`` finding. ``on_file`` is called after each file."""
    from radguard.dicom.io import read_dataset

    per_file: dict[str, list[dict[str, str]]] = {}
    loaded = []
    for f in files:
        try:
            ds = read_dataset(f, stop_before_pixels=False)
            per_file[str(f)] = [x.to_dict() for x in check_metadata(ds)]
            loaded.append((str(f), ds))
        except RadguardError as exc:
            per_file[str(f)] = [{"code": "unreadable", "severity": "high",
                                 "message": str(exc)}]
        if on_file is not None:
            on_file(str(f))
    for name, finding in check_collection(loaded):
        per_file[name].append(finding.to_dict())
    return per_file
