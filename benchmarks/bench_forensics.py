"""Forensics benchmark (issue 4). So far: the classical local tamper layer.

On radiographs from ../shared/data (NIH chest, MIAS mammograms, cxr-wild published images)
each image is edited once per kind: a copy-move of 16, 32 and 64 px (a patch copied from
elsewhere in the same image) and an inpainted removal (a 24 or 40 px region replaced by a
smooth interpolation of its border, i.e. a lesion erased). Reported: detection rate per kind
(a reported region overlaps the edit), false-alarm rate on the untouched images, the mean
IoU of the best-overlapping region with the edit, and the time per 1024 x 1024 image.

The synthetic-image detector and its leave-one-generator-out evaluation are not built yet.

    python benchmarks/bench_forensics.py [--per-set 100]
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radguard.forensics import detect_tamper  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def _inpaint(img: np.ndarray, y: int, x: int, s: int) -> np.ndarray:
    """Replace a square by bilinear interpolation of its border rows and columns."""
    out = img.copy()
    top, bottom = img[y - 1, x - 1 : x + s + 1], img[y + s, x - 1 : x + s + 1]
    left, right = img[y - 1 : y + s + 1, x - 1], img[y - 1 : y + s + 1, x + s]
    v = np.linspace(0, 1, s + 2)[1:-1]
    vertical = np.outer(1 - v, top[1:-1]) + np.outer(v, bottom[1:-1])
    horizontal = np.outer(left[1:-1], 1 - v) + np.outer(right[1:-1], v)
    out[y : y + s, x : x + s] = (vertical + horizontal) / 2
    return out


def _iou(a: list[int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-set", type=int, default=100)
    args = parser.parse_args()
    files = []
    for folder, pattern in (("cxr-nih", "*.jpg"), ("mammo-mias", "*.png"), ("cxr-wild", "*.png")):
        files += sorted((SHARED / folder).rglob(pattern))[: args.per_set]
    found = Counter()
    tried = Counter()
    ious: dict[str, list[float]] = defaultdict(list)
    false_alarms = 0
    for path in files:
        img = np.array(Image.open(path).convert("L")).astype(np.float64)
        if detect_tamper(img).regions:
            false_alarms += 1
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        h, w = img.shape
        for kind, size in (
            ("copy-move 16", 16),
            ("copy-move 32", 32),
            ("copy-move 64", 64),
            ("inpaint 24", 24),
            ("inpaint 40", 40),
        ):
            y = int(rng.integers(h // 4, 3 * h // 4 - size))
            x = int(rng.integers(w // 4, 3 * w // 4 - size))
            if kind.startswith("copy"):
                sy, sx = (y + h // 3) % (h - size), (x + w // 4) % (w - size)
                edited = img.copy()
                edited[y : y + size, x : x + size] = img[sy : sy + size, sx : sx + size]
            else:
                edited = _inpaint(img, y, x, size)
            box = (x, y, x + size, y + size)
            regions = detect_tamper(edited).regions
            tried[kind] += 1
            overlaps = [_iou(r, box) for r in regions]
            if overlaps and max(overlaps) > 0:
                found[kind] += 1
                ious[kind].append(max(overlaps))
    print(f"{len(files)} images ({args.per_set} per set: cxr-nih, mammo-mias, cxr-wild)")
    print(f"{'edit':<14}{'detected':>12}{'rate':>8}{'mean IoU':>10}")
    for kind in tried:
        iou = np.mean(ious[kind]) if ious[kind] else float("nan")
        print(
            f"{kind:<14}{found[kind]:>6}/{tried[kind]:<5}{found[kind] / tried[kind]:>8.1%}"
            f"{iou:>10.2f}"
        )
    print(
        f"false alarms on untouched images: {false_alarms}/{len(files)} "
        f"({false_alarms / len(files):.1%})"
    )
    big = np.array(
        Image.open(sorted((SHARED / "cxr-wild").rglob("*.png"))[0])
        .convert("L")
        .resize((1024, 1024))
    ).astype(np.float64)
    t0 = time.perf_counter()
    for _ in range(5):
        detect_tamper(big)
    print(
        f"speed: {(time.perf_counter() - t0) / 5:.3f} s per 1024 x 1024 image (one core; "
        "the scan target is 0.5 s for every layer together)"
    )
    print("synthetic-image detector: not built yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
