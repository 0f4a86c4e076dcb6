"""Splicing edited elements into a file's own bytes."""

from __future__ import annotations

import struct

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from radguard.dicom import read_dataset
from radguard.dicom.io import source_view
from radguard.dicom.splice import encode_element, source_layout, write_spliced
from tests.conftest import MR_NATIVE, RG1_J2K


def _pydicom_encoding(ds, tag):
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, ds.get_item(tag), ds._character_set)
    return fp.getvalue()


def _raw(tag, vr, value):
    return RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def test_raw_sequences_encode_as_pydicom_does():
    items = []
    for n in (1, 2):
        item = Dataset()
        item[0x04000005] = _raw(0x04000005, "US", struct.pack("<H", n))
        item[0x04000015] = _raw(0x04000015, "CS", b"SHA256")
        item[0x04000115] = _raw(0x04000115, "OB", bytes(range(256)) * 3)
        items.append(item)
    ds = Dataset()
    ds.MACParametersSequence = Sequence(items)
    ds.set_original_encoding(False, True)
    ours = encode_element(ds, 0x4FFE0001)
    assert ours == _pydicom_encoding(ds, 0x4FFE0001)
    assert ours[:8] == struct.pack("<HH", 0x4FFE, 0x0001) + b"SQ\0\0"


def test_sequences_with_converted_values_are_left_to_pydicom():
    item = Dataset()
    item.CodeValue = "X1"  # a converted element, not raw bytes
    ds = Dataset()
    ds.ProcedureCodeSequence = Sequence([item])
    ds.set_original_encoding(False, True)
    assert encode_element(ds, 0x00081032) == _pydicom_encoding(ds, 0x00081032)


def _layout(path):
    ds = read_dataset(path)
    view = source_view(ds)
    return ds, source_layout(ds, path, len(view), view)


def test_tapped_copy_writes_the_same_file_and_hands_over_the_bytes(tmp_path):
    ds, layout = _layout(MR_NATIVE)  # 2 MB of pixels, then trailing padding (FFFC,FFFC)
    edits = {0x00080090: b"", 0xFFFAFFFA: struct.pack("<HH2sHL", 0xFFFA, 0xFFFA, b"SQ", 0, 0)}
    plain, tapped = tmp_path / "plain.dcm", tmp_path / "tapped.dcm"
    assert write_spliced(layout, edits, plain)
    start, end = layout.between(0x00080090, 0xFFFAFFFA)
    assert end == layout.starts[0xFFFCFFFC]
    seen = []
    assert write_spliced(layout, edits, tapped, tap=(start, end, lambda b: seen.append(bytes(b))))
    assert tapped.read_bytes() == plain.read_bytes()
    assert b"".join(seen) == bytes(layout.source[start:end])
    assert len(seen) > 1  # handed over piece by piece


def test_tap_outside_one_copied_range_is_refused(tmp_path):
    ds, layout = _layout(RG1_J2K)
    edits = {0x00080080: b"", 0x4FFE0001: b""}
    with pytest.raises(ValueError, match="tapped range"):
        write_spliced(layout, edits, tmp_path / "x.dcm", tap=(0, layout.data_end, print))
    assert not (tmp_path / "x.dcm").exists()
