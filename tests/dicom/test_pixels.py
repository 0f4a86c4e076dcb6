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


def _pydicom_decode(ds):
    from radguard.dicom.io import detached_view

    return np.asarray(detached_view(ds).pixel_array)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
@pytest.mark.parametrize("allocated", [8, 16, 32])
@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("frames", [1, 3])
def test_native_pixels_equal_pydicoms_decoding(syntax, allocated, signed, frames):
    """The native fast path gives pydicom's values, dtype and shape, junk above BitsStored
    included (masked when unsigned, sign-extended when signed)."""
    from pydicom.dataset import Dataset, FileMetaDataset

    from radguard.dicom.pixels import _native_array

    rng = np.random.default_rng(allocated * 10 + signed + frames)
    for stored in sorted({1, allocated // 2 + 1, allocated - 1, allocated}):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 3, 5, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
        ds.PixelRepresentation, ds.PhotometricInterpretation = signed, "MONOCHROME2"
        if frames > 1:
            ds.NumberOfFrames = frames
        raw = rng.integers(0, 256, 15 * frames * allocated // 8, dtype=np.uint8).tobytes()
        ds.PixelData = raw + b"\0" * (len(raw) % 2)
        fast = _native_array(ds, pixel_info(ds))
        assert fast is not None, "the fast path should take native little-endian grey data"
        ref = _pydicom_decode(ds)
        assert (fast.dtype, fast.shape) == (ref.dtype, ref.shape)
        assert np.array_equal(fast, ref)
        assert fast.flags.writeable


@pytest.mark.parametrize("path", [NIH_DX, MR_NATIVE, DICOM_DIR / "pydicom-data-693_UNCR.dcm"])
def test_native_pixels_of_real_files_equal_pydicoms(path):
    ds = read_dataset(path)
    assert np.array_equal(pixel_array(ds), _pydicom_decode(ds))
    assert pixel_array(ds).dtype == _pydicom_decode(ds).dtype


def test_native_pixel_data_too_short_is_an_error():
    ds = read_dataset(MR_NATIVE)
    ds.PixelData = ds.PixelData[:-64]
    with pytest.raises(DicomReadError):
        pixel_array(ds)


def test_native_pixels_of_a_deferred_value_are_read_from_the_mapped_file(tmp_path):
    """A file over the defer size keeps its pixel value unread; the fast path reads it
    from the mapped file and still agrees with pydicom (which reads it from the file)."""
    from radguard.dicom.io import DEFER_SIZE, stored_element, write_dataset
    from radguard.dicom.pixels import _native_array

    ds = read_dataset(MR_NATIVE)
    side = 1024
    ds.Rows = ds.Columns = side
    values = np.random.default_rng(5).integers(0, 1 << 16, (side, side), dtype=np.uint16)
    ds.PixelData = values.astype("<u2").tobytes()
    write_dataset(ds, tmp_path / "big.dcm")
    big = read_dataset(tmp_path / "big.dcm")
    elem = stored_element(big, 0x7FE00010)
    assert elem.length > DEFER_SIZE and elem.value is None  # deferred
    assert _native_array(big, pixel_info(big)) is not None  # taken, not left to pydicom
    arr = pixel_array(big)
    assert np.array_equal(arr, values & ((1 << int(big.BitsStored)) - 1))
    assert np.array_equal(arr, _pydicom_decode(big))


def test_a_decode_scope_keeps_the_reservation_while_the_pixels_are_held():
    """Review finding 3: the decode budget counted a decode only while it ran, not the array
    the caller then held. Inside ``decode_scope`` the reservation lasts until the scope
    ends, so another thread's decode waits for it; the holding thread itself never waits
    (waiting for what it holds itself would never end)."""
    import threading

    from radguard.dicom.limits import (
        DecodeLimits,
        decode_budget,
        decode_limits,
        decode_scope,
        set_decode_limits,
    )
    from radguard.dicom.pixels import decoded_bytes

    saved = decode_limits()
    ds = read_dataset(NIH_DX)
    size = decoded_bytes(ds)
    set_decode_limits(DecodeLimits(decode_budget_bytes=size * 3 // 2))
    try:
        budget, order = decode_budget(), []
        pixel_array(ds)
        assert budget.used == 0  # no scope: released when the decode returns
        other = threading.Thread(target=lambda: order.append(pixel_array(ds).shape))
        with decode_scope():
            held = pixel_array(ds)
            assert budget.used == size
            again = pixel_array(ds)  # beyond the budget, but this thread holds the rest
            assert budget.used == 2 * size and np.array_equal(held, again)
            other.start()
            other.join(2)  # it cannot finish while the scope holds the budget
            assert other.is_alive() and not order
            order.append("scope ended")
        other.join(60)
        assert order == ["scope ended", held.shape] and budget.used == 0
    finally:
        set_decode_limits(saved)
