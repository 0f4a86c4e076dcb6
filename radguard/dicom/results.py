"""AI results back into the PACS as standard DICOM, built with highdicom (which validates
on construction):

* :func:`triage_report` - a Comprehensive SR following TID 1500 (Measurement Report): one
  measurement group holding the finding (qualitative evaluation), the probability, the 1-10
  suspicion and the operating threshold, each tied to the algorithm's name and version
  (TID 4019), referencing the source image;
* :func:`overlay_capture` - the saliency overlay as a Secondary Capture image in the source's
  study, referencing the source image;
* :func:`saliency_segmentation` - the saliency map itself as a FRACTIONAL DICOM
  Segmentation of the source image (what viewers with SEG support overlay and threshold).

Codes without a standard concept (probability of a model, suspicion score) use the private
coding scheme ``99RADGUARD``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes

from radguard.dicom.uids import new_uid
from radguard.errors import RadguardError

if TYPE_CHECKING:
    from highdicom.sr import CodedConcept

__all__ = ["TriageFinding", "frame_count", "overlay_capture", "patient_orientation",
           "saliency_segmentation", "triage_report"]

MANUFACTURER = "radguard"
_SCHEME = "99RADGUARD"


@dataclass(frozen=True)
class TriageFinding:
    """What a triage model concluded about one image."""

    finding: str  # e.g. "Pneumonia"
    finding_code: tuple[str, str]  # (value, scheme) e.g. ("233604007", "SCT")
    positive: bool
    probability: float
    suspicion: int
    threshold: float
    model: str
    version: str


def _code(value: str, scheme: str, meaning: str) -> CodedConcept:
    import highdicom as hd

    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


# Type 2 attributes of the Patient and General Study modules: present (maybe empty) in
# every derived object, so the results stay in the source's patient and study
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
          "StudyTime", "ReferringPhysicianName", "AccessionNumber", "StudyID")


_REFERENCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
              "Modality", "SeriesNumber", "InstanceNumber", "StudyDescription",
              "Laterality", "ImageLaterality", "BodyPartExamined",
              "SpecificCharacterSet", "Rows", "Columns", "SamplesPerPixel",
              "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
              "PixelRepresentation", "NumberOfFrames")


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation as two valid biped values (upper-cased), or None when
    it is absent, empty, of one value or not made of L/R/A/P/H/F without contradictions:
    a derived image then says "unknown" (empty) rather than copying or inventing one."""
    raw = source.get("PatientOrientation", None)
    if raw is None or raw == "":
        return None
    values = [str(v).strip().upper() for v in (raw if not isinstance(raw, str) else [raw])]
    if len(values) != 2:
        return None
    for value in values:
        if not 1 <= len(value) <= 3 or set(value) - set(_OPPOSITE) or len(set(value)) != \
                len(value) or any(_OPPOSITE[c] in value for c in value):
            return None
    return values[0], values[1]


def frame_count(source: Dataset) -> int:
    """How many frames ``source`` holds (1 when NumberOfFrames is absent or odd)."""
    try:
        return max(1, int(source.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _multiframe(source: Dataset) -> bool:
    """Whether references to ``source`` must name a frame: it holds several and its IOD is
    a multi-frame one (a frame number is not allowed for the others, dciodvfy)."""
    if frame_count(source) <= 1:
        return False
    try:
        from highdicom._standard_utils import is_multiframe_image

        return bool(is_multiframe_image(source))
    except (ImportError, KeyError, AttributeError, ValueError):
        return False


def _header(source: Dataset) -> Dataset:
    """The source attributes a derived object needs (identity, patient, study), with absent
    Type 2 attributes empty. Empty or malformed values of the others (an empty Modality, an
    age like "81") are left out rather than copied: highdicom validates what it copies, and
    one odd optional attribute must not cost the whole result set."""
    import re

    header = Dataset()
    for keyword in _TYPE2 + _REFERENCE:
        value = source.get(keyword, None)
        if value is not None and value != "" and source[keyword].VM > 0:
            header.add(source[keyword])
        elif keyword in _TYPE2:
            setattr(header, keyword, "")
    if "Modality" not in header:
        header.Modality = "OT"  # Type 1 in every image: "other" when the source has none
    if "PatientSex" in header and header.PatientSex not in ("M", "F", "O", ""):
        header.PatientSex = ""  # CS values highdicom refuses: unknown rather than a failure
    age = str(source.get("PatientAge", "") or "")
    if re.fullmatch(r"\d{3}[DWMY]", age):
        header.PatientAge = age
    return header


def _quiet(func: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """Silence highdicom's advice about single-component patient names: the source's names
    are copied as they are, and the CLI must not print warnings per image."""

    @functools.wraps(func)
    def wrapper(*args: object, **kwargs: object) -> Dataset:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*intended person name.*")
            return func(*args, **kwargs)

    return wrapper


@_quiet
def triage_report(source: Dataset, result: TriageFinding, *, series_number: int = 990,
                  instance_number: int = 1, sop_instance_uid: str | None = None,
                  series_instance_uid: str | None = None) -> Dataset:
    """A TID 1500 Comprehensive SR of one triage result about ``source`` (its first frame,
    the one scored, when it has several). UIDs: new ones unless given (the gateway derives
    them from the image, so a retried result set is the same set)."""
    import highdicom as hd

    frames = [1] if _multiframe(source) else None
    source = _header(source)
    try:
        algorithm = hd.sr.AlgorithmIdentification(name=result.model, version=result.version)
        unitless = _code("1", "UCUM", "no units")
        finding = _code(result.finding_code[0], result.finding_code[1], result.finding)
        present = codes.SCT.Present if result.positive else codes.SCT.Absent
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(),
                                                         identifier=f"{result.model} triage"),
            finding_type=finding,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=_code(code, _SCHEME, meaning), value=value,
                                  unit=unitless, algorithm_id=algorithm)
                for code, meaning, value in (
                    ("P-001", f"{result.finding} probability", float(result.probability)),
                    ("S-001", "Suspicion score (1-10)", float(result.suspicion)),
                    ("T-001", "Operating threshold", float(result.threshold)),
                )
            ],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=present)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(
                source, referenced_frame_numbers=frames)],
        )
        context = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=new_uid(), name=result.model, manufacturer_name=MANUFACTURER,
                    model_name=f"{result.model} {result.version}"),
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=codes.LN.ImagingProcedure
            if hasattr(codes.LN, "ImagingProcedure") else _code("363679005", "SCT",
                                                                 "Imaging procedure"),
            imaging_measurements=[group],
        )
        return hd.sr.ComprehensiveSR(
            evidence=[source], content=report,
            series_instance_uid=series_instance_uid or new_uid(), series_number=series_number,
            sop_instance_uid=sop_instance_uid or new_uid(), instance_number=instance_number,
            manufacturer=MANUFACTURER, series_description=f"{result.model} triage result",
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise RadguardError(f"cannot build the triage SR ({exc})") from exc


@_quiet
def overlay_capture(source: Dataset, rgb: np.ndarray, *, description: str,
                    series_number: int = 991, instance_number: int = 1,
                    sop_instance_uid: str | None = None,
                    series_instance_uid: str | None = None) -> Dataset:
    """A Secondary Capture (RGB) of an overlay, in the source's study, referencing it (its
    first frame when it has several). Its Patient Orientation is the source's when that is
    valid, else empty (unknown): an invented one would mislead a reader."""
    import highdicom as hd

    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise RadguardError("overlay must be an 8-bit RGB image")
    orientation = patient_orientation(source)
    multiframe = _multiframe(source)
    source = _header(source)
    try:
        # highdicom wants an orientation for the patient coordinate system and knows no
        # oblique ones ("LP"): a placeholder, replaced below by the source's or "unknown"
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB",
            bits_allocated=8, coordinate_system="PATIENT",
            series_instance_uid=series_instance_uid or new_uid(),
            series_number=series_number, sop_instance_uid=sop_instance_uid or new_uid(),
            instance_number=instance_number, manufacturer=MANUFACTURER,
            patient_orientation=("L", "F"),
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise RadguardError(f"cannot build the overlay capture ({exc})") from exc
    # highdicom types it a list; "" is DICOM's empty (unknown) value
    sc.PatientOrientation = list(orientation) if orientation else ""  # type: ignore[assignment]
    sc.SeriesDescription = description[:64]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if multiframe:
        ref.ReferencedFrameNumber = 1
    sc.SourceImageSequence = [ref]
    sc.ImageType = ["DERIVED", "SECONDARY"]
    if "Laterality" not in sc:
        sc.Laterality = ""  # Type 2C: known to be unpaired or unknown
    sc.BurnedInAnnotation = "NO"
    return sc


@_quiet
def saliency_segmentation(source: Dataset, heat: np.ndarray, *, model: str, version: str,
                          series_number: int = 992, instance_number: int = 1,
                          sop_instance_uid: str | None = None,
                          series_instance_uid: str | None = None) -> Dataset:
    """A FRACTIONAL Segmentation (one segment, values 0-255 for 0-1) of a [0, 1] saliency
    map with the source image's size, referencing the source. The segment is typed as
    "selected region" found by an AI algorithm: saliency shows where a model looked, not
    a delineated lesion."""
    import highdicom as hd

    if frame_count(source) > 1:
        raise RadguardError("a saliency map of one frame cannot segment a multi-frame source "
                            "(highdicom needs a frame of reference to place it)")
    heat = np.asarray(heat, dtype=np.float32)
    rows, cols = int(source.get("Rows", 0)), int(source.get("Columns", 0))
    if heat.shape != (rows, cols):
        raise RadguardError(f"saliency map {heat.shape} does not match the source image "
                            f"({rows}, {cols})")
    if not np.isfinite(heat).all() or heat.min() < 0 or heat.max() > 1:
        raise RadguardError("saliency map values must lie in [0, 1]")
    orientation = patient_orientation(source)
    ref = _header(source)
    ref.file_meta = getattr(source, "file_meta", FileMetaDataset())
    try:
        algorithm = hd.AlgorithmIdentificationSequence(
            name=model, version=version, family=codes.cid7162.ArtificialIntelligence)
        segment = hd.seg.SegmentDescription(
            segment_number=1, segment_label=f"{model} saliency"[:64],
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=_code("111099", "DCM", "Selected region"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        seg = hd.seg.Segmentation(
            source_images=[ref], pixel_array=heat[None],
            segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
            segment_descriptions=[segment],
            series_instance_uid=series_instance_uid or new_uid(),
            series_number=series_number, sop_instance_uid=sop_instance_uid or new_uid(),
            instance_number=instance_number, manufacturer=MANUFACTURER,
            manufacturer_model_name=f"{model} {version}"[:64], software_versions=version,
            device_serial_number="0", max_fractional_value=255,
            series_description=f"{model} saliency (fractional SEG)"[:64],
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise RadguardError(f"cannot build the saliency segmentation ({exc})") from exc
    if "FrameOfReferenceUID" not in seg:  # Type 2C for images without a patient plane:
        seg.PatientOrientation = list(orientation) if orientation else ""  # else unknown
    return seg
