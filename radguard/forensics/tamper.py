"""Local tamper detection without a watermark: copy-move, fills and splices.

* **Copy-move** (a lesion copied from elsewhere in the same image, as CT-GAN-style injections
  and "clone stamp" removals do): every 8x8 block position is described by its sixteen 2x2
  cell means (from integral images), quantised and hashed; a shift vector shared by many
  matching pairs (a whole copied patch moves as one) is a candidate. Blocks touching the
  image's extreme values (padding, saturation, burned-in text) are ignored. A candidate marks
  both the source and the copy only when the match is sharp (far better than at the shifts
  1-2 px next to it) and the region carries noise or fine texture: JPEG's flat blocks,
  smoothed or upsampled images and straight edges match along whole families of shifts and
  were most of this layer's false alarms on processed real radiographs; a pasted patch of
  tissue matches at one shift only.
* **Fills and splices** (a lesion erased by interpolating or blurring its surroundings, or
  tissue pasted from another patient's image): the learned local-edit detector of
  :mod:`~radguard.forensics.localnet`, which needs no twin in the image; its cell map becomes
  ``local_edit_map`` and the cells above its threshold become boxes. An exactly flat patch
  inside noisy tissue (a constant fill, :func:`_flat_fills`) sets its cells to 1 in that map.

The output is boxes [x0, y0, x1, y1] (x1/y1 exclusive) in pixel coordinates of the input.
Measured rates: ``benchmarks/bench_forensics.py`` (figures in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import numpy as np
from scipy import ndimage

from radguard.errors import RadguardError
from radguard.forensics.cues import MAX_ASPECT, CueError, Prepared, fine_residual
from radguard.forensics.localnet import (
    CELL,
    LocalEditDetector,
    load_local_detector,
    smoothed_max,
)
from radguard.regions import mask_boxes

__all__ = ["TamperError", "TamperResult", "detect_tamper"]


class TamperError(RadguardError):
    """The image cannot be analysed (wrong shape, too small)."""


MIN_SIDE = 32
STEP = 4  # copy-move regions are reported on this grid
CM_BLOCK = 8  # copy-move blocks, at every position
CM_MAX = 2048  # larger images are averaged down first
CM_MIN_PAIRS = 20  # blocks that must move together before a shift counts as a copy
CM_MAX_SHIFTS = 32  # candidate shifts verified per image, most pairs first
CM_NEAR = 2  # a copy must match far better than at the shifts up to this many px next to it
CM_SHARPNESS = 2.0  # ... by this factor
CM_MARGIN = 0.75  # ... and by this many grey levels (of 255; a smooth DX chest's lung: ~1)
CM_SAMPLE = 256  # source blocks a candidate copy is measured on
CM_TEXTURE = 0.3  # median absolute fine residual (grey levels) a copied region must carry
FLAT_SIDE = 12  # analysed px: the smallest exactly flat square counted as a constant fill
FLAT_RING = 6  # analysed px around it that must be noisy tissue ...
FLAT_NOISE = 3.0  # ... with this median 3 x 3 range (grey levels)
FLAT_MAX_SHARE = 0.01  # images with more flat (non-extreme) pixels than this are not checked


@dataclass
class TamperResult:
    """Changed-region evidence for one image."""

    copy_move: list[list[int]] = field(default_factory=list)
    local_edits: list[list[int]] = field(default_factory=list)  # fills and splices
    score: float = 0.0  # 0 nothing found .. 1 strong evidence
    local_edit_score: float | None = None  # the learned detector's image score (None: not run)
    local_edit_threshold: float | None = None
    local_edit_map: np.ndarray | None = field(default=None, repr=False)  # cell probabilities
    local_edit_cell: float = 0.0  # a map cell's edge in input pixels

    @property
    def regions(self) -> list[list[int]]:
        """All suspicious boxes."""
        return self.copy_move + self.local_edits

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (the cell map is left out: it goes to the heat-map PNG)."""
        return {
            "score": self.score,
            "copy_move": self.copy_move,
            "local_edits": self.local_edits,
            "local_edit_score": (
                round(self.local_edit_score, 4) if self.local_edit_score is not None else None
            ),
        }


def _normalise(img: np.ndarray) -> tuple[np.ndarray, float]:
    """Check the input, then stretch it to 0..255 (0.5/99.5 percentiles) so thresholds hold."""
    raw = np.asarray(img)
    if raw.dtype.kind not in "buif":
        raise TamperError(f"tamper detection needs numeric pixels, not {raw.dtype}")
    if raw.ndim != 2:
        raise TamperError("tamper detection needs a 2-D grey image")
    if min(raw.shape) < MIN_SIDE:
        raise TamperError(f"image too small for tamper detection (min side {MIN_SIDE})")
    if max(raw.shape) > MAX_ASPECT * min(raw.shape):  # a strip: no radiograph, unbounded cost
        raise TamperError(f"image {raw.shape[1]}x{raw.shape[0]} is too elongated for tamper "
                          f"detection (sides more than {MAX_ASPECT}:1)")
    a, _scale = _reduce(raw.astype(np.float32), CM_MAX)  # huge images: bounded time and memory
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise TamperError("image has NaN or infinite pixels; refusing to score it")
    lo, hi = np.percentile(a, [0.5, 99.5])
    return (a - lo) / max(hi - lo, 1e-9) * 255.0, _scale


def _reduce(a: np.ndarray, limit: int = 1024) -> tuple[np.ndarray, float]:
    """Block means down to at most ``limit`` pixels per side, and the scale factor."""
    if max(a.shape) <= limit:
        return a, 1.0
    step = int(np.ceil(max(a.shape) / limit))
    a = a[: a.shape[0] // step * step, : a.shape[1] // step * step]
    return a.reshape(a.shape[0] // step, step, a.shape[1] // step, step).mean(axis=(1, 3)), float(
        step
    )


def _cell_blocks(cells: np.ndarray, c: int, n: int, ny: int, nx: int) -> np.ndarray:
    """Sum of n x n cells (each c x c pixels, one per pixel position) for every block."""
    # n >= 1: the sums are arrays, never sum()'s start value 0
    rows = cast(np.ndarray, sum(cells[:, j * c : j * c + nx] for j in range(n)))
    return cast(np.ndarray, sum(rows[i * c : i * c + ny] for i in range(n)))


def _copy_candidates(a: np.ndarray) -> list[tuple[int, int, int, np.ndarray, np.ndarray]]:
    """Shifts shared by many matching block pairs, most pairs first: (pairs, dy, dx, y, x)
    with the source blocks' top-left corners (each copied to (y + dy, x + dx)). Every 8x8
    block position (no grid, so any shift is found) is described by its sixteen 2x2 cell
    sums, quantised and hashed."""
    h, w = a.shape
    b, c = CM_BLOCK, CM_BLOCK // 4
    a32 = a.astype(np.float32)
    ny, nx = h - b + 1, w - b + 1
    sq = a32 * a32
    cells = a32[: h - 1, : w - 1] + a32[1:, : w - 1] + a32[: h - 1, 1:] + a32[1:, 1:]
    cells_sq = sq[: h - 1, : w - 1] + sq[1:, : w - 1] + sq[: h - 1, 1:] + sq[1:, 1:]
    mean = _cell_blocks(cells, c, b // c, ny, nx) / (b * b)
    var = _cell_blocks(cells_sq, c, b // c, ny, nx) / (b * b) - mean * mean
    std = np.sqrt(np.clip(var, 0, None))
    # padding, saturation, burned-in text: blocks touching the extreme values
    extreme = ((a <= a.min()) | (a >= a.max())).astype(np.uint8)
    touches_extreme = ndimage.maximum_filter(extreme, size=b, origin=-(b // 2))[:ny, :nx] > 0
    keep = (std > max(3.0, float(np.percentile(std, 30)))) & ~touches_extreme
    # the outer band holds labels, markers and burned-in text, whose repeated glyphs are
    # genuine copies; lesions are not injected there
    my, mx = max(16, h // 25), max(16, w // 25)
    keep[:my] = keep[-my:] = False
    keep[:, :mx] = keep[:, -mx:] = False
    if keep.sum() < 2:
        return []
    # sum of every c x c cell, quantised once; the 4 x 4 cells of a block hashed row by row
    q = np.round(cells / (c * c * 0.5)).astype(np.int64).astype(np.uint64)
    multipliers = np.random.default_rng(7).integers(1, 2**62, 8, dtype=np.uint64) | 1
    rows = np.zeros((q.shape[0], nx), dtype=np.uint64)
    for j in range(4):
        rows += q[:, j * c : j * c + nx] * multipliers[j]
    key = np.zeros((ny, nx), dtype=np.uint64)
    for i in range(4):
        key += rows[i * c : i * c + ny] * multipliers[4 + i]
    ys, xs = np.nonzero(keep)
    keys = key[ys, xs]
    order = np.argsort(keys)
    ks, ys, xs = keys[order], ys[order], xs[order]
    same = np.nonzero(ks[1:] == ks[:-1])[0]
    if len(same) == 0:
        return []
    dy = ys[same + 1].astype(np.int64) - ys[same]
    dx = xs[same + 1].astype(np.int64) - xs[same]
    flip = (dy < 0) | ((dy == 0) & (dx < 0))  # one direction per shift: source + shift = copy
    dy, dx = np.where(flip, -dy, dy), np.where(flip, -dx, dx)
    far = np.maximum(np.abs(dy), np.abs(dx)) >= b
    if not far.any():
        return []
    src = np.where(flip, same + 1, same)[far]
    dy, dx = dy[far], dx[far]
    shift_ids = dy * (2 * w + 1) + dx
    values, first, counts = np.unique(shift_ids, return_index=True, return_counts=True)
    out: list[tuple[int, int, int, np.ndarray, np.ndarray]] = []
    for k in np.argsort(-counts, kind="stable"):
        if counts[k] < CM_MIN_PAIRS or len(out) >= CM_MAX_SHIFTS:
            break
        hits = src[shift_ids == values[k]]
        out.append((int(counts[k]), int(dy[first[k]]), int(dx[first[k]]), ys[hits], xs[hits]))
    return out


def _copy_stats(a: np.ndarray, residual: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                dy: int, dx: int) -> tuple[float, float, float]:
    """How a candidate copy differs from its source (mean absolute difference over the
    source blocks), how the best shift next to it (1-2 px off) differs, and the median
    absolute fine residual of the source (its noise and fine texture). Measured on at most
    :data:`CM_SAMPLE` source blocks, spread evenly, so a periodic texture with thousands of
    matching blocks costs no more than a small copy."""
    b, p = CM_BLOCK, CM_NEAR
    pick = np.unique(np.linspace(0, len(ys) - 1, min(len(ys), CM_SAMPLE)).astype(int))
    ys, xs = ys[pick].astype(np.intp), xs[pick].astype(np.intp)
    off = np.arange(b, dtype=np.intp)
    rows = (ys[:, None] + off)[:, :, None]  # (blocks, b, 1)
    cols = (xs[:, None] + off)[:, None, :]  # (blocks, 1, b)
    src = a[rows, cols]
    padded = np.pad(a, p, mode="edge")  # the copy's neighbourhood may run off the image
    diffs = {}
    for ey in range(-p, p + 1):
        for ex in range(-p, p + 1):
            tgt = padded[rows + dy + ey + p, cols + dx + ex + p]
            diffs[ey, ex] = float(np.abs(src - tgt).mean())
    exact = diffs.pop((0, 0))
    texture = float(np.median(np.abs(residual[rows, cols])))
    return exact, min(diffs.values()), texture


def _copy_move(a: np.ndarray) -> tuple[list[list[int]], int]:
    """Copies within the image: candidate shifts (:func:`_copy_candidates`) kept only when
    the match is sharp - far better than at the shifts 1-2 px next to it - and the copied
    region carries noise or fine texture. Straight edges, smooth gradients, JPEG's flat
    blocks, upsampled pixels and glyphs on a flat label all match along whole families of
    shifts or carry no noise; a pasted copy of tissue matches at one shift only."""
    h, w = a.shape
    b = CM_BLOCK
    mask = np.zeros((h, w), dtype=bool)
    best = 0
    residual = None
    for count, dy, dx, ys, xs in _copy_candidates(a):
        if residual is None:  # only images with a candidate pay for it
            residual = fine_residual(a)
        exact, near, texture = _copy_stats(a, residual, ys, xs, dy, dx)
        if near < max(CM_SHARPNESS * exact, exact + CM_MARGIN) or texture < CM_TEXTURE:
            continue
        best = max(best, count)
        for y0, x0 in zip(np.r_[ys, ys + dy], np.r_[xs, xs + dx], strict=True):
            mask[y0 : y0 + b, x0 : x0 + b] = True
    if not best:
        return [], 0
    grid = cast(np.ndarray, (  # numpy types any(axis=...) as maybe a scalar
        mask[: h // STEP * STEP, : w // STEP * STEP]
        .reshape(h // STEP, STEP, w // STEP, STEP)
        .any(axis=(1, 3))
    ))
    return mask_boxes(grid, STEP), best


def _flat_fills(a: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Cells (of the local-edit map's ``grid``) of exactly flat patches of at least
    FLAT_SIDE x FLAT_SIDE analysed pixels lying inside noisy tissue: a constant fill (a
    lesion erased with one grey value). Only in images that carry noise almost everywhere
    (at most FLAT_MAX_SHARE of their non-extreme pixels flat): enlarged, posterised or
    smoothed images and published figures have flat plateaus of their own. Ignored as well:
    the extreme values (collimator shadow, saturation, padding, as the network ignores them),
    flat areas at the border (collimator bands, labels), and flat areas whose grey is not the
    tissue's around them (drawn markers, label boxes: a fill takes the surroundings' grey)."""
    h, w = grid[0] * CELL, grid[1] * CELL
    a = a[:h, :w]
    out = np.zeros(grid, dtype=bool)
    lo, hi = float(a.min()), float(a.max())
    rng3 = ndimage.maximum_filter(a, 3) - ndimage.minimum_filter(a, 3)
    inner = (a > lo + 1) & (a < hi - 1)
    flat = (rng3 < 0.5) & inner
    if flat.sum() > FLAT_MAX_SHARE * max(int(inner.sum()), 1):
        return out
    # binary opening with a FLAT_SIDE square, as two separable (fast) min / max filters
    fits = ndimage.minimum_filter(flat.view(np.uint8), FLAT_SIDE, mode="constant")
    core = ndimage.maximum_filter(fits, FLAT_SIDE, mode="constant", origin=-1) > 0
    if not core.any():
        return out
    labels, _ = ndimage.label(flat)  # whole flat areas: the ring is measured around them
    slices = ndimage.find_objects(labels)
    for k in np.unique(labels[core]):
        sl = slices[k - 1]
        pad = FLAT_RING + 1
        y0, x0, y1, x1 = sl[0].start - pad, sl[1].start - pad, sl[0].stop + pad, sl[1].stop + pad
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:  # at the border: a collimator band or label
            continue
        region = labels[y0:y1, x0:x1] == k
        ring = ndimage.binary_dilation(region, iterations=FLAT_RING) & ~ndimage.binary_dilation(
            region, iterations=1)
        window = a[y0:y1, x0:x1]
        value = float(np.median(window[region]))
        if flat[y0:y1, x0:x1][ring].mean() > 0.1 or np.median(rng3[y0:y1, x0:x1][ring]) \
                < FLAT_NOISE:
            continue
        q25, q75 = np.percentile(window[ring], [25, 75])
        if not q25 <= value <= q75:
            continue
        cells = np.zeros((h, w), dtype=bool)
        cells[y0:y1, x0:x1] = ndimage.binary_dilation(region)  # the rim lost to the 3x3 range
        out |= cells.reshape(grid[0], CELL, grid[1], CELL).any(axis=(1, 3))
    return out


def _local_edits(img: np.ndarray, result: TamperResult, detector: LocalEditDetector,
                 prepared: Prepared | None = None) -> None:
    """Run the learned fill / splice detector on the analysed copy of ``img``."""
    try:
        prepared = prepared or Prepared.of(img)
    except CueError:  # too small for the network: the classical layers still spoke
        return
    a = prepared.image
    edit_map = detector.analyse(a, prepared.residual)
    flat = _flat_fills(a, edit_map.probability.shape)
    if flat.any():  # a dead-flat patch inside noisy tissue: a fill, whatever the network says
        edit_map.probability = np.maximum(edit_map.probability, flat.astype(np.float64))
        edit_map.score = smoothed_max(edit_map.probability)
    cell = CELL * max(np.asarray(img).shape[:2]) / max(a.shape)
    result.local_edit_score = edit_map.score
    result.local_edit_threshold = edit_map.threshold
    result.local_edit_map = edit_map.probability
    result.local_edit_cell = cell
    if edit_map.score >= edit_map.threshold:
        result.local_edits = [[int(round(v * cell / CELL)) for v in box]
                              for box in mask_boxes(edit_map.edited, CELL)]


def detect_tamper(img: np.ndarray, *, local: LocalEditDetector | None | bool = True,
                  prepared: Prepared | None = None) -> TamperResult:
    """Look for copy-moved, filled and spliced regions in a grey image.

    ``local``: the learned fill / splice detector to use (``True``: the shipped one,
    ``False``: only the classical layers). ``prepared``: ``img`` in analysis form, when the
    caller has it already (the scan shares it with the synthetic-image detector).
    """
    full, base = _normalise(img)
    cm_boxes, pairs = _copy_move(full)
    result = TamperResult([[int(v * base) for v in box] for box in cm_boxes])
    evidence = pairs / (pairs + 10.0) if pairs else 0.0
    if local is not False:
        detector = load_local_detector() if local is True or local is None else local
        _local_edits(img, result, detector, prepared)
        if result.local_edits:
            evidence = max(evidence, float(result.local_edit_score or 0.0))
    result.score = float(evidence)
    return result
