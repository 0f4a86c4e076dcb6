"""Simulated local edits for training the learned tamper detector (radguard/forensics/localnet).

A lesion is removed by filling its region from the surroundings, or injected by pasting
tissue from another radiograph. Attackers' tools differ, so every kind comes in several
flavours and the detector must not learn one tool's exact output:

* fills (removals): bilinear interpolation of the border (rectangles), harmonic (Laplace)
  fill, normalised-convolution blur fill, a constant mean, a heavy local blur ("smudge"),
  each optionally with added Gaussian grain matched to the surrounding noise level (an
  attacker who knows radiographs carry noise);
* splices (injections): tissue from another image at a random place, mean-matched and
  optionally contrast-matched, with a hard or feathered (blurred alpha) edge, rectangular or
  elliptical.

Every edited crop is rounded to 8 bit and, sometimes, JPEG round-tripped afterwards, as a
saved forgery would be. Masks are float (1 = edited) at the crop's resolution.

:func:`real_sources` lists every real radiograph of ``../shared/data`` by source, with its
split, for training and for the leave-one-source-out false-alarm measurements.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

FILLS = ("bilinear", "harmonic", "blur", "mean", "smudge")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# every real source of ../shared/data; the last three are never trained on (held out whole)
SOURCES = ("cxr-nih", "cxr-kermany", "mammo-mias", "cxr-wild", "stylegan2-real", "cbis-real",
           "dicom")
RADIOGRAPH_MODALITIES = ("CR", "DX", "MG", "RF", "XA", "PX", "IO")


@dataclass(frozen=True)
class RealItem:
    """One real radiograph: file, data set, and train / val / test split (by patient, woman
    or image; every DICOM radiograph is test-only)."""

    path: Path
    source: str
    split: str

    def load(self) -> np.ndarray:
        """The image as a reader sees it, 8-bit grey (DICOM: its display frame)."""
        if self.source == "dicom":
            from radguard.dicom.io import read_dataset
            from radguard.images import display_frame

            return np.asarray(display_frame(read_dataset(self.path, stop_before_pixels=False)))
        with Image.open(self.path) as im:
            return np.asarray(im.convert("L"))


def real_sources(shared: Path = SHARED) -> list[RealItem]:
    """Every real radiograph of the shared sets: the four raster sets of
    ``scripts/synthdata.py`` (same splits), the real crops of synthetic-stylegan2-cxr (split
    by image), the real rows of mammo-cbis-patches (the set's patient-disjoint splits) and
    the readable CR / DX / MG objects of dicom/."""
    import synthdata as sd

    from radguard.evaluation.splits import split_of

    out = [RealItem(r.path, r.source, r.split) for r in sd.real_images()]
    with open(shared / "synthetic-stylegan2-cxr" / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["label"] == "real":
                out.append(RealItem(shared / "synthetic-stylegan2-cxr" / row["file"],
                                    "stylegan2-real", split_of("stylegan2-real", row["file"])))
    with open(shared / "mammo-cbis-patches" / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["synthetic"] == "0":
                out.append(RealItem(shared / "mammo-cbis-patches" / row["file"], "cbis-real",
                                    row["split"]))
    from radguard.dicom.io import read_dataset
    from radguard.errors import RadguardError

    for path in sorted((shared / "dicom").rglob("*.dcm")):
        try:
            ds = read_dataset(path, stop_before_pixels=True)
            if str(getattr(ds, "Modality", "")).upper() not in RADIOGRAPH_MODALITIES:
                continue
            item = RealItem(path, "dicom", "test")
            item.load()  # a file whose pixels cannot be decoded is not a radiograph to judge
        except RadguardError:
            continue
        out.append(item)
    return out


def region_mask(shape: tuple[int, int], rng: np.random.Generator, size: int) -> tuple[
    np.ndarray, tuple[int, int, int, int]
]:
    """A rectangle, ellipse or irregular blob of about ``size`` px, away from the crop edge;
    returns the mask and its bounding box (y0, x0, y1, x1)."""
    h, w = shape
    sy = int(np.clip(size * rng.uniform(0.7, 1.3), 8, h - 8))
    sx = int(np.clip(size * rng.uniform(0.7, 1.3), 8, w - 8))
    y0 = int(rng.integers(4, h - sy - 4))
    x0 = int(rng.integers(4, w - sx - 4))
    m = np.zeros(shape, dtype=bool)
    kind = rng.random()
    if kind < 0.45:
        m[y0 : y0 + sy, x0 : x0 + sx] = True
    else:
        yy, xx = np.mgrid[0:sy, 0:sx]
        e = ((yy - (sy - 1) / 2) / (sy / 2)) ** 2 + ((xx - (sx - 1) / 2) / (sx / 2)) ** 2
        if kind > 0.8:  # irregular: an ellipse with a wobbly edge
            e = e + ndimage.gaussian_filter(rng.normal(0, 1.5, e.shape), 3)
        m[y0 : y0 + sy, x0 : x0 + sx] = e <= 1.0
    if not m.any():
        m[y0 + sy // 2, x0 + sx // 2] = True
    return m, (y0, x0, y0 + sy, x0 + sx)


def _bilinear_fill(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    y0, x0, y1, x1 = box
    s_y, s_x = y1 - y0, x1 - x0
    top, bottom = img[y0 - 1, x0:x1], img[y1, x0:x1]
    left, right = img[y0:y1, x0 - 1], img[y0:y1, x1]
    v = np.linspace(0, 1, s_y + 2)[1:-1]
    u = np.linspace(0, 1, s_x + 2)[1:-1]
    vertical = np.outer(1 - v, top) + np.outer(v, bottom)
    horizontal = np.outer(left, 1 - u) + np.outer(right, u)
    out = img.copy()
    out[y0:y1, x0:x1] = (vertical + horizontal) / 2
    return out


def _blur_fill(img: np.ndarray, m: np.ndarray, sigma: float) -> np.ndarray:
    keep = (~m).astype(np.float64)
    num = ndimage.gaussian_filter(img * keep, sigma)
    den = ndimage.gaussian_filter(keep, sigma)
    out = img.copy()
    out[m] = (num / np.maximum(den, 1e-6))[m]
    return out


def _harmonic_fill(img: np.ndarray, m: np.ndarray, iterations: int = 300) -> np.ndarray:
    """Jacobi iterations of Laplace's equation inside the mask, from a blur fill."""
    out = _blur_fill(img, m, max(2.0, np.sqrt(m.sum()) / 3))
    ys, xs = np.nonzero(m)
    y0, y1 = max(ys.min() - 1, 0), min(ys.max() + 2, img.shape[0])
    x0, x1 = max(xs.min() - 1, 0), min(xs.max() + 2, img.shape[1])
    sub, sm = out[y0:y1, x0:x1].copy(), m[y0:y1, x0:x1]
    for _ in range(iterations):
        p = np.pad(sub, 1, mode="edge")
        avg = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]) / 4
        sub[sm] = avg[sm]
    out[y0:y1, x0:x1] = sub
    return out


def local_noise(img: np.ndarray, m: np.ndarray) -> float:
    """Standard deviation of the fine residual in a ring around the mask."""
    ring = ndimage.binary_dilation(m, iterations=6) & ~m
    r = img - ndimage.uniform_filter(img, 3)
    return float(r[ring].std() * 1.5) if ring.any() else 1.0


def fill(img: np.ndarray, m: np.ndarray, box: tuple[int, int, int, int], method: str,
         rng: np.random.Generator, grain: bool) -> np.ndarray:
    """Remove what is under ``m`` with one of :data:`FILLS`."""
    if method == "bilinear":
        m[box[0] : box[2], box[1] : box[3]] = True  # works on the box
        out = _bilinear_fill(img, box)
    elif method == "harmonic":
        out = _harmonic_fill(img, m)
    elif method == "blur":
        out = _blur_fill(img, m, float(rng.uniform(2.0, 8.0)))
    elif method == "mean":
        out = img.copy()
        ring = ndimage.binary_dilation(m, iterations=3) & ~m
        out[m] = img[ring].mean() if ring.any() else img.mean()
    else:  # smudge: a strong blur of the region only
        out = img.copy()
        out[m] = ndimage.gaussian_filter(img, float(rng.uniform(2.5, 6.0)))[m]
    if grain:
        noise = rng.normal(0.0, local_noise(img, m) * rng.uniform(0.6, 1.2), img.shape)
        if rng.random() < 0.5:
            noise = ndimage.gaussian_filter(noise, 0.6) * 1.8
        out[m] += noise[m]
    return out


def splice(img: np.ndarray, m: np.ndarray, box: tuple[int, int, int, int], donor: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste tissue from ``donor`` into ``m`` (mean-, optionally contrast-matched; hard or
    feathered edge). Returns the image and the mask actually changed."""
    y0, x0, y1, x1 = box
    sy, sx = y1 - y0, x1 - x0
    dy = int(rng.integers(0, donor.shape[0] - sy))
    dx = int(rng.integers(0, donor.shape[1] - sx))
    patch = donor[dy : dy + sy, dx : dx + sx].astype(np.float64)
    target = img[y0:y1, x0:x1]
    patch = patch - patch.mean()
    if rng.random() < 0.5:
        patch *= (target.std() + 1e-3) / (patch.std() + 1e-3)
    patch += target.mean()
    alpha = m[y0:y1, x0:x1].astype(np.float64)
    if rng.random() < 0.5:
        alpha = ndimage.gaussian_filter(alpha, float(rng.uniform(0.8, 3.0)))
    out = img.copy()
    out[y0:y1, x0:x1] = alpha * patch + (1 - alpha) * target
    changed = np.zeros_like(m)
    changed[y0:y1, x0:x1] = alpha > 0.25
    return out, changed


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """A JPEG round trip of an 8-bit grey image."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=quality
    )
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im, dtype=np.float64)


def edit(crop: np.ndarray, donor: np.ndarray, rng: np.random.Generator, *,
         jpeg_p: float = 0.2, max_edits: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """One to ``max_edits`` random edits of an 8-bit crop or image (one in 70% of cases), then
    a JPEG round trip with probability ``jpeg_p``; returns (edited 8-bit image, float mask)."""
    img = crop.astype(np.float64)
    mask = np.zeros(img.shape, dtype=bool)
    count = 1 if rng.random() < 0.7 else int(rng.integers(2, max_edits + 1))
    for _ in range(count):
        size = int(rng.choice([12, 16, 24, 32, 40, 48, 64]))
        size = min(size, min(img.shape) // 2)
        m, box = region_mask(img.shape, rng, size)
        if rng.random() < 0.6:
            method = FILLS[int(rng.integers(len(FILLS)))]
            img = fill(img, m, box, method, rng, grain=rng.random() < 0.3)
            mask |= m
        else:
            img, changed = splice(img, m, box, donor, rng)
            mask |= changed
    img = np.clip(np.round(img), 0, 255)
    if rng.random() < jpeg_p:
        img = jpeg(img, int(rng.integers(80, 98)))
    return img, mask.astype(np.float32)
