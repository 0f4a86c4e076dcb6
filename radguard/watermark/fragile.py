"""Block geometry of the fragile mark, and the block tags of watermark format version 1 (read
for older images; version 2 tags are in :mod:`.wctags`): a keyed tag per block, written in
the LSBs of its last rows.

The frame is cut into ``block x block`` squares. The last ``rows`` rows of each square are
its *tag rows*: the least significant bit of every pixel there holds one bit of a BLAKE2s
MAC (keyed) over the block's position and all its pixels, tag LSBs cleared. Changing any
bit of any pixel in a block makes its tag fail with probability 1 - 2^-n (n = tag bits,
16 for 8x8 blocks with two tag rows). Every block is checked on its own, so untouched
blocks can never be reported as changed.

The tag rows' original LSBs are not lost: the reversible layer (:mod:`.rhombus`) carries
them, so ``restore`` puts them back bit for bit.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from radguard.regions import mask_boxes

__all__ = ["TagLayout", "regions_from_grid", "tag_failures", "write_tags"]


@dataclass(frozen=True)
class TagLayout:
    """Block geometry of one frame."""

    height: int
    width: int
    block: int
    rows: int  # tag rows per block

    def tag_row_mask(self) -> np.ndarray:
        """Boolean per frame row: True for tag rows."""
        return _tag_row_mask(self.height, self.block, self.rows).copy()

    @property
    def grid(self) -> tuple[int, int]:
        """Blocks down and across."""
        return -(-self.height // self.block), -(-self.width // self.block)

    def blocks(self) -> Iterator[tuple[int, int, int, int, int, int]]:
        """(by, bx, y0, y1, x0, x1) for every block, raster order."""
        for by, y0 in enumerate(range(0, self.height, self.block)):
            y1 = min(y0 + self.block, self.height)
            for bx, x0 in enumerate(range(0, self.width, self.block)):
                yield by, bx, y0, y1, x0, min(x0 + self.block, self.width)

    def tag_bits(self) -> int:
        """Total tag bits in the frame (= tag pixels)."""
        return int(np.count_nonzero(self.tag_row_mask())) * self.width

    def tag_bits_per_block(self) -> np.ndarray:
        """Tag bits of every block (grid shape): what a block's passing check is worth."""
        rows = self.tag_row_mask().astype(np.int64)
        gy, gx = self.grid
        down = np.add.reduceat(rows, np.arange(0, self.height, self.block))[:gy]
        across = np.minimum(self.block, self.width - np.arange(gx) * self.block)
        return np.outer(down, across)


@functools.lru_cache(maxsize=64)
def _tag_row_mask(height: int, block: int, rows: int) -> np.ndarray:
    mask = np.zeros(height, dtype=bool)
    for y0 in range(0, height, block):
        h = min(block, height - y0)
        mask[y0 + h - min(rows, h - 1 if h > 1 else 1) : y0 + h] = True
    return mask


def _digest_bits(key: bytes, prefix: bytes, by: int, bx: int, data: bytes | memoryview,
                 n_bits: int) -> np.ndarray:
    digest = hashlib.blake2s(prefix + by.to_bytes(4, "little") + bx.to_bytes(4, "little"),
                             key=key, digest_size=min(32, max(1, -(-n_bits // 8))))
    digest.update(data)
    return np.unpackbits(np.frombuffer(digest.digest(), dtype=np.uint8))[:n_bits]


def _cleared(frame: np.ndarray, layout: TagLayout) -> np.ndarray:
    work = frame.astype("<i4", copy=True)
    work[layout.tag_row_mask(), :] &= ~1
    return work


def _full_blocks(work: np.ndarray, layout: TagLayout) -> tuple[int, int, np.ndarray]:
    b = layout.block
    fy, fx = layout.height // b, layout.width // b
    blocks = work[: fy * b, : fx * b].reshape(fy, b, fx, b).transpose(0, 2, 1, 3)
    cube = np.ascontiguousarray(blocks)
    return fy, fx, cube


def _full_block_tags(work: np.ndarray, layout: TagLayout, key: bytes, context: bytes
                     ) -> tuple[int, int, np.ndarray]:
    """Expected tags of all full blocks as bits, shape (fy, fx, rows * block)."""
    fy, fx, cube = _full_blocks(work, layout)
    b = layout.block
    n_bits = layout.rows * b
    n_bytes = min(32, -(-n_bits // 8))
    raw = cube.data.cast("B")
    step = b * b * 4
    digests = bytearray()
    # keyed once, then copied per block: the same digest as keying each block's hash anew
    # (the key block is compressed first either way), without 4,096 re-keyings per frame
    keyed = hashlib.blake2s(context, key=key, digest_size=n_bytes)
    across = [bx.to_bytes(4, "little") for bx in range(fx)]
    for by in range(fy):
        down = by.to_bytes(4, "little")
        for bx in range(fx):
            offset = (by * fx + bx) * step
            h = keyed.copy()
            h.update(down + across[bx])
            h.update(raw[offset : offset + step])
            digests += h.digest()
    bits = np.unpackbits(np.frombuffer(bytes(digests), dtype=np.uint8).reshape(fy, fx, n_bytes),
                         axis=2)[:, :, :n_bits]
    return fy, fx, bits


def _edge_blocks(work: np.ndarray, layout: TagLayout, key: bytes, context: bytes
                 ) -> Iterator[tuple[int, int, slice, slice, np.ndarray]]:
    """Partial blocks along the right and bottom edges, one by one."""
    rows = layout.tag_row_mask()
    b = layout.block
    fy, fx = layout.height // b, layout.width // b
    gy, gx = layout.grid
    if (gy, gx) == (fy, fx):
        return  # the frame divides into whole blocks: no partial ones
    # raster order, as layout.blocks(): the partial column of every full row, then the
    # partial last row
    edges = [(by, gx - 1) for by in range(fy) if gx > fx] + [(fy, bx) for bx in range(gx)
                                                            if gy > fy]
    for by, bx in edges:
        y0, x0 = by * b, bx * b
        y1, x1 = min(y0 + b, layout.height), min(x0 + b, layout.width)
        tag_rows = np.nonzero(rows[y0:y1])[0]
        ys = slice(y0 + int(tag_rows[0]), y0 + int(tag_rows[-1]) + 1)
        n_bits = len(tag_rows) * (x1 - x0)
        data = np.ascontiguousarray(work[y0:y1, x0:x1]).tobytes()
        yield by, bx, ys, slice(x0, x1), _digest_bits(key, context, by, bx, data, n_bits)


def _tag_view(arr: np.ndarray, layout: TagLayout, fy: int, fx: int) -> np.ndarray:
    """The tag-row pixels of the full blocks as (fy, fx, rows * block), tag-bit order."""
    b, r = layout.block, layout.rows
    sub = arr[: fy * b, : fx * b].reshape(fy, b, fx, b)[:, b - r :, :, :]
    return sub.transpose(0, 2, 1, 3).reshape(fy, fx, r * b)


def write_tags(frame: np.ndarray, layout: TagLayout, key: bytes, context: bytes) -> np.ndarray:
    """Return a copy of ``frame`` with every block's tag in its tag-row LSBs."""
    work = _cleared(frame, layout)
    out = work.astype(np.int32, copy=True)
    fy, fx, bits = _full_block_tags(work, layout, key, context)
    if fy and fx:
        b, r = layout.block, layout.rows
        view = out[: fy * b, : fx * b].reshape(fy, b, fx, b)
        tags = bits.reshape(fy, fx, r, b).transpose(0, 2, 1, 3)
        view[:, b - r :, :, :] |= tags
    for _by, _bx, ys, xs, tag in _edge_blocks(work, layout, key, context):
        out[ys, xs] |= tag.reshape(out[ys, xs].shape)
    return out


def tag_failures(frame: np.ndarray, layout: TagLayout, key: bytes, context: bytes
                 ) -> np.ndarray:
    """Boolean grid (blocks down x across): True where the block's tag does not match."""
    failed = np.zeros(layout.grid, dtype=bool)
    work = _cleared(frame, layout)
    lsb = (frame.astype(np.int32) & 1).astype(np.uint8)
    fy, fx, bits = _full_block_tags(work, layout, key, context)
    if fy and fx:
        failed[:fy, :fx] = np.any(_tag_view(lsb, layout, fy, fx) != bits, axis=2)
    for by, bx, ys, xs, tag in _edge_blocks(work, layout, key, context):
        failed[by, bx] = not np.array_equal(lsb[ys, xs].ravel(), tag)
    return failed


def regions_from_grid(failed: np.ndarray, layout: TagLayout) -> list[list[int]]:
    """Group failed blocks (8-connected) into boxes [x0, y0, x1, y1] in pixels (x1, y1
    exclusive, clipped to the image), largest first."""
    return [[x0, y0, min(x1, layout.width), min(y1, layout.height)]
            for x0, y0, x1, y1 in mask_boxes(failed, layout.block)]
