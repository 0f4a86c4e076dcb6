"""Side by side: radguard's DICOMweb (QIDO-RS / WADO-RS) and a real Orthanc with its DICOMweb
plugin, through the same third-party client (``dicomweb-client``), over the same studies.

The same files go into both servers: every file of ``../shared/data/dicom`` and a dozen
generated studies with chosen names (mixed case, five-component and non-ASCII names in
ISO_IR 100 and ISO_IR 192), dates spread over 25 years, one study without a date, CT / MR /
US / DX / CR / MG series, multi-modality studies and a multi-frame US object.

The oracle is the standard, not either server: each query carries the PS3.4 C.2.2.2 /
PS3.18 QIDO-RS rule it exercises as a predicate over the attributes read from the files
themselves, so the expected matches and the expected values of the required return
attributes are computed here. Radguard must match the oracle exactly. Orthanc must match it
too, except where it deviates from the standard in a way recorded in
``ORTHANC_DEVIATIONS`` (query or attribute -> clause; listed in docs/conformance-orthanc.md);
a deviation of Orthanc that is not recorded fails the test, so the list cannot rot.

What is compared: only studies whose every instance radguard serves (state ``done``) and
none of whose SOP Instance UIDs is reused with other bytes (byte-identical resends - the
shared data has one - are one instance, checked on both servers). What radguard refused or
quarantined is reported (``test_load_report``; ``-s`` prints it) and its study left out of
the comparison on both sides. One object is sent to radguard only, to be quarantined: a
signed object altered after signing (visible to an admin, never to a radiologist).

Orthanc 1.10 does not percent-decode query values; ``_OrthancSession`` sends it ``*``, ``?``
and ``,`` unescaped so its matching rules can still be compared (see the class).

Runs in well under a minute: one Orthanc (configured as tests/conftest.py's ``orthanc``, but
the module's own) and one gateway for the whole module; each query is its own test id.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radguard.gateway import Gateway, GatewayConfig
from radguard.gateway.auth import Users
from tests.conftest import DICOM_DIR, running_orthanc

dicomweb_client = pytest.importorskip("dicomweb_client")
from dicomweb_client import DICOMwebClient  # noqa: E402

PASSWORD = "conformance test password"

# -- the generated studies ------------------------------------------------------------------------

SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "US-MF": "1.2.840.10008.5.1.4.1.1.3.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
}


@dataclasses.dataclass(frozen=True)
class Spec:
    key: str
    name: str
    pid: str
    date: str
    time: str
    acc: str
    desc: str
    ref: str
    series: tuple[tuple[str, int], ...]  # (modality, instances); "US-MF": one 3-frame object
    charset: str | None = None
    birth: str = "19700101"
    sex: str = "O"
    study_id: str = ""


SPECS = [
    Spec("S01", "Müller^Jürgen", "RGC-001", "19990314", "081500", "ACC-1999-01", "CT Thorax",
         "House^Gregory", (("CT", 2), ("CT", 1)), charset="ISO_IR 100", birth="19510203",
         sex="M"),
    Spec("S02", "Smith^John", "RGC-002", "20050607", "093000.25", "ACC-2005-02",
         "Head MR and CT", "Wilson^James", (("MR", 3), ("CT", 2), ("MR", 1)), sex="M"),
    Spec("S03", "SMITH^JANE", "RGC-003", "20100215", "142000", "ACC-2010-03", "Abdomen US",
         "house^gregory", (("US", 2), ("US-MF", 1)), sex="F"),
    Spec("S04", "smithers^bob", "RGC-004", "20150101", "000000", "ACC-2015-04", "Hand",
         "Cuddy^Lisa", (("DX", 1), ("CR", 2)), sex="M"),
    Spec("S05", "Smyth^John^A^Dr^Jr", "RGC-005", "20160630", "235959", "ACC-2016-05",
         "Screening mammography", "Cuddy^Lisa", (("MG", 4),), sex="F"),
    Spec("S06", "Doe^John", "RGC-006", "20181120", "101010", "ACC-2018-06", "Chest DX",
         "Foreman^Eric", (("DX", 2),), sex="M"),
    Spec("S07", "Doe^John", "RGC-006", "20190402", "110500", "ACC-2019-07",
         "Trauma CT and MR", "Foreman^Eric", (("CT", 2), ("MR", 2), ("DX", 1)), sex="M"),
    Spec("S08", "O'Brien^Siobhan", "RGC-008", "20200229", "075959", "ACC-2020-08", "Knee MR",
         "Chase^Robert", (("MR", 3),), sex="F"),
    Spec("S09", "Ng^Li", "RGC-009", "20211231", "120000", "ACC-2021-09", "Breast US and MG",
         "Cameron^Allison", (("US", 1), ("MG", 2)), sex="F"),
    Spec("S10", "García^José", "RGC-010", "20220704", "163000", "ACC-2022-10", "Spine CT",
         "Taub^Chris", (("CT", 3),), charset="ISO_IR 192", sex="M"),
    Spec("S11", "Anderson^Lars", "RGC-011", "20231231", "235900", "ACC-2023-11", "Pelvis CR",
         "Hadley^Remy", (("CR", 1),), sex="M"),
    Spec("S12", "Unknown^Date", "RGC-012", "", "", "ACC-NODATE-12", "No study date",
         "", (("CT", 1), ("US", 1)), sex=""),
]


def _pixels(rng: np.random.Generator, rows: int, cols: int, bits: int, frames: int = 1
            ) -> np.ndarray:
    """A smooth random field plus noise: looks like tissue more than white noise does."""
    out = []
    for _ in range(frames):
        coarse = rng.normal(0.5, 0.15, (rows // 8 + 1, cols // 8 + 1))
        field = np.kron(coarse, np.ones((8, 8)))[:rows, :cols]
        img = np.clip(field + rng.normal(0, 0.03, (rows, cols)), 0, 1) * (2 ** bits - 1)
        out.append(img.astype(np.uint8 if bits <= 8 else np.uint16))
    return np.stack(out) if frames > 1 else out[0]


def _generate(spec: Spec, folder: Path, rng: np.random.Generator) -> list[Path]:
    study_uid = generate_uid()
    paths = []
    for s_index, (kind, count) in enumerate(spec.series, start=1):
        series_uid = generate_uid()
        modality = kind.split("-")[0]
        for i in range(1, count + 1):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[kind]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SOPClassUID = SOP_CLASS[kind]
            if spec.charset:
                ds.SpecificCharacterSet = spec.charset
            ds.PatientName = spec.name
            ds.PatientID = spec.pid
            ds.PatientBirthDate = spec.birth
            ds.PatientSex = spec.sex
            ds.PatientAge = "045Y"
            ds.StudyInstanceUID = study_uid
            ds.StudyDate = spec.date
            ds.StudyTime = spec.time
            ds.AccessionNumber = spec.acc
            ds.StudyDescription = spec.desc
            ds.ReferringPhysicianName = spec.ref
            ds.StudyID = spec.study_id or spec.key[1:]
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = s_index
            ds.SeriesDescription = f"{spec.desc} {modality} series {s_index}"
            ds.Modality = modality
            ds.PerformedProcedureStepStartDate = spec.date
            ds.PerformedProcedureStepStartTime = spec.time
            ds.SeriesDate, ds.SeriesTime = spec.date, spec.time
            ds.InstanceNumber = i
            ds.Manufacturer = "radguard conformance"
            ds.ConversionType = "WSD"
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            frames = 3 if kind == "US-MF" else 1
            bits = 8 if modality == "US" else 12
            rows, cols = (24, 32) if modality == "US" else (32, 32)
            ds.Rows, ds.Columns = rows, cols
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated = 8 if bits == 8 else 16
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
            if frames > 1:
                ds.NumberOfFrames = frames
                ds.FrameIncrementPointer = 0x00181063
                ds.FrameTime = 33.3
            ds.PixelData = _pixels(rng, rows, cols, bits, frames).tobytes()
            if modality in ("CT", "MR"):
                ds.ImagePositionPatient = [0, 0, float(i)]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.PixelSpacing = [0.5, 0.5]
                ds.SliceThickness = 1.0
            if modality == "CT":
                ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
            path = folder / f"{spec.key}-s{s_index}-i{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


# -- the oracle: attributes as read from the files ----------------------------------------------

STUDY_KEYS = ["StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
              "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
              "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
              "NumberOfStudyRelatedInstances"]
SERIES_KEYS = ["Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID",
               "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
               "PerformedProcedureStepStartTime"]
INSTANCE_KEYS = ["SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                 "BitsAllocated", "NumberOfFrames"]
LEVEL_UID = {"studies": "StudyInstanceUID", "series": "SeriesInstanceUID",
             "instances": "SOPInstanceUID"}
NUMERIC = {"SeriesNumber", "InstanceNumber", "Rows", "Columns", "BitsAllocated",
           "NumberOfFrames", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
           "NumberOfSeriesRelatedInstances"}
OWN_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
            "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID",
            "StudyDescription", "PatientAge", "Modality", "SeriesDescription", "SeriesNumber",
            "SeriesInstanceUID", "PerformedProcedureStepStartDate",
            "PerformedProcedureStepStartTime", "SOPClassUID", "SOPInstanceUID",
            "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames"]


def _norm(keyword: str, value: Any) -> Any:  # noqa: ANN401
    """One comparable form for a value from pydicom or from DICOM JSON: None for absent or
    empty, numbers as int, PN as its alphabetic string, several values as a sorted tuple."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        items = [_norm("" if keyword == "ModalitiesInStudy" else keyword, v) for v in value]
        items = [v for v in items if v is not None]
        if keyword == "ModalitiesInStudy":
            return tuple(sorted(set(items))) or None
        return items[0] if len(items) == 1 else (tuple(items) or None)
    if isinstance(value, dict):  # a PN in DICOM JSON
        return _norm(keyword, value.get("Alphabetic"))
    if keyword in NUMERIC:
        return int(float(value))
    text = str(value).strip()
    if keyword == "ModalitiesInStudy":
        return (text,)
    return text or None


def json_value(item: dict[str, Any], keyword: str) -> Any:  # noqa: ANN401
    from pydicom.datadict import tag_for_keyword

    tag = f"{tag_for_keyword(keyword):08X}"
    element = item.get(tag)
    if element is None:
        return None
    return _norm(keyword, element.get("Value"))


@dataclasses.dataclass
class Record:
    """One loaded instance as the oracle sees it: its own attributes plus the computed
    study / series attributes, and the file it came from."""

    path: Path
    attrs: dict[str, Any]

    def __getitem__(self, keyword: str) -> Any:  # noqa: ANN401
        return self.attrs.get(keyword)


def _read_record(path: Path) -> Record:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Record(path, {k: _norm(k, ds[k].value if k in ds else None) for k in OWN_KEYS})


def _add_computed(records: list[Record]) -> None:
    by_study: dict[str, list[Record]] = {}
    by_series: dict[str, list[Record]] = {}
    for r in records:
        by_study.setdefault(r["StudyInstanceUID"], []).append(r)
        by_series.setdefault(r["SeriesInstanceUID"], []).append(r)
    for r in records:
        study = by_study[r["StudyInstanceUID"]]
        r.attrs["ModalitiesInStudy"] = tuple(sorted({x["Modality"] for x in study
                                                     if x["Modality"]})) or None
        r.attrs["NumberOfStudyRelatedSeries"] = len({x["SeriesInstanceUID"] for x in study})
        r.attrs["NumberOfStudyRelatedInstances"] = len(study)
        r.attrs["NumberOfSeriesRelatedInstances"] = len(by_series[r["SeriesInstanceUID"]])
        # NumberOfFrames stays None for single-frame objects without it: a server may leave
        # it out or send it empty, and both compare equal to None


# -- PS3.4 C.2.2.2 matching, as predicates ----------------------------------------------------


def wildcard(pattern: str, *, fold: bool = False) -> Callable[[Any], bool]:
    """C.2.2.2.4: ``*`` any sequence (also empty), ``?`` one character; the rest literal.
    ``fold``: PN may be matched insensitive to case (C.2.2.2.1), which radguard does."""
    import re

    rx = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                            for c in pattern), re.DOTALL | (re.IGNORECASE if fold else 0))
    return lambda v: v is not None and rx.fullmatch(str(v)) is not None


def date_range(lo: str, hi: str) -> Callable[[Any], bool]:
    """C.2.2.2.5: inclusive; an open end is unbounded; an empty value never matches."""
    return lambda v: v is not None and (not lo or v >= lo) and (not hi or v <= hi)


def time_range(lo: str, hi: str) -> Callable[[Any], bool]:
    def match(v: Any) -> bool:  # noqa: ANN401
        if v is None:
            return False
        t = str(v).split(".")[0].ljust(6, "0")
        return (not lo or t >= lo.ljust(6, "0")) and (not hi or t <= hi.ljust(6, "0"))
    return match


def pn(pattern: str) -> Callable[[Any], bool]:
    return wildcard(pattern, fold=True)


def exact(value: str) -> Callable[[Any], bool]:
    return lambda v: v == value


# -- queries ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    id: str
    level: str  # studies / series / instances: what is returned
    filters: dict[str, str] = dataclasses.field(default_factory=dict)
    match: dict[str, Callable[[Any], bool]] = dataclasses.field(default_factory=dict)
    scope: tuple[str, ...] = ()  # ("S02",) study, ("S02", 1) series of a generated study
    fields: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # attributes the includefield must bring back
    fuzzy: bool | None = None
    clause: str = ""


CT, MG, MR_SOP = SOP_CLASS["CT"], SOP_CLASS["MG"], SOP_CLASS["MR"]

QUERIES = [
    # /studies
    Query("studies-all", "studies", clause="PS3.18 QIDO universal"),
    Query("studies-PatientID-exact", "studies", {"PatientID": "RGC-006"},
          {"PatientID": exact("RGC-006")}, clause="PS3.4 C.2.2.2.1"),
    Query("studies-PatientID-is-not-a-prefix", "studies", {"PatientID": "RGC-00"},
          {"PatientID": exact("RGC-00")}, clause="PS3.4 C.2.2.2.1"),
    Query("studies-PatientName-star", "studies", {"PatientName": "Smith*"},
          {"PatientName": pn("Smith*")}, clause="PS3.4 C.2.2.2.4 + PN case C.2.2.2.1"),
    Query("studies-PatientName-qmark", "studies", {"PatientName": "Sm?th^J*"},
          {"PatientName": pn("Sm?th^J*")}, clause="PS3.4 C.2.2.2.4"),
    Query("studies-PatientName-case-insensitive-wildcard", "studies",
          {"PatientName": "sMiTh*"}, {"PatientName": pn("sMiTh*")},
          clause="PS3.4 C.2.2.2.1 (PN) / C.2.2.2.4"),
    Query("studies-PatientName-case-insensitive", "studies", {"PatientName": "smith^john"},
          {"PatientName": pn("smith^john")}, clause="PS3.4 C.2.2.2.1 (PN)"),
    Query("studies-PatientName-latin1", "studies", {"PatientName": "Müller^Jürgen"},
          {"PatientName": pn("Müller^Jürgen")}, clause="PS3.18 8.3.4.1 (UTF-8 in URI)"),
    Query("studies-PatientName-utf8-case-wildcard", "studies", {"PatientName": "GARCÍA*"},
          {"PatientName": pn("GARCÍA*")}, clause="PS3.4 C.2.2.2.1 / C.2.2.2.4"),
    Query("studies-PatientName-five-components", "studies",
          {"PatientName": "Smyth^John^A^Dr^Jr"}, {"PatientName": pn("Smyth^John^A^Dr^Jr")},
          clause="PS3.4 C.2.2.2.1"),
    Query("studies-StudyDate-single", "studies", {"StudyDate": "20050607"},
          {"StudyDate": exact("20050607")}, clause="PS3.4 C.2.2.2.1"),
    Query("studies-StudyDate-range", "studies", {"StudyDate": "20000101-20151231"},
          {"StudyDate": date_range("20000101", "20151231")}, clause="PS3.4 C.2.2.2.5"),
    Query("studies-StudyDate-open-start", "studies", {"StudyDate": "-20051231"},
          {"StudyDate": date_range("", "20051231")}, clause="PS3.4 C.2.2.2.5"),
    Query("studies-StudyDate-open-end", "studies", {"StudyDate": "20200101-"},
          {"StudyDate": date_range("20200101", "")}, clause="PS3.4 C.2.2.2.5"),
    Query("studies-StudyTime-range", "studies", {"StudyTime": "080000-120000"},
          {"StudyTime": time_range("080000", "120000")}, clause="PS3.4 C.2.2.2.5"),
    Query("studies-StudyDate-and-StudyTime", "studies",
          {"StudyDate": "20150101-", "StudyTime": "-120000"},
          {"StudyDate": date_range("20150101", ""), "StudyTime": time_range("", "120000")},
          clause="PS3.4 C.2.2.2.5 (each key on its own)"),
    Query("studies-AccessionNumber", "studies", {"AccessionNumber": "ACC-2010-03"},
          {"AccessionNumber": exact("ACC-2010-03")}, clause="PS3.4 C.2.2.2.1"),
    Query("studies-ModalitiesInStudy-MR", "studies", {"ModalitiesInStudy": "MR"},
          {"ModalitiesInStudy": lambda v: v is not None and "MR" in v},
          clause="PS3.4 C.6.1.1.2 (a study matches if any series has the modality)"),
    Query("studies-ModalitiesInStudy-MG", "studies", {"ModalitiesInStudy": "MG"},
          {"ModalitiesInStudy": lambda v: v is not None and "MG" in v},
          clause="PS3.4 C.6.1.1.2"),
    Query("studies-ReferringPhysicianName-wildcard", "studies",
          {"ReferringPhysicianName": "House*"},
          {"ReferringPhysicianName": pn("House*")}, clause="PS3.18 QIDO study keys"),
    Query("studies-StudyID", "studies", {"StudyID": "07"}, {"StudyID": exact("07")},
          clause="PS3.18 QIDO study keys"),
    Query("studies-StudyInstanceUID-list", "studies",
          {"StudyInstanceUID": "{S02},{S05},{S12}"},
          {"StudyInstanceUID": lambda v: v in ("{S02}", "{S05}", "{S12}")},
          clause="PS3.4 C.2.2.2.2 / PS3.18 8.3.4.1 (comma-separated UID list)"),
    Query("studies-includefield-StudyDescription", "studies", {"PatientID": "RGC-002"},
          {"PatientID": exact("RGC-002")}, fields=("StudyDescription",),
          extra=("StudyDescription",), clause="PS3.18 8.3.4.3 includefield"),
    Query("studies-includefield-all", "studies", {"PatientID": "RGC-005"},
          {"PatientID": exact("RGC-005")}, fields=("all",),
          extra=("StudyDescription", "PatientAge"), clause="PS3.18 8.3.4.3 includefield=all"),
    Query("studies-fuzzymatching-false", "studies", {"PatientName": "Doe^John"},
          {"PatientName": pn("Doe^John")}, fuzzy=False, clause="PS3.18 8.3.4.2"),
    Query("studies-no-match", "studies", {"PatientID": "NOBODY"},
          {"PatientID": exact("NOBODY")}, clause="PS3.18 QIDO (empty answer)"),
    # /series
    Query("series-Modality-CT", "series", {"Modality": "CT"}, {"Modality": exact("CT")},
          clause="PS3.18 QIDO series keys"),
    Query("series-Modality-US", "series", {"Modality": "US"}, {"Modality": exact("US")},
          clause="PS3.18 QIDO series keys"),
    Query("series-SeriesInstanceUID", "series", {"SeriesInstanceUID": "{S07/2}"},
          {"SeriesInstanceUID": exact("{S07/2}")}, clause="PS3.4 C.2.2.2.1"),
    Query("series-by-study-key-PatientID", "series", {"PatientID": "RGC-006"},
          {"PatientID": exact("RGC-006")},
          clause="PS3.18 QIDO: study keys allowed in a /series search"),
    Query("series-of-study", "series", scope=("S02",), clause="PS3.18 /studies/{uid}/series"),
    Query("series-of-study-Modality", "series", {"Modality": "MR"},
          {"Modality": exact("MR")}, scope=("S02",), clause="PS3.18 /studies/{uid}/series"),
    Query("series-of-study-SeriesNumber", "series", {"SeriesNumber": "2"},
          {"SeriesNumber": exact(2)}, scope=("S07",), clause="PS3.4 C.2.2.2.1 (IS)"),
    # /instances
    Query("instances-SOPClassUID-CT", "instances", {"SOPClassUID": CT},
          {"SOPClassUID": exact(CT)}, clause="PS3.18 QIDO instance keys"),
    Query("instances-SOPClassUID-MG", "instances", {"SOPClassUID": MG},
          {"SOPClassUID": exact(MG)}, clause="PS3.18 QIDO instance keys"),
    Query("instances-by-series-key-Modality", "instances", {"Modality": "US"},
          {"Modality": exact("US")}, clause="PS3.18 QIDO: series keys in /instances"),
    Query("instances-SeriesInstanceUID", "instances", {"SeriesInstanceUID": "{S02/1}"},
          {"SeriesInstanceUID": exact("{S02/1}")}, clause="PS3.4 C.2.2.2.1"),
    Query("instances-of-study", "instances", scope=("S05",),
          clause="PS3.18 /studies/{uid}/instances"),
    Query("instances-of-study-SOPClassUID", "instances", {"SOPClassUID": MR_SOP},
          {"SOPClassUID": exact(MR_SOP)}, scope=("S07",),
          clause="PS3.18 /studies/{uid}/instances"),
    Query("instances-of-series", "instances", scope=("S02", 1),
          clause="PS3.18 /studies/{uid}/series/{uid}/instances"),
    Query("instances-of-series-InstanceNumber", "instances", {"InstanceNumber": "2"},
          {"InstanceNumber": exact(2)}, scope=("S02", 1), clause="PS3.4 C.2.2.2.1 (IS)"),
    Query("instances-multiframe", "instances", {"SOPClassUID": SOP_CLASS["US-MF"]},
          {"SOPClassUID": exact(SOP_CLASS["US-MF"])}, clause="PS3.18 NumberOfFrames"),
]

# Where Orthanc answers differently from the standard: (query id or "*", attribute or "")
# -> the clause and what Orthanc does. "" as attribute: the set of matches differs.
_PCT = ("Orthanc does not percent-decode QIDO query values: a value with %5E (^), %20 or "
        "UTF-8 escapes (required by RFC 3986 3.4 for such characters) is matched literally "
        "and matches nothing - PS3.18 8.1.1.3 / 8.3.1 (query parameters are URI-encoded)")
ORTHANC_DEVIATIONS: dict[tuple[str, str], str] = {
    ("studies-PatientName-qmark", ""): _PCT,
    ("studies-PatientName-case-insensitive", ""): _PCT,
    ("studies-PatientName-latin1", ""): _PCT,
    ("studies-PatientName-utf8-case-wildcard", ""): _PCT,
    ("studies-PatientName-five-components", ""): _PCT,
    ("studies-fuzzymatching-false", ""): _PCT,
    ("studies-StudyDate-open-start", ""): (
        "Orthanc matches studies with an empty Study Date to the range '-20051231' - PS3.4 "
        "C.2.2.2.5: a range matches values within it; an empty value is matched only by "
        "universal or empty-value matching (C.2.2.2.1, C.2.2.2.8 / PS3.18 8.3.4.1 '\"\"')"),
    ("cfind-studies-StudyDate-open-start", ""): (
        "C-FIND as QIDO: Orthanc matches studies with an empty Study Date to the range "
        "'-20051231' - PS3.4 C.2.2.2.5"),
    ("studies-includefield-all", "StudyDescription"): (
        "includefield=all: Orthanc leaves out Study Description - PS3.18 8.3.4.3 ('all': "
        "all available attributes of the level)"),
    ("retrieve_study-R:pydicom-data-RG3_J2KR", ""): (
        "Orthanc (as packaged here, without its GDCM plugin) cannot transcode JPEG 2000 to "
        "the default Explicit VR Little Endian and answers 500 - PS3.18 8.7.3 (default "
        "transfer syntax of application/dicom) and the Retrieve status codes (406 Not "
        "Acceptable when no acceptable representation can be supplied)"),
    ("retrieve_instance_rendered-R:pydicom-data-RG3_J2KR", ""): (
        "Orthanc (without GDCM) cannot decode JPEG 2000 to render it and answers 400 Bad "
        "Request ('Parameter out of range') to a valid request - PS3.18 rendered resources "
        "(10.4) and 8.1.2.1 (4xx only for client errors)"),
    ("studies-includefield-all", "PatientAge"): (
        "includefield=all: Orthanc leaves out Patient's Age (Patient Study Module, a "
        "study-level attribute, PS3.4 C.6.2.1.2) - PS3.18 8.3.4.3"),
}

# -- the pair of servers ------------------------------------------------------------------------


@dataclasses.dataclass
class Pair:
    gateway: Gateway
    rg: DICOMwebClient
    rg_rad: DICOMwebClient
    oc: DICOMwebClient
    records: list[Record]  # the comparable instances
    excluded_studies: set[str]
    uids: dict[str, str]  # "S02" -> study UID, "S02/1" -> series UID
    report: dict[str, Any]
    loaded_studies: set[str]  # every study loaded (answers about others are not counted)
    orthanc_dicom_port: int = 0


def _rg_client(gw: Gateway, token: str) -> DICOMwebClient:
    return DICOMwebClient(f"http://127.0.0.1:{gw.http_port}/dicom-web",
                          headers={"Authorization": f"Bearer {token}"}, timeout=60)


@pytest.fixture(scope="module")
def own_orthanc(tmp_path_factory):  # noqa: ANN201
    """An Orthanc of this module's own, configured as tests/conftest.py's ``orthanc``: that
    one is shared by the session, and other tests store objects into it (copies of the
    shared files under their study UIDs among them), which would change these answers."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc-conformance"),
                         "radguard-conformance", DicomAlwaysAllowFind=True) as server:
        yield server


@pytest.fixture(scope="module")
def pair(tmp_path_factory, pki, own_orthanc) -> Pair:
    orthanc = own_orthanc
    tmp = tmp_path_factory.mktemp("conformance")
    gen = tmp / "generated"
    gen.mkdir()
    rng = np.random.default_rng(20261207)
    generated: dict[str, list[Path]] = {s.key: _generate(s, gen, rng) for s in SPECS}
    real = sorted(p for p in DICOM_DIR.rglob("*.dcm"))
    files = [*real, *(p for paths in generated.values() for p in paths)]

    config = GatewayConfig(data_dir=str(tmp / "data"), dicom_port=0, http_port=0,
                           trust=[str(pki.ca_cert_path)], check_processes=0,
                           dicom_query_callers=["CONFORMANCE@127.0.0.1"])
    gw = Gateway(config)
    users = Users(gw.store)
    for name, role in (("tech", "technologist"), ("rad", "radiologist"), ("boss", "admin")):
        users.add(name, role, PASSWORD)
    tokens = {name: users.issue_token(name) for name in ("tech", "rad", "boss")}
    gw.start()
    try:
        stow_failures = []
        for i in range(0, len(files), 8):  # same order as Orthanc: the first copy wins
            stow_failures += _stow(gw.http_port, tokens["tech"], files[i:i + 8])
        for p in files:
            orthanc.upload(p)
        # one object radguard must hold back: signed by a trusted device, then altered
        # (radguard only; its study is left out of the comparison)
        tampered = _tampered_copy(generated["S06"][0], tmp, pki)
        stow_failures += _stow(gw.http_port, tokens["tech"], [tampered])
        assert gw.wait_idle(300), "the gateway did not finish checking the loaded files"

        # what radguard made of every file: state per row (a SOP UID may have several rows)
        rows = gw.store.instances()
        held = [r for r in rows if r.state != "done"]
        done_sops = {r.sop_uid for r in rows if r.state == "done"}
        records = [_read_record(p) for p in files]
        by_sop: dict[str, list[Record]] = {}
        for r in records:
            by_sop.setdefault(r["SOPInstanceUID"], []).append(r)
        reused = {sop for sop, rs in by_sop.items()
                  if len({p.path.read_bytes() for p in rs}) > 1}
        excluded = {r["StudyInstanceUID"] for r in records
                    if r["SOPInstanceUID"] in reused or r["SOPInstanceUID"] not in done_sops}
        held_study = pydicom.dcmread(tampered, stop_before_pixels=True).StudyInstanceUID
        excluded.add(held_study)
        comparable, seen = [], set()
        for r in records:
            if r["StudyInstanceUID"] in excluded or r["SOPInstanceUID"] in seen:
                continue  # an identical resend is one instance
            seen.add(r["SOPInstanceUID"])
            comparable.append(r)
        _add_computed(comparable)
        uids: dict[str, str] = {}
        for key, paths in generated.items():
            first = pydicom.dcmread(paths[0], stop_before_pixels=True)
            uids[key] = first.StudyInstanceUID
            for p in paths:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
                uids[f"{key}/{ds.SeriesNumber}"] = ds.SeriesInstanceUID
        for p in real:  # "R:nih_dx" -> its study, "R:nih_dx/i" -> its SOP Instance UID
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            uids[f"R:{p.stem}"] = ds.StudyInstanceUID
            uids[f"R:{p.stem}/i"] = ds.SOPInstanceUID
        uids["Q01"] = held_study
        report = {
            "files": len(files), "rows": len(rows), "stow_failures": stow_failures,
            "held": [(r.sop_uid, r.state, r.verdict, r.duplicate_of,
                      Path(r.calling_ae or "").name, (r.details or "")[:300]) for r in held],
            "reused_sop_uids": sorted(reused), "excluded_studies": sorted(excluded),
            "comparable_instances": len(comparable),
        }
        yield Pair(gw, _rg_client(gw, tokens["boss"]), _rg_client(gw, tokens["rad"]),
                   _orthanc_client(orthanc), comparable, excluded, uids, report,
                   {r["StudyInstanceUID"] for r in records} | {held_study},
                   orthanc.dicom_port)
    finally:
        gw.stop()


class _OrthancSession(requests.Session):
    """Orthanc 1.10 / DICOMweb 1.7 does not percent-decode QIDO query values (recorded in
    ``ORTHANC_DEVIATIONS``), and requests encodes ``*``, ``?`` and ``,``. To still
    compare its matching rules, its queries get those three characters as they are (legal in
    a query, RFC 3986 3.4); ``^``, space and non-ASCII characters are not allowed there and
    stay encoded - those queries are recorded deviations. Radguard always gets what the
    client sends."""

    def send(self, request, **kwargs):  # noqa: ANN001, ANN003, ANN201
        if "?" in request.url:  # after requests' own re-quoting (it would escape ^ again)
            head, _, query = request.url.partition("?")
            for escaped, char in (("%2A", "*"), ("%3F", "?"), ("%2C", ",")):
                query = query.replace(escaped, char).replace(escaped.lower(), char)
            request.url = f"{head}?{query}"
        return super().send(request, **kwargs)


def _tampered_copy(source: Path, tmp: Path, pki) -> Path:  # noqa: ANN001
    """A copy of ``source`` in a study of its own, signed by the test PKI's device key,
    then its Patient Name changed: a broken signature, which radguard quarantines."""
    from radguard.provenance.sign import sign_file

    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp / "to-sign.dcm", enforce_file_format=True)
    sign_file(tmp / "to-sign.dcm", tmp / "signed.dcm", pki.signer)
    ds = pydicom.dcmread(tmp / "signed.dcm")
    ds.PatientName = "Someone^Else"
    ds.save_as(tmp / "tampered.dcm", enforce_file_format=True)
    return tmp / "tampered.dcm"


def _stow(port: int, token: str, paths: list[Path]) -> list[tuple[Any, ...]]:
    """STOW-RS of the files' bytes as they are; what was refused: (SOP Instance UID,
    Failure Reason, the Warning header that says why)."""
    boundary = "conformance-boundary-7d1e"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + p.read_bytes() + b"\r\n" for p in paths) + f"--{boundary}--\r\n".encode()
    resp = requests.post(f"http://127.0.0.1:{port}/dicom-web/studies", data=body, timeout=120,
                         headers={"Authorization": f"Bearer {token}",
                                  "Accept": "application/dicom+json",
                                  "Content-Type": 'multipart/related; type="application/dicom"; '
                                                  f"boundary={boundary}"})
    assert resp.status_code in (200, 202, 409), (resp.status_code, resp.text[:300])
    answer = resp.json() if resp.content else {}
    return [(json_value(item, "ReferencedSOPInstanceUID"), json_value(item, "FailureReason"),
             resp.headers.get("Warning", "")[:400])
            for item in answer.get("00081198", {}).get("Value", [])]


def _orthanc_client(orthanc) -> DICOMwebClient:
    session = _OrthancSession()
    session.auth = (orthanc.user, orthanc.password)
    session.trust_env = False
    return DICOMwebClient(f"{orthanc.url}/dicom-web", session=session, timeout=60)


# -- helpers ------------------------------------------------------------------------------------


def _fill(text: str, uids: dict[str, str]) -> str:
    for key in sorted(uids, key=len, reverse=True):
        text = text.replace("{" + key + "}", uids[key])
    return text


def _search(client: DICOMwebClient, q: Query, uids: dict[str, str], **extra: Any
            ) -> list[dict[str, Any]]:
    filters = {k: _fill(v, uids) for k, v in q.filters.items()}
    kw: dict[str, Any] = {"search_filters": filters, "fields": list(q.fields) or None,
                          "fuzzymatching": q.fuzzy, **extra}
    study = uids[q.scope[0]] if q.scope else None
    series = uids[f"{q.scope[0]}/{q.scope[1]}"] if len(q.scope) > 1 else None
    if q.level == "studies":
        return client.search_for_studies(**kw)
    if q.level == "series":
        return client.search_for_series(study_instance_uid=study, **kw)
    return client.search_for_instances(study_instance_uid=study,
                                       series_instance_uid=series, **kw)


def _expected(pair: Pair, q: Query) -> dict[str, Record]:
    """The oracle's answer: UID at the level -> one record of that entity."""
    out: dict[str, Record] = {}
    preds = {k: _resolve(m, pair.uids) for k, m in q.match.items()}
    for r in pair.records:
        if q.scope and r["StudyInstanceUID"] != pair.uids[q.scope[0]]:
            continue
        if len(q.scope) > 1 and r["SeriesInstanceUID"] != pair.uids[f"{q.scope[0]}/{q.scope[1]}"]:
            continue
        # an entity matches when one of its instances' records does: study and series
        # attributes are the same on all of them, ModalitiesInStudy is computed per study
        if all(p(r[k]) for k, p in preds.items()):
            out.setdefault(r[LEVEL_UID[q.level]], r)
    return out


def _resolve(pred: Callable[[Any], bool], uids: dict[str, str]) -> Callable[[Any], bool]:
    """Predicates written with "{S02}" placeholders compare against the real UIDs."""
    return lambda v: pred(_unfill(v, uids)) if isinstance(v, str) else pred(v)


def _unfill(value: str, uids: dict[str, str]) -> str:
    for key, uid in uids.items():
        if value == uid:
            return "{" + key + "}"
    return value


def _keys(level: str, q: Query) -> list[str]:
    keys = {"studies": STUDY_KEYS, "series": SERIES_KEYS, "instances": INSTANCE_KEYS}[level]
    return [*keys, *q.extra]


def _compare(name: str, q: Query, answer: list[dict[str, Any]], expected: dict[str, Record],
             excluded: set[str], loaded: set[str] | None = None) -> list[tuple[str, str]]:
    """Differences of one server's answer from the oracle: ("", what) for the set of matches
    and (attribute, what) for values. ``loaded``: studies of other origin are not counted
    (the session's Orthanc may hold other tests' data; radguard's gateway is this module's)."""
    problems = []
    uid_key = LEVEL_UID[q.level]
    got: dict[str, dict[str, Any]] = {}
    dupes = []
    for item in answer:
        study = json_value(item, "StudyInstanceUID")
        if study in excluded:
            continue  # a study left out on both sides (reused UIDs, quarantine)
        if loaded is not None and study is not None and study not in loaded:
            continue
        uid = json_value(item, uid_key)
        if uid in got:
            dupes.append(uid)
        got[uid] = item
    if dupes:
        problems.append(("", f"{name}: the same {uid_key} answered twice: {dupes}"))
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    if missing or extra:
        problems.append(("", f"{name}: matches differ: missing {len(missing)} "
                             f"{sorted(missing)[:4]}, unexpected {len(extra)} "
                             f"{sorted(extra)[:4]}"))
    for uid in sorted(set(got) & set(expected)):
        for kw in _keys(q.level, q):
            want, have = expected[uid][kw], json_value(got[uid], kw)
            if want != have:
                problems.append((kw, f"{name}: {uid}: {kw} = {have!r}, expected {want!r}"))
    return problems


def _orthanc_unexplained(q: Query, problems: list[tuple[str, str]]) -> list[str]:
    out = []
    for kw, text in problems:
        if (q.id, kw) in ORTHANC_DEVIATIONS or ("*", kw) in ORTHANC_DEVIATIONS:
            continue
        out.append(text)
    return out


# -- the tests ----------------------------------------------------------------------------------


def test_load_report(pair: Pair) -> None:
    """What radguard made of the loaded files; printed for the report (``-s`` or on failure).
    Every generated file must be served; a real file held back is listed with why."""
    r = pair.report
    print("\nload report:", json.dumps({k: v for k, v in r.items()
                                         if k not in ("stow_failures", "held")}))
    for failure in r["stow_failures"]:
        print("  STOW refused:", failure)
    for row in r["held"]:
        print("  held back:", row)
    generated_studies = {pair.uids[s.key] for s in SPECS}
    assert not (generated_studies & pair.excluded_studies), (
        "generated studies quarantined or not stored by radguard: "
        f"{sorted(generated_studies & pair.excluded_studies)}; {r['held']}")
    assert r["comparable_instances"] >= sum(n for s in SPECS for _, n in s.series)


@pytest.mark.parametrize("q", QUERIES, ids=[q.id for q in QUERIES])
def test_qido(pair: Pair, q: Query) -> None:
    expected = _expected(pair, q)
    rg_problems, oc_problems = [], []
    try:
        rg_answer = _search(pair.rg, q, pair.uids)
        rg_problems = _compare("radguard", q, rg_answer, expected, pair.excluded_studies)
    except requests.HTTPError as exc:
        rg_problems = [("", f"radguard: HTTP {exc.response.status_code} "
                            f"{exc.response.text[:200]}")]
    try:
        oc_answer = _search(pair.oc, q, pair.uids)
        oc_problems = _compare("orthanc", q, oc_answer, expected, pair.excluded_studies,
                               pair.loaded_studies)
    except requests.HTTPError as exc:
        oc_problems = [("", f"orthanc: HTTP {exc.response.status_code} "
                            f"{exc.response.text[:200]}")]
    unexplained = _orthanc_unexplained(q, oc_problems)
    known = [t for _, t in oc_problems if t not in unexplained]
    if known:
        print(f"\n{q.id}: known Orthanc deviations: {known}")
    messages = [t for _, t in rg_problems] + [f"(not a recorded deviation) {t}"
                                              for t in unexplained]
    assert not messages, f"{q.id} [{q.clause}]:\n  " + "\n  ".join(messages[:25])


def test_qido_no_query_matches_nothing_by_accident(pair: Pair) -> None:
    """The oracle itself: most queries must expect matches, or the comparison says little."""
    empty = [q.id for q in QUERIES if not _expected(pair, q)]
    assert empty == ["studies-PatientID-is-not-a-prefix", "studies-no-match"], empty


@pytest.mark.parametrize("server", ["radguard", "orthanc"])
def test_qido_limit_offset_pages(pair: Pair, server: str) -> None:
    """PS3.18 8.3.4.4 (response pagination): limit and offset page through one answer -
    pages of 4 studies, no study twice, none lost, no page longer than the limit."""
    client = pair.rg if server == "radguard" else pair.oc
    full = {json_value(i, "StudyInstanceUID") for i in client.search_for_studies()}
    seen: list[str] = []
    for offset in range(0, len(full) + 4, 4):
        page = client.search_for_studies(limit=4, offset=offset)
        assert len(page) <= 4, (server, offset, len(page))
        seen += [json_value(i, "StudyInstanceUID") for i in page]
    assert len(seen) == len(set(seen)), f"{server}: a study on two pages"
    assert set(seen) == full, f"{server}: pages lost {len(full - set(seen))} studies"


@pytest.mark.parametrize("server", ["radguard", "orthanc"])
def test_qido_retrieve_url(pair: Pair, server: str) -> None:
    """PS3.18 QIDO-RS study attributes: Retrieve URL (0008,1190) of each study, and it
    retrieves that study. (dicomweb-client 0.61 sends ``Host`` without the port, and both
    servers build the URL from ``Host``: the search is sent here with a correct one.)"""
    client = pair.rg if server == "radguard" else pair.oc
    session = client._session  # noqa: SLF001 (the client's own: its credentials and headers)
    base = client.base_url.rstrip("/")
    host = base.split("/")[2]
    uid = pair.uids["S09"]
    resp = session.get(f"{base}/studies?StudyInstanceUID={uid}", timeout=60,
                       headers={"Host": host, "Accept": "application/dicom+json"})
    resp.raise_for_status()
    [study] = resp.json()
    url = json_value(study, "RetrieveURL")
    assert url and url == f"{base}/studies/{uid}", (server, url)
    resp = session.get(url, timeout=60, headers={
        "Host": host, "Accept": 'multipart/related; type="application/dicom"'})
    assert resp.status_code == 200, (server, url, resp.status_code)
    assert resp.headers["content-type"].startswith("multipart/related"), resp.headers


def test_qido_unknown_parameter_is_400(pair: Pair) -> None:
    """PS3.18 8.3.4 / 10.6.1.3: a query parameter that is neither a known keyword / tag nor a
    QIDO parameter is a 400 Bad Request, not silently ignored (radguard's specification).
    Orthanc's answer is recorded in the docs, not asserted."""
    with pytest.raises(requests.HTTPError) as err:
        pair.rg.search_for_studies(search_filters={"NoSuchKeyword": "x"})
    assert err.value.response.status_code == 400
    try:
        answer = pair.oc.search_for_studies(search_filters={"NoSuchKeyword": "x"})
        print(f"\nOrthanc ignores an unknown query parameter: 200, {len(answer)} studies")
    except requests.HTTPError as exc:
        print(f"\nOrthanc: unknown query parameter -> {exc.response.status_code}")


def test_quarantined_only_for_admin(pair: Pair) -> None:
    """A signed object altered after signing is held back (quarantined); QIDO shows it to
    an admin (who decides about it) and never to a radiologist."""
    study = pair.uids["Q01"]
    held = pair.gateway.store.instances("study_uid=?", (study,))
    assert [r.state for r in held] == ["quarantined"], [(r.state, r.verdict) for r in held]
    assert pair.rg_rad.search_for_studies(search_filters={"StudyInstanceUID": study}) == []
    assert pair.rg_rad.search_for_instances(search_filters={"StudyInstanceUID": study}) == []
    admin = pair.rg.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert [json_value(a, "StudyInstanceUID") for a in admin] == [study]


def test_identical_resend_is_one_instance(pair: Pair) -> None:
    """The shared data holds byte-identical copies under two names (pydicom-data-RG1_J2KI
    and pylibjpeg-data/RG1_J2KI): one SOP Instance UID, one instance, on both servers."""
    counts: dict[str, int] = {}
    for p in DICOM_DIR.rglob("*.dcm"):
        sop = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        counts[sop] = counts.get(sop, 0) + 1
    twice = [sop for sop, n in counts.items() if n > 1]
    assert twice, "no resent file in the shared data"
    for sop in twice:
        for name, client in (("radguard", pair.rg), ("orthanc", pair.oc)):
            answer = client.search_for_instances(search_filters={"SOPInstanceUID": sop})
            assert len(answer) == 1, (name, sop, len(answer))


# -- C-FIND: the same searches over DIMSE -----------------------------------------------------

CFIND_IDS = [q.id for q in QUERIES if q.level == "studies" and not q.fields and q.fuzzy is None
             and q.id != "studies-all"] + [
    "series-of-study", "series-of-study-Modality", "series-of-study-SeriesNumber",
    "instances-of-series", "instances-of-series-InstanceNumber"]
CFIND_LEVEL = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}


def _identifier(pair: Pair, q: Query) -> Dataset:
    """The query as a Study Root C-FIND identifier: its matching keys (a UID list with
    backslashes, PS3.4 C.2.2.2.2), the required keys of the level as return keys, and the
    unique keys of the levels above for a search inside a study or series (PS3.4 C.4.1.2.1)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = CFIND_LEVEL[q.level]
    for kw in _keys(q.level, q):
        setattr(ds, kw, None)  # an empty return key
    if q.level != "studies":
        ds.StudyInstanceUID = pair.uids[q.scope[0]]
    if q.level == "instances":
        ds.SeriesInstanceUID = pair.uids[f"{q.scope[0]}/{q.scope[1]}"]
    for kw, value in q.filters.items():
        setattr(ds, kw, _fill(value, pair.uids).replace(",", "\\"))
    return ds


def _find(port: int, called: str, identifier: Dataset) -> list[Dataset]:
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title="CONFORMANCE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"{called}: association refused"
    try:
        answers, final = [], None
        for status, ident in assoc.send_c_find(identifier, FIND):
            assert status, f"{called}: no C-FIND answer"
            if int(status.Status) in (0xFF00, 0xFF01):
                answers.append(ident)
            else:
                final = int(status.Status)
        assert final == 0, f"{called}: C-FIND ended with {final:#06x}"
        return answers
    finally:
        assoc.release()


def _as_json(ds: Dataset) -> dict[str, Any]:
    """A C-FIND answer in the DICOM JSON form the QIDO comparison reads."""
    return ds.to_json_dict(bulk_data_threshold=1 << 20)


@pytest.mark.parametrize("qid", CFIND_IDS)
def test_cfind(pair: Pair, qid: str) -> None:
    """PS3.4 C.4.1 / C.2.2.2: the same matches and values over C-FIND as over QIDO-RS
    (Study Root; SpecificCharacterSet ISO_IR 192 in the identifier for the non-ASCII names)."""
    q = next(q for q in QUERIES if q.id == qid)
    expected = _expected(pair, q)
    messages = []
    for name, port, called in (("radguard", pair.gateway.dicom.port, "RADGUARD"),
                               ("orthanc", pair.orthanc_dicom_port, "ORTHANC")):
        try:
            answer = [_as_json(a) for a in _find(port, called, _identifier(pair, q))]
            problems = _compare(name, q, answer, expected, pair.excluded_studies,
                                pair.loaded_studies)
        except AssertionError as exc:
            problems = [("", f"{name}: {exc}")]
        if name == "orthanc":
            problems = [p for p in problems if (f"cfind-{qid}", p[0]) not in
                        ORTHANC_DEVIATIONS and ("cfind-*", p[0]) not in ORTHANC_DEVIATIONS]
        messages += [t for _, t in problems]
    assert not messages, f"C-FIND {qid} [{q.clause}]:\n  " + "\n  ".join(messages[:25])


# -- WADO-RS ------------------------------------------------------------------------------------

WADO_STUDIES = ["S02", "S03", "S05", "S12", "R:nih_dx", "R:pydicom-data-693_UNCR",
                "R:pydicom-data-SC_rgb_16bit", "R:pydicom-data-RG3_J2KR"]
METADATA_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
                 "StudyDescription", "SeriesInstanceUID", "SeriesNumber", "Modality",
                 "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                 "BitsAllocated", "NumberOfFrames"]


def _both(pair: Pair, call: Callable[[DICOMwebClient], Any]) -> dict[str, Any]:  # noqa: ANN401
    out = {}
    for name, client in (("radguard", pair.rg), ("orthanc", pair.oc)):
        try:
            out[name] = call(client)
        except requests.HTTPError as exc:
            out[name] = exc
    return out


def _check(pair: Pair, results: dict[str, Any], check: Callable[[Any], list[str]],  # noqa: ANN401
           wid: str, acceptable: tuple[int, ...] = ()) -> None:
    """Both servers' answers through ``check``; an HTTP error fails unless its status is
    ``acceptable``; Orthanc's recorded deviations (``(wid, "")``) are printed, not failed."""
    messages = []
    for name, value in results.items():
        if isinstance(value, requests.HTTPError) and value.response.status_code in acceptable:
            continue
        if isinstance(value, requests.HTTPError):
            problems = [f"HTTP {value.response.status_code} {value.response.text[:160]}"]
        else:
            problems = check(value)
        if name == "orthanc" and (wid, "") in ORTHANC_DEVIATIONS:
            if problems:
                print(f"\n{wid}: known Orthanc deviation: {problems[:3]}")
            continue
        messages += [f"{name}: {p}" for p in problems]
    assert not messages, f"{wid}:\n  " + "\n  ".join(messages[:20])


@pytest.mark.parametrize("key", WADO_STUDIES)
def test_wado_retrieve_study(pair: Pair, key: str) -> None:
    """PS3.18 10.4: every instance of the study, nothing else. The client asks for
    multipart/related; type="application/dicom" without a transfer-syntax parameter: the
    default, Explicit VR Little Endian (PS3.18 8.7.3, default transfer syntax of
    application/dicom) - or 406 Not Acceptable where the server cannot transcode."""
    uid = pair.uids[key]
    want = {r["SOPInstanceUID"] for r in pair.records if r["StudyInstanceUID"] == uid}

    def check(datasets: list[Dataset]) -> list[str]:
        got = [ds.SOPInstanceUID for ds in datasets]
        problems = [] if sorted(got) == sorted(want) else [
            f"SOP UIDs {sorted(got)} != {sorted(want)}"]
        problems += [f"{ds.SOPInstanceUID}: transfer syntax {ds.file_meta.TransferSyntaxUID} "
                     "(asked for the default, Explicit VR Little Endian)"
                     for ds in datasets if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian]
        return problems
    results = _both(pair, lambda c: c.retrieve_study(uid))
    _check(pair, results, check, f"retrieve_study-{key}", acceptable=(406,))


@pytest.mark.parametrize("key", ["S02", "R:nih_dx", "R:pydicom-data-RG3_J2KR",
                                 "R:pydicom-data-693_UNCR"])
def test_wado_retrieve_study_as_stored(pair: Pair, key: str) -> None:
    """PS3.18 8.7.3: transfer-syntax=* - any transfer syntax, so the objects as stored:
    same transfer syntax and same pixel data as the loaded files."""
    uid = pair.uids[key]
    files = {r["SOPInstanceUID"]: r.path for r in pair.records if r["StudyInstanceUID"] == uid}

    def check(datasets: list[Dataset]) -> list[str]:
        problems = []
        if sorted(ds.SOPInstanceUID for ds in datasets) != sorted(files):
            problems.append(f"SOP UIDs differ: {len(datasets)} answered, {len(files)} loaded")
        for ds in datasets:
            if ds.SOPInstanceUID not in files:
                continue
            src = pydicom.dcmread(files[ds.SOPInstanceUID])
            if ds.file_meta.TransferSyntaxUID != src.file_meta.TransferSyntaxUID:
                problems.append(f"{ds.SOPInstanceUID}: transfer syntax "
                                f"{ds.file_meta.TransferSyntaxUID}, stored as "
                                f"{src.file_meta.TransferSyntaxUID}")
            elif ds.PixelData != src.PixelData:
                problems.append(f"{ds.SOPInstanceUID}: pixel data differ from the file")
        return problems
    _check(pair, _both(pair, lambda c: c.retrieve_study(
        uid, media_types=(("application/dicom", "*"),))), check, f"retrieve_study_as_stored-{key}")


@pytest.mark.parametrize("series", ["S02/1", "S03/2", "S07/3"])
def test_wado_series_metadata(pair: Pair, series: str) -> None:
    """PS3.18 10.4.1.1.2 (metadata): one DICOM JSON object per instance with the attributes
    of the file; bulk data (Pixel Data) by BulkDataURI or InlineBinary, never missing."""
    study_uid, series_uid = pair.uids[series.split("/")[0]], pair.uids[series]
    want = {r["SOPInstanceUID"]: r for r in pair.records if r["SeriesInstanceUID"] == series_uid}

    def check(items: list[dict[str, Any]]) -> list[str]:
        problems = []
        got = {json_value(i, "SOPInstanceUID"): i for i in items}
        if set(got) != set(want):
            problems.append(f"instances {sorted(got)} != {sorted(want)}")
        for sop in set(got) & set(want):
            for kw in METADATA_KEYS:
                if json_value(got[sop], kw) != want[sop][kw]:
                    problems.append(f"{sop} {kw}: {json_value(got[sop], kw)!r} != "
                                    f"{want[sop][kw]!r}")
            pixel = got[sop].get("7FE00010", {})
            if not ("BulkDataURI" in pixel or "InlineBinary" in pixel):
                problems.append(f"{sop}: PixelData neither BulkDataURI nor InlineBinary")
        return problems
    _check(pair, _both(pair, lambda c: c.retrieve_series_metadata(study_uid, series_uid)),
           check, f"retrieve_series_metadata-{series}")


FRAME_CASES = [("S02/1", 1, [1]), ("S05/1", 2, [1]), ("S03/2", 1, [1, 3]), ("S04/1", 1, [1]),
               ("R:nih_dx", 0, [1]), ("R:pydicom-data-693_UNCR", 0, [1]),
               ("R:pydicom-data-MR2_UNCR", 0, [1]), ("R:pydicom-data-SC_rgb_16bit", 0, [1])]


def _record(pair: Pair, where: str, number: int) -> Record:
    """A generated series' instance by InstanceNumber, or a shared file's one instance."""
    if where.startswith("R:"):
        sop = pair.uids[f"{where}/i"]
        return next(r for r in pair.records if r["SOPInstanceUID"] == sop)
    series_uid = pair.uids[where]
    return next(r for r in pair.records
                if r["SeriesInstanceUID"] == series_uid and r["InstanceNumber"] == number)


@pytest.mark.parametrize("where,number,frames", FRAME_CASES,
                         ids=[f"{s}-i{n}-f{','.join(map(str, f))}" for s, n, f in FRAME_CASES])
def test_wado_frames_are_bit_identical(pair: Pair, where: str, number: int,
                                       frames: list[int]) -> None:
    """PS3.18 10.4.1.1.3 / 8.7.3.5.2: frames of a natively encoded object as
    application/octet-stream are the frame's bytes, unchanged (Implicit VR files too)."""
    rec = _record(pair, where, number)
    ds = pydicom.dcmread(rec.path)
    size = ds.Rows * ds.Columns * ds.BitsAllocated // 8 * int(ds.get("SamplesPerPixel", 1))
    want = [ds.PixelData[(f - 1) * size:f * size] for f in frames]

    def check(got: list[bytes]) -> list[str]:
        if len(got) != len(want):
            return [f"{len(got)} frames, expected {len(want)}"]
        return [f"frame {f}: {len(g)} bytes, differs from the file ({len(w)} bytes)"
                for f, g, w in zip(frames, got, want, strict=True) if g != w]
    _check(pair, _both(pair, lambda c: c.retrieve_instance_frames(
        rec["StudyInstanceUID"], rec["SeriesInstanceUID"], rec["SOPInstanceUID"], frames,
        media_types=("application/octet-stream",))), check,
        f"retrieve_instance_frames-{where}")


@pytest.mark.parametrize("series,media", [("S02/1", "image/jpeg"), ("S05/1", "image/png"),
                                          ("S03/1", "image/jpeg"), ("R:nih_dx", "image/png"),
                                          ("R:pydicom-data-RG3_J2KR", "image/jpeg")])
def test_wado_rendered(pair: Pair, series: str, media: str) -> None:
    """PS3.18 10.4.1.1.4 / 8.3.5.1: a rendered instance decodes as an image of the
    object's size (no viewport asked)."""
    from PIL import Image

    rec = _record(pair, series, 1)
    results = _both(pair, lambda c: c.retrieve_instance_rendered(
        rec["StudyInstanceUID"], rec["SeriesInstanceUID"], rec["SOPInstanceUID"],
        media_types=(media,)))
    def check(data: bytes) -> list[str]:
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Exception as exc:  # noqa: BLE001
            return [f"does not decode as an image: {exc}"]
        want = (rec["Columns"], rec["Rows"])
        return [] if img.size == want else [f"size {img.size}, expected {want}"]
    _check(pair, results, check, f"retrieve_instance_rendered-{series}")
