"""Decoded pixels as numpy arrays, with the stored bit depth made explicit.

Compressed transfer syntaxes (JPEG 2000, JPEG-LS, JPEG lossless/lossy, RLE) are decoded by
the pylibjpeg plugins and pyjpegls; a decoder failure becomes a :class:`DicomReadError`.

Nothing is decoded before the header's numbers pass :mod:`radguard.dicom.limits` (frame
size, total decoded bytes) and, for compressed data, before the encapsulation is seen to
fit them (a believable compression ratio): a decoder allocates what the header declares
before it finds the stream too short. The decoded array takes its size from the decode
budget - until the caller's :func:`~radguard.dicom.limits.decode_scope` ends, when the
caller keeps it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from radguard.dicom.io import detached_view, peek, source_view, stored_element
from radguard.dicom.limits import check_ratio, decode_budget, decoded_size
from radguard.errors import DicomReadError

__all__ = ["PixelInfo", "decoded_bytes", "pixel_array", "pixel_info", "validate_pixel_data"]


@dataclass(frozen=True)
class PixelInfo:
    """The Image Pixel Module facts a consumer needs to interpret the array correctly."""

    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    high_bit: int
    signed: bool
    photometric: str

    @property
    def min_value(self) -> int:
        """Smallest value the stored bits can hold."""
        return -(1 << (self.bits_stored - 1)) if self.signed else 0

    @property
    def max_value(self) -> int:
        """Largest value the stored bits can hold."""
        return (1 << (self.bits_stored - 1)) - 1 if self.signed else (1 << self.bits_stored) - 1


def pixel_info(ds: Dataset) -> PixelInfo:
    """Read the Image Pixel Module; raises :class:`DicomReadError` if it is incomplete."""
    name = getattr(ds, "filename", None) or "dataset"
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DicomReadError(f"{name}: has no pixel data")
    try:
        bits_allocated = int(peek(ds, "BitsAllocated"))
        return PixelInfo(
            rows=int(peek(ds, "Rows")),
            columns=int(peek(ds, "Columns")),
            frames=int(peek(ds, "NumberOfFrames", 1) or 1),
            samples_per_pixel=int(peek(ds, "SamplesPerPixel", 1)),
            bits_allocated=bits_allocated,
            bits_stored=int(peek(ds, "BitsStored", bits_allocated)),
            high_bit=int(peek(ds, "HighBit", bits_allocated - 1)),
            signed=int(peek(ds, "PixelRepresentation", 0)) == 1,
            photometric=str(peek(ds, "PhotometricInterpretation", "MONOCHROME2")).strip(),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomReadError(f"{name}: incomplete Image Pixel Module ({exc})") from exc


def decoded_bytes(ds: Dataset, info: PixelInfo | None = None) -> int:
    """Bytes the decoded pixel array will take; a :class:`DicomReadError` when the header's
    numbers are impossible or exceed the decode limits in force (nothing is decoded)."""
    info = info or pixel_info(ds)
    return decoded_size(getattr(ds, "filename", None) or "dataset", info.rows, info.columns,
                        info.frames, info.samples_per_pixel, info.bits_allocated)


def validate_pixel_data(ds: Dataset, *, decode_compressed: bool = True) -> PixelInfo:
    """Check that the pixel data can be displayed, as cheaply as that can be known.

    The header's frame size must be within the decode limits. Native pixel data must hold
    exactly the bytes the Image Pixel Module implies (odd totals padded by one), and may be
    larger than ``max_decoded_bytes``: it is as large as what was received and cannot
    expand (decoding it for the checks meets the limit: "too large to check").
    Encapsulated (compressed) pixel data must decode within the limits and hold a
    believable amount of data, and is decoded, since only a decoder can tell that a JPEG
    stream is corrupt (``decode_compressed=False`` skips the decoding, for a receiver that
    must answer quickly and checks the image later).
    """
    info = pixel_info(ds)
    name = getattr(ds, "filename", None) or "dataset"
    elem = stored_element(ds, 0x7FE00010) if 0x7FE00010 in ds else None
    if elem is None or _encapsulated(elem):
        if decode_compressed:
            pixel_array(ds)  # checks the encapsulation before decoding
        elif elem is not None:
            _check_encapsulated(ds, elem, decoded_bytes(ds, info), name)
        return info
    decoded_size(name, info.rows, info.columns, info.frames, info.samples_per_pixel,
                 info.bits_allocated, check_total=False)
    bits = info.rows * info.columns * info.frames * info.samples_per_pixel * info.bits_allocated
    if info.photometric == "YBR_FULL_422" and info.samples_per_pixel == 3:
        bits = bits * 2 // 3  # two luma samples share one Cb and one Cr (PS3.3 C.7.6.3.1.2)
    expected = (bits + 7) // 8
    actual = elem.length if isinstance(elem, RawDataElement) else len(elem.value or b"")
    if actual not in (expected, expected + (expected % 2)):
        raise DicomReadError(
            f"{name}: pixel data holds {actual} bytes, the header implies {expected}"
        )
    return info


def pixel_array(ds: Dataset) -> np.ndarray:
    """Decode the pixel data to stored values (no rescale, no VOI), as numpy.

    Shape is (rows, cols), (frames, rows, cols) or with a trailing samples axis; dtype is
    the smallest integer type holding ``BitsAllocated`` with the module's signedness.
    ``ds`` itself is not modified.
    """
    info = pixel_info(ds)
    decoded = decoded_bytes(ds, info)  # before anything is allocated
    name = getattr(ds, "filename", None) or "dataset"
    elem = stored_element(ds, 0x7FE00010)
    encoded = 0
    if elem is not None and _encapsulated(elem):
        encoded = _check_encapsulated(ds, elem, decoded, name)
    with decode_budget().reserve(decoded + encoded):
        native = _native_array(ds, info)
        if native is not None:
            return native
        # decode through a view with its own element dict: pydicom replaces raw elements by
        # converted ones on access, and the caller's original bytes must stay untouched
        # (signature verification and byte-faithful re-writing depend on them)
        try:
            arr = detached_view(ds).pixel_array
        except Exception as exc:
            text = " ".join(str(exc).split())[:200]
            raise DicomReadError(f"{name}: cannot decode pixel data ({text})") from exc
    expected = info.rows * info.columns * info.frames * info.samples_per_pixel
    if arr.size != expected:
        raise DicomReadError(
            f"{name}: pixel data holds {arr.size} values, header says {expected}"
        )
    return np.asarray(arr)


_ITEM_HEAD = struct.Struct("<HHL")


def _encapsulated(elem: object) -> bool:
    """Whether pixel data is encapsulated (undefined length: a sequence of fragments)."""
    return getattr(elem, "length", None) == 0xFFFFFFFF or bool(
        getattr(elem, "is_undefined_length", False))


def _check_encapsulated(ds: Dataset, elem: object, decoded: int, name: str) -> int:
    """Walk the item headers of encapsulated pixel data (no pixel byte is read): the
    fragments must hold enough bytes for the decoded size
    (:func:`radguard.dicom.limits.check_ratio`). How many fragments hold the frames is
    left to the decoder (a file that does not follow PS3.5 A.4 to the letter is refused
    only if it cannot be decoded; the decoded size is bounded anyway). Returns the encoded
    size; a :class:`DicomReadError` for data that cannot be walked."""
    value = getattr(elem, "value", None)
    start: int | None
    start, in_file = 0, value is None
    if in_file:  # deferred: the item headers are read where the file is mapped
        value, start = source_view(ds), getattr(elem, "value_tell", None)
        if value is None or start is None:
            return 0  # not read by radguard: the decoder is the only check left
    if not isinstance(value, bytes | bytearray | memoryview):
        return 0
    items, encoded, pos, size = 0, 0, start, len(value)
    while True:
        if pos == size and not in_file:
            break  # a value read into memory stops before the sequence delimiter
        if pos + 8 > size:
            raise DicomReadError(f"{name}: encapsulated pixel data ends without its "
                                 "sequence delimiter")
        group, element, length = _ITEM_HEAD.unpack_from(value, pos)
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFFFFFF \
                or pos + 8 + length > size:
            raise DicomReadError(f"{name}: malformed encapsulated pixel data (item "
                                 f"({group:04X},{element:04X}) at byte {pos - start})")
        encoded += length if items else 0  # the first item is the Basic Offset Table
        items += 1
        pos += 8 + length
    check_ratio(name, decoded, encoded)
    return encoded


#: uncompressed little-endian syntaxes: the stored values are the bytes themselves
_NATIVE_LITTLE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _native_array(ds: Dataset, info: PixelInfo) -> np.ndarray | None:
    """The common case without pydicom's decoder machinery (about 1 ms of a 512 px frame):
    native little-endian grey pixel data of 8, 16 or 32 bits allocated, values kept to
    ``BitsStored`` as pydicom does (unsigned masked, signed sign-extended). None for
    anything else (compressed, big endian, colour, 1-bit, float, a length that does not fit
    the header), which then goes through pydicom and its errors."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    if (syntax not in _NATIVE_LITTLE or info.samples_per_pixel != 1
            or info.bits_allocated not in (8, 16, 32)
            or not 0 < info.bits_stored <= info.bits_allocated or "FloatPixelData" in ds):
        return None
    elem = stored_element(ds, 0x7FE00010)
    value = getattr(elem, "value", None)
    length = getattr(elem, "length", None)
    if value is None and getattr(elem, "is_raw", False) and length not in (None, 0xFFFFFFFF):
        source = source_view(ds)  # a deferred value: read it where the file is mapped
        tell = getattr(elem, "value_tell", None)
        if source is not None and tell is not None and tell + length <= len(source):
            value = source[tell : tell + length]
    if not isinstance(value, bytes | bytearray | memoryview) or info.rows < 1 or info.columns < 1:
        return None
    count = info.rows * info.columns * info.frames
    width = info.bits_allocated // 8
    if len(value) not in (count * width, count * width + 1):
        return None  # pydicom's message says what is wrong
    kind = "i" if info.signed else "u"
    arr = np.frombuffer(value, dtype=f"<{kind}{width}", count=count).astype(
        f"{kind}{width}")  # a writable copy in native byte order, as pydicom returns
    shape = (info.frames, info.rows, info.columns) if info.frames > 1 else (info.rows,
                                                                            info.columns)
    arr = arr.reshape(shape)
    spare = info.bits_allocated - info.bits_stored
    if spare and info.signed:
        arr <<= spare
        arr >>= spare  # arithmetic shift: the sign bit of BitsStored spreads up
    elif spare:
        arr &= arr.dtype.type((1 << info.bits_stored) - 1)
    return arr
