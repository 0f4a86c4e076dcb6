"""Rewrite a DICOM file by replacing a few top-level elements, copying the rest verbatim.

Adding a signature changes two elements of a 7 MB radiograph; re-encoding the whole data set
through pydicom costs more than hashing it. When the source is Explicit VR Little Endian (or
a compressed syntax built on it), the output is the source's own bytes with the changed
elements spliced in, and the unchanged ranges are copied by the kernel (copy_file_range).
Bytes that are not replaced are therefore preserved exactly, whatever their encoding quirks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import DeflatedExplicitVRLittleEndian

from radguard.dicom.io import stored_element
from radguard.fileio import atomic_writer, copy_range

__all__ = ["SourceLayout", "encode_element", "source_layout", "write_spliced"]

_LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)


@dataclass(frozen=True)
class SourceLayout:
    """Where each top-level element of a file starts, and the identity of that file."""

    path: Path
    starts: dict[int, int]
    data_end: int
    identity: tuple[int, int, int]  # (inode, size, mtime_ns) when the layout was taken

    def span(self, tag: int) -> tuple[int, int]:
        """Byte range of an existing top-level element (header included)."""
        start = self.starts[tag]
        later = [s for t, s in self.starts.items() if t > tag]
        return start, min(later) if later else self.data_end

    def insertion_point(self, tag: int) -> int:
        """Offset where a new element with ``tag`` belongs (dataset order)."""
        later = [s for t, s in self.starts.items() if t > tag]
        return min(later) if later else self.data_end


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def source_layout(ds: Dataset, path: str | os.PathLike[str], size: int) -> SourceLayout | None:
    """Element offsets of a freshly read file, or None if splicing cannot be exact here."""
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
        vr = elem.VR
        if tell is None or vr is None:
            return None
        starts[int(tag)] = tell - (12 if vr in _LONG_VRS else 8)
    p = Path(path)
    return SourceLayout(p, starts, size, _identity(p))


def encode_element(ds: Dataset, tag: int) -> bytes:
    """One top-level element of ``ds`` encoded in Explicit VR Little Endian."""
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
) -> bool:
    """Write ``dst`` = the source file with the top-level elements in ``edits`` added or
    replaced by the given encoded bytes (``b""`` removes one).

    A value may be a callable: it is called only when the writer reaches that element, so
    work that produces it (a signature over the data being copied) can run meanwhile.
    Returns False, writing nothing, when the source changed since it was read or a group
    length of an affected group would go stale.
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
    with open(layout.path, "rb") as src, atomic_writer(dst, durable=durable) as out:
        pos = 0
        for start, end, tag in spans:
            copy_range(src, out, pos, start - pos)
            value = edits[tag]
            out.write(value() if callable(value) else value)
            pos = end
        copy_range(src, out, pos, layout.data_end - pos)
    return True
