"""Local tamper detection without a watermark: copy-move and flattened (inpainted) regions.

* **Copy-move** (a lesion copied from elsewhere in the same image, as CT-GAN-style injections
  and "clone stamp" removals do): every 8x8 block position is described by its sixteen 2x2
  cell means (from integral images), quantised and hashed; a shift vector shared by many
  matching pairs (a whole copied patch moves as one) marks both the source and the copy.
  Blocks touching the image's extreme values (padding, saturation, burned-in text) are ignored.
* **Flattened regions** (a lesion erased by filling): radiographs carry quantum noise
  everywhere the detector saw photons, so a textured neighbourhood around a block with almost
  no fine detail is suspicious; image borders and saturated areas are excluded.

The output is a block map and boxes [x0, y0, x1, y1] (x1/y1 exclusive) in pixel coordinates.
This is the first, classical layer of the tamper detector: it finds pastes that are copies
(exact or near-exact) and near-constant fills, not spliced content from other images and not
smooth interpolated fills (0% in ``benchmarks/bench_forensics.py``; figures in
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from radguard.errors import RadguardError
from radguard.regions import mask_boxes

__all__ = ["TamperError", "TamperResult", "detect_tamper"]


class TamperError(RadguardError):
    """The image cannot be analysed (wrong shape, too small)."""


BLOCK = 16  # flattened-region blocks
STEP = 4
CM_BLOCK = 8  # copy-move blocks, at every position
CM_MAX = 2048  # larger images are averaged down first
CM_MIN_PAIRS = 20  # blocks that must move together before a shift counts as a copy


@dataclass
class TamperResult:
    """Changed-region evidence for one image."""

    copy_move: list[list[int]] = field(default_factory=list)
    flattened: list[list[int]] = field(default_factory=list)
    score: float = 0.0  # 0 nothing found .. 1 strong evidence

    @property
    def regions(self) -> list[list[int]]:
        """All suspicious boxes."""
        return self.copy_move + self.flattened

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"score": self.score, "copy_move": self.copy_move, "flattened": self.flattened}


def _normalise(img: np.ndarray) -> tuple[np.ndarray, float]:
    """Check the input, then stretch it to 0..255 (0.5/99.5 percentiles) so thresholds hold."""
    raw = np.asarray(img)
    if raw.dtype.kind not in "buif":
        raise TamperError(f"tamper detection needs numeric pixels, not {raw.dtype}")
    if raw.ndim != 2:
        raise TamperError("tamper detection needs a 2-D grey image")
    if min(raw.shape) < 2 * BLOCK:
        raise TamperError(f"image too small for tamper detection (min side {2 * BLOCK})")
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


def _boxes(mask: np.ndarray, scale: float) -> list[list[int]]:
    """Connected components of a block-position mask (STEP grid, BLOCK blocks) as boxes."""
    return [
        [
            int(x0 * scale),
            int(y0 * scale),
            int((x1 - STEP + BLOCK) * scale),
            int((y1 - STEP + BLOCK) * scale),
        ]
        for x0, y0, x1, y1 in mask_boxes(mask, STEP)
    ]


def _cell_blocks(cells: np.ndarray, c: int, n: int, ny: int, nx: int) -> np.ndarray:
    """Sum of n x n cells (each c x c pixels, one per pixel position) for every block."""
    rows = sum(cells[:, j * c : j * c + nx] for j in range(n))
    return sum(rows[i * c : i * c + ny] for i in range(n))


def _copy_move(a: np.ndarray) -> tuple[list[list[int]], int]:
    """Exact or near-exact copies: every 8x8 block position (no grid, so any shift is
    found) described by its sixteen 2x2 cell means, hashed, and grouped by shift."""
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
        return [], 0
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
        return [], 0
    dy = ys[same + 1].astype(np.int64) - ys[same]
    dx = xs[same + 1].astype(np.int64) - xs[same]
    flip = (dy < 0) | ((dy == 0) & (dx < 0))
    dy, dx = np.where(flip, -dy, dy), np.where(flip, -dx, dx)
    far = np.maximum(np.abs(dy), np.abs(dx)) >= b
    if not far.any():
        return [], 0
    shift_ids = dy[far] * (2 * w + 1) + dx[far]
    values, counts = np.unique(shift_ids, return_counts=True)
    strong = values[counts >= CM_MIN_PAIRS]
    if len(strong) == 0:
        return [], 0
    mask = np.zeros((h, w), dtype=bool)
    first = same[far]
    for sid in strong:
        hits = first[shift_ids == sid]
        for y0, x0 in zip(
            np.r_[ys[hits], ys[hits + 1]], np.r_[xs[hits], xs[hits + 1]], strict=True
        ):
            mask[y0 : y0 + b, x0 : x0 + b] = True
    grid = (
        mask[: h // STEP * STEP, : w // STEP * STEP]
        .reshape(h // STEP, STEP, w // STEP, STEP)
        .any(axis=(1, 3))
    )
    return mask_boxes(grid, STEP), int(counts.max())


def _window_mean(x: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean of every BLOCK x BLOCK window whose corner lies on the STEP grid, from sums of
    STEP x STEP cells (BLOCK is a multiple of STEP)."""
    n = BLOCK // STEP
    h4, w4 = grid[0] + n - 1, grid[1] + n - 1
    cells = x[: h4 * STEP, : w4 * STEP].reshape(h4, STEP, w4, STEP).sum(axis=(1, 3))
    rows = sum(cells[:, j : j + grid[1]] for j in range(n))
    return sum(rows[i : i + grid[0]] for i in range(n)) / (BLOCK * BLOCK)


def _flattened(a: np.ndarray) -> np.ndarray:
    """BLOCK x BLOCK windows (STEP grid) with almost no fine detail inside textured
    surroundings: a fill where the detector's quantum noise should be."""
    grid = (a.shape[0] - BLOCK) // STEP + 1, (a.shape[1] - BLOCK) // STEP + 1
    # neighbour differences inside each window (the last row / column reaches one pixel out)
    dy = np.abs(np.diff(a, axis=0, append=a[-1:]))
    dx = np.abs(np.diff(a, axis=1, append=a[:, -1:]))
    detail_map = _window_mean(dy, grid) + _window_mean(dx, grid)
    level_map = _window_mean(a, grid)
    typical = (
        np.median(detail_map[(level_map > 10) & (level_map < 245)])
        if np.any((level_map > 10) & (level_map < 245))
        else 0.0
    )
    if typical <= 0:
        return np.zeros(grid, dtype=bool)
    pad = np.pad(detail_map, 4, mode="edge")
    ring = np.stack(
        [
            pad[4 + dy : 4 + dy + grid[0], 4 + dx : 4 + dx + grid[1]]
            for dy in (-4, 0, 4)
            for dx in (-4, 0, 4)
            if (dy, dx) != (0, 0)
        ]
    )
    around = np.partition(ring, (3, 4), axis=0)[3:5].mean(axis=0)  # median of the 8 neighbours
    flat = (
        (detail_map < 0.05 * typical)
        & (ring.min(axis=0) > 0.3 * typical)
        & (around > 0.5 * typical)
    )
    flat &= (level_map > 10) & (level_map < 245)  # not background, not saturated
    flat[:4, :] = flat[-4:, :] = False  # borders hold labels and collimator edges
    flat[:, :4] = flat[:, -4:] = False
    return flat


def detect_tamper(img: np.ndarray) -> TamperResult:
    """Look for copy-moved and flattened regions in a grey image."""
    full, base = _normalise(img)
    cm_boxes, pairs = _copy_move(full)
    cm_boxes = [[int(v * base) for v in box] for box in cm_boxes]
    a, scale = _reduce(full)
    scale *= base
    flat_mask = _flattened(a)
    result = TamperResult(cm_boxes, _boxes(flat_mask, scale))
    evidence = pairs / (pairs + 10.0) if pairs else 0.0
    if flat_mask.any():
        evidence = max(evidence, min(1.0, 0.5 + flat_mask.sum() / 50.0))
    result.score = float(evidence)
    return result
