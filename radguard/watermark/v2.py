"""Watermark format version 2 (magic ``RGW2``), the one radguard writes.

Layout of a marked frame (tag rows and compact image as in version 1):

* **tag rows**: the last rows of every block carry its Wegman-Carter tag (:mod:`.wctags`),
  bound to the frame's random 64-bit nonce;
* **header zone** (first rows of the compact image), in the LSBs: the clear header (magic,
  block size, tag rows, threshold ``T``, nonce, lengths, a 16-bit key check), the **frame
  MAC** (128 bits: HMAC-SHA256 over every stored value of the marked frame with these 128
  LSBs cleared), the identity (encrypted), a MAC over the original frame, and the compressed
  location map;
* **payload zone**: the reversible embedding (:mod:`.rhombus`) of the original LSBs of the
  header zone, the anchor and the tag rows, encrypted with a keystream bound to the nonce;
* **anchor** (the last 128 pixels of the compact image): magic, layout, nonce and a key
  check, so the tags can be checked when an edit destroyed the header (the frame MAC sits
  at a fixed place, so the tags know which LSBs it took without reading the header).

``check`` reads the header, the tags and the frame MAC from the stored values as they are:
no reversible extraction, one hash of the frame and a vectorised hash of the blocks. A frame
whose MAC verifies is exactly as marked, so ``restore`` (which also checks the MAC over the
original) will give back the original bit for bit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from radguard.watermark import rhombus
from radguard.watermark.base import (
    LAYOUTS,
    FrameCheck,
    Identity,
    Split,
    UnauthenticatedPayload,
    WatermarkError,
    header_probe,
    key_check,
    location_plans,
    lsbs,
)
from radguard.watermark.bits import bits_to_bytes, bytes_to_bits, keystream
from radguard.watermark.fragile import TagLayout, regions_from_grid
from radguard.watermark.keys import WatermarkKey
from radguard.watermark.wctags import BlockTags

VERSION = 2
MAGIC = b"RGW2"
# magic, block, rows, T, nonce | payload bits, location-map bits (2 passes), LM bytes,
# header-zone rows, key check, identity bytes
HEAD = struct.Struct("<4sBBHQIIIIHHH")
ANCHOR_MAGIC = b"RGWb"
ANCHOR_BITS = 128  # magic, block, rows, nonce, key check
_MAC_BITS = 128  # the frame MAC, in the header zone right after the fixed header


def _anchor_body(key: WatermarkKey, layout: TagLayout, nonce: bytes) -> bytes:
    body = ANCHOR_MAGIC + bytes([layout.block, layout.rows]) + nonce
    check = hmac.new(key.mac, b"anchor-v2" + body + struct.pack("<II", layout.height,
                                                                 layout.width), hashlib.sha256)
    return body + check.digest()[:2]


@dataclass(frozen=True)
class _Geometry:
    """Where the parts of a version 2 mark sit in a frame of a given layout."""

    layout: TagLayout
    tag_rows: np.ndarray  # bool per frame row
    compact_rows: np.ndarray  # frame row of each compact-image row
    anchor_rows: int  # compact rows holding the anchor (at the bottom)
    anchor_px: tuple[np.ndarray, np.ndarray]  # frame (rows, cols) of the anchor pixels
    mac_px: tuple[np.ndarray, np.ndarray]  # frame (rows, cols) of the frame MAC's pixels

    @classmethod
    def of(cls, height: int, width: int, block: int, rows: int) -> _Geometry:
        layout = TagLayout(height, width, block, rows)
        tag_rows = layout.tag_row_mask()
        compact_rows = np.nonzero(~tag_rows)[0]
        anchor = compact_rows.size * width - ANCHOR_BITS + np.arange(ANCHOR_BITS)
        mac = HEAD.size * 8 + np.arange(_MAC_BITS)  # a fixed place: no header parse needed
        if mac[-1] >= anchor[0]:
            raise WatermarkError("image too small to hold the watermark anchor")
        return cls(layout, tag_rows, compact_rows, -(-ANCHOR_BITS // width),
                   (compact_rows[anchor // width], anchor % width),
                   (compact_rows[mac // width], mac % width))

    def header_bits(self, frame: np.ndarray, n_bits: int) -> np.ndarray:
        """The first ``n_bits`` LSBs of the compact image."""
        width = frame.shape[1]
        rows = self.compact_rows[: -(-n_bits // width)]
        return lsbs(frame[rows, :]).ravel()[:n_bits]


def _mac_input(frame: np.ndarray, geo: _Geometry) -> np.ndarray:
    """The frame's values mod 2^16 (uint16), the frame MAC's own LSBs cleared: what the frame
    MAC covers, and, with the tag rows' LSBs cleared too, what the block tags hash."""
    work = np.asarray(frame).astype("<u2")  # integer casts keep the low 16 bits
    work[geo.mac_px] &= np.uint16(0xFFFE)
    return work


def _mac128(key: WatermarkKey, label: bytes, context: bytes, values: np.ndarray) -> bytes:
    """HMAC-SHA256, truncated to 128 bits, over ``values`` (little-endian uint16).
    SHA-256 rather than BLAKE2b: with the SHA extensions of current x86 and ARM server CPUs
    it hashes a frame in less than half the time (0.4 vs 1.0 ms per 512 KB here)."""
    h = hmac.new(key.mac, label + context, hashlib.sha256)
    h.update(np.ascontiguousarray(values, "<u2").data)
    return h.digest()[:16]


def _frame_mac(key: WatermarkKey, work: np.ndarray, frame_index: int) -> bytes:
    """The frame MAC over :func:`_mac_input`."""
    return _mac128(key, b"rgw2-frame/",
                   struct.pack("<III", work.shape[0], work.shape[1], frame_index), work)


def _original_mac(key: WatermarkKey, head_start: bytes, id_bytes: bytes, original: np.ndarray
                  ) -> bytes:
    return _mac128(key, b"rgw2-original/", head_start + id_bytes,
                   np.asarray(original).astype("<u2"))


def need_bits(id_bytes: bytes, n_tag: int, width: int) -> int:
    """Payload bits an embedding at this size needs (estimate, before the header size)."""
    return 8 * (len(id_bytes) + 32 + HEAD.size) + n_tag + width + ANCHOR_BITS


def try_embed(original: np.ndarray, sp: Split, key: WatermarkKey, id_bytes: bytes,
              threshold: int, lo: int, hi: int, n_tag: int, frame_index: int
              ) -> np.ndarray | None:
    """The marked frame, or None when the payload does not fit at this threshold."""
    compact = sp.compact
    height, width = original.shape
    layout = sp.layout
    try:
        geo = _Geometry.of(height, width, layout.block, layout.rows)
    except WatermarkError:
        return None
    n_compact = compact.shape[0]
    nonce = secrets.token_bytes(8)
    head_start = struct.pack("<4sBBH", MAGIC, layout.block, layout.rows, threshold) + nonce
    mac_original = _original_mac(key, head_start, id_bytes, original)
    enc_id = bytes(a ^ b for a, b in zip(id_bytes, keystream(key.encrypt, head_start + b"|id",
                                                             len(id_bytes)), strict=True))
    flat = compact.ravel()
    anchor_lsbs = lsbs(flat[-ANCHOR_BITS:])
    tag_lsbs = lsbs(original[sp.tag_rows, :]).ravel()
    stream = bytes_to_bits(keystream(key.encrypt, head_start, -(-(flat.size + n_tag) // 8)))
    reserved = 1
    while reserved < n_compact - geo.anchor_rows - 2:
        zone = compact[reserved : n_compact - geo.anchor_rows]
        plain = np.concatenate([lsbs(compact[:reserved]).ravel(), anchor_lsbs, tag_lsbs])
        marked_zone, plans, used = rhombus.embed(zone, plain ^ stream[: plain.size], threshold,
                                                 lo, hi)
        if used < plain.size:
            return None
        lm = np.concatenate([p.location_map for p in plans]).astype(np.uint8)
        lm_blob = zlib.compress(bits_to_bytes(lm), 9)
        head = head_start + struct.pack("<IIIIHHH", plain.size, len(plans[0].location_map),
                                        len(plans[1].location_map), len(lm_blob), reserved,
                                        key_check(key, head_start), len(id_bytes))
        # the frame MAC's place stays zero until the tags are written
        header = bytes_to_bits(head + bytes(_MAC_BITS // 8) + enc_id + mac_original + lm_blob)
        if header.size > reserved * width:
            reserved = -(-header.size // width)
            continue
        out = compact.copy()
        out[reserved : n_compact - geo.anchor_rows] = marked_zone
        out_flat = out.reshape(-1)  # a view
        out_flat[: header.size] = (out_flat[: header.size] & ~1) | header
        anchor = bytes_to_bits(_anchor_body(key, layout, nonce)).astype(np.int32)
        out_flat[-ANCHOR_BITS:] = (out_flat[-ANCHOR_BITS:] & ~1) | anchor
        marked = original.astype(np.int32)
        marked[~sp.tag_rows, :] = out
        marked = BlockTags(layout, key.tag, nonce, frame_index).write(marked, geo.mac_px)
        mac = bytes_to_bits(_frame_mac(key, _mac_input(marked, geo), frame_index)).astype(
            np.int32)
        marked[geo.mac_px] = (marked[geo.mac_px] & ~1) | mac
        return marked
    return None


@dataclass(frozen=True)
class Header:
    """A parsed version 2 header."""

    geo: _Geometry
    threshold: int
    head_start: bytes  # magic, block, rows, T, nonce: what the keystreams and MACs bind to
    payload_bits: int
    lm_bits: tuple[int, int]
    reserved: int
    key_check: int
    enc_id: bytes
    mac_original: bytes
    lm_blob: bytes

    @property
    def nonce(self) -> bytes:
        """The frame's random 64-bit nonce."""
        return self.head_start[8:16]


def read_header(frame: np.ndarray) -> Header | None:
    """The clear version 2 header, or None when it is missing or damaged beyond parsing."""
    try:
        return _parse_header(frame)
    except (struct.error, ValueError, IndexError, WatermarkError):
        return None


def _parse_header(frame: np.ndarray) -> Header | None:
    layout = header_probe(frame, MAGIC)
    if layout not in LAYOUTS:
        return None
    block, rows = layout
    height, width = frame.shape
    geo = _Geometry.of(height, width, block, rows)
    fields = HEAD.unpack(bits_to_bytes(geo.header_bits(frame, HEAD.size * 8)))
    _m, _b, _r, threshold, _n, payload_bits, lm0, lm1, lm_bytes, reserved, kc, id_len = fields
    total = 8 * (HEAD.size + _MAC_BITS // 8 + id_len + 16 + lm_bytes)
    if reserved >= geo.compact_rows.size - geo.anchor_rows - 2 or total > reserved * width:
        return None
    raw = bits_to_bytes(geo.header_bits(frame, total))
    blob = raw[HEAD.size + _MAC_BITS // 8 :]
    return Header(geo, threshold, raw[:16], payload_bits, (lm0, lm1), reserved, kc,
                  blob[:id_len], blob[id_len : id_len + 16], blob[id_len + 16 :])


def read_anchor(frame: np.ndarray, key: WatermarkKey) -> tuple[_Geometry, bytes, bool] | None:
    """(geometry, nonce, key proven) from the anchor, for the layout whose anchor it is."""
    height, width = frame.shape
    for block, rows in LAYOUTS:
        try:
            geo = _Geometry.of(height, width, block, rows)
        except WatermarkError:
            continue
        body = bits_to_bytes(lsbs(frame[geo.anchor_px]))
        if body[:4] == ANCHOR_MAGIC and body[4] == block and body[5] == rows:
            nonce = body[6:14]
            return geo, nonce, body == _anchor_body(key, geo.layout, nonce)
    return None


def _identity(key: WatermarkKey, header: Header) -> tuple[Identity, bytes]:
    """The decrypted identity and its encoded bytes (as the MAC over the original saw them)."""
    plain = bytes(a ^ b for a, b in zip(header.enc_id, keystream(
        key.encrypt, header.head_start + b"|id", len(header.enc_id)), strict=True))
    try:
        identity, used = Identity.decode(plain)
    except (IndexError, struct.error, ValueError) as exc:
        raise WatermarkError("watermark identity does not decode") from exc
    if used != len(plain):
        raise WatermarkError("watermark identity does not decode")
    return identity, plain


def check(frame: np.ndarray, key: WatermarkKey, frame_index: int) -> FrameCheck | None:
    """Localise changed blocks and read the identity; None when the frame carries no version
    2 header or anchor (it may still be a version 1 mark)."""
    header = read_header(frame)
    key_ok = header is not None and header.key_check == key_check(key, header.head_start)
    anchor = None if key_ok else read_anchor(frame, key)
    if key_ok and header is not None:
        geo, nonce = header.geo, header.nonce
    elif anchor is not None and anchor[2]:
        geo, nonce = anchor[0], anchor[1]
    elif header is not None or anchor is not None:
        raise WatermarkError("watermark key does not match this image")
    else:
        return None
    work = _mac_input(frame, geo)  # one copy for both hashes
    expected, stored = _frame_mac(key, work, frame_index), lsbs(frame[geo.mac_px])
    failed = BlockTags(geo.layout, key.tag, nonce, frame_index).failures(frame, work)
    mac_ok = hmac.compare_digest(expected, bits_to_bytes(stored))
    if not mac_ok and not failed.any():
        # every block holds but the MAC does not: its own pixels changed (their LSBs are
        # outside the tags), and since the rest is as marked, the bits that differ from the
        # MAC of the rest say which
        moved = bytes_to_bits(expected) != stored
        b = geo.layout.block
        failed[geo.mac_px[0][moved] // b, geo.mac_px[1][moved] // b] = True
    result = FrameCheck(regions=regions_from_grid(failed, geo.layout),
                        failed_blocks=int(np.count_nonzero(failed)),
                        total_blocks=int(failed.size),
                        params={"version": VERSION, "block": geo.layout.block,
                                "tag_rows": geo.layout.rows})
    if not key_ok:
        result.problem = "watermark header damaged: the payload cannot be read"
        return result
    assert header is not None  # key_ok
    result.params["threshold"] = header.threshold
    try:
        result.identity = _identity(key, header)[0]
    except WatermarkError as exc:
        result.problem = str(exc)
        return result
    result.payload_ok = mac_ok
    if not mac_ok:  # readable, but not vouched for
        result.problem = ("watermark does not authenticate: stored values were changed after "
                          "marking (the frame MAC fails)")
    return result


def extract(frame: np.ndarray, key: WatermarkKey, lo: int, hi: int
            ) -> tuple[np.ndarray, Identity] | None:
    """The original frame (its MAC checked) and the identity; None without a version 2
    header."""
    header = read_header(frame)
    if header is None:
        return None
    if header.key_check != key_check(key, header.head_start):
        raise WatermarkError("watermark key does not match this image")
    identity, id_bytes = _identity(key, header)
    geo = header.geo
    width = frame.shape[1]
    compact = frame[geo.compact_rows, :].astype(np.int32)
    n_compact = compact.shape[0]
    payload_zone = compact[header.reserved : n_compact - geo.anchor_rows]
    plans = location_plans(header.lm_blob, header.lm_bits, payload_zone)
    try:
        zone, carried = rhombus.extract(payload_zone, plans, header.threshold, lo, hi)
    except ValueError as exc:
        raise WatermarkError(f"watermark payload cannot be extracted ({exc})") from exc
    n_header = header.reserved * width
    n_tag = int(np.count_nonzero(geo.tag_rows)) * width
    if header.payload_bits != n_header + ANCHOR_BITS + n_tag or carried.size < \
            header.payload_bits:
        raise WatermarkError("watermark payload is truncated")
    saved = (carried[: header.payload_bits] ^ bytes_to_bits(keystream(
        key.encrypt, header.head_start, -(-header.payload_bits // 8)))[: header.payload_bits]
             ).astype(np.int32)
    compact[header.reserved : n_compact - geo.anchor_rows] = zone
    flat = compact.reshape(-1)
    flat[:n_header] = (flat[:n_header] & ~1) | saved[:n_header]
    flat[-ANCHOR_BITS:] = (flat[-ANCHOR_BITS:] & ~1) | saved[n_header : n_header + ANCHOR_BITS]
    original = frame.astype(np.int32)
    original[geo.compact_rows, :] = compact
    tag_part = original[geo.tag_rows, :]
    original[geo.tag_rows, :] = (tag_part & ~1) | saved[n_header + ANCHOR_BITS :].reshape(
        tag_part.shape)
    if not hmac.compare_digest(_original_mac(key, header.head_start, id_bytes,
                                             original), header.mac_original):
        raise UnauthenticatedPayload(
            "watermark payload does not authenticate: the image was modified (the restored "
            "pixels do not match the embedded MAC)", identity)
    return original, identity
