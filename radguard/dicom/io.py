"""Read and write DICOM Part 10 files with clear errors and atomic writes.

pydicom is lenient: a file cut short in the middle of its pixel data is returned as a
dataset with a short element, and a file cut inside a sequence only produces a warning.
radguard is a security tool, so reading is strict: any short read is a truncated file.

Hostile input is bounded before it costs memory: a Deflated Explicit VR Little Endian data
set is inflated only up to :attr:`DecodeLimits.max_inflated_bytes` (counted in a first pass
that keeps nothing), and sequences nested deeper than :data:`MAX_NESTING` levels are
refused, since pydicom and every walk over a data set follow nesting by recursion (a
RecursionError that pydicom reports as a read error, or that escapes later).
"""

from __future__ import annotations

import functools
import io
import mmap
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from radguard.dicom import fastread
from radguard.dicom.limits import decode_budget, decode_limits
from radguard.errors import DicomReadError
from radguard.fileio import atomic_writer

__all__ = [
    "MAX_NESTING",
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

#: Deepest sequence nesting radguard reads. Real objects nest a few levels (structured
#: reports about ten); pydicom reads nesting by recursion and gives up near 200 levels with
#: a misleading "no tag to read", and signature and scan walks recurse too.
MAX_NESTING = 64


def _parse(buffer: bytes | mmap.mmap, name: str, *, stop_before_pixels: bool,
           defer: bool, path: str | None) -> Dataset:
    if len(buffer) < 132 or buffer[128:132] != b"DICM":
        raise DicomReadError(
            f"{name}: not a DICOM Part 10 file (no 'DICM' marker after the 128-byte preamble)"
        )
    extent, inflated = _file_meta_extent(buffer), False
    if extent is not None and extent[1] == DeflatedExplicitVRLittleEndian:
        # pydicom would inflate without any bound: inflate here, bounded - before taking
        # the parse lock, since the decode budget may make this wait for other parses
        buffer, inflated = _inflate(buffer, extent[0], name), True
    fp = _StrictReader(buffer, path)
    ds: Dataset | None
    # warning capture is process-global, so parses that rely on it take turns
    with _PARSE_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if inflated:
                ds = _read_inflated(fp, stop_before_pixels)
            else:
                # ordinary Explicit VR Little Endian files: the lean parser (the same
                # Dataset, about a third less time); anything else, or anything it
                # declines: pydicom
                ds = None if stop_before_pixels else fastread.parse(
                    fp, buffer, len(buffer), DEFER_SIZE if defer else None)
                if ds is None:
                    fp.seek(0)
                    fp.short_read = False
                    ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels,
                                         defer_size=DEFER_SIZE if defer else None)
        except DicomReadError:
            raise
        except InvalidDicomError as exc:
            raise DicomReadError(f"{name}: not a valid DICOM file ({_one_line(exc)})") from exc
        except RecursionError as exc:
            raise _too_deep_error(name) from exc
        except (EOFError, OSError) as exc:
            _raise_if_too_deep(buffer, name, exc, inflated=inflated)
            raise DicomReadError(f"{name}: truncated DICOM file ({_one_line(exc)})") from exc
        except Exception as exc:  # pydicom raises many types on garbage input
            _raise_if_too_deep(buffer, name, exc, inflated=inflated)
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
    _check_nesting(ds, name)
    ds.filename = path or name
    return ds


# -- deflated data sets ---------------------------------------------------------------------

#: inflated bytes per step, and compressed bytes handed to zlib per step: zlib keeps a copy
#: of the input it has not consumed yet, so a step never copies more than one input slice
_INFLATE_CHUNK, _INFLATE_INPUT = 1 << 20, 64 << 10


def _file_meta_extent(buffer: bytes | mmap.mmap) -> tuple[int, str] | None:
    """(offset of the first data-set byte, transfer syntax) from the File Meta Information
    (Explicit VR Little Endian, group 0002); None when it cannot be walked."""
    pos, size, syntax = 132, len(buffer), None
    while pos + 8 <= size:
        group, element, vr, length = struct.unpack_from("<HH2sH", buffer, pos)
        if group != 0x0002:
            break
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
            if pos + 12 > size:
                return None
            length = struct.unpack_from("<L", buffer, pos + 8)[0]
            pos += 12
        else:
            pos += 8
        if length == 0xFFFFFFFF or pos + length > size:
            return None
        if element == 0x0010:
            syntax = bytes(buffer[pos:pos + length]).rstrip(b"\0 ").decode("ascii", "replace")
        pos += length
    return (pos, syntax) if syntax else None


def _inflate_chunks(data: memoryview, name: str) -> Iterator[bytes]:
    """The raw deflate stream ``data`` (PS3.5 A.5) inflated, at most 1 MiB at a time.

    The input goes to zlib in fixed 64 KiB slices: given the whole stream, zlib would copy
    the rest of it (``unconsumed_tail``) for every MiB of output - quadratic in the size of
    the data set. Slices make the work linear."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    at, size = 0, len(data)
    pending: bytes | memoryview = b""
    try:
        while not inflater.eof:
            if not pending and at < size:
                pending, at = data[at:at + _INFLATE_INPUT], at + _INFLATE_INPUT
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            pending = inflater.unconsumed_tail
            if chunk:
                yield chunk
            elif not pending and at >= size:
                break  # all input consumed and nothing more comes out
    except zlib.error as exc:
        raise DicomReadError(f"{name}: malformed deflated data set ({exc})") from exc
    if not inflater.eof:
        raise DicomReadError(f"{name}: truncated DICOM file (the deflated data set ends "
                             "early)")


def _inflate(buffer: bytes | mmap.mmap, start: int, name: str) -> mmap.mmap:
    """The file with its data set inflated, in an anonymous map (one copy, no joining of
    chunks). A first pass only counts, so a data set over the limit is refused without
    ever being held; the map then takes its size from the decode budget, for as long as
    the caller's :func:`~radguard.dicom.limits.decode_scope` lasts (the parsed data set
    keeps the map)."""
    limit = decode_limits().max_inflated_bytes
    data = memoryview(buffer)[start:]
    total = 0
    for chunk in _inflate_chunks(data, name):
        total += len(chunk)
        if total > limit:
            raise DicomReadError(f"{name}: the deflated data set inflates to more than "
                                 f"{limit:,} bytes, more than this system accepts")
    with decode_budget().reserve(total):
        out = mmap.mmap(-1, start + total)
        out[:start] = buffer[:start]
        at = start
        for chunk in _inflate_chunks(data, name):
            out[at:at + len(chunk)] = chunk
            at += len(chunk)
    return out


def _read_inflated(fp: _StrictReader, stop_before_pixels: bool) -> Dataset:
    """What ``pydicom.dcmread`` builds for a deflated file, read from the already inflated
    data set (pydicom 3.0's own steps, minus its unbounded inflate)."""
    from pydicom.dataset import FileDataset
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filereader import read_dataset as read_elements

    fp.seek(0)
    binary = cast(BinaryIO, fp)  # pydicom says BinaryIO, and calls only read, seek and tell
    preamble = read_preamble(binary, False)
    file_meta = _read_file_meta_info(binary)
    stop = (lambda tag, vr, length: tag in _PIXEL_TAGS) if stop_before_pixels else None
    dataset = read_elements(binary, False, True, stop_when=stop, defer_size=DEFER_SIZE)
    ds = FileDataset(fp, dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})


# -- nesting depth --------------------------------------------------------------------------

_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_DATA_SET, _SEQUENCE, _FRAGMENTS = 0, 1, 2


def _too_deep_error(name: str) -> DicomReadError:
    return DicomReadError(f"{name}: sequences nested deeper than {MAX_NESTING} levels "
                          "(refused: no real object nests so deep)")


#: one region being walked: what it holds, where it ends (None: at its delimiter), implicit VR
_Frame = tuple[int, int | None, bool]


def _nests_deeper(data: bytes | bytearray | memoryview | mmap.mmap, pos: int, end: int, *,
                  sequence: bool, implicit: bool, little: bool, allowed: int) -> bool:
    """Whether the encoded elements in ``data[pos:end]`` - the items of one sequence value
    (``sequence``), or a data set - nest sequences more than ``allowed`` levels deep.

    Iterative (a stack, no recursion) and over-inclusive: every value that could be read as
    a sequence is followed (SQ, UN, any implicit-VR value starting with an item). A region
    that is not well formed is skipped when its end is known, and otherwise ends the scan;
    the parser reports malformed data itself."""
    head = struct.Struct("<HHL" if little else ">HHL")
    explicit_head = struct.Struct("<HH2sH" if little else ">HH2sH")
    long_length = struct.Struct("<L" if little else ">L")
    item = head.pack(0xFFFE, 0xE000, 0)[:4]
    stack: list[_Frame] = [(_SEQUENCE if sequence else _DATA_SET, end, implicit)]
    level = 1 if sequence else 0
    size = min(len(data), end)
    while stack:
        kind, frame_end, imp = stack[-1]
        if frame_end is not None and pos >= frame_end:
            level -= stack.pop()[0] == _SEQUENCE
            continue
        tag = length = -1
        if pos + 8 <= size:
            group, element, length = head.unpack_from(data, pos)
            tag = group << 16 | element
        push: _Frame | None = None
        if tag < 0:
            pass  # runs past the end: malformed
        elif kind != _DATA_SET:  # the items of a sequence, or the fragments of pixel data
            if tag == _SEQ_END:
                pos += 8
                level -= stack.pop()[0] == _SEQUENCE
                continue
            if tag == _ITEM and kind == _SEQUENCE:
                pos += 8
                push = (_DATA_SET, None if length == _UNDEFINED else pos + length, imp)
            elif tag == _ITEM and length != _UNDEFINED:
                pos += 8 + length
                continue
        elif tag == _ITEM_END:
            pos += 8
            stack.pop()
            continue
        else:
            vr = None
            at = pos + 8
            if not imp:
                vr, length = explicit_head.unpack_from(data, pos)[2:]
                if vr in _LONG_VRS:
                    length = long_length.unpack_from(data, pos + 8)[0] if pos + 12 <= size \
                        else -1
                    at = pos + 12
            if length == _UNDEFINED:
                pos = at
                if tag in _PIXEL_TAGS or vr in (b"OB", b"OW"):
                    push = (_FRAGMENTS, None, imp)
                else:  # SQ, an implicit-VR sequence or UN (implicit VR inside)
                    push = (_SEQUENCE, None, imp or vr == b"UN")
            elif length >= 0:
                pos = at + length
                if ((imp or vr in (b"SQ", b"UN")) and length >= 8
                        and bytes(data[at:at + 4]) == item
                        and level + 1 + length // 16 > allowed):
                    push = (_SEQUENCE, at + length, imp or vr == b"UN")
                    pos = at
                else:
                    continue
        if push is None:  # malformed: resume after the innermost region of known length
            resume = None
            while stack and resume is None:
                resume = stack.pop()[1]
            if resume is None:
                return False
            pos = resume
            level = sum(f[0] == _SEQUENCE for f in stack)
            continue
        stack.append(push)
        if push[0] == _SEQUENCE:
            level += 1
            if level > allowed:
                return True
    return False


def _check_nesting(ds: Dataset, name: str) -> None:
    """Refuse a parsed data set whose sequences nest deeper than :data:`MAX_NESTING`.

    Sequences pydicom has already read are walked as objects; those still raw (defined
    length: pydicom reads them on first access) are scanned in their bytes, and only when
    their length leaves room for enough levels (each level takes at least 16 bytes), so an
    ordinary file costs one pass over its top-level elements."""
    source = source_view(ds)
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    while stack:
        current, level = stack.pop()
        for elem in current._dict.values():
            if isinstance(elem, RawDataElement):
                vr = elem.VR
                if not (vr in ("SQ", "UN") or (vr is None and elem.is_implicit_VR)):
                    continue
                length = elem.length
                if length == _UNDEFINED or level + 1 + length // 16 <= MAX_NESTING:
                    continue
                value: bytes | memoryview | None = elem.value
                if value is None and source is not None and current is ds:
                    value = source[elem.value_tell:elem.value_tell + length]
                if value is None or bytes(value[:4]) not in (b"\xfe\xff\x00\xe0",
                                                             b"\xff\xfe\xe0\x00"):
                    continue
                implicit = elem.is_implicit_VR or vr == "UN"
                if _nests_deeper(value, 0, len(value), sequence=True, implicit=implicit,
                                 little=elem.is_little_endian, allowed=MAX_NESTING - level):
                    raise _too_deep_error(name)
            elif elem.VR == "SQ" and elem.value:
                if level + 1 > MAX_NESTING:
                    raise _too_deep_error(name)
                stack.extend((item, level + 1) for item in elem.value)


def _raise_if_too_deep(buffer: bytes | mmap.mmap, name: str, exc: Exception, *,
                       inflated: bool) -> None:
    """After a failed parse: if the data set nests too deep, say so (pydicom gives up with
    an unrelated-looking read error when its recursion runs out). ``inflated``: ``buffer``
    holds a deflated file's data set already inflated."""
    meta = _file_meta_extent(buffer)
    if meta is None:
        return
    syntax = UID(ExplicitVRLittleEndian if inflated else meta[1])
    if not syntax.is_transfer_syntax or syntax.is_deflated:
        return
    if _nests_deeper(buffer, meta[0], len(buffer), sequence=False,
                     implicit=syntax.is_implicit_VR, little=syntax.is_little_endian,
                     allowed=MAX_NESTING):
        raise _too_deep_error(name) from exc


def read_dataset_bytes(
    data: bytes, name: str = "<bytes>", *, stop_before_pixels: bool = False,
    defer: bool = False,
) -> Dataset:
    """Parse Part 10 bytes into a dataset, raising :class:`DicomReadError` on any defect.
    ``defer``: values over 1 MiB stay in ``data`` until read (a parse that only checks
    and indexes then copies nothing large)."""
    return _parse(data, name, stop_before_pixels=stop_before_pixels, defer=defer, path=None)


def stored_element(ds: Dataset, tag: int) -> DataElement | RawDataElement | None:
    """The element as stored - raw, and deferred values left unread - like
    ``ds.get_item(tag, keep_deferred=True)`` but without pydicom converting the int to a Tag
    on every call: signing and verifying walk every element of every file several times,
    and that conversion was about 2 ms of a 7 MB file's 18 ms of CPU."""
    # pydicom types the keys BaseTag, an int with int's hash: a plain int finds the same entry
    return ds._dict.get(tag)  # type: ignore[call-overload]


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
        if not isinstance(raw, RawDataElement):
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
    view = Dataset({tag: ds._dict[tag] for tag in ds.keys()})
    view.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    implicit, little = ds.original_encoding
    view.set_original_encoding(implicit, little, ds.original_character_set)
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


def peek(ds: Dataset, keyword: str | int, default: Any = None) -> Any:
    """An element's value without converting it in place.

    ``ds.Keyword`` makes pydicom replace the raw element by a decoded one, and a decoded
    value is re-encoded on writing (trailing spaces dropped, numbers reformatted...), which
    would change bytes a signature covers. Read-only consumers use this instead.
    """
    tag = keyword if isinstance(keyword, int) else _keyword_tag(keyword)
    if tag is None:
        return default
    # one lookup (``in`` + ``get_item`` made two Tag objects); an int finds a BaseTag key
    elem = ds._dict.get(tag)  # type: ignore[call-overload]
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
