"""Local tamper detection without a watermark: copy-move, fills and splices.

* **Copy-move** (a lesion copied from elsewhere in the same image, as CT-GAN-style injections
  and "clone stamp" removals do): every 8x8 block position is described by its sixteen 2x2
  cell means (from integral images), quantised and hashed; a shift vector shared by many
  matching pairs (a whole copied patch moves as one) marks both the source and the copy.
  Blocks touching the image's extreme values (padding, saturation, burned-in text) are ignored.
* **Fills and splices** (a lesion erased by interpolating or blurring its surroundings, or
  tissue pasted from another patient's image): the learned local-edit detector of
  :mod:`~radguard.forensics.localnet`, which needs no twin in the image; its cell map becomes
  ``local_edit_map`` and the cells above its threshold become boxes.

The output is boxes [x0, y0, x1, y1] (x1/y1 exclusive) in pixel coordinates of the input.
Measured rates: ``benchmarks/bench_forensics.py`` (figures in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from radguard.errors import RadguardError
from radguard.forensics.cues import Prepared
from radguard.forensics.localnet import CELL, LocalEditDetector, load_local_detector
from radguard.regions import mask_boxes

__all__ = ["TamperError", "TamperResult", "detect_tamper"]


class TamperError(RadguardError):
    """The image cannot be analysed (wrong shape, too small)."""


MIN_SIDE = 32
STEP = 4  # copy-move regions are reported on this grid
CM_BLOCK = 8  # copy-move blocks, at every position
CM_MAX = 2048  # larger images are averaged down first
CM_MIN_PAIRS = 20  # blocks that must move together before a shift counts as a copy


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


def _local_edits(img: np.ndarray, result: TamperResult, detector: LocalEditDetector,
                 prepared: Prepared | None = None) -> None:
    """Run the learned fill / splice detector on the analysed copy of ``img``."""
    from radguard.forensics.cues import CueError

    try:
        prepared = prepared or Prepared.of(img)
    except CueError:  # too small for the network: the classical layers still spoke
        return
    a = prepared.image
    edit_map = detector.analyse(a, prepared.residual)
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
