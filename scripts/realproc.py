"""What real radiographs go through between the detector and the viewer, as image operations.

A forensic detector that calls ordinary processing "synthetic" or "tampered" quarantines a
new hospital's images on day one. Real radiographs are resized (0.25-2x, up and down),
JPEG-compressed (quality 60-95), sharpened by vendor software (unsharp masking, edge
enhancement), histogram-equalised, windowed to 8 bit, noise-reduced, and they carry burned-in
text and markers, lines and tubes, ECG electrodes and collimation edges. Each of those is one
named operation here; the training scripts apply random chains of them to real images (and to
fakes, so processing never separates the classes) and the benchmark measures false alarms per
operation. Every operation takes and returns a 2-D uint8 image and draws only from ``rng``.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy import ndimage

__all__ = ["PROCESSINGS", "apply", "random_chain"]

Op = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def resize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Down- or up-sampling by 0.25-2x with a viewer's or PACS's kernel (never below 64 px
    on the short side, never above 2048)."""
    h, w = img.shape
    k = float(np.exp(rng.uniform(np.log(0.25), np.log(2.0))))
    k = float(np.clip(k, 64 / min(h, w), 2048 / max(h, w)))
    kernel = [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS,
              Image.Resampling.BOX, Image.Resampling.NEAREST][int(rng.integers(5))]
    size = (max(1, round(w * k)), max(1, round(h * k)))
    return np.asarray(Image.fromarray(img).resize(size, kernel))


def jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A JPEG round trip at quality 60-95 (4:2:0 is irrelevant for grey)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(60, 96)))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"))


def unsharp(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vendor sharpening: unsharp masking (radius 1-8 px, 40-250%)."""
    im = Image.fromarray(img).filter(ImageFilter.UnsharpMask(
        radius=float(rng.uniform(1, 8)), percent=int(rng.integers(40, 250)),
        threshold=int(rng.integers(0, 4))))
    return np.asarray(im)


def edge_enhance(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multi-scale edge enhancement: a band of detail boosted, as CR/DX post-processing
    (MUSICA-like) does."""
    a = img.astype(np.float64)
    s1, s2 = float(rng.uniform(0.7, 2.0)), float(rng.uniform(3.0, 12.0))
    band = ndimage.gaussian_filter(a, s1) - ndimage.gaussian_filter(a, s2)
    return _u8(a + float(rng.uniform(0.3, 1.5)) * band)


def histeq(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Global histogram equalisation, or a contrast-limited one on tiles (CLAHE: each
    tile's clipped mapping, interpolated bilinearly between tile centres so no seams show),
    blended with the original."""
    a = img.astype(np.float64)
    if rng.random() < 0.5:
        hist = np.bincount(img.ravel(), minlength=256).astype(np.float64)
        cdf = np.cumsum(hist) / hist.sum()
        eq = cdf[img] * 255
    else:
        eq = _clahe(img, int(rng.integers(4, 9)), float(rng.uniform(2, 5)))
    blend = float(rng.uniform(0.4, 1.0))
    return _u8(blend * eq + (1 - blend) * a)


def _clahe(img: np.ndarray, tiles: int, clip_factor: float) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an 8-bit image on
    ``tiles`` x ``tiles`` tiles (clip at ``clip_factor`` x the mean bin, excess spread)."""
    h, w = img.shape
    ys = np.linspace(0, h, tiles + 1).astype(int)
    xs = np.linspace(0, w, tiles + 1).astype(int)
    luts = np.empty((tiles, tiles, 256))
    for i, (y0, y1) in enumerate(zip(ys[:-1], ys[1:], strict=True)):
        for j, (x0, x1) in enumerate(zip(xs[:-1], xs[1:], strict=True)):
            hist = np.bincount(img[y0:y1, x0:x1].ravel(), minlength=256).astype(np.float64)
            clip = hist.mean() * clip_factor
            excess = np.maximum(hist - clip, 0).sum()
            hist = np.minimum(hist, clip) + excess / 256
            luts[i, j] = np.cumsum(hist) / hist.sum() * 255
    # fractional tile coordinates of every pixel, measured between tile centres
    cy = (np.arange(h) + 0.5) / (h / tiles) - 0.5
    cx = (np.arange(w) + 0.5) / (w / tiles) - 0.5
    y0 = np.clip(np.floor(cy).astype(int), 0, tiles - 1)
    x0 = np.clip(np.floor(cx).astype(int), 0, tiles - 1)
    y1, x1 = np.minimum(y0 + 1, tiles - 1), np.minimum(x0 + 1, tiles - 1)
    wy = np.clip(cy - y0, 0, 1)[:, None]
    wx = np.clip(cx - x0, 0, 1)[None, :]
    v = img.astype(np.intp)
    top = luts[y0[:, None], x0[None, :], v] * (1 - wx) + luts[y0[:, None], x1[None, :], v] * wx
    bottom = (luts[y1[:, None], x0[None, :], v] * (1 - wx)
              + luts[y1[:, None], x1[None, :], v] * wx)
    return top * (1 - wy) + bottom * wy


def window_level(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A window narrower than the data mapped to 8 bit, with a display gamma: part of the
    range clips, the rest stretches (what exporting a windowed view does)."""
    a = img.astype(np.float64)
    lo_q, hi_q = np.percentile(a, [float(rng.uniform(0, 8)), float(rng.uniform(92, 100))])
    if hi_q <= lo_q:
        return img
    x = np.clip((a - lo_q) / (hi_q - lo_q), 0, 1) ** float(np.exp(rng.uniform(-0.4, 0.4)))
    if rng.random() < 0.15:
        x = 1 - x  # an inverted display (MONOCHROME1 shown as stored)
    return _u8(x * 255)


def denoise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Vendor noise reduction: a light Gaussian, median or edge-preserving filter."""
    kind = int(rng.integers(3))
    if kind == 0:
        return _u8(ndimage.gaussian_filter(img.astype(np.float64), float(rng.uniform(0.5, 1.5))))
    if kind == 1:
        return ndimage.median_filter(img, size=int(rng.choice([3, 5])))
    size = int(rng.choice([3, 5]))
    return np.asarray(Image.fromarray(img).filter(ImageFilter.ModeFilter(size))) \
        if rng.random() < 0.2 else _u8(
            0.5 * img + 0.5 * ndimage.uniform_filter(img.astype(np.float64), size))


_WORDS = ("L", "R", "PA", "AP", "PORTABLE", "SUPINE", "ERECT", "UPRIGHT", "INSP", "ICU 3",
          "BEDSIDE", "LAT", "CHEST", "2024-03-17", "08:42", "kVp 110", "mAs 2.5", "STAT",
          "Hospital", "Dept. Radiology", "ID 0012345", "x1.0", "AP SITTING")


def text(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Burned-in annotation: laterality letters, view, date/time, technique, in white or
    black, sometimes on a box, near a corner or an edge."""
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    h, w = img.shape
    for _ in range(int(rng.integers(1, 5))):
        size = int(np.clip(rng.uniform(0.02, 0.07) * min(h, w), 8, 120))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            font = ImageFont.load_default()
        word = str(rng.choice(_WORDS))
        x = int(rng.uniform(0.02, 0.8) * w)
        y = int(rng.choice([rng.uniform(0.01, 0.15), rng.uniform(0.8, 0.95)]) * h)
        ink = 255 if rng.random() < 0.8 else 0
        if rng.random() < 0.25:  # a label on a box
            box = draw.textbbox((x, y), word, font=font)
            draw.rectangle([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], fill=255 - ink)
        draw.text((x, y), word, fill=ink, font=font)
    return np.asarray(im)


def markers(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lead markers and measurement graphics: small bright squares, circles, arrows, a
    ruler's ticks."""
    im = Image.fromarray(img)
    draw = ImageDraw.Draw(im)
    h, w = img.shape
    for _ in range(int(rng.integers(1, 4))):
        s = int(np.clip(rng.uniform(0.015, 0.05) * min(h, w), 4, 80))
        x, y = int(rng.uniform(0.05, 0.9) * w), int(rng.uniform(0.05, 0.9) * h)
        ink = int(rng.integers(200, 256))
        kind = int(rng.integers(4))
        if kind == 0:
            draw.rectangle([x, y, x + s, y + s], outline=ink, width=max(1, s // 6))
        elif kind == 1:
            draw.ellipse([x, y, x + s, y + s], fill=ink)
        elif kind == 2:
            draw.line([x, y, x + 3 * s, y + 3 * s], fill=ink, width=max(1, s // 5))
            draw.polygon([(x, y), (x + s, y + s // 3), (x + s // 3, y + s)], fill=ink)
        else:
            for i in range(10):
                xx = x + i * s // 2
                draw.line([xx, y, xx, y + (s if i % 5 == 0 else s // 2)], fill=ink, width=1)
    return np.asarray(im)


def _curve(h: int, w: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """A smooth random path across part of the image (a tube or a wire)."""
    n = 40
    t = np.linspace(0, 1, n)
    x0, y0 = rng.uniform(0.1, 0.9) * w, rng.uniform(0.0, 0.3) * h
    x1, y1 = rng.uniform(0.1, 0.9) * w, rng.uniform(0.5, 1.0) * h
    bend = rng.normal(0, 0.15 * w, 2)
    xs = x0 + (x1 - x0) * t + bend[0] * np.sin(np.pi * t) + bend[1] * np.sin(2 * np.pi * t) / 3
    ys = y0 + (y1 - y0) * t
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def lines_tubes(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Endotracheal and nasogastric tubes, central lines, pacing wires, sternal wires: thin
    radio-opaque (bright) or lucent curves, some with a radio-opaque stripe, softened as
    the detector blurs them."""
    h, w = img.shape
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 5))):
        width = int(np.clip(rng.uniform(0.002, 0.012) * min(h, w), 1, 24))
        draw.line(_curve(h, w, rng), fill=int(rng.integers(60, 256)), width=width,
                  joint="curve")
    overlay = ndimage.gaussian_filter(np.asarray(layer, dtype=np.float64),
                                      float(rng.uniform(0.3, 1.2)))
    a = img.astype(np.float64)
    if rng.random() < 0.85:
        out = a + (255 - a) * overlay / 255 * float(rng.uniform(0.4, 0.95))  # opaque: bright
    else:
        out = a * (1 - overlay / 255 * float(rng.uniform(0.2, 0.5)))  # lucent: dark
    return _u8(out)


def electrodes(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ECG electrodes: bright discs with a central snap and a lead wire leaving them."""
    h, w = img.shape
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 6))):
        r = int(np.clip(rng.uniform(0.01, 0.03) * min(h, w), 3, 60))
        x, y = rng.uniform(0.05, 0.95) * w, rng.uniform(0.05, 0.95) * h
        draw.ellipse([x - r, y - r, x + r, y + r], outline=140, width=max(1, r // 4))
        draw.ellipse([x - r / 3, y - r / 3, x + r / 3, y + r / 3], fill=255)
        if rng.random() < 0.7:
            end = (x + rng.normal(0, 0.3) * w, y + rng.normal(0, 0.3) * h)
            draw.line([(x, y), end], fill=180, width=max(1, r // 5))
    overlay = ndimage.gaussian_filter(np.asarray(layer, dtype=np.float64), 0.7)
    a = img.astype(np.float64)
    return _u8(a + (255 - a) * overlay / 255 * float(rng.uniform(0.5, 0.95)))


def collimation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Collimator edges: one to four straight, slightly tilted borders outside which the
    image is flat (bright unexposed film or a dark electronic shutter), with a soft edge."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    inside = np.ones((h, w))
    for side in rng.choice(4, size=int(rng.integers(1, 5)), replace=False):
        angle = float(rng.normal(0, 0.03))
        depth = float(rng.uniform(0.02, 0.15))
        if side == 0:
            d = yy - depth * h - angle * (xx - w / 2)
        elif side == 1:
            d = (h - depth * h) - yy - angle * (xx - w / 2)
        elif side == 2:
            d = xx - depth * w - angle * (yy - h / 2)
        else:
            d = (w - depth * w) - xx - angle * (yy - h / 2)
        inside = np.minimum(inside, np.clip(d / float(rng.uniform(0.5, 3.0)) + 0.5, 0, 1))
    level = float(rng.choice([rng.uniform(0, 25), rng.uniform(200, 255)]))
    grain = rng.normal(0, float(rng.uniform(0, 2)), (h, w))
    return _u8(img * inside + (level + grain) * (1 - inside))


PROCESSINGS: dict[str, Op] = {
    "resize": resize,
    "jpeg": jpeg,
    "unsharp": unsharp,
    "edge_enhance": edge_enhance,
    "histeq": histeq,
    "window_level": window_level,
    "denoise": denoise,
    "text": text,
    "markers": markers,
    "lines_tubes": lines_tubes,
    "electrodes": electrodes,
    "collimation": collimation,
}


def apply(name: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One named operation on a 2-D uint8 image."""
    return PROCESSINGS[name](np.ascontiguousarray(img, dtype=np.uint8), rng)


def random_chain(img: np.ndarray, rng: np.random.Generator, *, max_ops: int = 4,
                 p_none: float = 0.2) -> tuple[np.ndarray, list[str]]:
    """A random chain of 0-``max_ops`` operations in a plausible order (content first -
    collimation, lines, electrodes, markers, text - then display processing, then resizing
    and JPEG last, as an export would); returns the image and the names applied."""
    if rng.random() < p_none:
        return img, []
    content = ["collimation", "lines_tubes", "electrodes", "markers", "text"]
    display = ["unsharp", "edge_enhance", "histeq", "window_level", "denoise"]
    k = int(rng.integers(1, max_ops + 1))
    chosen = set(rng.choice(list(PROCESSINGS), size=k, replace=False).tolist())
    order = [n for n in content + display + ["resize", "jpeg"] if n in chosen]
    for name in order:
        img = apply(name, img, rng)
    return img, order
