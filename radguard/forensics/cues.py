"""Named image cues for the synthetic-radiograph detector, in the readers' language.

Every image is first brought to what an attacker cannot choose for free: 8-bit grey values
(bit depth and windowing erased) at an analysis size whose short side is at most
:data:`ANALYSIS_MAX` pixels (huge canvases are averaged down). The cues then describe what a
real X-ray detector leaves behind and a generator tends not to:

* quantum noise: its level, how uniform it is across the image, whether it depends on the
  signal (photon noise does; synthetic grain usually does not) and its tails;
* texture: fine-to-coarse detail ratio (over-smooth bones and soft tissue), spectral falloff;
* upsampling / decoder fingerprints: periodic peaks in the residual spectrum;
* bilateral symmetry of the anatomy's edges;
* residual co-occurrences (how neighbouring fine differences follow each other);
* physics cues (:func:`physics_cues`, issue 22): the slope and scatter of the noise level
  against brightness, detail consistency from half to quarter scale, and residual-spectrum
  peaks on the 2x / 4x / 8x grids that up-sampling decoders leave.

Block cues (one row per 32 x 32 block) feed the heat map of where the evidence lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
from PIL import Image

from radguard.errors import RadguardError

__all__ = ["ANALYSIS_MAX", "BLOCK", "CUE_NAMES", "PHYSICS_CUE_NAMES", "CueError", "Prepared",
           "block_cues", "image_cues", "physics_cues", "prepare"]

ANALYSIS_MAX = 512  # short side of the analysed image, at most
MIN_SIDE = 32
MAX_ASPECT = 8  # longer sides than this many times the short one are not judged
MIN_CONTRAST = 16  # grey levels (of 255) an analysed image must span to be judged
BLOCK = 32  # heat-map block
_NOISE_BLOCK = 16
_KB = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], dtype=np.float32) / 4.0
_T = 2  # co-occurrence truncation
_FLOOR = 0.05  # residual variance floor: a constant block reads as Gaussian, not as -inf

# display names of the scalar cues, in the order of image_cues()
CUE_NAMES = {
    "noise_level": "noise level in flat regions (log)",
    "noise_uniformity": "spread of the noise level across the image",
    "noise_signal_dependence": "noise follows brightness (photon noise) - rank correlation",
    "noise_tails": "heavy tails of the fine residual (log kurtosis)",
    "texture_smoothness": "fine-to-coarse detail ratio (log)",
    "spectral_falloff": "high-frequency power spectrum slope",
    "upsampling_peaks": "periodic interpolation traces (resampling spectrum peak, log)",
    "bilateral_symmetry": "left-right mirror correlation of edges",
    "flat_pixels": "share of neighbouring pixels with identical values",
}
# display names of physics_cues(), in its order
PHYSICS_CUE_NAMES = {
    "noise_brightness_slope": "slope of the log noise level against brightness (photon noise)",
    "noise_model_scatter": "scatter of the noise level around its brightness trend",
    "scale_consistency": "detail ratio between half and quarter scale (log)",
    "grid_peak_half": "residual spectrum peak at 1/2 of the sampling rate (decoder grid, log)",
    "grid_peak_quarter": "residual spectrum peak at 1/4 of the sampling rate (log)",
    "grid_peak_eighth": "residual spectrum peak at odd 1/8 frequencies (log)",
}


class CueError(RadguardError):
    """The image cannot be analysed (not a 2D grey image, too small, not finite)."""


def prepare(img: np.ndarray) -> np.ndarray:
    """8-bit grey values as float32, short side <= ANALYSIS_MAX; refuse what cannot be judged."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[-1] in (3, 4):  # colour or RGBA: luminance, alpha dropped
        a = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        if np.asarray(img).dtype == np.uint8:  # as Pillow's convert("L"): what it was
            a = np.round(a).astype(np.uint8)  # trained on, with no stretch
    if a.ndim != 2:
        raise CueError(f"expected a 2D grey image, got shape {a.shape}")
    if a.dtype.kind not in "uifb":
        raise CueError(f"expected numeric pixels, got dtype {a.dtype}")
    if min(a.shape) < MIN_SIDE:
        raise CueError(
            f"image {a.shape[1]}x{a.shape[0]} is too small to judge "
            f"(needs at least {MIN_SIDE}x{MIN_SIDE})"
        )
    if max(a.shape) > MAX_ASPECT * min(a.shape):  # a strip: no radiograph, unbounded cost
        raise CueError(f"image {a.shape[1]}x{a.shape[0]} is too elongated to judge (sides "
                       f"more than {MAX_ASPECT}:1)")
    # huge canvases: integer block means first, so memory and time stay bounded
    factor = min(a.shape) // (2 * ANALYSIS_MAX)
    if factor >= 2:
        h, w = (a.shape[0] // factor) * factor, (a.shape[1] // factor) * factor
        a = a[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise CueError("image holds NaN or infinite values")
    # every image's range to 8 bit (as the detectors were trained), robustly: the darkest
    # and brightest 1 in 100,000 pixels (at least one) are ignored, so a hot or dead pixel
    # cannot squeeze the image into a few grey levels
    flat = a.ravel()
    k = min(max(1, flat.size // 100_000), (flat.size - 1) // 2)
    low = float(np.partition(flat, k)[k])
    high = float(np.partition(flat, flat.size - 1 - k)[flat.size - 1 - k])
    if not high > low:
        low, high = float(flat.min()), float(flat.max())
    if not np.isfinite(high - low):
        raise CueError("pixel values span more than a floating-point number holds")
    a = np.clip((a - low) / max(high - low, 1e-300) * 255.0, 0, 255)
    a = np.round(a).astype(np.uint8)
    levels = int(np.count_nonzero(np.bincount(a.ravel(), minlength=256)))
    if levels == 1:
        raise CueError("the image is one flat value: nothing to judge")
    if int(a.max()) - int(a.min()) < MIN_CONTRAST or levels < 8:
        raise CueError(f"too little contrast to judge ({levels} grey levels; a radiograph "
                       "has far more)")
    short = min(a.shape)
    if short > ANALYSIS_MAX:
        scale = ANALYSIS_MAX / short
        size = (max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale)))
        a = np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BOX))
    return a.astype(np.float32)


@dataclass(frozen=True)
class Prepared:
    """An image in analysis form, made once and shared by the content detectors (the
    synthetic-image detector and the learned fill / splice detector read the same pixels)."""

    image: np.ndarray  # prepare(): 8-bit grey values as float32, short side <= ANALYSIS_MAX
    residual: np.ndarray  # fine_residual(image)

    @classmethod
    def of(cls, img: np.ndarray) -> Prepared:
        """Prepare ``img`` (CueError when it cannot be judged)."""
        a = prepare(img)
        return cls(a, fine_residual(a))


def fine_residual(a: np.ndarray) -> np.ndarray:
    """3 x 3 high-pass residual (Kirchner's KB kernel): noise and fine texture.

    KB is separable (minus the outer product of two second differences, over 4), so it is
    applied as two second differences on a mirrored border - the same numbers as
    ``ndimage.correlate(a, _KB, mode="reflect")`` (exactly so for the integer-valued
    analysis image), at a third of the cost.
    """
    p = np.pad(np.asarray(a, dtype=np.float32), 1, mode="symmetric")
    rows = p[:, :-2] - 2 * p[:, 1:-1] + p[:, 2:]
    return (rows[:-2] - 2 * rows[1:-1] + rows[2:]) * np.float32(-0.25)


def _sobel_magnitude(a: np.ndarray) -> np.ndarray:
    """Gradient magnitude from the two Sobel derivatives (as ``ndimage.sobel``, mirrored
    border), by slicing."""
    p = np.pad(a, 1, mode="symmetric")
    dy = p[2:] - p[:-2]  # derivative along axis 0, smoothed along axis 1
    gy = dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]
    dx = p[:, 2:] - p[:, :-2]
    gx = dx[:-2] + 2 * dx[1:-1] + dx[2:]
    return np.hypot(gy, gx)


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    h, w = (x.shape[0] // size) * size, (x.shape[1] // size) * size
    return x[:h, :w].reshape(h // size, size, w // size, size).swapaxes(1, 2)


def _cooccurrence(q: np.ndarray) -> np.ndarray:
    """First-order transition histogram of truncated neighbour differences (5 x 5), rows and
    columns pooled."""
    q = q.astype(np.int16)
    hist = np.zeros(25, dtype=np.float64)
    for axis in (1, 0):  # pairs of successive differences along rows, then along columns
        d = (np.clip(np.diff(q, axis=axis), -_T, _T) + _T).astype(np.uint8)
        first, second = (d[:, :-1], d[:, 1:]) if axis == 1 else (d[:-1], d[1:])
        hist += np.bincount((first * np.uint8(5) + second).ravel(), minlength=25)
    return hist / max(hist.sum(), 1.0)


def _texture_statistics(a: np.ndarray, r: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Co-occurrences of the pixels, of the rounded fine residual and of the half-size image
    (75 values): how neighbouring fine differences follow each other at two scales."""
    return np.concatenate(
        [_cooccurrence(a), _cooccurrence(np.round(r)), _cooccurrence(np.round(half))]
    )


# Kirchner's fixed linear predictor of a pixel from its 8 neighbours (its error is -KB * a)
_PREDICT = np.array([[-0.25, 0.5, -0.25], [0.5, 0.0, 0.5], [-0.25, 0.5, -0.25]], np.float32)


def _tile_spectrum(x: np.ndarray, tile: int) -> np.ndarray:
    """Welch-averaged power spectrum over (at most 64) tile x tile Hann-windowed tiles.

    Real input, so only half the plane is transformed; the other half is its mirror
    (P(-u, -v) = P(u, v)), filled in so callers see the whole tile x tile plane.
    """
    win = np.outer(np.hanning(tile), np.hanning(tile)).astype(np.float32)
    tiles = _blocks(x, tile).reshape(-1, tile, tile)
    tiles = tiles[:: max(1, len(tiles) // 64)]
    tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
    c = scipy.fft.rfft2(tiles * win)
    half = (c.real**2 + c.imag**2).mean(axis=0)
    full = np.empty((tile, tile), dtype=half.dtype)
    full[:, : tile // 2 + 1] = half
    u = (-np.arange(tile)) % tile
    full[:, tile // 2 + 1 :] = half[u][:, tile - np.arange(tile // 2 + 1, tile)]
    return full


def _spectrum_cues(a: np.ndarray, r: np.ndarray) -> tuple[float, float]:
    """(spectral falloff slope, log resampling-peak ratio).

    The peak follows Kirchner's fast resampling detector: interpolated pixels are linear
    combinations of their neighbours, so the map of how well a fixed linear predictor fits
    (p = exp(-e^2 / 2)) becomes periodic; its spectrum shows peaks. Frequencies of the 8 x 8
    JPEG grid are left out: a JPEG round trip is laundering, not generation. ``r`` is the
    image's :func:`fine_residual`.
    """
    tile = 64 if min(a.shape) >= 64 else 32
    f = np.fft.fftfreq(tile)
    radius = np.hypot(f[:, None], f[None, :])
    pa = _tile_spectrum(a, tile)
    band = (radius > 0.1) & (radius < 0.45)
    slope = float(np.polyfit(np.log(radius[band]), np.log(pa[band] + 1e-6), 1)[0])
    # the predictor's error a - _PREDICT * a is -r, since _PREDICT = _KB + identity
    pr = _tile_spectrum(np.exp(-r * r / 2.0).astype(np.float32), tile)
    rings = np.minimum((radius * tile).astype(int), tile // 2)
    med = np.ones(tile // 2 + 1)
    for k in range(tile // 2 + 1):
        sel = pr[rings == k]
        if sel.size:
            med[k] = np.median(sel)
    on_grid = np.arange(tile) % (tile // 8) == 0
    candidates = (radius > 0.15) & ~(on_grid[:, None] & on_grid[None, :])
    ratio = pr / (med[rings] + 1e-9)
    return slope, float(np.log(ratio[candidates].max() + 1e-2))


def image_cues(a: np.ndarray, r: np.ndarray | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Scalar cues (CUE_NAMES order) and the 75 co-occurrence frequencies of a prepared image
    (``r``: its :func:`fine_residual`, when the caller has it already)."""
    r = fine_residual(a) if r is None else r
    rb = _blocks(r, _NOISE_BLOCK)
    ab = _blocks(a, _NOISE_BLOCK)
    sigma = rb.std(axis=(2, 3)).ravel() + 0.05
    mean = ab.mean(axis=(2, 3)).ravel()
    usable = (ab.min(axis=(2, 3)).ravel() > 2) & (ab.max(axis=(2, 3)).ravel() < 253)
    if usable.sum() < 8:
        usable = np.ones_like(usable)
    s_use, m_use = sigma[usable], mean[usable]
    flat = s_use <= np.percentile(s_use, 40)  # flattest blocks: noise, not anatomy
    log_s = np.log(s_use)
    noise_level = float(np.median(log_s[flat]))
    q25, q75 = np.percentile(log_s, [25, 75])
    uniformity = float(q75 - q25)
    if np.ptp(m_use) > 0 and np.ptp(s_use) > 0:
        rank_m = np.argsort(np.argsort(m_use))
        rank_s = np.argsort(np.argsort(s_use))
        dependence = float(np.corrcoef(rank_m, rank_s)[0, 1])
    else:
        dependence = 0.0
    flat_res = rb.reshape(-1, _NOISE_BLOCK * _NOISE_BLOCK)[np.flatnonzero(usable)[flat]]
    flat_res = flat_res - flat_res.mean(axis=1, keepdims=True)
    var = float((flat_res**2).mean()) + _FLOOR
    kurt = float(((flat_res**4).mean() + 3 * _FLOOR**2) / var**2)
    half = np.asarray(
        Image.fromarray(a).resize(
            (max(1, a.shape[1] // 2), max(1, a.shape[0] // 2)), Image.Resampling.BOX
        )
    )
    fine = float(np.abs(r).mean()) + 1e-3
    coarse = float(np.abs(fine_residual(half)).mean()) + 1e-3
    slope, peak = _spectrum_cues(a, r)
    g = _sobel_magnitude(a)
    g64 = np.asarray(Image.fromarray(g).resize((64, 64), Image.Resampling.BOX))
    g64 = g64 - g64.mean()
    denom = float(np.sqrt((g64**2).sum() * (g64[:, ::-1] ** 2).sum())) + 1e-9
    symmetry = float((g64 * g64[:, ::-1]).sum() / denom)
    q = a.astype(np.int16)
    same = float((np.diff(q, axis=1) == 0).mean() + (np.diff(q, axis=0) == 0).mean()) / 2
    cues = {
        "noise_level": noise_level,
        "noise_uniformity": uniformity,
        "noise_signal_dependence": dependence,
        "noise_tails": float(np.log(kurt)),
        "texture_smoothness": float(np.log(fine / coarse)),
        "spectral_falloff": slope,
        "upsampling_peaks": peak,
        "bilateral_symmetry": symmetry,
        "flat_pixels": same,
    }
    return cues, _texture_statistics(a, r, half)


def physics_cues(a: np.ndarray, r: np.ndarray | None = None) -> np.ndarray:
    """What a physical detector leaves and a generator need not (PHYSICS_CUE_NAMES order):
    how the noise level follows brightness (a straight trend with little scatter for photon
    noise after the display curve, none for synthetic grain), whether detail falls off
    consistently from half to quarter scale, and peaks of the residual spectrum on the
    2x / 4x / 8x grid that up-sampling decoders leave (the 8 x 8 JPEG grid is left to
    ``upsampling_peaks``; odd multiples of 1/8 are reported separately)."""
    r = fine_residual(a) if r is None else r
    rb = _blocks(r, _NOISE_BLOCK)
    ab = _blocks(a, _NOISE_BLOCK)
    sigma = rb.std(axis=(2, 3)).ravel() + 0.05
    mean = ab.mean(axis=(2, 3)).ravel() / 255.0
    usable = (ab.min(axis=(2, 3)).ravel() > 2) & (ab.max(axis=(2, 3)).ravel() < 253)
    if usable.sum() < 8:
        usable = np.ones_like(usable)
    ls, m = np.log(sigma[usable]), mean[usable]
    if np.ptp(m) > 1e-6:
        slope, icpt = np.polyfit(m, ls, 1)
        scatter = float(np.std(ls - (slope * m + icpt)))
    else:
        slope, scatter = 0.0, float(np.std(ls))
    im = Image.fromarray(a)
    half = np.asarray(im.resize((max(1, a.shape[1] // 2), max(1, a.shape[0] // 2)),
                                Image.Resampling.BOX))
    quarter = np.asarray(im.resize((max(1, a.shape[1] // 4), max(1, a.shape[0] // 4)),
                                   Image.Resampling.BOX))
    e2 = float(np.abs(fine_residual(half)).mean()) + 1e-3
    e4 = float(np.abs(fine_residual(quarter)).mean()) + 1e-3 if min(quarter.shape) >= 3 else e2
    tile = 64 if min(a.shape) >= 64 else 32
    p = _tile_spectrum(r, tile)
    f = np.fft.fftfreq(tile)
    radius = np.hypot(f[:, None], f[None, :])
    rings = np.minimum((radius * tile).astype(int), tile // 2)
    med = np.array([np.median(p[rings == k]) if (rings == k).any() else 1.0
                    for k in range(tile // 2 + 1)])
    ratio = np.log(p / (med[rings] + 1e-9) + 1e-3)
    k = np.arange(tile)

    def at(on: np.ndarray) -> float:
        sel = on[:, None] & on[None, :]
        sel[0, 0] = False
        return float(ratio[sel].mean()) if sel.any() else 0.0

    m_quarter = k % (tile // 4) == 0
    m_eighth_odd = (k % (tile // 8) == 0) & ~m_quarter | (k == 0)
    return np.array([slope, scatter, np.log(e2 / e4), at(k % (tile // 2) == 0), at(m_quarter),
                     at(m_eighth_odd)])


BLOCK_CUES = ("log_noise", "log_detail", "log_kurtosis", "brightness", "flat_share", "small_steps")


def block_cues(a: np.ndarray, r: np.ndarray | None = None
               ) -> tuple[np.ndarray, tuple[int, int]]:
    """Per-block cues for the heat map: (rows*cols, len(BLOCK_CUES)) and the grid shape
    (``r``: the image's :func:`fine_residual`, when the caller has it already)."""
    r = fine_residual(a) if r is None else r
    q = a.astype(np.int16)
    dx = np.abs(np.diff(q, axis=1, append=q[:, -1:]))
    rb = _blocks(r, BLOCK)
    grid = rb.shape[:2]
    rb = rb.reshape(-1, BLOCK * BLOCK)
    ab = _blocks(a, BLOCK).reshape(-1, BLOCK * BLOCK)
    db = _blocks(dx, BLOCK).reshape(-1, BLOCK * BLOCK)
    rc = rb - rb.mean(axis=1, keepdims=True)
    var = (rc**2).mean(axis=1) + _FLOOR
    feats = np.stack(
        [
            np.log(np.sqrt(var) + 0.05),
            np.log(db.mean(axis=1) + 0.05),
            np.log(((rc**4).mean(axis=1) + 3 * _FLOOR**2) / var**2),
            ab.mean(axis=1) / 255.0,
            (db == 0).mean(axis=1),
            (db <= 1).mean(axis=1),
        ],
        axis=1,
    )
    return feats.astype(np.float64), (int(grid[0]), int(grid[1]))
