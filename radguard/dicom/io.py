"""Read and write DICOM Part 10 files with clear errors and atomic writes.

pydicom is lenient: a file cut short in the middle of its pixel data is returned as a
dataset with a short element, and a file cut inside a sequence only produces a warning.
radguard is a security tool, so reading is strict: any short read is a truncated file.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian

from radguard.errors import DicomReadError
from radguard.fileio import atomic_writer

__all__ = [
    "detached_view",
    "encode_dataset",
    "iter_dicom_paths",
    "peek",
    "read_dataset",
    "read_dataset_bytes",
    "write_dataset",
]


class _ShortReadDetector(io.BytesIO):
    """A BytesIO that remembers whether any read returned some but not all bytes asked for.

    pydicom reads element headers and values with exact sizes; a partial read means the
    data ended inside an element. A read returning nothing is the normal end of data.
    """

    short_read: bool = False

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        if size is not None and size > 0 and 0 < len(data) < size:
            self.short_read = True
        return data


def read_dataset_bytes(
    data: bytes, name: str = "<bytes>", *, stop_before_pixels: bool = False
) -> Dataset:
    """Parse Part 10 bytes into a dataset, raising :class:`DicomReadError` on any defect."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DicomReadError(
            f"{name}: not a DICOM Part 10 file (no 'DICM' marker after the 128-byte preamble)"
        )
    fp = _ShortReadDetector(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError as exc:
            raise DicomReadError(f"{name}: not a valid DICOM file ({_one_line(exc)})") from exc
        except (EOFError, OSError) as exc:
            raise DicomReadError(f"{name}: truncated DICOM file ({_one_line(exc)})") from exc
        except Exception as exc:  # pydicom raises many types on garbage input
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
        _check_complete(ds, name)
    ds.filename = name
    return ds


def _check_complete(ds: Dataset, name: str) -> None:
    """Top-level defined-length values must hold as many bytes as their header says."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if raw is None or not getattr(raw, "is_raw", False):
            continue
        length = raw.length
        if length != 0xFFFFFFFF and raw.value is not None and len(raw.value) < length:
            raise DicomReadError(f"{name}: truncated DICOM file (element {tag} is cut short)")


def read_dataset(path: str | os.PathLike[str], *, stop_before_pixels: bool = False) -> Dataset:
    """Read a DICOM Part 10 file strictly. Raises :class:`DicomReadError` on any defect."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError as exc:
        raise DicomReadError(f"{p}: is a folder, not a DICOM file") from exc
    except FileNotFoundError as exc:
        raise DicomReadError(f"{p}: no such file") from exc
    except OSError as exc:
        raise DicomReadError(f"{p}: cannot read ({exc.strerror})") from exc
    return read_dataset_bytes(data, str(p), stop_before_pixels=stop_before_pixels)


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
    ds: Dataset, path: str | os.PathLike[str], transfer_syntax: str | None = None
) -> None:
    """Write a dataset to ``path`` atomically (temporary file, fsync, rename)."""
    data = encode_dataset(ds, transfer_syntax)
    with atomic_writer(path) as fh:
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
    view = Dataset({tag: ds.get_item(tag) for tag in ds.keys()})
    view.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    view.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    view.preamble = getattr(ds, "preamble", None)
    return view


def peek(ds: Dataset, keyword: str | int, default: Any = None) -> Any:  # noqa: ANN401
    """An element's value without converting it in place.

    ``ds.Keyword`` makes pydicom replace the raw element by a decoded one, and a decoded
    value is re-encoded on writing (trailing spaces dropped, numbers reformatted...), which
    would change bytes a signature covers. Read-only consumers use this instead.
    """
    tag = keyword if isinstance(keyword, int) else tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return default
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        elem = convert_raw_data_element(elem, encoding=ds._character_set, ds=ds)
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
