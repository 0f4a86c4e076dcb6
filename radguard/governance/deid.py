"""De-identification: the PS3.15 Annex E Basic Application Level Confidentiality Profile.

Every attribute of Table E.1-1 (``data/annex_e.json``, built by
``scripts/build_deid_table.py``) gets its action - D dummy, Z empty, X remove, K keep,
C clean, U keyed UID - anywhere in the data set, nested sequences included, with the
profile's options switching actions to K or C. Where the table leaves a choice (X/Z, X/D,
Z/D, X/Z/D) the least destructive action that keeps every IOD valid is taken (Z for X/Z,
D otherwise), so dciodvfy finds no new errors; the identifying value is gone either way.

Pseudonyms and UIDs are keyed (HMAC-SHA-256): the same key maps the same patient to the
same pseudonym and the same UID to the same new UID across any number of files and runs,
so studies stay linked without a lookup table; without the key nobody can map back. Dates,
under the Modified Dates option, shift by a keyed per-patient number of days, which keeps
intervals between a patient's studies.

Burned-in text cannot be found reliably without OCR: a file that says Burned In Annotation
YES (or is of a kind that usually carries it) gets a warning, and ``blank_regions`` blacks
out given rectangles (Clean Pixel Data Option). Old signatures are removed (they no longer
hold); the caller may re-sign with a radguard key.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from radguard import __version__
from radguard.errors import RadguardError

__all__ = ["OPTION_CODES", "DeidError", "DeidOptions", "DeidReport", "Deidentifier",
           "deidentify_file", "profile_table", "pseudonym_key"]

# CID 7050 De-identification Method codes (scheme DCM)
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_PIXELS_CODE = ("113101", "Clean Pixel Data Option")
OPTION_CODES = {
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "modified_dates": ("113107",
                       "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_chars": ("113108", "Retain Patient Characteristics Option"),
    "retain_device": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_institution": ("113112", "Retain Institution Identity Option"),
}
# kinds of image that usually carry burned-in text even when the header does not say so
_BURNED_IN_MODALITIES = {"US", "SC", "OT", "XC", "ES", "DOC"}
_SIGNATURE_TAGS = (0xFFFAFFFA, 0x4FFE0001)
# compressed transfer syntaxes pydicom can re-encode losslessly after blanking (with the
# encoder options that make it lossless); the others are written as Explicit VR Little Endian
_LOSSLESS_REENCODE: dict[str, dict[str, Any]] = {
    RLELossless: {}, JPEGLSLossless: {}, JPEGLSNearLossless: {"jls_error": 0},
    JPEG2000Lossless: {},
}


class DeidError(RadguardError):
    """De-identification cannot proceed as asked."""


@dataclass(frozen=True)
class DeidOptions:
    """The profile's options (all off = the Basic Profile alone)."""

    retain_dates: bool = False
    modified_dates: bool = False
    retain_uids: bool = False
    retain_device: bool = False
    retain_institution: bool = False
    retain_patient_chars: bool = False
    clean_descriptors: bool = False
    clean_structured: bool = False
    clean_graphics: bool = False

    @classmethod
    def parse(cls, text: str | Iterable[str]) -> DeidOptions:
        """From names like ``retain-dates,clean-descriptors`` (dashes or underscores)."""
        items = text.split(",") if isinstance(text, str) else list(text)
        names = {f.name for f in fields(cls)}
        chosen = {}
        for item in items:
            name = item.strip().lower().replace("-", "_")
            if not name:
                continue
            if name not in names:
                raise DeidError(f"unknown de-identification option {item.strip()!r} (known: "
                                f"{', '.join(sorted(n.replace('_', '-') for n in names))})")
            chosen[name] = True
        options = cls(**chosen)
        if options.retain_dates and options.modified_dates:
            raise DeidError("retain-dates and modified-dates exclude each other")
        if options.clean_graphics:
            raise DeidError("clean-graphics is not supported: radguard cannot tell identifying "
                            "from harmless graphics, so overlays and curves are removed")
        return options

    def enabled(self) -> list[str]:
        """Names of the options switched on."""
        return [f.name for f in fields(self) if getattr(self, f.name)]


@dataclass
class DeidReport:
    """What happened to one data set."""

    removed: int = 0
    emptied: int = 0
    replaced: int = 0
    cleaned: int = 0
    uids: int = 0
    warnings: list[str] = field(default_factory=list)
    pixels_cleaned: bool = False
    notes: list[str] = field(default_factory=list)  # informational, e.g. a new transfer syntax

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


@cache
def profile_table() -> dict[int, dict[str, Any]]:
    """Table E.1-1 by tag; repeating-group rows (50xx, 60xx) are keyed by their mask."""
    text = resources.files("radguard.governance").joinpath("data/annex_e.json").read_text()
    out: dict[int, dict[str, Any]] = {}
    for tag, row in json.loads(text)["attributes"].items():
        out[int(tag.replace("X", "0"), 16)] = row
    return out


def _repeating_row(tag: int) -> dict[str, Any] | None:
    group, elem = tag >> 16, tag & 0xFFFF
    table = profile_table()
    if 0x5000 <= group <= 0x50FF and group % 2 == 0:
        return table.get(0x50000000)
    if 0x6000 <= group <= 0x60FF and group % 2 == 0 and elem in (0x3000, 0x4000):
        return table.get(0x60000000 | elem)
    return None


_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "PN": "ANONYMOUS",
          "LO": "ANONYMIZED", "SH": "ANONYMIZED", "LT": "ANONYMIZED", "ST": "ANONYMIZED",
          "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANONYMIZED", "AE": "ANONYMIZED",
          "AS": "000D", "IS": "0", "DS": "0"}


class Deidentifier:
    """Apply the profile to data sets; one instance per consistent set (same key)."""

    def __init__(self, key: bytes | None = None, options: DeidOptions | None = None, *,
                 blank_regions: Iterable[tuple[int, int, int, int]] = ()) -> None:
        self.key = key if key else secrets.token_bytes(32)
        self.options = options or DeidOptions()
        self.blank_regions = [tuple(int(v) for v in r) for r in blank_regions]
        for r in self.blank_regions:
            if len(r) != 4 or r[2] <= 0 or r[3] <= 0 or r[0] < 0 or r[1] < 0:
                raise DeidError(f"a region is x,y,width,height with positive sizes, not {r}")

    # -- keyed mappings ---------------------------------------------------------------------
    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self.key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    def pseudonym(self, patient_id: str) -> str:
        """The patient's pseudonym: stable for one key, meaningless without it."""
        return "RG" + self._mac("patient", patient_id).hex()[:14].upper()

    def uid(self, original: str) -> str:
        """A new UID under the 2.25 (UUID-derived) root, stable for one key."""
        return "2.25." + str(int.from_bytes(self._mac("uid", original)[:16], "big"))

    def date_shift(self, patient_id: str) -> dt.timedelta:
        """Days every date of this patient moves back (1 to 10 years, keyed)."""
        return dt.timedelta(days=365 + int.from_bytes(self._mac("date", patient_id)[:4],
                                                      "big") % 3288)

    # -- the profile ------------------------------------------------------------------------
    def deidentify(self, ds: Dataset) -> DeidReport:
        """De-identify ``ds`` in place (file meta included) and report what was done."""
        report = DeidReport()
        patient_id = str(ds.get("PatientID", "") or "")
        context = _Context(self, report, patient_id, _identifiers(ds))
        burned = str(ds.get("BurnedInAnnotation", "")).upper()
        modality = str(ds.get("Modality", "")).upper()
        for tag in _SIGNATURE_TAGS:
            if tag in ds:
                del ds[tag]
                report.removed += 1
        context.walk(ds)
        ds.PatientID = self.pseudonym(patient_id)
        ds.PatientName = f"ANONYMOUS^{ds.PatientID}"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = self._method_text()
        ds.DeidentificationMethodCodeSequence = self._method_codes()
        if self.options.retain_dates:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif self.options.modified_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"
        if "PixelData" in ds:
            if self.blank_regions:
                self._blank(ds, report)
            elif burned == "YES":
                report.warnings.append("Burned In Annotation is YES: the pixels may show "
                                       "identifying text; give regions to blank "
                                       "(--blank x,y,w,h) or check by eye")
            elif modality in _BURNED_IN_MODALITIES and burned != "NO":
                report.warnings.append(f"{modality} images often carry burned-in text and "
                                       "this one does not say it has none")
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                            "ReceivingApplicationEntityTitle", "PrivateInformation",
                            "PrivateInformationCreatorUID"):
                if keyword in meta:
                    del meta[keyword]
        return report

    def _method_text(self) -> list[str]:
        values = [f"radguard {__version__} PS3.15 E.1 Basic Profile"[:64]]
        values += [OPTION_CODES[o][1][:64] for o in self.options.enabled()]
        if self.blank_regions:
            values.append(CLEAN_PIXELS_CODE[1])
        return values

    def _method_codes(self) -> DicomSequence:
        codes = [BASIC_PROFILE_CODE] + [OPTION_CODES[o] for o in self.options.enabled()]
        if self.blank_regions:
            codes.append(CLEAN_PIXELS_CODE)
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        return DicomSequence(items)

    def _blank(self, ds: Dataset, report: DeidReport) -> None:
        from radguard.dicom.pixels import pixel_array

        pixels = np.array(pixel_array(ds))  # writable copy
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]
        fill = pixels.min()
        for x, y, w, h in self.blank_regions:
            if x >= cols or y >= rows:
                raise DeidError(f"region {x},{y},{w},{h} lies outside the {cols}x{rows} image")
            frames[:, y:y + h, x:x + w, ...] = fill
        data = frames.reshape(pixels.shape)
        bits = int(ds.BitsAllocated)
        dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]
        if int(ds.get("PixelRepresentation", 0)) == 1:
            dtype = {8: np.int8, 16: np.int16, 32: np.int32}[bits]
        data = np.ascontiguousarray(data.astype(dtype))
        meta = getattr(ds, "file_meta", None)
        syntax = UID(str(meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))) \
            if meta is not None else ExplicitVRLittleEndian
        if not (syntax.is_compressed and _reencode(ds, data, syntax, report)):
            ds.PixelData = data.tobytes()
            ds["PixelData"].VR = "OW" if bits > 8 else "OB"
            ds["PixelData"].is_undefined_length = False  # no longer encapsulated
            if syntax.is_compressed:
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                if int(ds.get("SamplesPerPixel", 1)) == 3:
                    ds.PhotometricInterpretation = "RGB"
                    ds.PlanarConfiguration = 0
        ds.BurnedInAnnotation = "NO"
        report.pixels_cleaned = True


def _reencode(ds: Dataset, data: np.ndarray, syntax: UID, report: DeidReport) -> bool:
    """Re-encode blanked pixels losslessly in the file's own compressed transfer syntax.

    True when done (and checked by decoding it again); False, with a note, when pydicom
    cannot: the caller then writes them uncompressed (Explicit VR Little Endian).
    """
    from radguard.dicom.pixels import pixel_array

    params = _LOSSLESS_REENCODE.get(str(syntax))
    reason = "no lossless encoder for it"
    if params is not None:
        trial = Dataset()
        trial.update(ds)  # shallow: a failed encoding leaves ``ds`` as it was
        trial.file_meta = copy.copy(ds.file_meta)
        trial.set_original_encoding(*ds.original_encoding)
        if int(ds.get("SamplesPerPixel", 1)) == 3:  # decoded to RGB
            trial.PhotometricInterpretation = "RGB"
            trial.PlanarConfiguration = 0
        try:
            trial.compress(syntax, data, generate_instance_uid=False, **params)
            same = np.array_equal(pixel_array(trial), data)
        except Exception as exc:  # encoder missing or refusing this image
            reason = " ".join(str(exc).split())[:120]
        else:
            if same:
                for keyword in ("PixelData", "PhotometricInterpretation",
                                "PlanarConfiguration"):
                    if keyword in trial:
                        ds[keyword] = trial[keyword]
                ds.file_meta.TransferSyntaxUID = syntax
                report.notes.append(f"blanked pixels re-encoded losslessly as {syntax.name}")
                return True
            reason = "the re-encoded pixels did not decode to the blanked ones"
    report.notes.append(f"blanked pixels written uncompressed (Explicit VR Little Endian): "
                        f"{syntax.name} - {reason}")
    return False


class _Context:
    """One pass over one data set: actions, cleaning and counts."""

    def __init__(self, owner: Deidentifier, report: DeidReport, patient_id: str,
                 identifiers: list[str]) -> None:
        self.owner, self.report, self.patient_id = owner, report, patient_id
        self.options = owner.options
        self.identifiers = identifiers

    def action(self, tag: int) -> str | None:
        row = profile_table().get(tag) or _repeating_row(tag)
        if row is None:
            return "X" if (tag >> 16) % 2 == 1 else None  # private: removed; others kept
        chosen = row["basic"]
        for option, value in row["options"].items():
            if getattr(self.options, option, False):
                if value == "K" or chosen != "K":
                    chosen = value
        return chosen

    def walk(self, ds: Dataset) -> None:
        for elem in list(ds):
            tag = int(elem.tag)
            action = self.action(tag)
            if action is None or action == "K":
                self._recurse(elem)
                continue
            if action == "X":
                del ds[tag]
                self.report.removed += 1
            elif action in ("Z", "X/Z"):
                self._empty(elem)
            elif action == "U":
                self._replace_uid(elem)
            elif action == "C":
                self._clean(elem)
            else:  # D, Z/D, X/D, X/Z/D, X/Z/U*: keep the attribute, drop its content
                self._dummy(elem)

    def _recurse(self, elem: Any) -> None:
        if elem.VR == "SQ" and elem.value:
            for item in elem.value:
                self.walk(item)

    def _empty(self, elem: Any) -> None:
        elem.value = DicomSequence() if elem.VR == "SQ" else None
        self.report.emptied += 1

    def _replace_uid(self, elem: Any) -> None:
        if elem.VR == "SQ":
            self._recurse(elem)
            return
        if elem.VM > 1:
            elem.value = [self.owner.uid(str(v)) for v in elem.value]
        elif elem.value:
            elem.value = self.owner.uid(str(elem.value))
        self.report.uids += 1

    def _dummy(self, elem: Any) -> None:
        if elem.VR == "SQ":  # keep the structure; the profile applies inside
            self._recurse(elem)
            return
        if elem.VR == "UI":
            self._replace_uid(elem)
            return
        dummy = _DUMMY.get(elem.VR)
        if dummy is None:  # numbers and binary values: no meaningful dummy, so emptied
            elem.value = b"" if elem.VR in ("OB", "OW", "UN") else None
        else:
            elem.value = dummy
        self.report.replaced += 1

    def _clean(self, elem: Any) -> None:
        if elem.VR == "SQ":
            self._recurse(elem)
            self.report.cleaned += 1
            return
        if elem.VR in ("DA", "DT"):
            if self.options.modified_dates:
                elem.value = _shift(elem.value, elem.VR,
                                    self.owner.date_shift(self.patient_id))
            self.report.cleaned += 1
            return
        if elem.VR == "TM":
            self.report.cleaned += 1  # times of day kept under the modified-dates option
            return
        if isinstance(elem.value, str) and elem.value:
            elem.value = _redact(elem.value, self.identifiers)
        elif elem.VM > 1 and all(isinstance(v, str) for v in elem.value):
            elem.value = [_redact(v, self.identifiers) for v in elem.value]
        elif elem.value not in (None, ""):
            elem.value = None  # non-text content of a descriptor: cannot be cleaned, emptied
        self.report.cleaned += 1


def _identifiers(ds: Dataset) -> list[str]:
    """Values to strike from free text: names, IDs, birth date, accession, institution."""
    found: set[str] = set()
    for keyword in ("PatientName", "OtherPatientNames", "PatientBirthName",
                    "PatientMotherBirthName", "ReferringPhysicianName",
                    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy"):
        for value in _values(ds.get(keyword)):
            found.update(p for p in re.split(r"[\^= ,]+", str(value)) if len(p) >= 2)
    for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate",
                    "StudyID", "InstitutionName", "PatientAddress", "MedicalRecordLocator"):
        found.update(str(v) for v in _values(ds.get(keyword)) if len(str(v)) >= 2)
    return sorted(found, key=len, reverse=True)


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)  # type: ignore[call-overload]  # a MultiValue is iterable
    return [value]


_NUMBERS = re.compile(r"\b\d[\d\-/. ]{5,}\d\b")  # phone numbers, IDs, dates written out


def _redact(text: str, identifiers: list[str]) -> str:
    for ident in identifiers:
        text = re.sub(re.escape(ident), "***", text, flags=re.IGNORECASE)
    return _NUMBERS.sub("***", text)


def _shift(value: object, vr: str, delta: dt.timedelta) -> object:
    def one(text: str) -> str:
        text = str(text)
        if len(text) < 8 or not text[:8].isdigit():
            return ""
        try:
            day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8])) - delta
        except ValueError:
            return ""
        return day.strftime("%Y%m%d") + (text[8:] if vr == "DT" else "")

    if isinstance(value, str):
        return one(value) if value else value
    if value is None:
        return value
    return [one(v) for v in value]  # type: ignore[attr-defined]  # a MultiValue


def deidentify_file(src: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    deidentifier: Deidentifier, *, signer: Any = None,
                    ) -> tuple[Path, DeidReport]:
    """De-identify one file into ``out_dir/<new SOP Instance UID>.dcm`` (the original name
    may itself identify the patient), optionally re-signed; written atomically."""
    from radguard.dicom.io import read_dataset, write_dataset

    ds = read_dataset(src)
    if "PixelData" in ds and deidentifier.blank_regions:
        from radguard.dicom.pixels import validate_pixel_data

        validate_pixel_data(ds)
    report = deidentifier.deidentify(ds)
    transfer_syntax = None
    if signer is not None:
        from radguard.provenance.sign import output_transfer_syntax, sign_dataset

        sign_dataset(ds, signer, profile="base")
        transfer_syntax = output_transfer_syntax(ds)
    name = str(ds.get("SOPInstanceUID") or deidentifier.uid(str(src)))
    dst = Path(out_dir) / f"{name}.dcm"
    write_dataset(ds, dst, transfer_syntax)
    return dst, report


def pseudonym_key(path: str | os.PathLike[str] | None) -> tuple[bytes | None, str]:
    """The key that keeps pseudonyms and UIDs consistent across runs, read from ``path``
    (64 hex digits) or made there (mode 0600) when missing, and a note saying which; None
    (consistent within one run only) without a path."""
    if not path:
        return None, "pseudonyms consistent within this run only (give --pseudonym-key)"
    from radguard.fileio import atomic_write_bytes

    p = Path(path)
    if p.exists():
        try:
            key = bytes.fromhex(p.read_text().strip())
        except (OSError, ValueError) as exc:
            raise DeidError(f"{p}: not a radguard pseudonym key (64 hex digits)") from exc
        if len(key) < 16:
            raise DeidError(f"{p}: pseudonym key too short")
        return key, f"pseudonym key {p}"
    key = secrets.token_bytes(32)
    atomic_write_bytes(p, key.hex().encode() + b"\n", 0o600)
    os.chmod(p, 0o600)
    return key, f"new pseudonym key written to {p} (keep it secret; it links future runs)"
