"""Decoded pixels keep their bit depth; decoder failures are radguard errors."""

from __future__ import annotations

import numpy as np
import pytest

from radguard.dicom import pixel_array, pixel_info, read_dataset
from radguard.errors import DicomReadError
from tests.conftest import DICOM_DIR, MR_NATIVE, NIH_DX, RG1_J2K, RG2_JLS, RG2_JPLL, RG2_JPLY


@pytest.mark.parametrize(
    ("path", "bits", "dtype"),
    [(NIH_DX, 8, np.uint8), (RG1_J2K, 15, np.uint16), (RG2_JLS, 10, np.uint16),
     (RG2_JPLL, 10, np.uint16), (MR_NATIVE, 12, np.uint16),
     (DICOM_DIR / "pydicom-data-693_UNCR.dcm", 14, np.int16)],
)
def test_pixels_decode_with_stored_bit_depth(path, bits, dtype):
    ds = read_dataset(path)
    info = pixel_info(ds)
    arr = pixel_array(ds)
    assert info.bits_stored == bits
    assert arr.dtype == dtype
    assert arr.shape == (info.rows, info.columns)
    assert info.min_value <= arr.min() and arr.max() <= info.max_value
    assert arr.max() > 2 ** (bits - 3)  # the stored range is really used


def test_lossless_codecs_agree():
    """JPEG-LS lossless and JPEG lossless of the same RG2 image decode to the same values."""
    assert np.array_equal(pixel_array(read_dataset(RG2_JLS)), pixel_array(read_dataset(RG2_JPLL)))


def test_decoding_does_not_touch_the_dataset():
    ds = read_dataset(RG1_J2K)
    pixel_array(ds)
    assert ds.get_item(0x7FE00010).is_raw


def test_corrupt_jpeg_is_a_clear_error():
    with pytest.raises(DicomReadError, match="cannot decode pixel data"):
        pixel_array(read_dataset(RG2_JPLY))


def test_header_pixel_mismatch_is_an_error():
    ds = read_dataset(NIH_DX)
    ds.Rows = 2048
    with pytest.raises(DicomReadError):
        pixel_array(ds)
