"""A fast parser for the common case: Part 10 files in Explicit VR Little Endian.

pydicom's reader handles every transfer syntax and every quirk, through a Python file
object, one small read per element header; on a radiograph's header (about a hundred
elements) that costs as much as hashing a megabyte of pixels, and signing, verifying and
the gateway parse every file. Files whose data set is Explicit VR Little Endian (native, or
a compressed syntax built on it) and whose elements are ordinary are parsed here with
``struct.unpack_from`` over the file's bytes into the very Dataset pydicom builds: raw
elements with their value offsets, large values deferred, Specific Character Set applied,
sequences of undefined length decoded by pydicom's own sequence reader.

Anything else (implicit VR, big endian, deflate, a command group, unknown VR bytes, an
undefined-length UN, a value running past the end of the file, ...) makes :func:`parse`
return None, and the caller falls back to pydicom, whose errors it already translates.
``tests/dicom/test_fastread.py`` compares both parsers element by element.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import read_sequence
from pydicom.fileutil import read_undefined_length_value
from pydicom.tag import BaseTag, SequenceDelimiterTag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
from pydicom.values import convert_string

__all__ = ["parse"]

_HEADER = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<L")
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset(str(vr).encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
     b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_DELIMITERS = frozenset({0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD})
#: Values of undefined length that pydicom reads up to a sequence delimiter.
_ENCAPSULATED_VRS = frozenset({b"OB", b"OW"})


def parse(fp: Any, buffer: Any, size: int, defer_size: int | None) -> FileDataset | None:
    """The data set of the Part 10 file in ``buffer`` (bytes or mmap, ``size`` long), read
    through ``fp`` (its seekable reader, kept as ``ds.buffer`` like pydicom does), or None
    when the file is not one this parser handles exactly like pydicom."""
    view = memoryview(buffer)
    meta_elements, pos = _elements(view, 132, size, None, group=2)
    if meta_elements is None or not meta_elements:
        return None
    syntax_elem = meta_elements.get(BaseTag(0x00020010))
    if syntax_elem is None or not syntax_elem.value:
        return None
    syntax = UID(syntax_elem.value.decode("ascii", "replace").rstrip("\0 "))
    if (not syntax.is_transfer_syntax or syntax.is_implicit_VR or not syntax.is_little_endian
            or syntax.is_deflated):
        return None
    if pos < size and int.from_bytes(view[pos : pos + 2], "little") == 0:
        return None  # a command group before the data set: pydicom's special case
    file_meta = FileMetaDataset(meta_elements)
    file_meta.set_original_encoding(False, True, default_encoding)
    # pydicom's reader looks at these three, which converts them; do the same
    file_meta.get(next(iter(meta_elements)))
    file_meta.get(0x00020000)
    file_meta.get(0x00020010)

    elements, end = _elements(view, pos, size, fp, group=None, defer_size=defer_size)
    if elements is None or end != size:
        return None
    encoding: str | list[str] = default_encoding
    charset = elements.get(BaseTag(0x00080005))
    if charset is not None:
        encoding = convert_encodings(convert_string(charset.value or b"", True))
    dataset = Dataset(elements, parent_encoding=default_encoding)
    dataset.set_original_encoding(False, True, encoding)
    preamble = bytes(view[:128])
    ds = FileDataset(fp, dataset, preamble=preamble, file_meta=file_meta,
                     is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def _elements(
    view: memoryview, pos: int, size: int, fp: Any,
    *, group: int | None, defer_size: int | None = None,
) -> tuple[dict[BaseTag, RawDataElement | DataElement] | None, int]:
    """Top-level elements from ``pos`` on (only those of ``group`` if given): the dict and
    where parsing stopped, or (None, pos) for anything to leave to pydicom."""
    out: dict[BaseTag, RawDataElement | DataElement] = {}
    unpack_header = _HEADER.unpack_from
    unpack_long = _LONG_LENGTH.unpack_from
    encoding: str | list[str] = default_encoding
    while pos < size:
        if size - pos < 8:
            return None, pos
        grp, elem, vr_bytes, length = unpack_header(view, pos)
        if group is not None and grp != group:
            break
        tag = grp << 16 | elem
        if tag in _DELIMITERS:
            return None, pos
        if vr_bytes in _LONG_VRS:
            if size - pos < 12:
                return None, pos
            length = unpack_long(view, pos + 8)[0]
            value_tell = pos + 12
        elif vr_bytes in _SHORT_VRS:
            value_tell = pos + 8
        else:
            return None, pos
        vr = vr_bytes.decode("ascii")
        key = BaseTag(tag)
        if length == _UNDEFINED:
            if fp is None:
                return None, pos
            fp.seek(value_tell)
            if vr_bytes == b"SQ":
                seq = read_sequence(fp, False, True, length, encoding)
                out[key] = DataElement(key, vr, seq, value_tell, is_undefined_length=True)
            elif vr_bytes in _ENCAPSULATED_VRS:
                value = read_undefined_length_value(fp, True, SequenceDelimiterTag,
                                                    defer_size)
                out[key] = RawDataElement(key, vr, length, value, value_tell, False, True)
            else:
                return None, pos
            pos = fp.tell()
            continue
        end = value_tell + length
        if end > size:
            return None, pos
        if defer_size is not None and length > defer_size and tag != 0x00080005:
            value = None
        elif length:
            value = bytes(view[value_tell:end])
        else:
            value = cast(bytes | None, empty_value_for_VR(vr, raw=True))  # raw: b"" or None
        if tag == 0x00080005:
            encoding = convert_encodings(convert_string(value or b"", True))
        out[key] = RawDataElement(key, vr, length, value, value_tell, False, True)
        pos = end
    return out, pos
