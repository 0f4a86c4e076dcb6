"""Read and write DICOM Part 10 files with clear errors and atomic writes.

pydicom is lenient: a file cut short in the middle of its pixel data is returned as a
dataset with a short element, and a file cut inside a sequence only produces a warning.
radguard is a security tool, so reading is strict: any short read is a truncated file.
"""

from __future__ import annotations

import functools
import io
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from radguard.dicom import fastread
from radguard.errors import DicomReadError
from radguard.fileio import atomic_writer

__all__ = [
    "detached_view",
    "encode_dataset",
    "iter_dicom_paths",
    "peek",
    "read_dataset",
    "read_dataset_bytes",
    "source_view",
    "stored_element",
    "write_dataset",
]


class _StrictReader:
    """A read/seek/tell view over a whole file (bytes or mmap) that remembers whether any
    read returned some but not all of the bytes asked for.

    pydicom reads element headers and values with exact sizes, so a partial read means the
    data ended inside an element; a read returning nothing is the normal end of data. The
    reader stays attached to the dataset (pydicom keeps it as ``ds.buffer``) so deferred
    values can be read later, and :func:`source_view` lets hashing use them in place.
    """

    def __init__(self, buffer: bytes | mmap.mmap, name: str | None) -> None:
        self._buffer = buffer
        self._size = len(buffer)
        self._pos = 0
        self.short_read = False
        self.view = memoryview(buffer)
        if name:
            self.name = name

    def read(self, size: int | None = -1, /) -> bytes:
        start = self._pos
        end = self._size if size is None or size < 0 else min(self._size, start + size)
        self._pos = max(end, start)
        data = self._buffer[start:end]
        if size is not None and size > 0 and 0 < len(data) < size:
            self.short_read = True
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    @property
    def closed(self) -> bool:
        return False


_PARSE_LOCK = threading.Lock()

#: Values above this size are left in the file (mmap) and read or hashed in place.
DEFER_SIZE = 1 << 20


def _parse(buffer: bytes | mmap.mmap, name: str, *, stop_before_pixels: bool,
           defer: bool, path: str | None) -> Dataset:
    if len(buffer) < 132 or buffer[128:132] != b"DICM":
        raise DicomReadError(
            f"{name}: not a DICOM Part 10 file (no 'DICM' marker after the 128-byte preamble)"
        )
    fp = _StrictReader(buffer, path)
    # warning capture is process-global, so parses that rely on it take turns
    with _PARSE_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # ordinary Explicit VR Little Endian files: the lean parser (the same Dataset,
            # about a third less time); anything else, or anything it declines: pydicom
            ds = None if stop_before_pixels else fastread.parse(
                fp, buffer, len(buffer), DEFER_SIZE if defer else None)
            if ds is None:
                fp.seek(0)
                fp.short_read = False
                ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels,
                                     defer_size=DEFER_SIZE if defer else None)
        except InvalidDicomError as exc:
            raise DicomReadError(f"{name}: not a valid DICOM file ({_one_line(exc)})") from exc
        except (EOFError, OSError) as exc:
            raise DicomReadError(f"{name}: truncated DICOM file ({_one_line(exc)})") from exc
        except Exception as exc:  # pydicom raises many types on garbage input
            if fp.short_read or fp.tell() >= len(buffer):  # failed for want of data
                raise DicomReadError(f"{name}: truncated DICOM file (data ends inside an "
                                     f"element: {_one_line(exc)})") from exc
            raise DicomReadError(f"{name}: malformed DICOM file ({_one_line(exc)})") from exc
    eof_warnings = [w for w in caught if "end of file" in str(w.message).lower()]
    if fp.short_read or eof_warnings:
        raise DicomReadError(f"{name}: truncated DICOM file (data ends inside an element)")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        raise DicomReadError(f"{name}: no File Meta Information (transfer syntax unknown)")
    if len(ds) == 0:
        raise DicomReadError(f"{name}: DICOM file holds no data set")
    if not stop_before_pixels:
        _check_complete(ds, name, len(buffer))
    ds.filename = path or name
    return ds


def read_dataset_bytes(
    data: bytes, name: str = "<bytes>", *, stop_before_pixels: bool = False
) -> Dataset:
    """Parse Part 10 bytes into a dataset, raising :class:`DicomReadError` on any defect."""
    return _parse(data, name, stop_before_pixels=stop_before_pixels, defer=False, path=None)


def stored_element(ds: Dataset, tag: int) -> DataElement | RawDataElement | None:
    """The element as stored - raw, and deferred values left unread - like
    ``ds.get_item(tag, keep_deferred=True)`` but without pydicom converting the int to a Tag
    on every call: signing and verifying walk every element of every file several times,
    and that conversion was about 2 ms of a 7 MB file's 18 ms of CPU."""
    return ds._dict.get(tag)


def source_view(ds: Dataset) -> memoryview | None:
    """The whole source file of a dataset read by radguard, for zero-copy access to values
    (``RawDataElement.value_tell`` offsets index into it); None for other datasets."""
    buffer = getattr(ds, "buffer", None)
    return buffer.view if isinstance(buffer, _StrictReader) else None


def _check_complete(ds: Dataset, name: str, size: int) -> None:
    """Top-level defined-length values must hold as many bytes as their header says
    (deferred values are not read, so their extent is checked against the file size)."""
    for tag in ds.keys():
        raw = stored_element(ds, tag)
        if raw is None or not getattr(raw, "is_raw", False):
            continue
        length = raw.length
        if length == 0xFFFFFFFF:
            continue
        short = (raw.value is None and raw.value_tell + length > size) or (
            raw.value is not None and len(raw.value) < length)
        if short:
            raise DicomReadError(f"{name}: truncated DICOM file (element {tag} is cut short)")


def read_dataset(path: str | os.PathLike[str], *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM Part 10 file strictly. Raises :class:`DicomReadError` on any defect."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size >= DEFER_SIZE:
                # large files are mapped, not copied: pixel data is hashed and spliced in
                # place. radguard replaces files by rename, so a mapped file never shrinks.
                buffer: bytes | mmap.mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            else:
                buffer = fh.read()
    except IsADirectoryError as exc:
        raise DicomReadError(f"{p}: is a folder, not a DICOM file") from exc
    except FileNotFoundError as exc:
        raise DicomReadError(f"{p}: no such file") from exc
    except (OSError, ValueError) as exc:
        raise DicomReadError(f"{p}: cannot read ({getattr(exc, 'strerror', None) or exc})") \
            from exc
    return _parse(buffer, str(p), stop_before_pixels=stop_before_pixels,
                  defer=isinstance(buffer, mmap.mmap), path=str(p))


def encode_dataset(ds: Dataset, transfer_syntax: str | None = None) -> bytes:
    """Encode a dataset as Part 10 bytes, in its own transfer syntax unless one is given.

    Elements that were never accessed are written from their original bytes, so an
    untouched element survives a read/write cycle bit for bit.
    """
    _ensure_file_meta(ds, transfer_syntax)
    buf = io.BytesIO()
    try:
        detached_view(ds).save_as(buf, enforce_file_format=True)
    except Exception as exc:
        raise DicomReadError(f"cannot encode dataset ({_one_line(exc)})") from exc
    return buf.getvalue()


def write_dataset(
    ds: Dataset,
    path: str | os.PathLike[str],
    transfer_syntax: str | None = None,
    *,
    durable: bool = True,
) -> None:
    """Write a dataset to ``path`` atomically (temporary file, [fsync,] rename)."""
    data = encode_dataset(ds, transfer_syntax)
    with atomic_writer(path, durable=durable) as fh:
        fh.write(data)


def _ensure_file_meta(ds: Dataset, transfer_syntax: str | None) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if transfer_syntax is not None:
        meta.TransferSyntaxUID = UID(transfer_syntax)
    elif "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if ds.original_encoding == (None, None):
        # a dataset built in memory: its encoding is the one it is about to be written in
        tsyntax = UID(meta.TransferSyntaxUID)
        ds.set_original_encoding(tsyntax.is_implicit_VR, tsyntax.is_little_endian)
    for src, dst in (("SOPClassUID", "MediaStorageSOPClassUID"),
                     ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        value = peek(ds, src)
        if value:
            setattr(meta, dst, value)


def detached_view(ds: Dataset) -> Dataset:
    """A dataset sharing ``ds``'s elements but with its own element table.

    pydicom converts raw elements in place whenever something reads them (the writer and
    the pixel decoder included); working on a view keeps the caller's raw bytes intact.
    """
    view = Dataset({tag: stored_element(ds, tag) for tag in ds.keys()})
    view.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    view.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    view.preamble = getattr(ds, "preamble", None)
    # where deferred values live, so the view can read them too
    for attr in ("filename", "buffer", "fileobj_type", "timestamp"):
        setattr(view, attr, getattr(ds, attr, None))
    return view


#: one little-endian binary number: pydicom would return the same int, slower
_SINGLE_BINARY = {vr: struct.Struct(f"<{code}") for vr, code in
                  (("US", "H"), ("SS", "h"), ("UL", "I"), ("SL", "i"))}


@functools.lru_cache(maxsize=1024)
def _keyword_tag(keyword: str) -> int | None:
    return tag_for_keyword(keyword)


def peek(ds: Dataset, keyword: str | int, default: Any = None) -> Any:  # noqa: ANN401
    """An element's value without converting it in place.

    ``ds.Keyword`` makes pydicom replace the raw element by a decoded one, and a decoded
    value is re-encoded on writing (trailing spaces dropped, numbers reformatted...), which
    would change bytes a signature covers. Read-only consumers use this instead.
    """
    tag = keyword if isinstance(keyword, int) else _keyword_tag(keyword)
    if tag is None:
        return default
    elem = ds._dict.get(tag)  # one lookup; ``in`` + ``get_item`` made two Tag objects
    if elem is None:
        return default
    if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
        elem = ds.get_item(tag)  # a deferred value: pydicom reads it from the file
    if isinstance(elem, RawDataElement):
        fmt = _SINGLE_BINARY.get(elem.VR)  # type: ignore[arg-type]
        if (fmt is not None and elem.value is not None and len(elem.value) == fmt.size
                and ds.original_encoding[1] is True):
            return fmt.unpack(elem.value)[0]  # what pydicom gives for one binary number
        try:
            elem = convert_raw_data_element(elem, encoding=ds._character_set, ds=ds)
        except (NotImplementedError, ValueError, TypeError, KeyError, OverflowError) as exc:
            name = getattr(ds, "filename", None) or "dataset"
            raise DicomReadError(f"{name}: element {Tag(tag)} cannot be decoded "
                                 f"({_one_line(exc)})") from exc
    return elem.value


def iter_dicom_paths(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Yield files named directly, and every regular file under named folders (sorted)."""
    for entry in paths:
        p = Path(entry)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            yield p


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__
