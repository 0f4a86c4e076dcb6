"""PS3.15 Annex C digital signature security profiles: Base, Creator and Authorization RSA.

The DICOM data set records no profile name: a verifier infers which profiles a signature
satisfies from its key type, MAC algorithm and the elements it covers (dcmsign does the
same). radguard signs every signable element by default, which satisfies all three; the
lists below matter when a caller restricts the signed elements or an element is unsignable.

The same lists, plus how the image is shown, measured and whose it is
(:func:`defines_image`), decide whether a signature vouches for an image at all
(``VerificationReport.pixels_covered``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pydicom.datadict import tag_for_keyword

__all__ = [
    "IMAGE_DEFINING",
    "PROFILES",
    "SIGNING_MACS",
    "VERIFY_MACS",
    "defines_image",
    "missing_for_profile",
    "satisfied_profiles",
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
# "Values verifiable by the technician or physician": what a viewer shows next to the image.
_DISPLAYED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyDescription", "SeriesDescription", "Modality",
    "BodyPartExamined", "ViewPosition", "Laterality",
)
# How stored values become what is shown and measured: Hounsfield units and SUVs come from
# the rescale or Modality LUT, the window and VOI LUT pick what is visible, the presentation
# LUT and the intensity relationship sign invert it, a segmented palette repaints it.
_PRESENTATION = (
    "RescaleIntercept", "RescaleSlope", "RescaleType", "ModalityLUTSequence", "WindowCenter",
    "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence",
    "PresentationLUTSequence", "PixelIntensityRelationship", "PixelIntensityRelationshipSign",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
)
# How big a pixel is and which way the image faces: measurements, left and right.
_GEOMETRY = (
    "PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing",
    "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription",
    "EstimatedRadiographicMagnificationFactor", "ImageOrientationPatient",
    "ImagePositionPatient", "SliceThickness", "SpacingBetweenSlices", "SliceLocation",
    "FrameOfReferenceUID", "PatientPosition", "ViewCodeSequence", "FieldOfViewRotation",
    "FieldOfViewHorizontalFlip", "FrameIncrementPointer",
)
# What a PET standardised uptake value is computed from (units, dose, decay reference).
_QUANTITATION = (
    "Units", "DecayCorrection", "CorrectedImage", "RadiopharmaceuticalInformationSequence",
    "PatientWeight", "PatientSize", "SeriesDate", "SeriesTime",
)
# Whose image it is (the character set decides how the name is read).
_PATIENT = (
    "SpecificCharacterSet", "PatientName", "PatientID", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "PatientBirthDate",
    "PatientSex", "PatientAge",
)


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
#: Elements that say what an image is: everything the Creator RSA profile requires a
#: signature to cover (pixels, how to read them, equipment, multi-frame functional groups,
#: UIDs), what the Authorization profile adds as displayed next to the image, and how it is
#: shown, measured, quantified and whose it is. Overlay groups (60xx) count too
#: (:func:`defines_image`).
IMAGE_DEFINING = _CREATOR_IF_PRESENT | _tags(_DISPLAYED, _PRESENTATION, _GEOMETRY,
                                             _QUANTITATION, _PATIENT)


def _is_overlay_or_curve(tag: int) -> bool:
    group = tag >> 16
    return (0x6000 <= group <= 0x601E or 0x5000 <= group <= 0x501E) and group % 2 == 0


def defines_image(tag: int) -> bool:
    """True for an element that changes what an image shows or means: if present, a
    signature must cover it to vouch for the image (see :data:`IMAGE_DEFINING`)."""
    return tag in IMAGE_DEFINING or _is_overlay_or_curve(tag)


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
