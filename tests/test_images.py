"""Display helpers shared by forensics, triage and the gateway: the histogram percentiles
agree exactly with numpy's, and windowing through a lookup table gives the same pixels as
per-pixel float maths."""

from __future__ import annotations

import numpy as np
import pytest

from radguard.images import (
    display_frame,
    level_counts,
    percentiles,
    percentiles_of_counts,
    window_to_8bit,
)
from tests.conftest import MR_NATIVE, NIH_DX, RG1_J2K


@pytest.mark.parametrize("dtype, low, high", [
    (np.uint8, 0, 256), (np.uint8, 40, 200), (np.uint16, 0, 4096), (np.uint16, 1000, 3000),
    (np.int16, -1024, 3072),
    (np.float32, 0, 256), (np.float64, -5, 5),
])
def test_percentiles_match_numpy_exactly(dtype, low, high):
    rng = np.random.default_rng(int(high))
    for n in (1, 2, 7, 1000, 300_000):
        a = rng.integers(low, high, n).astype(dtype)
        for qs in ((0.5, 99.5), (5, 50, 95), (0, 100), (33.3,)):
            assert np.array_equal(percentiles(a, qs), np.percentile(a, qs).astype(np.float64))


def test_percentiles_of_rescaled_levels_match_numpy_on_the_rescaled_image():
    """The monitor reads percentiles of (stored value - offset) / peak: per level, they must
    be the very numbers numpy finds on the rescaled pixels."""
    rng = np.random.default_rng(5)
    for dtype, high, offset, peak in ((np.uint8, 256, 0.0, 255.0), (np.uint16, 4096, 0.0, 4095.0),
                                      (np.int16, 2048, -1024.0, 4095.0)):
        a = (rng.integers(0, high, (211, 137)) + (offset if dtype == np.int16 else 0)
             ).astype(dtype)
        low, counts = level_counts(a)
        values = (np.arange(counts.size, dtype=np.float64) + low) - offset
        values /= peak
        scaled = (a.astype(np.float64) - offset) / peak
        qs = (0.5, 5, 50, 95, 99.5)
        assert np.array_equal(percentiles_of_counts(low, counts, qs, values),
                              np.percentile(scaled, qs))


def test_percentiles_of_non_integer_or_wide_values_fall_back_to_numpy():
    rng = np.random.default_rng(1)
    for a in (rng.normal(size=5000), rng.integers(0, 2**20, 5000),
              np.array([0.5, np.nan, 2.0])):
        with np.errstate(invalid="ignore"):
            assert np.array_equal(percentiles(a, (5, 95)), np.percentile(a, (5, 95)),
                                  equal_nan=True)


@pytest.mark.parametrize("slope, intercept, invert", [(1.0, 0.0, False), (2.0, -1024.0, True),
                                                      (-0.5, 100.0, False)])
def test_lookup_table_windowing_equals_float_windowing(slope, intercept, invert):
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 4096, (400, 400)).astype(np.uint16)
    by_table = window_to_8bit(frame, invert=invert, slope=slope, intercept=intercept)
    rescaled = frame.astype(np.float64) * slope + intercept
    by_floats = window_to_8bit(rescaled, invert=invert)
    assert np.array_equal(by_table, by_floats)
    windowed = window_to_8bit(frame, 1500.0, 800.0, slope=slope, intercept=intercept)
    assert np.array_equal(windowed, window_to_8bit(rescaled, 1500.0, 800.0))


@pytest.mark.parametrize("path", [NIH_DX, RG1_J2K, MR_NATIVE])
def test_display_frame_of_real_files_equals_the_float_rescale(path):
    from radguard.dicom import pixel_array, read_dataset

    ds = read_dataset(path, stop_before_pixels=False)
    shown = display_frame(ds)
    assert shown.dtype == np.uint8 and shown.ndim == 2 and int(shown.max()) - shown.min() > 100
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")

    def first(v):
        if v is None:
            return None
        return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)

    reference = window_to_8bit(pixel_array(ds).astype(np.float64) * slope + intercept,
                               first(centre), first(width),
                               invert=ds.PhotometricInterpretation == "MONOCHROME1")
    assert np.array_equal(shown, reference)


@pytest.mark.parametrize("dtype, low, high", [
    (np.uint8, 0, 256), (np.uint8, 40, 200), (np.uint16, 1000, 5000),
    (np.int16, -32768, 32768), (np.int32, 2**31 - 70000, 2**31 - 10000),
])
def test_per_level_lookup_equals_applying_the_function_to_every_pixel(dtype, low, high):
    from radguard.images import per_level

    rng = np.random.default_rng(7)
    frame = rng.integers(low, high, (300, 300)).astype(dtype)
    frame.flat[:2] = low, high - 1  # the full range, including int16's two extremes

    def fn(v):
        return np.clip((v.astype(np.float32) - 1234.5) / 987.0, 0, 1).astype(np.float32)

    assert np.array_equal(per_level(frame, fn), fn(frame))


def test_network_input_equals_the_per_pixel_float_formula():
    from PIL import Image

    from radguard.triage.networks import to_input

    rng = np.random.default_rng(5)
    for frame in (rng.integers(0, 256, (512, 512)).astype(np.uint8),
                  rng.integers(-1024, 3072, (300, 400)).astype(np.int16),
                  rng.normal(100, 20, (256, 256)).astype(np.float32)):
        lo, hi = percentiles(frame, (0.5, 99.5))
        a = np.clip((frame.astype(np.float32) - lo) / max(float(hi - lo), 1e-6), 0, 1)
        a = np.asarray(Image.fromarray(a.astype(np.float32), mode="F")
                       .resize((128, 128), Image.Resampling.BILINEAR))
        expected = ((a - a.mean()) / (a.std() + 1e-6))[None].astype(np.float32)
        assert np.array_equal(to_input(frame, 128), expected)
