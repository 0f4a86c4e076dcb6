"""The fast Explicit VR Little Endian parser builds exactly the Dataset pydicom builds."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from radguard.dicom import fastread, read_dataset_bytes
from radguard.dicom.io import DEFER_SIZE, _StrictReader
from radguard.errors import DicomReadError
from tests.conftest import DICOM_DIR, MR_NATIVE, RG1_J2K

#: the shared radiographs and the edge cases pydicom ships with itself (no download)
CORPUS = sorted(DICOM_DIR.rglob("*.dcm")) + sorted(
    (Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _pydicom(data: bytes, defer: int | None) -> Dataset:
    return pydicom.dcmread(_StrictReader(data, None), defer_size=defer)


def _assert_same(ours: Dataset, theirs: Dataset, where: str) -> None:
    assert list(ours._dict) == list(theirs._dict), where
    for tag in theirs._dict:
        a, b = ours._dict[tag], theirs._dict[tag]
        assert type(a) is type(b), f"{where} {tag}"
        if isinstance(b, RawDataElement):
            assert a == b, f"{where} {tag}"
            continue
        assert (a.VR, a.is_undefined_length, a.file_tell) == (
            b.VR, b.is_undefined_length, b.file_tell), f"{where} {tag}"
        if b.VR != "SQ":
            assert a.value == b.value, f"{where} {tag}"
            continue
        assert len(a.value) == len(b.value), f"{where} {tag}"
        for i, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
            _assert_same(x, y, f"{where} {tag}[{i}]")
    assert ours.original_encoding == theirs.original_encoding, where
    assert ours.original_character_set == theirs.original_character_set, where


def test_corpus_parses_identically_or_falls_back():
    handled = []
    for path in CORPUS:
        data = path.read_bytes()
        if len(data) < 132 or data[128:132] != b"DICM":
            continue
        for defer in (None, 1024):
            try:
                theirs = _pydicom(data, defer)
            except Exception:  # files pydicom refuses are not compared
                continue
            ours = fastread.parse(_StrictReader(data, None), data, len(data), defer)
            if ours is None:
                continue
            handled.append(path.name)
            assert ours.preamble == theirs.preamble, path.name
            _assert_same(ours.file_meta, theirs.file_meta, f"{path.name} meta")
            _assert_same(ours, theirs, path.name)
    # the corpus has implicit VR, big endian, deflated and broken files; the rest is ours
    assert len(set(handled)) >= 40, sorted(set(handled))


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                  "image_dfl.dcm"])
def test_other_encodings_are_left_to_pydicom(name):
    data = (PYDICOM_FILES / name).read_bytes()
    assert fastread.parse(_StrictReader(data, None), data, len(data), DEFER_SIZE) is None
    assert len(read_dataset_bytes(data, name)) > 0  # and pydicom reads them


@pytest.mark.parametrize("cut", [140, 400, 1000, 5000, -1, -7])
def test_truncated_files_fall_back_and_fail_clearly(cut):
    data = RG1_J2K.read_bytes()[:cut]
    try:  # pydicom's item reader (called for undefined lengths) raises EOFError itself
        assert fastread.parse(_StrictReader(data, None), data, len(data), None) is None
    except (EOFError, struct.error):
        pass
    with pytest.raises(DicomReadError, match="truncated|File Meta"):
        read_dataset_bytes(data, "cut")


def test_unknown_vr_bytes_fall_back():
    data = bytearray(RG1_J2K.read_bytes())
    ds = read_dataset_bytes(bytes(data), "rg1")
    offset = ds._dict[0x00080060].value_tell - 4  # Modality's VR bytes
    assert data[offset : offset + 2] == b"CS"
    data[offset : offset + 2] = b"zz"
    assert fastread.parse(_StrictReader(bytes(data), None), bytes(data), len(data),
                          None) is None


def test_corrupted_headers_parse_identically_or_fail_clearly():
    """Random byte damage in the header area: whenever the lean parser accepts the bytes,
    pydicom builds the same Dataset; reading never fails with anything but DicomReadError."""
    rng = random.Random(7)
    sources = [MR_NATIVE.read_bytes(), RG1_J2K.read_bytes()]
    accepted = 0
    for trial in range(400):
        data = bytearray(sources[trial % 2])
        header_end = min(len(data), 2000)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(132, header_end)] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(132, len(data))]
        data = bytes(data)
        try:
            ours = fastread.parse(_StrictReader(data, None), data, len(data), 1024)
        except Exception:  # pydicom's own sequence reader may raise
            ours = None
        if ours is not None:
            accepted += 1
            _assert_same(ours, _pydicom(data, 1024), f"trial {trial}")
        try:
            read_dataset_bytes(data, "damaged")
        except DicomReadError:
            pass
    assert accepted > 50  # the damage often lands in values, which parse fine
