"""PS3.15 Annex C digital signature security profiles: Base, Creator and Authorization RSA.

The DICOM data set records no profile name: a verifier infers which profiles a signature
satisfies from its key type, MAC algorithm and the elements it covers (dcmsign does the
same). radguard signs every signable element by default, which satisfies all three; the
lists below matter when a caller restricts the signed elements or an element is unsignable.

Whether signatures vouch for an *image* (``VerificationReport.pixels_covered``) is a
separate question with its own lists (:func:`uncovered_image`): what changes what the image
shows and, at the default :class:`Coverage` ``image``, whose it is. The Creator RSA profile
asks for less than that (no Patient module, rescale, window or pixel spacing) and for some
things that do not change the image (General Equipment, which routers fill in).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from enum import StrEnum

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from radguard.dicom.io import peek, stored_element
from radguard.errors import RadguardError

__all__ = [
    "PIXEL_DATA",
    "PROFILES",
    "SIGNING_MACS",
    "VERIFY_MACS",
    "Coverage",
    "missing_for_profile",
    "satisfied_profiles",
    "uncovered_image",
]

#: Profiles a signer may request; ``none`` is for ECDSA keys (no standard profile exists).
PROFILES = ("base", "creator", "authorization", "none")
#: MAC algorithms radguard signs with (strongest first); PS3.15 also lists weaker ones.
SIGNING_MACS = ("SHA256", "SHA384", "SHA512")
#: MAC algorithms radguard verifies (everything the Base RSA profile allows).
VERIFY_MACS = ("RIPEMD160", "MD5", "SHA1", "SHA256", "SHA384", "SHA512")

_ALWAYS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

_GENERAL_EQUIPMENT = (
    "Manufacturer", "InstitutionName", "InstitutionAddress", "StationName",
    "InstitutionalDepartmentName", "InstitutionalDepartmentTypeCodeSequence",
    "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions", "GantryID",
    "UDISequence", "DeviceUID", "SpatialResolution", "DateOfLastCalibration",
    "TimeOfLastCalibration", "PixelPaddingValue",
)
_GENERAL_IMAGE = (
    "InstanceNumber", "PatientOrientation", "ContentDate", "ContentTime", "ImageType",
    "AcquisitionNumber", "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
    "ImagesInAcquisition", "ImageComments", "QualityControlImage", "BurnedInAnnotation",
    "RecognizableVisualFeatures", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", "IconImageSequence", "PresentationLUTShape",
    "IrradiationEventUID", "RealWorldValueMappingSequence", "ImageLaterality",
    "AnatomicRegionSequence", "PrimaryAnatomicStructureSequence",
)
_IMAGE_PIXEL = (
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "PlanarConfiguration", "PixelAspectRatio",
    "SmallestImagePixelValue", "LargestImagePixelValue",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData", "ICCProfile",
    "ColorSpace", "PixelData", "FloatPixelData", "DoubleFloatPixelData",
    "PixelDataProviderURL", "PixelPaddingRangeLimit", "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths", "SyntheticData",
)
_ANNOTATION = ("GraphicAnnotationSequence",)
_SR = (
    "PreliminaryFlag", "CompletionFlag", "CompletionFlagDescription", "VerificationFlag",
    "VerifyingObserverSequence", "AuthorObserverSequence", "ParticipantSequence",
    "CustodialOrganizationSequence", "PredecessorDocumentsSequence",
    "IdenticalDocumentsSequence", "ReferencedRequestSequence",
    "PerformedProcedureCodeSequence", "CurrentRequestedProcedureEvidenceSequence",
    "PertinentOtherEvidenceSequence", "ReferencedInstanceSequence", "ValueType",
    "ConceptNameCodeSequence", "ContinuityOfContent", "ContentTemplateSequence",
    "ObservationDateTime", "ObservationUID", "ContentSequence",
)
_WAVEFORM = ("WaveformSequence", "WaveformAnnotationSequence")
_MULTIFRAME = (
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "NumberOfFrames",
    "ConcatenationFrameOffsetNumber", "RepresentativeFrameNumber", "ConcatenationUID",
    "SOPInstanceUIDOfConcatenationSource", "InConcatenationNumber",
    "InConcatenationTotalNumber",
)
# Whose image it is and which examination: the start of what the Authorization profile
# calls "values verifiable by the technician or physician" (shown next to the image).
_PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_EXAMINATION = ("Modality", "StudyDate", "StudyTime")
_DISPLAYED = (
    *_PATIENT, *_EXAMINATION, "AccessionNumber", "StudyDescription", "SeriesDescription",
    "BodyPartExamined", "ViewPosition", "Laterality",
)
# How stored values become what is shown and measured: Hounsfield units and SUVs come from
# the rescale or Modality LUT, the window and VOI LUT pick what is visible, the presentation
# LUT and the intensity relationship sign invert it, a segmented palette repaints it,
# padding values are blanked, an XA mask is subtracted from every frame.
_PRESENTATION = (
    "RescaleIntercept", "RescaleSlope", "RescaleType", "ModalityLUTSequence", "WindowCenter",
    "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence",
    "PresentationLUTShape", "PresentationLUTSequence", "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign", "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData",
    "RealWorldValueMappingSequence", "PixelPaddingValue", "MaskSubtractionSequence",
    "RecommendedViewingMode",
)
# How big a pixel is and which way the image faces: measurements (ultrasound regions carry
# their own calibration), left and right.
_GEOMETRY = (
    "PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing",
    "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription",
    "EstimatedRadiographicMagnificationFactor", "SequenceOfUltrasoundRegions",
    "ImageOrientationPatient", "ImagePositionPatient", "SliceThickness",
    "SpacingBetweenSlices", "SliceLocation", "FrameOfReferenceUID", "PatientPosition",
    "PatientOrientation", "ImageLaterality", "Laterality", "ViewPosition", "ViewCodeSequence",
    "FieldOfViewRotation", "FieldOfViewHorizontalFlip",
)
# When each frame was taken: time measurements on cine loops (cardiac cycles, flow).
_TIMING = ("FrameIncrementPointer", "FrameTime", "FrameTimeVector")
# What a PET standardised uptake value is computed from (units, dose, decay reference).
_PET_SUV = (
    "Units", "DecayCorrection", "CorrectedImage", "RadiopharmaceuticalInformationSequence",
    "PatientWeight", "PatientSize", "SeriesDate", "SeriesTime",
)
#: PET, Enhanced PET and Legacy Converted Enhanced PET Image Storage.
_PET_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",
                              "1.2.840.10008.5.1.4.1.1.128.1"})


def _tags(*groups: Iterable[str]) -> frozenset[int]:
    """Tags by keyword; an unknown keyword is a bug that would leave an element unprotected."""
    out = set()
    for group in groups:
        for kw in group:
            tag = tag_for_keyword(kw)
            if tag is None:
                raise ValueError(f"unknown DICOM keyword {kw!r}")
            out.add(int(tag))
    return frozenset(out)


_CREATOR_IF_PRESENT = _tags(
    _ALWAYS, ("InstanceCreationDate", "InstanceCreationTime"), _GENERAL_EQUIPMENT,
    _GENERAL_IMAGE, _IMAGE_PIXEL, _ANNOTATION, _SR, _WAVEFORM, _MULTIFRAME,
)
_AUTHORIZATION_IF_PRESENT = _tags(
    _ALWAYS, _GENERAL_IMAGE, _IMAGE_PIXEL, _ANNOTATION, _SR, _WAVEFORM, _MULTIFRAME, _DISPLAYED,
)
_ALWAYS_TAGS = _tags(_ALWAYS)


class Coverage(StrEnum):
    """What valid signatures must cover before they vouch for an image
    (``VerificationReport.pixels_covered``; ``[signatures] coverage``, ``--coverage``)."""

    #: What the image shows and whose it is (the default).
    IMAGE = "image"
    #: What the image shows only: for devices that sign the pixels and how to read and
    #: show them but not the patient's identity (the Creator RSA profile does not ask for
    #: it). Such an image can be relabelled to another patient unnoticed.
    PIXELS = "pixels"


#: The image itself: Pixel Data, Float Pixel Data, Double Float Pixel Data.
PIXEL_DATA = _tags(("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
#: ``pixels``: the pixel data and how it is read (SOP Class, Image Pixel and Multi-frame
#: modules with the functional groups, frame timing), shown (presentation chain, graphic
#: annotations, waveforms; overlays and curves: :func:`_is_overlay_or_curve`) and measured.
_SHOWN = _tags(("SOPClassUID",), _IMAGE_PIXEL, _MULTIFRAME, _TIMING, _PRESENTATION,
               _GEOMETRY, _ANNOTATION, _WAVEFORM)
#: ``image`` adds whose image it is and where it belongs: what the Creator RSA profile asks
#: of an image (Study / Series / SOP Instance UIDs, General Image...) except the General
#: Equipment module (who made it and where: routers fill in an institution name, and it
#: changes nothing shown), the patient's name, ID, birth date and sex, modality, study date.
_SHOWN_AND_WHOSE = (_SHOWN | (_CREATOR_IF_PRESENT - _tags(_GENERAL_EQUIPMENT))
                    | _tags(_PATIENT, _EXAMINATION))
_PET_SUV_TAGS = _tags(_PET_SUV)
_CHARACTER_SET = 0x00080005
_PATIENT_TEXT = (0x00100010, 0x00100020)  # PatientName, PatientID
#: Characters every DICOM character set reads alike: printable ASCII but for the backslash
#: and tilde (JIS X 0201, ISO_IR 13, has a yen sign and an overline there) - no escapes.
_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"\\", "~"}


def _is_overlay_or_curve(tag: int) -> bool:
    group = tag >> 16
    return (0x6000 <= group <= 0x601E or 0x5000 <= group <= 0x501E) and group % 2 == 0


def uncovered_image(ds: Dataset, vouched: Collection[int],
                    coverage: Coverage = Coverage.IMAGE) -> list[int]:
    """Top-level elements of ``ds`` that change what the image shows (and, at ``image``,
    whose it is) and that ``vouched`` leaves out, in tag order: why signatures over
    ``vouched`` do not vouch for the image (none: they do).

    Left out as changing nothing: zero-length elements (the empty type-2 elements routers
    add; pixel data always counts), the Specific Character Set while the patient's name and
    ID are plain ASCII (every character set reads them alike), and the PET SUV inputs in
    images that are not PET (a weight the RIS fills in changes no CT).
    """
    wanted = _SHOWN_AND_WHOSE if coverage is Coverage.IMAGE else _SHOWN
    pet: bool | None = None  # looked up once, if needed
    gaps = []
    for tag in sorted(int(t) for t in ds.keys()):
        if tag in vouched or not tag & 0xFFFF:  # a group length is never signed
            continue
        if tag == _CHARACTER_SET:
            if coverage is not Coverage.IMAGE or _plain_identity(ds):
                continue
        elif not (tag in wanted or _is_overlay_or_curve(tag)):
            if tag not in _PET_SUV_TAGS:
                continue
            pet = _is_pet(ds) if pet is None else pet
            if not pet:
                continue
        if tag in PIXEL_DATA or not _is_empty(ds, tag):
            gaps.append(tag)
    return gaps


def _is_empty(ds: Dataset, tag: int) -> bool:
    """Zero-length (or only padding): the element says nothing."""
    elem = stored_element(ds, tag)
    if isinstance(elem, RawDataElement) and elem.length == 0:
        return True
    try:
        value = peek(ds, tag)
    except RadguardError:
        return False  # unreadable: it might say anything
    if value is None:
        return True
    if isinstance(value, int | float):
        return False
    if isinstance(value, str | PersonName):
        return str(value).strip(" \0") == ""
    try:
        return len(value) == 0  # bytes, a sequence, several values
    except TypeError:
        return False  # a date or time object: a value


def _plain_identity(ds: Dataset) -> bool:
    """The patient's name and ID (if present) hold only characters every DICOM character
    set reads alike, so the Specific Character Set cannot change whose image it is."""
    for tag in _PATIENT_TEXT:
        elem = stored_element(ds, tag)
        if elem is None:
            continue
        if isinstance(elem, RawDataElement) and elem.value is not None:
            text = bytes(elem.value).decode("latin-1")  # one character per byte
        else:
            try:
                text = str(peek(ds, tag) or "")
            except RadguardError:
                return False
        if not set(text.rstrip(" \0")) <= _PLAIN:
            return False
    return True


def _is_pet(ds: Dataset) -> bool:
    """A PET image by modality or SOP Class (an unreadable one counts as PET)."""
    try:
        modality = str(peek(ds, "Modality", "") or "").strip().upper()
        sop_class = str(peek(ds, "SOPClassUID", "") or "").strip("\0 ")
    except RadguardError:
        return True
    return modality == "PT" or sop_class in _PET_SOP_CLASSES


def _required_if_present(profile: str, tag: int) -> bool:
    if profile == "creator":
        return tag in _CREATOR_IF_PRESENT or _is_overlay_or_curve(tag)
    if profile == "authorization":
        return tag in _AUTHORIZATION_IF_PRESENT or _is_overlay_or_curve(tag)
    return False


def missing_for_profile(
    profile: str, present: Collection[int], covered: Collection[int]
) -> list[int]:
    """Tags the profile requires that the signature would not cover (empty = satisfied)."""
    if profile not in ("creator", "authorization"):
        return []
    covered_set = set(covered)
    missing = [t for t in sorted(set(present) - covered_set) if _required_if_present(profile, t)]
    missing += [t for t in sorted(_ALWAYS_TAGS) if t not in covered_set and t not in missing]
    return missing


def satisfied_profiles(
    key_type: str, mac_algorithm: str, present: Collection[int], covered: Collection[int]
) -> list[str]:
    """Which of base/creator/authorization a signature conforms to."""
    if key_type != "RSA" or mac_algorithm not in VERIFY_MACS:
        return []
    return ["base"] + [p for p in ("creator", "authorization")
                       if not missing_for_profile(p, present, covered)]
