"""The MAC byte stream: the fast paths (file runs, mmap'd values) equal the element-wise
encoding, and the encoding rules match PS3.15 on hand-made cases."""

from __future__ import annotations

import hashlib
import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from radguard.dicom import read_dataset
from radguard.dicom.io import source_view
from radguard.provenance.bytestream import MacStream, is_signable_tag, signable_tags
from tests.conftest import DICOM_DIR, MR_NATIVE, NIH_DX, RG1_J2K, RG2_JLS


def _digest(ds, source, tap=None):
    implicit, little = ds.original_encoding
    stream = MacStream(hashlib.sha256(), is_implicit=bool(implicit), is_little_endian=little,
                       source=source, tap=tap)
    stream.add_elements(ds, signable_tags(ds, bool(implicit)))
    return stream.digest()


@pytest.mark.parametrize("path", [MR_NATIVE, RG1_J2K, RG2_JLS, NIH_DX,
                                  DICOM_DIR / "pydicom-data-693_UNCR.dcm"])
def test_file_runs_equal_element_wise_encoding(path):
    ds = read_dataset(path)
    assert _digest(ds, source_view(ds)) == _digest(ds, None)


def _stream_bytes(ds):
    chunks = []
    stream = MacStream(hashlib.sha256(), is_implicit=False, is_little_endian=True,
                       tap=chunks.append)
    stream.add_elements(ds, signable_tags(ds, False))
    stream.digest()
    return b"".join(chunks)


def test_sequence_and_short_element_encoding():
    ds = Dataset()
    ds.PatientName = "A^B"  # odd length: padded with a space
    item = Dataset()
    item.CodeValue = "12"
    ds.ProcedureCodeSequence = Sequence([item])
    ds.set_original_encoding(False, True)
    expected = (
        struct.pack("<HH", 0x0008, 0x1032) + b"SQ\0\0"  # sequence: no length
        + struct.pack("<HH", 0xFFFE, 0xE000)  # item: tag only
        + struct.pack("<HH", 0x0008, 0x0100) + b"SH" + struct.pack("<H", 2) + b"12"
        + struct.pack("<HH", 0xFFFE, 0xE0DD)  # sequence delimitation: tag only
        + struct.pack("<HH", 0x0010, 0x0010) + b"PN" + struct.pack("<H", 4) + b"A^B "
    )
    assert _stream_bytes(ds) == expected


@pytest.mark.parametrize(("tag", "signable"), [
    (0x00100010, True), (0x00100000, False), (0x00020010, False), (0x00080001, False),
    (0x4FFE0001, False), (0xFFFAFFFA, False), (0xFFFCFFFC, False), (0x7FE00010, True),
])
def test_signable_tags(tag, signable):
    assert is_signable_tag(tag) is signable


@pytest.mark.parametrize("path", [MR_NATIVE, NIH_DX])
def test_held_tail_fed_later_gives_the_same_digest(path):
    ds = read_dataset(path)
    source = source_view(ds)
    tags = signable_tags(ds, bool(ds.original_encoding[0]))
    pixels = ds._dict[0x7FE00010]
    start, end = pixels.value_tell - 12, pixels.value_tell + pixels.length
    stream = MacStream(hashlib.sha256(), is_implicit=bool(ds.original_encoding[0]),
                       is_little_endian=True, source=source, hold=(start, end))
    stream.add_elements(ds, tags)
    held = stream.take_held()
    if ds.original_encoding[0]:  # implicit VR: no file runs, so nothing can be held
        assert held is None, path.name
    else:
        assert held is not None and held[1] == end and held[0] >= start
        for offset in range(held[0], held[1], 1000):
            stream.feed(source[offset : min(held[1], offset + 1000)])
    assert stream.digest() == _digest(ds, source)


def test_held_tail_is_hashed_in_place_when_more_follows():
    ds = read_dataset(RG1_J2K)
    source = source_view(ds)
    pixel_start = ds._dict[0x7FE00010].value_tell - 12
    stream = MacStream(hashlib.sha256(), is_implicit=False, is_little_endian=True,
                       source=source, hold=(pixel_start, len(source)))
    stream.add_elements(ds, signable_tags(ds, False))
    item = Dataset()
    item.MACIDNumber = 1
    stream.add_signature_item(item)  # something after the held range: it is hashed first
    assert stream.take_held() is None
    plain = MacStream(hashlib.sha256(), is_implicit=False, is_little_endian=True,
                      source=source)
    plain.add_elements(ds, signable_tags(ds, False))
    plain.add_signature_item(item)
    assert stream.digest() == plain.digest()
