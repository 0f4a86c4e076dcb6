"""PS3.15 Annex C digital signature security profiles: Base, Creator and Authorization RSA.

The DICOM data set records no profile name: a verifier infers which profiles a signature
satisfies from its key type, MAC algorithm and the elements it covers (dcmsign does the
same). radguard signs every signable element by default, which satisfies all three; the
lists below matter when a caller restricts the signed elements or an element is unsignable.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from pydicom.datadict import tag_for_keyword

__all__ = [
    "PROFILES",
    "SIGNING_MACS",
    "VERIFY_MACS",
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


def _tags(*groups: Iterable[str]) -> frozenset[int]:
    out = set()
    for group in groups:
        for kw in group:
            tag = tag_for_keyword(kw)
            if tag is not None:
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


def _is_overlay_or_curve(tag: int) -> bool:
    group = tag >> 16
    return (0x6000 <= group <= 0x601E or 0x5000 <= group <= 0x501E) and group % 2 == 0


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
