"""Strict reading, atomic writing and byte-faithful round trips."""

from __future__ import annotations

import os

import pytest

from radguard.dicom import encode_dataset, read_dataset, read_dataset_bytes, write_dataset
from radguard.errors import DicomReadError, RadguardError
from tests.conftest import MR_NATIVE, NIH_DX, RG1_J2K


def test_reads_implicit_and_compressed_files():
    ds = read_dataset(NIH_DX)
    assert ds.Modality == "DX"
    assert ds.original_encoding == (True, True)
    j2k = read_dataset(RG1_J2K)
    assert j2k.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"


@pytest.mark.parametrize("cut", [5000, 200_000, -3])
def test_truncated_file_is_an_error(tmp_path, cut):
    data = RG1_J2K.read_bytes()
    short = tmp_path / "short.dcm"
    short.write_bytes(data[:cut])
    with pytest.raises(DicomReadError, match="truncated"):
        read_dataset(short)


def test_truncated_native_pixel_data_is_an_error():
    data = NIH_DX.read_bytes()
    with pytest.raises(DicomReadError, match="truncated"):
        read_dataset_bytes(data[:-1000], "nih")


@pytest.mark.parametrize("payload", [b"", b"hello", b"\0" * 128 + b"DICM", b"x" * 4096])
def test_not_dicom_is_an_error(payload):
    with pytest.raises(DicomReadError):
        read_dataset_bytes(payload, "junk")


def test_errors_share_one_family(tmp_path):
    with pytest.raises(RadguardError, match="no such file"):
        read_dataset(tmp_path / "missing.dcm")
    with pytest.raises(RadguardError, match="folder"):
        read_dataset(tmp_path)


def test_untouched_round_trip_is_byte_identical_for_elements(tmp_path):
    ds = read_dataset(RG1_J2K)
    out = tmp_path / "copy.dcm"
    write_dataset(ds, out)
    again = read_dataset(out)
    for tag in ds.keys():
        assert ds.get_item(tag).value == again.get_item(tag).value, tag


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    ds = read_dataset(NIH_DX)
    out = tmp_path / "out.dcm"
    write_dataset(ds, out)
    assert read_dataset(out).PatientID == ds.PatientID
    assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]


def test_failed_encoding_writes_nothing(tmp_path):
    ds = read_dataset(NIH_DX)
    with pytest.warns(UserWarning):
        ds.add_new(0x00091010, "US", "not a number")  # cannot be encoded
    out = tmp_path / "bad.dcm"
    with pytest.raises(RadguardError):
        write_dataset(ds, out)
    assert not out.exists() and not os.listdir(tmp_path)


def test_encode_defaults_to_explicit_vr_for_new_datasets():
    from radguard.demo import synthetic_radiograph

    data = encode_dataset(synthetic_radiograph(32, 32))
    assert read_dataset_bytes(data).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_truncated_large_file_read_through_mmap(tmp_path):
    """Files over 1 MiB are memory-mapped with deferred pixel data; truncation still shows."""
    data = MR_NATIVE.read_bytes()
    assert len(data) > 1 << 20
    short = tmp_path / "short_mr.dcm"
    short.write_bytes(data[:-5000])
    with pytest.raises(DicomReadError, match="truncated"):
        read_dataset(short)
    full = read_dataset(MR_NATIVE)
    assert full.get_item(0x7FE00010, keep_deferred=True).value is None  # left in the file
    assert len(full.PixelData) == 1024 * 1024 * 2  # ...and read on demand


def test_peek_of_binary_numbers_equals_pydicoms_decoding_across_the_corpus():
    """peek's shortcut for one US/SS/UL/SL number gives what pydicom's conversion gives,
    in every encoding of the shared files and pydicom's own test files (big endian and
    implicit VR ones fall through to pydicom)."""
    import pydicom
    from pydicom.dataelem import RawDataElement, convert_raw_data_element

    from radguard.dicom.io import peek
    from tests.dicom.test_fastread import CORPUS

    compared = 0
    for path in CORPUS:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # files pydicom refuses are not compared
            continue
        for tag in list(ds._dict):
            elem = ds.get_item(tag)
            if not isinstance(elem, RawDataElement) or elem.VR not in (None, "US", "SS",
                                                                        "UL", "SL"):
                continue
            try:
                expected = convert_raw_data_element(elem, encoding=ds._character_set,
                                                    ds=ds).value
            except Exception:  # elements pydicom cannot decode either
                continue
            assert peek(ds, tag) == expected, f"{path.name} {tag}"
            assert isinstance(ds.get_item(tag), RawDataElement)  # left as stored
            compared += 1
    assert compared > 500
