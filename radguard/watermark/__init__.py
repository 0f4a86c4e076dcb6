"""Invisible watermarks for diagnostic images.

* a **reversible payload mark** (rhombus prediction-error expansion) carrying the device or
  technologist identity, a SOP Instance UID digest, the acquisition time and a MAC over the
  original pixels: ``restore`` gives back the original bit for bit;
* a **fragile block mark** (keyed tag per block) that localises changed regions;
* a **robust export mark** for 8-bit exported copies that survives JPEG, resizing and grey
  conversion and traces a leak back to its instance.
"""

from radguard.watermark.dicom import DatasetCheck, check_dataset, embed_dataset, restore_dataset
from radguard.watermark.export import (
    ExportMark,
    decode_export_mark,
    embed_export_mark,
    export_file,
    lookup_export,
    new_export_id,
    register_export,
)
from radguard.watermark.keys import WatermarkKey, generate_key_file, load_key
from radguard.watermark.scheme import (
    SCHEME,
    VERSION,
    FrameCheck,
    Identity,
    WatermarkError,
    check_frame,
    embed_frame,
    restore_frame,
)

__all__ = [
    "SCHEME",
    "VERSION",
    "DatasetCheck",
    "ExportMark",
    "FrameCheck",
    "Identity",
    "WatermarkError",
    "WatermarkKey",
    "check_dataset",
    "check_frame",
    "decode_export_mark",
    "embed_dataset",
    "embed_export_mark",
    "export_file",
    "embed_frame",
    "generate_key_file",
    "load_key",
    "lookup_export",
    "new_export_id",
    "register_export",
    "restore_dataset",
    "restore_frame",
]
