"""Block tags of watermark format version 2: Wegman-Carter MACs for all blocks at once.

    tag(block) = H_K(block) XOR mask(nonce, block position)

* ``H_K`` is a keyed hash, linear over GF(2): each pixel counts as 16 bits (the stored value
  mod 2^16, tag-row LSBs cleared), multiplied in GF(2^m) by a keyed non-zero element for its
  position in the block, and the products are XORed (truncated to the block's n tag bits).
  For two different blocks ``H_K(a) XOR H_K(b) = H_K(a XOR b)``, uniform over the n-bit
  values for random keys: the hash is XOR-universal, and a change of a single pixel always
  changes it (n >= 16). The multipliers depend only on the key and the layout, so their byte
  lookup tables (256 entries per position and byte) are built once per process and the
  hash of every block is one gather and one XOR reduction in numpy.
* ``mask`` is n bits of SHAKE-256 over the tag key, the frame's random 64-bit nonce, the
  layout, the frame size and index, and the block's position: fresh for every block of
  every frame.

Wegman and Carter (1981): whatever tagged blocks a forger has seen, a changed block passes
with probability 2^-n (16 bits for 8x8 blocks with two tag rows), as long as masks never
repeat, which the 64-bit random nonce makes so. Because the mask belongs to the frame, a
block copied from another frame marked with the same key, even at the same position,
fails; format version 1 (:mod:`.fragile`, keyed BLAKE2s per block and position) let such
a block pass, and hashed block by block in a Python loop.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Iterator

import numpy as np

from radguard.watermark.fragile import TagLayout

__all__ = ["BlockTags"]


def _dtype(n_bits: int) -> np.dtype:
    return np.dtype(np.uint16 if n_bits <= 16 else np.uint32 if n_bits <= 32 else np.uint64)


def _low_bits(n_bits: int, dtype: np.dtype) -> int:
    return (1 << n_bits) - 1 if n_bits < 8 * dtype.itemsize else int(np.iinfo(dtype).max)


# reduction polynomials (low terms) of GF(2^16), GF(2^32), GF(2^64): x^16+x^12+x^3+x+1,
# x^32+x^22+x^2+x+1, x^64+x^4+x^3+x+1 (primitive; tests check that every position's key rows
# are linearly independent, which is what the construction needs)
_POLY = {16: 0x100B, 32: 0x400007, 64: 0x1B}


@functools.lru_cache(maxsize=8)
def _tables(tag_key: bytes, block: int, n_bits: int) -> np.ndarray:
    """Flat lookup table: entry ``(position * 2 + byte) * 256 + value`` is what that byte of
    the pixel at that position adds to the hash.

    The hash of a pixel ``v`` at position ``i`` is ``k_i * v`` in GF(2^m) (m = 16, 32 or 64
    bits, the tag's width rounded up), truncated to n bits, with ``k_i`` a keyed, non-zero
    field element: the key rows of the 16 bits of ``v`` are ``k_i * x^j``. Multiplication
    by ``k_i`` is one-to-one, so for n >= 16 any change of a single pixel always changes the
    tag, and any change of several pixels does with probability 1 - 2^-n."""
    dtype = _dtype(n_bits)
    m = 8 * dtype.itemsize
    positions = block * block
    raw = hashlib.shake_256(tag_key + b"|rgw2-hash|" + struct.pack("<II", block, n_bits)
                            ).digest(positions * dtype.itemsize)
    k = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    k = np.where(k == 0, dtype.type(1), k)  # a zero multiplier would ignore its pixel
    top, poly = dtype.type(1 << (m - 1)), dtype.type(_POLY[m])
    rows = np.empty((positions, 16), dtype)
    for j in range(16):  # k * x^j: multiply by x (shift, reduce when the top bit falls out)
        rows[:, j] = k
        k = (k << dtype.type(1)) ^ np.where(k & top, poly, dtype.type(0))
    rows = (rows & dtype.type(_low_bits(n_bits, dtype))).reshape(positions, 2, 8)
    values = np.arange(256)
    table = np.zeros((positions, 2, 256), dtype)
    for bit in range(8):
        on = ((values >> bit) & 1).astype(bool)
        table[:, :, on] ^= rows[:, :, bit, None]
    flat = table.reshape(-1)
    flat.flags.writeable = False
    return flat


class BlockTags:
    """The tags of one frame's blocks, for one key, layout and nonce."""

    def __init__(self, layout: TagLayout, tag_key: bytes, nonce: bytes, frame_index: int
                 ) -> None:
        self.layout = layout
        self.n_bits = layout.rows * layout.block
        self.dtype = _dtype(self.n_bits)
        self._table = _tables(tag_key, layout.block, self.n_bits)
        gy, gx = layout.grid
        context = struct.pack("<IIIII", layout.block, layout.rows, layout.height, layout.width,
                              frame_index)
        raw = hashlib.shake_256(tag_key + b"|rgw2-mask|" + nonce + context).digest(
            gy * gx * self.dtype.itemsize)
        self._masks = (np.frombuffer(raw, dtype=self.dtype.newbyteorder("<")).astype(self.dtype)
                       & self.dtype.type(_low_bits(self.n_bits, self.dtype))).reshape(gy, gx)
        self._rows = layout.tag_row_mask()
        b = layout.block
        self._full = (layout.height // b, layout.width // b)
        self._weights = (np.ones(1, self.dtype) << np.arange(self.n_bits, dtype=self.dtype))

    # -- the hashed form of a frame ------------------------------------------------------

    def hashed_form(self, frame: np.ndarray, exclude: tuple[np.ndarray, np.ndarray] | None
                    ) -> np.ndarray:
        """uint16 values as hashed: stored value mod 2^16, tag-row LSBs cleared, and the LSBs
        of ``exclude`` (row and column indices: pixels written after the tags) cleared."""
        work = np.asarray(frame).astype(np.uint16)  # integer casts keep the low 16 bits
        if exclude is not None:
            work[exclude] &= np.uint16(0xFFFE)
        return self._clear_tag_rows(work)

    def _clear_tag_rows(self, work: np.ndarray) -> np.ndarray:
        work[self._rows, :] &= np.uint16(0xFFFE)
        return work

    def _hash(self, values: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """XOR-hash of each row of ``values`` (blocks x pixels at ``positions``)."""
        base = positions * 512
        out = np.bitwise_xor.reduce(self._table[base + (values & 0xFF)], axis=-1)
        high = values >> 8
        if high.any():  # a zero byte adds nothing: 8-bit data needs one lookup per pixel
            out ^= np.bitwise_xor.reduce(self._table[base + 256 + high], axis=-1)
        return out

    def _edges(self) -> Iterator[tuple[int, int, slice, slice, slice]]:
        """Partial blocks on the right and bottom edges: (by, bx, rows, cols, tag rows)."""
        layout, b = self.layout, self.layout.block
        fy, fx = self._full
        gy, gx = layout.grid
        edges = [(by, gx - 1) for by in range(fy) if gx > fx]
        edges += [(fy, bx) for bx in range(gx) if gy > fy]
        for by, bx in edges:
            y0, x0 = by * b, bx * b
            y1, x1 = min(y0 + b, layout.height), min(x0 + b, layout.width)
            tag_rows = np.nonzero(self._rows[y0:y1])[0]
            yield (by, bx, slice(y0, y1), slice(x0, x1),
                   slice(y0 + int(tag_rows[0]), y0 + int(tag_rows[-1]) + 1))

    def expected(self, work: np.ndarray) -> np.ndarray:
        """Tags of every block (grid shape) of a frame in :meth:`hashed_form`."""
        b = self.layout.block
        fy, fx = self._full
        tags = self._masks.copy()
        if fy and fx:
            cube = work[: fy * b, : fx * b].reshape(fy, b, fx, b).transpose(0, 2, 1, 3)
            tags[:fy, :fx] ^= self._hash(cube.reshape(fy, fx, b * b), np.arange(b * b))
        for by, bx, ys, xs, tag_ys in self._edges():
            part = work[ys, xs]
            h, w = part.shape
            positions = (np.arange(h)[:, None] * b + np.arange(w)[None, :]).ravel()
            n = (tag_ys.stop - tag_ys.start) * w
            tags[by, bx] = (tags[by, bx] ^ self._hash(part.ravel(), positions)) & \
                self.dtype.type(_low_bits(n, self.dtype))
        return tags

    def _full_view(self, arr: np.ndarray) -> np.ndarray:
        """Tag-row pixels of the full blocks as (fy, fx, rows * block), tag-bit order."""
        b, r = self.layout.block, self.layout.rows
        fy, fx = self._full
        sub = arr[: fy * b, : fx * b].reshape(fy, b, fx, b)[:, b - r :, :, :]
        return sub.transpose(0, 2, 1, 3).reshape(fy, fx, r * b)

    def observed(self, frame: np.ndarray) -> np.ndarray:
        """Tags as read from the tag rows' LSBs (grid shape)."""
        lsb = (np.asarray(frame) & 1).astype(self.dtype)
        tags = np.zeros(self.layout.grid, self.dtype)
        fy, fx = self._full
        if fy and fx:
            tags[:fy, :fx] = (self._full_view(lsb) * self._weights).sum(axis=-1,
                                                                         dtype=self.dtype)
        for by, bx, _ys, xs, tag_ys in self._edges():
            bits = lsb[tag_ys, xs].ravel()
            tags[by, bx] = (bits * self._weights[: bits.size]).sum(dtype=self.dtype)
        return tags

    def write(self, frame: np.ndarray, exclude: tuple[np.ndarray, np.ndarray] | None
              ) -> np.ndarray:
        """A copy of ``frame`` (int32) with every block's tag in its tag-row LSBs."""
        out = np.asarray(frame).astype(np.int32)
        out[self._rows, :] &= ~1
        tags = self.expected(self.hashed_form(frame, exclude))
        fy, fx = self._full
        if fy and fx:
            b, r = self.layout.block, self.layout.rows
            bits = (tags[:fy, :fx, None] >> np.arange(self.n_bits, dtype=self.dtype)) & 1
            blocks = out[: fy * b, : fx * b].reshape(fy, b, fx, b)  # a view: writes through
            blocks[:, b - r :, :, :] |= bits.astype(np.int32).reshape(fy, fx, r, b).transpose(
                0, 2, 1, 3)
        for by, bx, _ys, xs, tag_ys in self._edges():
            n = (tag_ys.stop - tag_ys.start) * (xs.stop - xs.start)
            bits = (tags[by, bx] >> np.arange(n, dtype=self.dtype)) & 1
            out[tag_ys, xs] |= bits.astype(np.int32).reshape(out[tag_ys, xs].shape)
        return out

    def failures(self, frame: np.ndarray, work: np.ndarray) -> np.ndarray:
        """Boolean grid: True where a block's tag does not match its pixels. ``work``: the
        frame as uint16 with the LSBs written after the tags cleared (changed in place: its
        tag rows' LSBs are cleared too)."""
        return self.expected(self._clear_tag_rows(work)) != self.observed(frame)
