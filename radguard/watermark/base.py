"""What every watermark format version shares: errors, the identity payload, the split of a
frame into tag rows and compact image, and the outcome of a check."""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from radguard.errors import RadguardError
from radguard.watermark import rhombus
from radguard.watermark.bits import bits_to_bytes, bytes_to_bits
from radguard.watermark.fragile import TagLayout
from radguard.watermark.keys import WatermarkKey

__all__ = ["LAYOUTS", "FrameCheck", "Identity", "UnauthenticatedPayload", "WatermarkError",
           "location_plans", "max_threshold", "uid_digest"]

#: (block size, tag rows) in order of preference: strongest tags and finest blocks first.
LAYOUTS = ((8, 2), (16, 1), (8, 1), (32, 1), (64, 1))
MIN_WIDTH = 64  # narrowest frame that can carry a watermark (the v1 anchor is 64 bits wide)
MIN_HEIGHT = 8
_MAX_IDENTITY = 200
# tag bits that must verify before a layout found by trial counts as a watermark: tiny edge
# blocks carry 1-2 bit tags, and a few of them pass on any image by chance
MIN_EVIDENCE_BITS = 64


class WatermarkError(RadguardError):
    """No watermark, wrong key, image too small or flat, or a payload that does not decode."""


class UnauthenticatedPayload(WatermarkError):
    """The payload decoded but its MAC fails: pixels (or the payload) were changed."""

    def __init__(self, message: str, identity: Identity) -> None:
        super().__init__(message)
        self.identity = identity


@dataclass(frozen=True)
class Identity:
    """What the payload says about the image's origin."""

    signer: str = ""  # device / technologist identity (e.g. certificate subject)
    uid_digest: str = ""  # first 8 bytes of SHA-256(SOP Instance UID), hex
    acquired: str = ""  # acquisition date-time, DICOM DT text (up to 26 characters)
    frame: int = 0

    def encode(self) -> bytes:
        """Length-prefixed fields."""
        signer = self.signer.encode("utf-8")[:_MAX_IDENTITY]
        acquired = self.acquired.encode("ascii", "replace")[:26]
        uid = bytes.fromhex(self.uid_digest) if self.uid_digest else b""
        return (bytes([len(signer)]) + signer + bytes([len(uid)]) + uid
                + bytes([len(acquired)]) + acquired + struct.pack("<I", self.frame))

    @classmethod
    def decode(cls, data: bytes) -> tuple[Identity, int]:
        """Parse; returns the identity and the number of bytes used."""
        pos = 0

        def take() -> bytes:
            nonlocal pos
            n = data[pos]
            value = data[pos + 1 : pos + 1 + n]
            pos += 1 + n
            return value

        signer = take().decode("utf-8", "replace")
        uid = take().hex()
        acquired = take().decode("ascii", "replace")
        (frame,) = struct.unpack_from("<I", data, pos)
        return cls(signer, uid, acquired, frame), pos + 4


def inflate_location_map(blob: bytes, n_bits: int) -> np.ndarray:
    """The location map's first ``n_bits`` bits from its zlib stream, inflating no more than
    they need: the stream is read before any MAC is checked, so an image crafted by whoever
    holds one marked image must not become a decompression bomb."""
    need = (n_bits + 7) // 8
    try:
        inflater = zlib.decompressobj()
        data = inflater.decompress(blob, need)
    except zlib.error as exc:
        raise WatermarkError("watermark location map is corrupt") from exc
    if len(data) < need:
        raise WatermarkError("watermark location map is corrupt (too short)")
    return bytes_to_bits(data)[:n_bits]


def location_plans(blob: bytes, declared: tuple[int, int], zone: np.ndarray
                   ) -> list[rhombus.PassPlan]:
    """The two passes' location maps for the payload ``zone``, from their zlib stream.

    Their lengths come from header fields that the key check does not cover, so anyone
    holding one marked image can set them: each is bounded by the pixels its pass visits in
    the zone (a location map lists some of them) before anything is inflated."""
    limits = rhombus.pass_sizes(zone)
    if any(n > limit for n, limit in zip(declared, limits, strict=True)):
        raise WatermarkError(
            f"watermark header declares location maps of {declared[0]} + {declared[1]} "
            f"bits, more than the frame holds ({limits[0]} + {limits[1]}): forged or damaged")
    bits = inflate_location_map(blob, declared[0] + declared[1])
    return [rhombus.PassPlan(bits[: declared[0]].astype(bool)),
            rhombus.PassPlan(bits[declared[0] :].astype(bool))]


def uid_digest(sop_instance_uid: str) -> str:
    """The 8-byte SOP Instance UID digest carried in the payload (hex)."""
    return hashlib.sha256(sop_instance_uid.encode("ascii")).digest()[:8].hex()


def max_threshold(lo: int, hi: int, bits_stored: int) -> int:
    """Largest T keeping PSNR >= 70 dB on 12-16 bit data (MSE <= T^2 + 1); 8 below 12 bits
    (8-10 bit data has little room; the smallest T that fits is always tried first)."""
    if bits_stored < 12:
        return 8
    peak = hi - lo
    return max(1, int(math.floor(math.sqrt(max(0.0, peak**2 / 1e7 - 1.0)))))


def key_check(key: WatermarkKey, head_start: bytes) -> int:
    """16 bits of a MAC over the header's first bytes: tells a wrong key from damage."""
    return int.from_bytes(hmac.new(key.mac, b"key-check" + head_start, hashlib.sha256)
                          .digest()[:2], "little")


def lsbs(values: np.ndarray) -> np.ndarray:
    """Least significant bits as uint8 0/1."""
    return (values & 1).astype(np.uint8)


@dataclass
class Split:
    """The frame seen as tag rows + compact image (header zone + payload zone + anchor)."""

    layout: TagLayout
    tag_rows: np.ndarray  # bool per frame row
    compact: np.ndarray  # int32 copy of the non-tag rows


def split(frame: np.ndarray, block: int, rows: int) -> Split:
    """Cut ``frame`` by the tag layout (block, rows)."""
    layout = TagLayout(frame.shape[0], frame.shape[1], block, rows)
    mask = layout.tag_row_mask()
    return Split(layout, mask, frame[~mask, :].astype(np.int32))


def header_probe(frame: np.ndarray, magic: bytes) -> tuple[int, int] | None:
    """(block, tag rows) announced by the first LSBs of the frame when they start with a
    format's ``magic``; None otherwise."""
    probe = bits_to_bytes(lsbs(frame[0, : 8 * (len(magic) + 2)]))
    if probe[: len(magic)] != magic:
        return None
    return probe[len(magic)], probe[len(magic) + 1]


def refuse_small(frame: np.ndarray) -> None:
    """No format can mark (or find a mark in) a frame under MIN_WIDTH x MIN_HEIGHT."""
    height, width = frame.shape
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise WatermarkError(f"image too small to carry a radguard watermark ({width}x"
                             f"{height}; at least {MIN_WIDTH}x{MIN_HEIGHT})")


@dataclass
class FrameCheck:
    """Outcome of checking one frame."""

    regions: list[list[int]] = field(default_factory=list)
    failed_blocks: int = 0
    total_blocks: int = 0
    identity: Identity | None = None
    payload_ok: bool = False
    problem: str = ""
    params: dict[str, int] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        """No block changed and the payload decodes and authenticates."""
        return self.failed_blocks == 0 and self.payload_ok
