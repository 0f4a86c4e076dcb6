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

from radguard.errors import RadguardError
from radguard.regions import mask_boxes

__all__ = ["TamperError", "TamperResult", "detect_tamper"]


class TamperError(RadguardError):
    """The image cannot be analysed (wrong shape, too small)."""


BLOCK = 16  # flattened-region blocks
STEP = 4
CM_BLOCK = 8  # copy-move blocks, at every position
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


def _normalise(img: np.ndarray) -> np.ndarray:
    """Check the input, then stretch it to 0..255 (0.5/99.5 percentiles) so thresholds hold."""
    raw = np.asarray(img)
    if raw.dtype.kind not in "buif":
        raise TamperError(f"tamper detection needs numeric pixels, not {raw.dtype}")
    if raw.ndim != 2:
        raise TamperError("tamper detection needs a 2-D grey image")
    if min(raw.shape) < 2 * BLOCK:
        raise TamperError(f"image too small for tamper detection (min side {2 * BLOCK})")
    a = raw.astype(np.float64)
    if not np.isfinite(a).all():
        raise TamperError("image has NaN or infinite pixels; refusing to score it")
    lo, hi = np.percentile(a, [0.5, 99.5])
    return (a - lo) / max(hi - lo, 1e-9) * 255.0


def _reduce(a: np.ndarray) -> tuple[np.ndarray, float]:
    """A copy of at most 1024 pixels per side for the (slower) block statistics."""
    if max(a.shape) <= 1024:
        return a, 1.0
    step = int(np.ceil(max(a.shape) / 1024))
    a = a[: a.shape[0] // step * step, : a.shape[1] // step * step]
    return a.reshape(a.shape[0] // step, step, a.shape[1] // step, step).mean(axis=(1, 3)), float(
        step
    )


def _blocks(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every BLOCKxBLOCK block at STEP spacing: (positions, pixels)."""
    view = np.lib.stride_tricks.sliding_window_view(a, (BLOCK, BLOCK))[::STEP, ::STEP]
    ys, xs = np.meshgrid(
        np.arange(view.shape[0]) * STEP, np.arange(view.shape[1]) * STEP, indexing="ij"
    )
    return np.stack([ys.ravel(), xs.ravel()], axis=1), view.reshape(-1, BLOCK, BLOCK)


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


def _copy_move(a: np.ndarray) -> tuple[list[list[int]], int]:
    """Exact or near-exact copies: every 8x8 block position (no grid, so any shift is
    found) described by its sixteen 2x2 cell means, hashed, and grouped by shift."""
    h, w = a.shape
    b, c = CM_BLOCK, CM_BLOCK // 4
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = a.cumsum(0).cumsum(1)
    squares = np.zeros((h + 1, w + 1))
    squares[1:, 1:] = (a * a).cumsum(0).cumsum(1)

    def window_sum(table: np.ndarray, size: int) -> np.ndarray:
        return (
            table[size:, size:]
            - table[:-size, size:]
            - table[size:, :-size]
            + table[:-size, :-size]
        )

    cells = window_sum(integral, c)  # (h - c + 1, w - c + 1): sum of every c x c window
    ny, nx = h - b + 1, w - b + 1
    total = window_sum(integral, b)[:ny, :nx]
    var = window_sum(squares, b)[:ny, :nx] / (b * b) - (total / (b * b)) ** 2
    std = np.sqrt(np.clip(var, 0, None))
    extreme = ((raw_min := a <= a.min()) | (a >= a.max())).astype(np.float64)
    ext = np.zeros((h + 1, w + 1))
    ext[1:, 1:] = extreme.cumsum(0).cumsum(1)
    touches_extreme = window_sum(ext, b)[:ny, :nx] > 0  # padding, saturation, burned-in text
    del raw_min
    keep = (std > max(3.0, float(np.percentile(std, 30)))) & ~touches_extreme
    if keep.sum() < 2:
        return [], 0
    multipliers = np.random.default_rng(7).integers(1, 2**62, 16, dtype=np.uint64) | 1
    key = np.zeros((ny, nx), dtype=np.uint64)
    for i in range(4):
        for j in range(4):
            q = np.round(cells[i * c : i * c + ny, j * c : j * c + nx] / (c * c * 0.5))
            key += q.astype(np.int64).astype(np.uint64) * multipliers[i * 4 + j]
    ys, xs = np.nonzero(keep)
    keys = key[ys, xs]
    order = np.argsort(keys, kind="stable")
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


def _flattened(a: np.ndarray, positions: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    grid = (a.shape[0] - BLOCK) // STEP + 1, (a.shape[1] - BLOCK) // STEP + 1
    detail = np.abs(np.diff(blocks, axis=1)).mean(axis=(1, 2)) + np.abs(
        np.diff(blocks, axis=2)
    ).mean(axis=(1, 2))
    level = blocks.mean(axis=(1, 2))
    detail_map = detail.reshape(grid)
    level_map = level.reshape(grid)
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
    around = np.median(ring, axis=0)
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
    full = _normalise(img)
    cm_boxes, pairs = _copy_move(full)
    a, scale = _reduce(full)
    positions, blocks = _blocks(a)
    flat_mask = _flattened(a, positions, blocks)
    result = TamperResult(cm_boxes, _boxes(flat_mask, scale))
    evidence = pairs / (pairs + 10.0) if pairs else 0.0
    if flat_mask.any():
        evidence = max(evidence, min(1.0, 0.5 + flat_mask.sum() / 50.0))
    result.score = float(evidence)
    return result
