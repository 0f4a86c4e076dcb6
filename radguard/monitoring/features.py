"""What is monitored per study: image statistics, acquisition metadata, the model's score.

Image statistics are computed on a 256-pixel-wide copy normalised to [0, 1] by the stored
bit depth, so they compare across sizes and bit depths: brightness and contrast, percentiles,
histogram entropy, fine-detail energy (a noise/sharpness proxy) and the share of the image
at its extremes (collimation, burned-in borders).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from radguard.dicom.io import peek
from radguard.images import level_counts, percentiles_of_counts

__all__ = ["IMAGE_FEATURES", "METADATA_FIELDS", "dataset_features", "features_of_file",
           "image_features", "metadata_features"]

IMAGE_FEATURES = ("mean", "std", "p05", "p50", "p95", "entropy", "detail", "dark", "bright",
                  "aspect")
METADATA_FIELDS = ("Manufacturer", "ManufacturerModelName", "ProtocolName", "KVP",
                   "PixelSpacing", "ViewPosition", "BodyPartExamined")


def image_features(pixels: np.ndarray, max_value: float | None = None, *,
                   offset: float = 0.0) -> dict[str, float]:
    """Scale-free statistics of a grey image (2-D array of stored values, ``offset``
    subtracted first)."""
    img = np.asarray(pixels)
    if img.ndim != 2 or min(img.shape) < 8:
        raise ValueError("image features need a 2-D image of at least 8x8 pixels")
    step = max(1, img.shape[1] // 256)
    sample = img[::step, ::step]  # only the pixels read
    small = sample.astype(np.float64) - offset
    if not max_value:
        top = float(img.max()) - offset
        max_value = 255.0 if top <= 255 else top
    scale = max(max_value, 1.0)
    small /= scale
    levels = level_counts(sample)
    if levels is None:
        hist = np.histogram(small, bins=64, range=(0.0, 1.0))[0].astype(np.float64)
        p05, p50, p95 = np.percentile(small, [5, 50, 95])
    else:  # stored integers: per level, not per pixel (the same numbers, bit for bit)
        low, counts = levels
        values = (np.arange(counts.size, dtype=np.float64) + low) - offset
        values /= scale  # each level as ``small`` holds it
        hist = np.histogram(values, bins=64, range=(0.0, 1.0), weights=counts)[0]
        p05, p50, p95 = percentiles_of_counts(low, counts, (5, 50, 95), values)
    prob = hist[hist > 0] / hist.sum()
    lap = np.abs(4 * small[1:-1, 1:-1] - small[:-2, 1:-1] - small[2:, 1:-1]
                 - small[1:-1, :-2] - small[1:-1, 2:])
    return {
        "mean": float(small.mean()), "std": float(small.std()), "p05": float(p05),
        "p50": float(p50), "p95": float(p95), "entropy": float(-(prob * np.log2(prob)).sum()),
        "detail": float(lap.mean()), "dark": float((small < 0.02).mean()),
        "bright": float((small > 0.98).mean()), "aspect": float(img.shape[1] / img.shape[0]),
    }


def dataset_features(ds: Dataset, pixels: np.ndarray | None = None) -> dict[str, float]:
    """Image features of a DICOM image's first frame (first sample), scaled by its stored bit
    depth - not by a display window, which would move with every change of VOI. ``pixels``:
    the already decoded pixel array, if any. The reference (``radguard monitor features``)
    and the gateway both compute them here, so they compare."""
    from radguard.dicom.pixels import pixel_array, pixel_info

    info = pixel_info(ds)
    arr = pixel_array(ds) if pixels is None else pixels
    arr = np.asarray(arr).reshape(info.frames, info.rows, info.columns, -1)[0, ..., 0]
    low = info.min_value
    return image_features(arr, info.max_value - low, offset=low)


def metadata_features(ds: Dataset) -> dict[str, str]:
    """Acquisition metadata as text (categorical drift tests)."""
    out = {}
    for keyword in METADATA_FIELDS:
        value = peek(ds, keyword, "")
        if isinstance(value, list | tuple) or (hasattr(value, "__iter__")
                                               and not isinstance(value, str | bytes)):
            value = "\\\\".join(str(v) for v in value)
        out[keyword] = str(value if value is not None else "").strip()
    return out


def features_of_file(path: str) -> dict[str, float]:
    """Image features of a DICOM file (first frame) or a PNG/JPEG, with a clear error."""
    from PIL import Image, UnidentifiedImageError

    from radguard.dicom.io import read_dataset
    from radguard.errors import DicomReadError
    from radguard.images import is_dicom_path

    if is_dicom_path(path):
        return dataset_features(read_dataset(path))
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("L") if im.mode not in ("I;16", "I") else im)
    except (OSError, UnidentifiedImageError) as exc:
        raise DicomReadError(f"{path}: not a readable image") from exc
    return image_features(arr, 255.0 if arr.dtype == np.uint8 else 65535.0)
