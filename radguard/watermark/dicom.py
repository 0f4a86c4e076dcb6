"""The watermark on DICOM instances: derived-image bookkeeping, a documented private block,
and a clean hand-over to signatures.

Embedding produces a **new derived instance** (the stored pixel values differ, even if only
reversibly): Image Type DERIVED, a new SOP Instance UID, a Source Image Sequence item for the
original (purpose 121322 "Source image for image processing operation"), a Contributing
Equipment item (purpose 109103 "Modifying Equipment"), and a Derivation Description.
Lossy Image Compression is left as it was: no information is lost, ``restore`` gives back
the original pixels bit for bit. Compressed inputs are decoded; the output is always Explicit
VR Little Endian with native pixel data. Existing digital signatures are removed (they cannot
cover the new pixels): sign the watermarked instance afterwards.

Private block (group 0099, creator ``RADGUARD WATERMARK``):

=========  ====  ================================================================
element    VR    content
=========  ====  ================================================================
(0099,xx10) LO   scheme name, ``RG-RPEE-RH``
(0099,xx11) IS   format version (2; images marked before read as 1)
(0099,xx12) SH   watermark key fingerprint (identifies the key, reveals nothing)
(0099,xx13) LT   per-frame parameters (JSON: block size, tag rows, threshold)
(0099,xx14) LT   the original values of the header elements embedding changed (JSON)
=========  ====  ================================================================

The watermark itself does not depend on this block: ``check`` works on pixels whose header
was stripped or rewritten.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from radguard import __version__
from radguard.dicom.io import peek
from radguard.dicom.pixels import PixelInfo, pixel_array, pixel_info
from radguard.dicom.uids import new_uid
from radguard.watermark.keys import WatermarkKey
from radguard.watermark.scheme import (
    SCHEME,
    VERSION,
    FrameCheck,
    Identity,
    WatermarkError,
    check_frame,
    embed_frame,
    restore_frame,
    uid_digest,
)

__all__ = ["PRIVATE_CREATOR", "DatasetCheck", "check_dataset", "embed_dataset",
           "restore_dataset"]

PRIVATE_CREATOR = "RADGUARD WATERMARK"
PRIVATE_GROUP = 0x0099
_SIGNATURE_TAGS = (0x4FFE0001, 0xFFFAFFFA)


def _frames(ds: Dataset, pixels: np.ndarray | None = None) -> tuple[np.ndarray, PixelInfo]:
    info = pixel_info(ds)
    if info.samples_per_pixel != 1 or not info.photometric.startswith("MONOCHROME"):
        raise WatermarkError(f"only monochrome images can be watermarked, not "
                             f"{info.photometric} with {info.samples_per_pixel} samples")
    arr = pixel_array(ds) if pixels is None else pixels
    frames = arr.reshape(info.frames, info.rows, info.columns)
    return frames, info


def _acquired(ds: Dataset) -> str:
    value = peek(ds, "AcquisitionDateTime")
    if value:
        return str(value)[:26]
    for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"),
                             ("ContentDate", "ContentTime"), ("StudyDate", "StudyTime")):
        date = peek(ds, date_kw)
        if date:
            return (str(date) + str(peek(ds, time_kw, "") or ""))[:26]
    return ""


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _pixel_bytes(frames: np.ndarray, info: PixelInfo) -> bytes:
    kind = "i" if info.signed else "u"
    size = max(1, info.bits_allocated // 8)
    return np.ascontiguousarray(frames).astype(f"<{kind}{size}").tobytes()


def _with_pixels(ds: Dataset, frames: np.ndarray, info: PixelInfo) -> Dataset:
    out = Dataset()
    for tag in ds.keys():
        if int(tag) in _SIGNATURE_TAGS or int(tag) == 0x7FE00010:
            continue
        out.add(ds[tag])
    data = _pixel_bytes(frames, info)
    out.add_new(0x7FE00010, "OB" if info.bits_allocated <= 8 else "OW",
                data + (b"\0" if len(data) % 2 else b""))
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.file_meta = meta
    out.set_original_encoding(False, True)
    return out


def embed_dataset(ds: Dataset, key: WatermarkKey, *, signer: str = "") -> Dataset:
    """Return a watermarked derived copy of ``ds`` (``ds`` itself is not changed)."""
    frames, info = _frames(ds)
    sop_uid = str(peek(ds, "SOPInstanceUID", "") or "")
    acquired = _acquired(ds)
    marked = np.empty_like(frames, dtype=np.int64)
    params = []
    for i, frame in enumerate(frames):
        identity = Identity(signer, uid_digest(sop_uid) if sop_uid else "", acquired, i)
        marked[i], p = embed_frame(frame, key, identity, lo=info.min_value, hi=info.max_value,
                                   bits_stored=info.bits_stored)
        params.append(p)
    out = _with_pixels(ds, marked, info)
    original_header = {
        "SOPInstanceUID": sop_uid,
        "ImageType": list(peek(ds, "ImageType", []) or []) if "ImageType" in ds else None,
        "DerivationDescription": peek(ds, "DerivationDescription"),
        "SourceImageSequence": len(peek(ds, "SourceImageSequence", []) or [])
        if "SourceImageSequence" in ds else None,
        "ContributingEquipmentSequence": len(peek(ds, "ContributingEquipmentSequence", [])
                                             or []) if "ContributingEquipmentSequence" in ds
        else None,
    }
    image_type = list(original_header["ImageType"] or ["ORIGINAL", "PRIMARY"])
    image_type[0] = "DERIVED"
    if len(image_type) < 2:
        image_type.append("SECONDARY")
    out.add_new(0x00080008, "CS", image_type)
    new_instance = new_uid()
    out.add_new(0x00080018, "UI", new_instance)
    out.file_meta.MediaStorageSOPInstanceUID = UID(new_instance)
    sop_class = str(peek(ds, "SOPClassUID", "") or "")
    if sop_class:
        out.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    description = (f"radguard reversible watermark {SCHEME} v{VERSION}: pixel values changed "
                   "by at most a few levels; 'radguard watermark restore' recovers the "
                   "original bit for bit")
    out.add_new(0x00082111, "ST", description)
    source = Dataset()
    source.ReferencedSOPClassUID = sop_class
    source.ReferencedSOPInstanceUID = sop_uid
    source.PurposeOfReferenceCodeSequence = Sequence(
        [_code("121322", "DCM", "Source image for image processing operation")])
    sources = list(peek(ds, "SourceImageSequence", []) or [])
    out.add_new(0x00082112, "SQ", Sequence(sources + [source]))
    equipment = Dataset()
    equipment.Manufacturer = "radguard"
    equipment.ManufacturerModelName = "radguard watermark"
    equipment.SoftwareVersions = __version__
    equipment.ContributionDateTime = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S+0000")
    equipment.ContributionDescription = f"Reversible watermark {SCHEME} v{VERSION} embedded"
    equipment.PurposeOfReferenceCodeSequence = Sequence(
        [_code("109103", "DCM", "Modifying Equipment")])
    contributors = list(peek(ds, "ContributingEquipmentSequence", []) or [])
    out.add_new(0x0018A001, "SQ", Sequence(contributors + [equipment]))
    block = out.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", SCHEME)
    block.add_new(0x11, "IS", str(VERSION))
    block.add_new(0x12, "SH", key.fingerprint)
    block.add_new(0x13, "LT", json.dumps(params, separators=(",", ":")))
    block.add_new(0x14, "LT", json.dumps(original_header, separators=(",", ":")))
    return out


@dataclass
class DatasetCheck:
    """Outcome of checking every frame of an instance."""

    frames: list[FrameCheck] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        """Every frame untouched and its payload authentic."""
        return bool(self.frames) and all(f.intact for f in self.frames)

    @property
    def regions(self) -> list[list[int]]:
        """Changed regions [x0, y0, x1, y1] over all frames (see ``region_frames``)."""
        return [r for f in self.frames for r in f.regions]

    @property
    def region_frames(self) -> list[int]:
        """Frame index of each entry of ``regions``."""
        return [i for i, f in enumerate(self.frames) for _ in f.regions]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: intact, payload, regions (+ per-frame details)."""
        first = next((f for f in self.frames if f.identity is not None), None)
        payload = None
        if first is not None and first.identity is not None:
            ident = first.identity
            payload = {"signer": ident.signer, "sop_instance_uid_digest": ident.uid_digest,
                       "acquired": ident.acquired, "frames": len(self.frames),
                       "authenticated": all(f.payload_ok for f in self.frames)}
        return {
            "intact": self.intact,
            "payload": payload,
            "regions": self.regions,
            "region_frames": self.region_frames,
            "changed_blocks": sum(f.failed_blocks for f in self.frames),
            "blocks": sum(f.total_blocks for f in self.frames),
            "problems": [f.problem for f in self.frames if f.problem],
            "parameters": [f.params for f in self.frames],
        }


def check_dataset(ds: Dataset, key: WatermarkKey, pixels: np.ndarray | None = None
                  ) -> DatasetCheck:
    """Check every frame's tags and payload; ``pixels``: the stored values as
    :func:`radguard.dicom.pixels.pixel_array` decoded them, when the caller has them."""
    frames, info = _frames(ds, pixels)
    report = DatasetCheck()
    for i, frame in enumerate(frames):
        report.frames.append(check_frame(frame, key, lo=info.min_value, hi=info.max_value,
                                         frame_index=i))
    return report


def restore_dataset(ds: Dataset, key: WatermarkKey) -> Dataset:
    """The original pixels (bit for bit) and the header elements embedding changed."""
    frames, info = _frames(ds)
    restored = np.empty_like(frames, dtype=np.int64)
    for i, frame in enumerate(frames):
        restored[i], _identity = restore_frame(frame, key, lo=info.min_value, hi=info.max_value)
    out = _with_pixels(ds, restored, info)
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        original = json.loads(str(block[0x14].value))
    except (KeyError, ValueError):
        return out  # header stripped: the pixels are back, the header stays as it is
    if original.get("SOPInstanceUID"):
        out.add_new(0x00080018, "UI", original["SOPInstanceUID"])
        out.file_meta.MediaStorageSOPInstanceUID = original["SOPInstanceUID"]
    for kw, tag, vr in (("ImageType", 0x00080008, "CS"),
                        ("DerivationDescription", 0x00082111, "ST")):
        if original.get(kw) is None:
            if tag in out:
                del out[tag]
        else:
            out.add_new(tag, vr, original[kw])
    for kw, tag in (("SourceImageSequence", 0x00082112),
                    ("ContributingEquipmentSequence", 0x0018A001)):
        count = original.get(kw)
        if count is None:
            if tag in out:
                del out[tag]
        elif tag in out:
            out.add_new(tag, "SQ", Sequence(list(out[tag].value)[:count]))
    for tag in [t for t in out.keys() if (int(t) >> 16) == PRIVATE_GROUP]:
        del out[tag]
    return out
