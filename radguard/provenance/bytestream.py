"""The PS3.15 / PS3.3 C.12.1.1.3.1.1 byte stream that a DICOM digital signature covers.

The signed elements are encoded in dataset order in Explicit VR Little Endian (the MAC
Calculation Transfer Syntax), with these rules (matching dcmtk's ``writeSignatureFormat``
byte for byte, which the interoperability tests check):

* ordinary elements: tag, VR, (2 reserved bytes,) length, value -- as on the wire;
* sequences: tag, ``SQ``, two reserved bytes, *no length*; each item as its item tag with
  *no length* followed by its elements; no item delimiters; a sequence delimitation tag
  (FFFE,E0DD) with *no length* at the end;
* encapsulated pixel data: like a sequence (tag, ``OB``, 00 00), each fragment (the basic
  offset table included) as an item tag with no length followed by its bytes, then
  (FFFE,E0DD);
* never signed at the top level: group lengths, Length to End, groups below 0008, group
  FFFA, MAC Parameters (4FFE,0001), Data Set Trailing Padding (FFFC,FFFC), delimiters, and
  any element that is or contains a UN element (its meaning is unknown, so its encoding is
  not canonical).

Values are taken from the bytes that were read whenever pydicom still holds them raw, so a
value is hashed exactly as it was signed, whatever pydicom's value conversion would do.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.hooks import _private_vr_for_tag  # the rule pydicom itself applies
from pydicom.tag import BaseTag, Tag

from radguard.dicom.io import stored_element
from radguard.dicom.splice import explicit_header, header_size
from radguard.provenance import ripemd160
from radguard.provenance.ripemd160 import HashObject

__all__ = [
    "EXCLUDED_FROM_ITEM_STREAM",
    "MAC_TRANSFER_SYNTAX",
    "HashObject",
    "MacStream",
    "element_vr",
    "is_signable_element",
    "is_signable_tag",
    "signable_tags",
]

MAC_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1"  # Explicit VR Little Endian

_ITEM_TAG = struct.pack("<HH", 0xFFFE, 0xE000)
_SEQ_DELIM_TAG = struct.pack("<HH", 0xFFFE, 0xE0DD)
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

_BYTE_VRS = frozenset({"OB", "UN"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                       "TM", "UC", "UI", "UR", "UT"})
_WORD_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}

#: Signature item elements that are not part of the MAC (PS3.15 C.12.1.1.3.1.2).
EXCLUDED_FROM_ITEM_STREAM = frozenset(
    {0x04000115, 0x04000120, 0x04000305, 0x04000310}  # certificate, signature, timestamp
)


def is_signable_tag(tag: int) -> bool:
    """PS3.15 rules on which tags can ever be part of a signature."""
    group, elem = tag >> 16, tag & 0xFFFF
    if elem == 0 or group < 0x0008 or group == 0xFFFA:
        return False
    if tag in (0x00080001, 0x4FFE0001, 0xFFFCFFFC, _ITEM_DELIM, _SEQ_DELIM):
        return False
    return True


def element_vr(
    ds: Dataset, tag: int, is_implicit: bool, elem: DataElement | RawDataElement | None = None
) -> str:
    """The VR this element has in Explicit VR Little Endian, resolving implicit VR and the
    ambiguous dictionary VRs the same way pydicom (and dcmtk) write them."""
    if elem is None:
        elem = stored_element(ds, tag)
        if elem is None:
            raise KeyError(tag)
    vr = elem.VR
    if vr is not None and " or " not in vr:
        return str(vr)
    if vr is None:
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            btag = BaseTag(tag)
            if btag.is_private:
                return str(_private_vr_for_tag(ds, btag))
            return "UL" if (tag & 0xFFFF) == 0 else "UN"
        if " or " not in vr:
            return vr
    if tag == 0x7FE00010 or (tag & 0xFF00FFFF) == 0x60003000:
        undefined = getattr(elem, "length", 0) == _UNDEFINED or getattr(
            elem, "is_undefined_length", False
        )
        if undefined:
            return "OB"
        if is_implicit:
            return "OW"  # PS3.5 A.1: native pixel data in implicit VR is OW
        return "OW" if int(ds.get("BitsAllocated", 16)) > 8 else "OB"
    converted = _converted(ds, tag, is_little_endian=True)
    fixed = correct_ambiguous_vr_element(converted, ds, True)
    return str(fixed.VR).split(" or ")[0]


def is_signable_element(ds: Dataset, tag: int, is_implicit: bool) -> bool:
    """Signable tag, not UN, and (for sequences) no UN anywhere inside."""
    return is_signable_tag(tag) and not _contains_un(ds, tag, is_implicit)


def signable_tags(ds: Dataset, is_implicit: bool) -> list[int]:
    """Top-level tags of ``ds`` that a signature can cover, in dataset order."""
    return [t for t in _sorted_tags(ds) if is_signable_element(ds, t, is_implicit)]


def _sorted_tags(ds: Dataset) -> list[int]:
    return sorted(int(t) for t in ds.keys())


def _contains_un(ds: Dataset, tag: int, is_implicit: bool) -> bool:
    elem = stored_element(ds, tag)
    vr = element_vr(ds, tag, is_implicit, elem)
    if vr == "UN":
        return True
    if vr != "SQ":
        return False
    if (isinstance(elem, RawDataElement) and not is_implicit and elem.value is not None
            and b"UN\0\0" not in elem.value):
        return False  # explicit VR: a UN element inside would show its VR bytes
    for item in _sequence_items(ds, tag):
        for sub in _sorted_tags(item):
            if _contains_un(item, sub, is_implicit):
                return True
    return False


def _converted(ds: Dataset, tag: int, *, is_little_endian: bool) -> DataElement:
    """The element as a DataElement, without replacing the raw element stored in ``ds``."""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return convert_raw_data_element(elem, encoding=ds._character_set, ds=ds)
    return elem


def _sequence_items(ds: Dataset, tag: int) -> list[Dataset]:
    value = _converted(ds, tag, is_little_endian=True).value
    return list(value or [])


class MacStream:
    """Feeds the PS3.15 MAC byte stream of a dataset into a hash object.

    Small headers are buffered and large values are passed straight to the hash, so a 7 MB
    pixel data element is hashed without being copied.
    """

    def __init__(
        self,
        hasher: HashObject,
        *,
        is_implicit: bool,
        is_little_endian: bool,
        source: memoryview | None = None,
        tap: Callable[[bytes], None] | None = None,
        hold: tuple[int, int] | None = None,
    ) -> None:
        self._hash = hasher
        self._source = source  # the file, for values pydicom left unread (deferred)
        self._implicit = is_implicit
        self._little = is_little_endian
        self._buf = bytearray()
        self._tap = tap  # receives every byte too (tests compare with dcmtk's dump)
        self._hold = hold if source is not None else None
        self._held: tuple[int, int] | None = None

    # -- holding back the tail of the file ----------------------------------------------
    def take_held(self) -> tuple[int, int] | None:
        """The source range left unhashed, if the stream so far ends with it.

        With ``hold=(start, end)``, a run of file bytes that ends exactly at ``end`` is
        hashed only up to ``start``; the rest is held back. A writer that copies those
        bytes anyway passes them to :meth:`feed` as it goes, so a large pixel data value
        is read once for both (and hashed while it is still in the CPU cache). Whoever
        takes the range must feed all of it, in order, before anything else is added.
        """
        held, self._held = self._held, None
        return held

    def feed(self, data: bytes | memoryview) -> None:
        """Hash the next piece of a range obtained from :meth:`take_held`."""
        self._hash.update(data)
        if self._tap is not None:
            self._tap(bytes(data))

    def _release(self) -> None:
        if self._held is not None and self._source is not None:
            start, end = self._held
            self._held = None
            self.feed(self._source[start:end])

    # -- output -------------------------------------------------------------------------
    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self._release()
        if len(data) >= 65536:
            self._flush()
            self._hash.update(data)
            if self._tap is not None:
                self._tap(bytes(data))
        else:
            self._buf += data

    def _flush(self) -> None:
        if self._buf:
            self._hash.update(self._buf)
            if self._tap is not None:
                self._tap(bytes(self._buf))
            self._buf = bytearray()

    def digest(self) -> bytes:
        """Finish and return the hash of everything written."""
        self._flush()
        self._release()
        return self._hash.digest()

    def fork(self) -> MacStream:
        """An independent stream that goes on from everything written so far: signatures
        over the same elements hash them once and differ only in their own item."""
        self._flush()
        self._release()
        return MacStream(self._hash.copy(), is_implicit=self._implicit,
                         is_little_endian=self._little, source=self._source, tap=self._tap)

    # -- encoding ----------------------------------------------------------------------
    def add_elements(self, ds: Dataset, tags: Iterable[int]) -> None:
        """Append the given top-level elements of ``ds`` (present ones, dataset order).

        In an Explicit VR Little Endian file an ordinary element's bytes *are* its MAC
        encoding, so runs of such elements are hashed straight from the file in one piece.
        """
        wanted = set(int(t) for t in tags)
        run: list[int] = []  # [start, end) of the pending run of file bytes
        for tag in _sorted_tags(ds):
            if tag not in wanted:
                continue
            span = self._file_span(ds, tag)
            if span is not None and run and run[1] == span[0]:
                run[1] = span[1]
                continue
            self._flush_run(run)
            if span is not None:
                run = list(span)
            else:
                run = []
                self._element(ds, tag)
        self._flush_run(run)

    def _file_span(self, ds: Dataset, tag: int) -> tuple[int, int] | None:
        """Where an element's bytes sit in the source file, if they equal its MAC encoding."""
        if self._source is None or self._implicit or not self._little:
            return None
        elem = stored_element(ds, tag)
        if not isinstance(elem, RawDataElement):
            return None
        vr, length, tell = elem.VR, elem.length, elem.value_tell
        if vr is None or vr in ("SQ", "UN") or " or " in vr or length == _UNDEFINED or length % 2:
            return None
        head = header_size(vr)
        start = tell - head
        if start < 0 or tell + length > len(self._source):
            return None
        if head == 12 and bytes(self._source[tell - 6 : tell - 4]) != b"\0\0":
            return None  # non-zero reserved bytes: not the canonical encoding
        return start, tell + length

    def _flush_run(self, run: list[int]) -> None:
        if not run or self._source is None:
            return
        start, end = run
        if self._hold is not None and end == self._hold[1] and end > max(start, self._hold[0]):
            held_from = max(start, self._hold[0])
            if held_from > start:
                self._write(self._source[start:held_from])
            self._flush()
            self._held = (held_from, end)
            return
        self._write(self._source[start:end])

    def add_signature_item(self, item: Dataset) -> None:
        """Append the signature item's own elements, minus certificate/signature/timestamp."""
        for t in _sorted_tags(item):
            if t in EXCLUDED_FROM_ITEM_STREAM or not is_signable_tag(t):
                continue
            self._element(item, t)

    def _element(self, ds: Dataset, tag: int) -> None:
        elem = stored_element(ds, tag)
        vr = element_vr(ds, tag, self._implicit, elem)
        if vr == "SQ":
            self._sequence(ds, tag)
            return
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            if self._source is not None and elem.length != _UNDEFINED:
                # a view where pydicom says bytes: only _raw_value reads it, as a buffer
                elem = elem._replace(value=self._source[  # type: ignore[arg-type]
                    elem.value_tell : elem.value_tell + elem.length])
            else:
                elem = ds.get_item(tag)  # let pydicom read the deferred value
        raw_value = self._raw_value(elem, vr)
        undefined = (
            elem.length == _UNDEFINED
            if isinstance(elem, RawDataElement)
            else bool(getattr(elem, "is_undefined_length", False))
        )
        if undefined:
            value = raw_value if raw_value is not None else _converted_bytes(ds, tag)
            self._encapsulated(tag, vr, value)
            return
        if raw_value is None:
            self._write(_encode_converted(ds, tag, vr))
            return
        if len(raw_value) % 2:
            pad = b"\0" if vr in ("UI", "OB", "UN") else b" "
            raw_value = bytes(raw_value) + pad
        self._header(tag, vr, len(raw_value))
        self._write(memoryview(raw_value))

    def _raw_value(self, elem: DataElement | RawDataElement | None, vr: str) -> bytes | None:
        """Original value bytes in little-endian order, if pydicom still holds them raw.

        Big-endian OB/UN/text values need no swap and OW/OF/OL/OD/OV values are swapped
        word by word here; numbers (US, FL, AT...) go through pydicom's conversion instead.
        """
        if not isinstance(elem, RawDataElement):
            return None
        if elem.value is None:
            return b""
        if self._little or vr in _BYTE_VRS or vr in _TEXT_VRS:
            return elem.value
        width = _WORD_VRS.get(vr)
        if width is None or len(elem.value) % width:
            return None
        return np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()

    def _header(self, tag: int, vr: str, length: int) -> None:
        self._write(explicit_header(tag, vr, length))

    def _sequence(self, ds: Dataset, tag: int) -> None:
        self._write(struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0")
        for item in _sequence_items(ds, tag):
            self._write(_ITEM_TAG)
            for sub in _sorted_tags(item):
                self._element(item, sub)
        self._write(_SEQ_DELIM_TAG)

    def _encapsulated(self, tag: int, vr: str, value: bytes) -> None:
        self._write(struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii") + b"\0\0")
        view = memoryview(value)
        pos, end = 0, len(view)
        while pos + 8 <= end:
            group, element, length = struct.unpack_from("<HHL", view, pos)
            item_tag = (group << 16) | element
            pos += 8
            if item_tag == _SEQ_DELIM:
                break
            if item_tag != 0xFFFEE000 or length == _UNDEFINED or pos + length > end:
                raise ValueError(f"malformed encapsulated value in {Tag(tag)}")
            self._write(_ITEM_TAG)
            self._write(view[pos : pos + length])
            pos += length
        self._write(_SEQ_DELIM_TAG)


def _encode_converted(ds: Dataset, tag: int, vr: str) -> bytes:
    """Encode a non-raw (or big-endian) element in Explicit VR Little Endian via pydicom."""
    elem = _converted(ds, tag, is_little_endian=True)
    if elem.VR != vr:
        elem = DataElement(elem.tag, vr, elem.value, is_undefined_length=elem.is_undefined_length)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem, ds._character_set)
    return fp.getvalue()


def _converted_bytes(ds: Dataset, tag: int) -> bytes:
    value = _converted(ds, tag, is_little_endian=True).value
    return bytes(value or b"")


def new_hasher(mac_algorithm: str) -> HashObject:
    """A hashlib object for a DICOM MAC Algorithm (0400,0015) defined term (RIPEMD-160 from
    a pure-Python fallback where this OpenSSL build lacks it)."""
    name = _HASHLIB_NAMES.get(mac_algorithm.strip().upper())
    if name is None:
        raise ValueError(f"unknown MAC algorithm {mac_algorithm!r}")
    if name == "ripemd160":
        return ripemd160.new()
    return hashlib.new(name)


_HASHLIB_NAMES = {
    "SHA256": "sha256",
    "SHA384": "sha384",
    "SHA512": "sha512",
    "SHA1": "sha1",
    "MD5": "md5",
    "RIPEMD160": "ripemd160",
}
