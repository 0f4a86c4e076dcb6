"""Watermark format version 1 (magic ``RGW1``): read for images marked before version 2,
and written only on request (``embed_frame(..., version=1)``, for compatibility tests).

Differences from version 2 (:mod:`.v2`): the block tags are one keyed BLAKE2s per block
(:mod:`.fragile`, a Python loop over blocks), bound to the block's position but not to the
image, so a block copied from another image of the same size marked with the same key
passes; the identity and the MAC over the original (HMAC-SHA256 over int32 values) travel in
the reversible payload, so reading them means undoing the reversible embedding.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import zlib
from typing import Any

import numpy as np

from radguard.watermark import rhombus
from radguard.watermark.base import (
    LAYOUTS,
    MIN_EVIDENCE_BITS,
    FrameCheck,
    Identity,
    Split,
    UnauthenticatedPayload,
    WatermarkError,
    header_probe,
    key_check,
    location_plans,
    lsbs,
    split,
)
from radguard.watermark.bits import bits_to_bytes, bytes_to_bits, keystream
from radguard.watermark.fragile import TagLayout, regions_from_grid, tag_failures, write_tags
from radguard.watermark.keys import WatermarkKey

VERSION = 1
MAGIC = b"RGW1"
# magic, block, rows, T, nonce | payload bits, location-map bits (2 passes), LM bytes,
# header-zone rows, key check (16 bits of a MAC: tells a wrong key from a damaged image)
HEAD = struct.Struct("<4sBBHQIIIIHH")
ANCHOR_MAGIC = b"RGWa"
ANCHOR_BITS = 64  # magic, block, tag rows, key check: a second, tiny header in the last row


def _mac(key: WatermarkKey, head: bytes, identity: bytes, frame: np.ndarray) -> bytes:
    h = hmac.new(key.mac, head + identity, hashlib.sha256)
    h.update(np.ascontiguousarray(frame, dtype="<i4").tobytes())
    return h.digest()[:16]


def _anchor_bytes(key: WatermarkKey, layout: TagLayout) -> bytes:
    """The anchor: enough to find the tag layout and prove the key if the header is lost."""
    body = ANCHOR_MAGIC + bytes([layout.block, layout.rows])
    check = hmac.new(key.mac, b"anchor" + body + struct.pack("<II", layout.height,
                                                              layout.width), hashlib.sha256)
    return body + check.digest()[:2]


def read_anchor(frame: np.ndarray, key: WatermarkKey) -> tuple[tuple[int, int], bool] | None:
    """(layout, key proven) from the last non-tag row, for each plausible layout."""
    for block, rows in LAYOUTS:
        layout = TagLayout(frame.shape[0], frame.shape[1], block, rows)
        last = np.nonzero(~layout.tag_row_mask())[0][-1]
        data = bits_to_bytes(lsbs(frame[last, :ANCHOR_BITS]))
        if data[:4] == ANCHOR_MAGIC and data[4] == block and data[5] == rows:
            return (block, rows), data == _anchor_bytes(key, layout)
    return None


def _context(layout: TagLayout, frame_index: int) -> bytes:
    return struct.pack("<4sIIIII", MAGIC, layout.block, layout.rows, layout.height,
                       layout.width, frame_index)


def need_bits(id_bytes: bytes, n_tag: int, width: int) -> int:
    """Payload bits an embedding at this size needs (estimate, before the header size)."""
    return 8 * (len(id_bytes) + 16) + n_tag + 2 * width + ANCHOR_BITS


def try_embed(original: np.ndarray, sp: Split, key: WatermarkKey, id_bytes: bytes,
              threshold: int, lo: int, hi: int, n_tag: int, frame_index: int
              ) -> np.ndarray | None:
    """The marked frame, or None when the payload does not fit at this threshold."""
    compact = sp.compact
    width = compact.shape[1]
    head_start = HEAD.pack(MAGIC, sp.layout.block, sp.layout.rows, threshold,
                           secrets.randbits(64), 0, 0, 0, 0, 0, 0)[:16]
    mac = _mac(key, head_start, id_bytes, original)
    tag_lsbs = lsbs(original[sp.tag_rows, :]).ravel()
    stream = bytes_to_bits(keystream(key.encrypt, head_start,
                                     -(-(8 * (len(id_bytes) + 16) + compact.size + n_tag) // 8)))
    anchor_lsbs = lsbs(compact[-1, :ANCHOR_BITS])
    reserved = 1
    while reserved < compact.shape[0] - 2:
        zone = compact[reserved:-1]
        # payload: identity + MAC, then the original LSBs of the header zone, the anchor
        # and the tag rows
        plain = np.concatenate([bytes_to_bits(id_bytes + mac),
                                lsbs(compact[:reserved]).ravel(), anchor_lsbs, tag_lsbs])
        cipher = plain ^ stream[: len(plain)]
        marked_zone, plans, used = rhombus.embed(zone, cipher, threshold, lo, hi)
        if used < len(cipher):
            return None
        lm = np.concatenate([p.location_map for p in plans]).astype(np.uint8)
        lm_blob = zlib.compress(bits_to_bytes(lm), 9)
        head = head_start + struct.pack("<IIIIHH", len(plain), len(plans[0].location_map),
                                        len(plans[1].location_map), len(lm_blob), reserved,
                                        key_check(key, head_start))
        header = bytes_to_bits(head + lm_blob)
        if len(header) > reserved * width:
            reserved = -(-len(header) // width)
            continue
        header_zone = compact[:reserved].copy().ravel()
        header_zone[: len(header)] = (header_zone[: len(header)] & ~1) | header
        anchor_row = compact[-1].copy()
        anchor = bytes_to_bits(_anchor_bytes(key, sp.layout))
        anchor_row[:ANCHOR_BITS] = (anchor_row[:ANCHOR_BITS] & ~1) | anchor
        marked = original.copy()
        marked[~sp.tag_rows, :] = np.concatenate([header_zone.reshape(reserved, width),
                                                  marked_zone, anchor_row[None, :]])
        return write_tags(marked, sp.layout, key.tag, _context(sp.layout, frame_index))
    return None


Parsed = tuple[tuple[Any, ...], Split, bytes, int]


def read_header(frame: np.ndarray) -> Parsed | None:
    """The clear header, or None when it is missing or damaged beyond parsing."""
    try:
        return _parse_header(frame)
    except (struct.error, ValueError, IndexError):
        return None


def _parse_header(frame: np.ndarray) -> Parsed | None:
    layout = header_probe(frame, MAGIC)
    if layout is None:
        return None
    block, rows = layout
    if block < 2 or rows < 1 or rows >= block:
        return None
    sp = split(frame, block, rows)
    bits = lsbs(sp.compact).ravel()
    head = bits_to_bytes(bits[: HEAD.size * 8])
    fields = HEAD.unpack(head)
    lm_bytes, reserved = fields[8], fields[9]
    width = frame.shape[1]
    head_len = HEAD.size * 8 + 8 * lm_bytes
    if head_len > bits.size or head_len > reserved * width or reserved >= sp.compact.shape[0]:
        return None
    lm_blob = bits_to_bytes(bits[HEAD.size * 8 : head_len])
    return fields, sp, lm_blob + head, reserved


def extract(frame: np.ndarray, key: WatermarkKey, lo: int, hi: int,
            parsed: Parsed | None = None) -> tuple[np.ndarray, Identity, dict[str, int]]:
    """Decode the payload and rebuild the original frame (MAC-checked). ``parsed``: the
    frame's :func:`read_header`, when the caller has it already."""
    parsed = read_header(frame) if parsed is None else parsed
    if parsed is None:
        raise WatermarkError("no radguard watermark found (or its header was destroyed)")
    fields, sp, blob, reserved = parsed
    _magic, block, rows, threshold, _nonce, payload_len, lm0, lm1, lm_bytes, _rows, kc = fields
    head = blob[-HEAD.size:]
    if kc != key_check(key, head[:16]):
        raise WatermarkError("watermark key does not match this image")
    compact = sp.compact
    plans = location_plans(blob[:lm_bytes], (lm0, lm1), compact[reserved:-1])
    try:
        zone, carried = rhombus.extract(compact[reserved:-1], plans, threshold, lo, hi)
    except ValueError as exc:
        raise WatermarkError(f"watermark payload cannot be extracted ({exc})") from exc
    if carried.size < payload_len:
        raise WatermarkError("watermark payload is truncated")
    cipher = carried[:payload_len]
    plain = cipher ^ bytes_to_bits(keystream(key.encrypt, head[:16],
                                             -(-payload_len // 8)))[:payload_len]
    width = frame.shape[1]
    n_tag = int(np.count_nonzero(sp.tag_rows)) * width
    n_saved = reserved * width + ANCHOR_BITS + n_tag
    id_part = bits_to_bytes(plain[: payload_len - n_saved])
    try:
        identity, used = Identity.decode(id_part)
    except (IndexError, struct.error, ValueError) as exc:
        raise WatermarkError("watermark payload does not decode: wrong key?") from exc
    mac = id_part[used : used + 16]
    saved = plain[payload_len - n_saved :].astype(np.int32)
    header_zone = compact[:reserved].copy().ravel()
    header_zone = (header_zone & ~1) | saved[: reserved * width]
    anchor_row = compact[-1].copy()
    start = reserved * width
    anchor_row[:ANCHOR_BITS] = (anchor_row[:ANCHOR_BITS] & ~1) | saved[start : start +
                                                                         ANCHOR_BITS]
    original = frame.astype(np.int32).copy()
    original[~sp.tag_rows, :] = np.concatenate([header_zone.reshape(reserved, width), zone,
                                                anchor_row[None, :]])
    tag_part = original[sp.tag_rows, :]
    original[sp.tag_rows, :] = (tag_part & ~1) | saved[start + ANCHOR_BITS :].reshape(
        tag_part.shape)
    expected = _mac(key, head[:16], id_part[:used], original)
    if not hmac.compare_digest(expected, mac):
        raise UnauthenticatedPayload(
            "watermark payload does not authenticate: the image was modified (the restored "
            "pixels do not match the embedded MAC)", identity)
    params = {"block": block, "tag_rows": rows, "threshold": threshold,
              "header_rows": reserved}
    return original, identity, params


def check(frame: np.ndarray, key: WatermarkKey, lo: int, hi: int, frame_index: int,
          parsed: Parsed | None) -> FrameCheck:
    """Localise changed blocks of a version 1 frame (``parsed``: its header, or None when
    the header is missing or damaged) and decode the payload if it survived."""
    result = FrameCheck()
    key_ok = False
    header_layout: tuple[int, int] | None = None
    if parsed is not None:
        fields = parsed[0]
        header_layout = (int(fields[1]), int(fields[2]))
        key_ok = fields[10] == key_check(key, parsed[2][-HEAD.size:][:16])
    anchor_ok = False
    if not key_ok:
        anchor = read_anchor(frame, key)
        if anchor is not None:
            header_layout, anchor_ok = anchor

    def failures(block: int, rows: int) -> tuple[np.ndarray, TagLayout]:
        layout = TagLayout(frame.shape[0], frame.shape[1], block, rows)
        return tag_failures(frame, layout, key.tag, _context(layout, frame_index)), layout

    # The tags need neither the header nor the payload: if the header is damaged, the
    # layout is the one whose blocks verify (with a wrong key, none do).
    chosen = None
    if header_layout is not None and key_ok:
        failed, layout = failures(*header_layout)
        if failed.mean() < 0.5:
            chosen = (failed, layout)
    if chosen is None:
        tried = [header_layout] if header_layout else []
        tried += [lay for lay in LAYOUTS if lay != header_layout]
        scored = [failures(*lay) for lay in tried if lay[0] < min(frame.shape)]
        best = min(scored, key=lambda item: item[0].mean()) if scored else None
        if best is not None and best[0].mean() < 0.95 and int(
                best[1].tag_bits_per_block()[~best[0]].sum()) >= MIN_EVIDENCE_BITS:
            chosen = best
        elif (key_ok or anchor_ok) and header_layout is not None:
            chosen = failures(*header_layout)  # the key is proven: everything changed
        elif parsed is not None or header_layout is not None:
            raise WatermarkError("watermark key does not match this image")
        else:
            raise WatermarkError("no radguard watermark found with this key (no watermark, "
                                 "a wrong key, or the whole image was replaced)")
    failed, layout = chosen
    result.total_blocks = int(failed.size)
    result.failed_blocks = int(np.count_nonzero(failed))
    result.regions = regions_from_grid(failed, layout)
    result.params = {"version": VERSION, "block": layout.block, "tag_rows": layout.rows}
    if parsed is None or not key_ok:
        result.problem = "watermark header damaged: the payload cannot be read"
        return result
    result.params["threshold"] = int(parsed[0][3])
    try:
        _original, identity, _ = extract(frame, key, lo, hi, parsed)
        result.identity = identity
        result.payload_ok = True
    except UnauthenticatedPayload as exc:
        result.identity = exc.identity  # readable, but not vouched for
        result.problem = str(exc)
    except WatermarkError as exc:
        result.problem = str(exc)
    return result
