"""DICOM core: strict reading, atomic writing, decoded pixels, UIDs."""

from radguard.dicom.io import (
    encode_dataset,
    iter_dicom_paths,
    read_dataset,
    read_dataset_bytes,
    write_dataset,
)
from radguard.dicom.pixels import PixelInfo, pixel_array, pixel_info, validate_pixel_data
from radguard.dicom.uids import is_valid_uid, new_uid, uid_root

__all__ = [
    "PixelInfo",
    "encode_dataset",
    "is_valid_uid",
    "iter_dicom_paths",
    "new_uid",
    "pixel_array",
    "pixel_info",
    "read_dataset",
    "read_dataset_bytes",
    "uid_root",
    "validate_pixel_data",
    "write_dataset",
]
