"""Rewrite a DICOM file by replacing a few top-level elements, copying the rest verbatim.

Adding a signature changes two elements of a 7 MB radiograph; re-encoding the whole data set
through pydicom costs more than hashing it. When the source is Explicit VR Little Endian (or
a compressed syntax built on it), the output is the source's own bytes with the changed
elements spliced in, and the unchanged ranges are copied by the kernel (copy_file_range).
Bytes that are not replaced are therefore preserved exactly, whatever their encoding quirks.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from radguard.dicom.io import stored_element
from radguard.fileio import atomic_writer, copy_range

__all__ = ["LONG_VRS", "SourceLayout", "encode_element", "explicit_header", "header_size",
           "source_layout", "write_spliced"]

#: VRs whose Explicit VR header has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
LONG_VRS = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)


def header_size(vr: str) -> int:
    """Bytes of an Explicit VR element header before the value."""
    return 12 if vr in LONG_VRS else 8


def explicit_header(tag: int, vr: str, length: int) -> bytes:
    """An element header in Explicit VR Little Endian; ValueError if ``length`` does not
    fit the VR's 16-bit length field."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in LONG_VRS:
        return head + struct.pack("<HL", 0, length)
    if length > 0xFFFF:
        raise ValueError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) too long for VR {vr}")
    return head + struct.pack("<H", length)


@dataclass(frozen=True)
class SourceLayout:
    """Where each top-level element of a file starts, and the identity of that file."""

    path: Path
    starts: dict[int, int]
    data_end: int
    identity: tuple[int, int, int]  # (inode, size, mtime_ns) when the layout was taken
    source: memoryview | None = None  # the file's bytes as read (a map of the file)

    def span(self, tag: int) -> tuple[int, int]:
        """Byte range of an existing top-level element (header included)."""
        start = self.starts[tag]
        later = [s for t, s in self.starts.items() if t > tag]
        return start, min(later) if later else self.data_end

    def between(self, first: int, second: int) -> tuple[int, int]:
        """The source bytes a splice copies between the elements ``first`` and ``second``
        (each replaced or inserted), given no other element is edited in between."""
        start = self.span(first)[1] if first in self.starts else self.insertion_point(first)
        end = self.starts[second] if second in self.starts else self.insertion_point(second)
        return start, end

    def insertion_point(self, tag: int) -> int:
        """Offset where a new element with ``tag`` belongs (dataset order)."""
        later = [s for t, s in self.starts.items() if t > tag]
        return min(later) if later else self.data_end


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def source_layout(ds: Dataset, path: str | os.PathLike[str], size: int,
                  source: memoryview | None = None) -> SourceLayout | None:
    """Element offsets of a freshly read file, or None if splicing cannot be exact here.
    ``source`` is the file's content as read, needed to hash while writing."""
    if tuple(ds.original_encoding) != (False, True):
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return None
    starts: dict[int, int] = {}
    for tag in sorted(ds.keys()):
        elem = stored_element(ds, tag)
        tell = getattr(elem, "value_tell", None)
        if tell is None:
            tell = getattr(elem, "file_tell", None)
        vr = elem.VR if elem is not None else None
        if tell is None or vr is None:
            return None
        starts[int(tag)] = tell - header_size(vr)
    p = Path(path)
    return SourceLayout(p, starts, size, _identity(p), source)


def encode_element(ds: Dataset, tag: int) -> bytes:
    """One top-level element of ``ds`` encoded in Explicit VR Little Endian."""
    fast = _encode_flat_sequence(ds, tag)
    if fast is not None:
        return fast
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, ds.get_item(tag), ds._character_set)
    return fp.getvalue()


def write_spliced(
    layout: SourceLayout,
    edits: Mapping[int, bytes | Callable[[], bytes]],
    dst: str | os.PathLike[str],
    *,
    durable: bool = False,
    tap: tuple[int, int, Callable[[memoryview], None]] | None = None,
) -> bool:
    """Write ``dst`` = the source file with the top-level elements in ``edits`` added or
    replaced by the given encoded bytes (``b""`` removes one).

    A value may be a callable: it is called only when the writer reaches that element, so
    work that produces it (a signature over the data being copied) can run meanwhile.
    Returns False, writing nothing, when the source changed since it was read or a group
    length of an affected group would go stale.

    ``tap=(start, end, consumer)`` hands the source bytes ``[start, end)`` to ``consumer``
    in order, piece by piece, just before each piece is written (a hash that needs the same
    bytes then reads them once). The range must lie between two edits and the layout must
    carry the ``source`` bytes.
    """
    groups = {t >> 16 for t in edits}
    if any((t >> 16) in groups and (t & 0xFFFF) == 0 for t in layout.starts):
        return False
    if _identity(layout.path) != layout.identity:
        return False
    spans = []
    for tag in sorted(edits):
        if tag in layout.starts:
            start, end = layout.span(tag)
        else:
            start = end = layout.insertion_point(tag)
        spans.append((start, end, tag))
    spans.sort()
    if tap is not None and (layout.source is None or not any(
            pos <= tap[0] <= tap[1] <= start
            for pos, start in zip([0] + [e for _s, e, _t in spans],
                                  [s for s, _e, _t in spans] + [layout.data_end], strict=True))):
        raise ValueError("the tapped range must lie between two edits of a mapped source")
    with open(layout.path, "rb") as src, atomic_writer(dst, durable=durable) as out:
        pos = 0
        for start, end, tag in spans:
            if tap is not None and pos <= tap[0] <= tap[1] <= start:
                copy_range(src, out, pos, tap[0] - pos)
                _write_tapped(out, layout.source, tap)
                pos = tap[1]
            copy_range(src, out, pos, start - pos)
            value = edits[tag]
            out.write(value() if callable(value) else value)
            pos = end
        copy_range(src, out, pos, layout.data_end - pos)
    return True


#: Pieces small enough to stay in the CPU cache between being hashed and being written.
_TAP_CHUNK = 1 << 18


def _write_tapped(out: BinaryIO, source: memoryview | None,
                  tap: tuple[int, int, Callable[[memoryview], None]]) -> None:
    start, end, consumer = tap
    assert source is not None
    out.flush()
    fd = out.fileno()
    for offset in range(start, end, _TAP_CHUNK):
        piece = source[offset : min(end, offset + _TAP_CHUNK)]
        consumer(piece)
        while piece:
            piece = piece[os.write(fd, piece):]
    out.seek(0, os.SEEK_END)


def _encode_flat_sequence(ds: Dataset, tag: int) -> bytes | None:
    """A defined-length sequence whose items hold only raw Explicit VR Little Endian
    elements without nested sequences (the signature sequences radguard writes), encoded
    directly: the same bytes pydicom writes, without converting and re-encoding each
    value. None when the element is anything else."""
    elem = stored_element(ds, tag)
    if elem is None or elem.VR != "SQ" or isinstance(elem, RawDataElement):
        return None
    if elem.is_undefined_length or not isinstance(elem.value, DicomSequence):
        return None
    items = []
    for item in elem.value:
        if item.get("is_undefined_length_sequence_item", False):
            return None
        parts = []
        for sub_tag in sorted(item._dict):
            sub = item._dict[sub_tag]
            if (not isinstance(sub, RawDataElement) or sub.is_implicit_VR
                    or not sub.is_little_endian or sub.VR in (None, "SQ", "UN")
                    or sub.value is None or len(sub.value) % 2
                    or len(sub.value) != sub.length):
                return None
            try:
                parts.append(explicit_header(sub_tag, sub.VR, sub.length))
            except ValueError:
                return None
            parts.append(sub.value)
        body = b"".join(parts)
        items.append(struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body)
    value = b"".join(items)
    return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, len(value)) + value
