"""Plain image files (PNG, JPEG): reading grey pixels with their bit depth, writing them back
losslessly, and drawing overlays people can look at. Shared by the watermark and forensics."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from radguard.errors import DicomReadError
from radguard.fileio import atomic_write_bytes

__all__ = [
    "blend_heat",
    "display_frame",
    "is_dicom_path",
    "per_level",
    "percentiles",
    "read_for_analysis",
    "read_grey",
    "read_pixels",
    "render_overlay",
    "window_to_8bit",
    "write_grey",
]

_RASTER = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def is_dicom_path(path: str | os.PathLike[str]) -> bool:
    """True unless the suffix names a raster image format."""
    return Path(path).suffix.lower() not in _RASTER


def _check_size(im: Image.Image, p: Path) -> None:
    """The decode limits of :mod:`radguard.dicom.limits`, from the header Pillow has read
    before it decodes anything (a small PNG or JPEG can declare a huge image)."""
    from radguard.dicom.limits import decoded_size

    bits = 32 if im.mode in ("I", "F") else 16 if im.mode.startswith("I;16") else 8
    decoded_size(str(p), im.height, im.width, 1, len(im.getbands()), bits)


def read_grey(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """Grey pixels and bits per sample (8 or 16) of a raster image; colour is refused."""
    p = Path(path)
    try:
        with warnings.catch_warnings():
            # radguard's own decode limits decide (_check_size), up to Pillow's hard limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
        with im:
            _check_size(im, p)
            im.load()
            mode = im.mode
            if mode == "L":
                return np.array(im), 8
            if mode in ("I;16", "I;16B", "I;16L"):
                return np.array(im).astype(np.uint16), 16
            if mode == "I":
                arr = np.array(im)
                if arr.min() >= 0 and arr.max() < 65536:
                    return arr.astype(np.uint16), 16
            raise DicomReadError(
                f"{p}: only 8- or 16-bit grey images can be watermarked (this one is {mode})"
            )
    except FileNotFoundError as exc:
        raise DicomReadError(f"{p}: no such file") from exc
    except Image.DecompressionBombError as exc:
        raise DicomReadError(f"{p}: image too large to decode ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DicomReadError(f"{p}: not a readable image ({exc})") from exc


def read_for_analysis(path: str | os.PathLike[str], *, keep_colour: bool = False) -> np.ndarray:
    """Any raster image as an array for analysis: grey stays 2D (16-bit stays 16-bit); colour
    becomes grey luminance, or (rows, cols, 3) RGB with ``keep_colour`` so a model can refuse
    photographs; alpha is dropped. Unreadable files and decompression bombs raise
    DicomReadError."""
    p = Path(path)
    try:
        with warnings.catch_warnings():
            # radguard's own decode limits decide (_check_size), up to Pillow's hard limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
        with im:
            _check_size(im, p)
            im.load()
            if im.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                return np.array(im)
            if im.mode == "1":
                return np.array(im.convert("L"))
            rgb = im.convert("RGBA" if "A" in im.getbands() else "RGB").convert("RGB")
            return np.array(rgb) if keep_colour else np.array(rgb.convert("L"))
    except FileNotFoundError as exc:
        raise DicomReadError(f"{p}: no such file") from exc
    except Image.DecompressionBombError as exc:
        raise DicomReadError(f"{p}: image too large to analyse ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DicomReadError(f"{p}: not a readable image ({exc})") from exc


def write_grey(path: str | os.PathLike[str], pixels: np.ndarray, bits: int) -> None:
    """Write grey pixels losslessly as PNG (8 or 16 bit), atomically."""
    buf = io.BytesIO()
    if bits <= 8:
        Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, "PNG")
    else:
        Image.fromarray(pixels.astype(np.uint16)).save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())


def _byte_histogram(flat: np.ndarray) -> np.ndarray:
    """Counts of the 256 byte values, by PIL's histogram: one C pass over the bytes, where
    ``np.bincount`` would first widen every value to a 64-bit index."""
    row = np.ascontiguousarray(flat).reshape(1, -1)
    return np.asarray(Image.fromarray(row).histogram(), dtype=np.int64)


def level_counts(a: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(lowest value, count of every value from it up) of an image of integers spanning at
    most 65536 levels - every stored radiograph; None for anything else."""
    a = np.asarray(a)
    if a.size == 0 or a.dtype.kind not in "uif":
        return None
    if a.dtype.kind == "f" and not (np.isfinite(a).all() and np.array_equal(a, np.rint(a))):
        return None
    low, high = float(a.min()), float(a.max())
    if high - low >= 65536:
        return None
    flat = a.ravel()
    if a.dtype == np.uint8:
        counts = _byte_histogram(flat)[int(low):int(high) + 1]
    elif a.dtype.kind == "u" and low == 0:
        counts = np.bincount(flat, minlength=int(high) + 1)
    elif a.dtype.kind in "ui":
        counts = np.bincount(flat.astype(np.int64) - int(low), minlength=int(high - low) + 1)
    else:
        counts = np.bincount((flat - low).astype(np.intp), minlength=int(high - low) + 1)
    return int(low), counts


def percentiles_of_counts(low: int, counts: np.ndarray, qs: tuple[float, ...],
                          values: np.ndarray | None = None) -> np.ndarray:
    """What ``np.percentile`` (linear interpolation) gives on the image whose
    :func:`level_counts` these are; ``values``: what each level becomes first (a
    non-decreasing map, e.g. a rescale), else the levels themselves."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in qs:
        virtual = (q / 100.0) * (n - 1)
        index = np.floor(virtual)
        gamma = virtual - index
        lo = int(np.searchsorted(cumulative, int(index), side="right"))
        hi = int(np.searchsorted(cumulative, min(int(index) + 1, n - 1), side="right"))
        if values is None:
            below, above = low + float(lo), low + float(hi)
        else:
            below, above = float(values[lo]), float(values[hi])
        diff = above - below
        out.append(above - diff * (1 - gamma) if gamma >= 0.5 else below + diff * gamma)
    return np.array(out, dtype=np.float64)


def percentiles(a: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """``np.percentile(a, qs)`` (linear interpolation) in float64, computed from a histogram
    when the values are integers spanning at most 65536 levels - every stored radiograph -
    which is several times faster than numpy's partition on a full image."""
    levels = level_counts(a)
    if levels is None:
        return np.percentile(np.asarray(a), qs).astype(np.float64)
    return percentiles_of_counts(*levels, qs)


def per_level(frame: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``fn(frame)`` for an element-wise ``fn``. An integer image spanning fewer than 65536
    levels has far fewer levels than pixels: ``fn`` runs once per level (on int64 values)
    and the pixels gather their results, bit-identical and several times faster."""
    frame = np.asarray(frame)
    if frame.dtype.kind in "ui" and frame.size > 65536:
        first, last = int(frame.min()), int(frame.max())
        if last - first < 65536:
            table = fn(np.arange(first, last + 1, dtype=np.int64))
            if not first:
                index = frame
            elif frame.dtype.kind == "u":
                index = frame - first  # every value is >= first: no wrap-around
            else:  # int16 -32768..32767 minus -32768 does not fit in int16
                index = frame.astype(np.int64) - first
            return np.take(table, index)
    return fn(frame)


def window_to_8bit(
    frame: np.ndarray, center: float | None = None, width: float | None = None,
    invert: bool = False, *, slope: float = 1.0, intercept: float = 0.0,
) -> np.ndarray:
    """Display an image as 8-bit: stored values times ``slope`` plus ``intercept`` (the
    modality rescale), then the given window, else the 0.5-99.5 percentile range. Integer
    frames go through a lookup table over their value range, not per-pixel float maths."""
    if center is not None and width is not None and width > 1:
        low, high = center - width / 2, center + width / 2
    else:
        raw_low, raw_high = percentiles(frame, (0.5, 99.5)) * slope + intercept
        low, high = min(raw_low, raw_high), max(raw_low, raw_high)
        if high <= low:
            high = low + 1

    def display(values: np.ndarray) -> np.ndarray:
        out = np.clip((np.asarray(values, np.float64) * slope + intercept - low)
                      / (high - low) * 255.0, 0, 255)
        if invert:
            out = 255.0 - out
        return np.round(out).astype(np.uint8)

    return per_level(frame, display)


def _first_number(value: object) -> float | None:
    """First value of a possibly multi-valued numeric attribute; None if absent or malformed."""
    if isinstance(value, list | tuple) or (
        hasattr(value, "__len__") and not isinstance(value, str | bytes)
    ):
        value = value[0] if len(value) else None  # type: ignore[index]
    try:
        return None if value in (None, "") else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def display_frame(ds: object, pixels: np.ndarray | None = None) -> np.ndarray:
    """First frame of a DICOM image as a reader sees it, in 8 bits: modality rescale, the
    stored VOI window (else the 0.5-99.5 percentile range), MONOCHROME1 inverted; colour
    frames become grey luminance. ``pixels``: the already decoded pixel array, if any (else
    it is decoded here and counts against the decode budget until the frame is made)."""
    from radguard.dicom.limits import decode_scope

    with decode_scope():
        return _display_frame(ds, pixels)


def _display_frame(ds: object, pixels: np.ndarray | None) -> np.ndarray:
    from radguard.dicom.io import peek
    from radguard.dicom.pixels import pixel_array, pixel_info

    info = pixel_info(ds)  # type: ignore[arg-type]
    arr = pixel_array(ds) if pixels is None else pixels  # type: ignore[arg-type]
    frame = arr[0] if info.frames > 1 else arr
    if frame.ndim == 3:
        frame = frame[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return window_to_8bit(frame, 127.5, 256.0)
    slope = _first_number(peek(ds, "RescaleSlope")) or 1.0  # type: ignore[arg-type]
    intercept = _first_number(peek(ds, "RescaleIntercept")) or 0.0  # type: ignore[arg-type]
    return window_to_8bit(
        frame,
        _first_number(peek(ds, "WindowCenter")),  # type: ignore[arg-type]
        _first_number(peek(ds, "WindowWidth")),  # type: ignore[arg-type]
        invert=info.photometric == "MONOCHROME1", slope=slope, intercept=intercept,
    )


@dataclass
class ImageForReading:
    """What a reader (or a model) sees of one file: the displayed pixels, the DICOM Modality
    when there is one, and the dataset itself for results that must reference it."""

    pixels: np.ndarray
    modality: str | None
    dataset: object | None


def read_pixels(path: str | os.PathLike[str], *, keep_colour: bool = True) -> ImageForReading:
    """A DICOM file's first frame as displayed (:func:`display_frame`), or a raster image
    (:func:`read_for_analysis`); unreadable files raise a RadguardError."""
    if is_dicom_path(path):
        from radguard.dicom.io import read_dataset

        ds = read_dataset(path, stop_before_pixels=False)
        return ImageForReading(display_frame(ds), str(getattr(ds, "Modality", "") or ""), ds)
    return ImageForReading(read_for_analysis(path, keep_colour=keep_colour), None, None)


def blend_heat(grey: np.ndarray, heat: np.ndarray, *, start: float = 0.5,
               colour: tuple[int, int, int] = (255, 30, 30)) -> np.ndarray:
    """An 8-bit grey image as RGB with ``colour`` blended in where ``heat`` (same shape,
    values in [0, 1]) exceeds ``start``, stronger as it rises (at most 60% opacity)."""
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float64)
    alpha = np.clip((heat - start) / max(1 - start, 1e-6) * 0.6, 0, 0.6)[..., None]
    rgb = rgb * (1 - alpha) + np.array(colour, dtype=np.float64) * alpha
    return np.round(rgb).astype(np.uint8)


def render_overlay(
    frame: np.ndarray,
    regions: list[list[int]],
    path: str | os.PathLike[str],
    *,
    invert: bool = False,
) -> None:
    """Save the frame (windowed) with changed regions outlined in red, as PNG."""
    grey = Image.fromarray(window_to_8bit(frame, invert=invert)).convert("RGB")
    draw = ImageDraw.Draw(grey)
    width = max(2, min(grey.size) // 300)
    for x0, y0, x1, y1 in regions:
        draw.rectangle(
            [x0 - width, y0 - width, x1 + width - 1, y1 + width - 1],
            outline=(255, 40, 40),
            width=width,
        )
    buf = io.BytesIO()
    grey.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())
