"""Cues of the synthetic-image detector: trivia erased, hostile inputs refused, and each cue
moving the way its name says when the matching generator trace is added."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from radguard.forensics.cues import ANALYSIS_MAX, CueError, block_cues, image_cues, prepare
from tests.conftest import SHARED

CHEST = SHARED / "cxr-nih" / "images" / "00001280_004.jpg"


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return np.asarray(Image.open(CHEST).convert("L"))


def test_bit_depth_is_erased(chest):
    """The same picture stored in 16 bits is analysed exactly as its 8-bit version."""
    a8 = prepare(chest)
    stretched = chest.astype(np.float64) - chest.min()
    sixteen = np.round(stretched / stretched.max() * 65535).astype(np.uint16)
    a16 = prepare(sixteen)
    assert a8.shape == a16.shape
    # (the darkest and brightest pixels are ignored, so a stretch moves a level here and there)
    assert np.abs(a8 - prepare(np.round(stretched / stretched.max() * 255))).max() <= 1
    assert np.abs(a16 - a8).mean() < 1.0  # only the 8-bit rounding of the stretch differs


def test_one_hot_pixel_does_not_squeeze_the_image(chest):
    """A 12-bit image in 16 bits with one dead pixel at the top of the range (ordinary in a
    real detector; a cheap trick for a forger) is analysed as without it."""
    twelve = chest.astype(np.uint16) * 16
    hot = twelve.copy()
    hot[0, 0] = 65535
    dead = twelve.copy()
    dead[5, 5], dead[9, 9] = 0, 65535
    for odd in (hot, dead):
        assert np.abs(prepare(odd) - prepare(twelve)).mean() < 1.0


def test_what_cannot_be_judged_is_refused():
    """Flat, nearly flat, binary images and strips carry nothing a detector could read (or
    would cost without bound): refused, so the verdict is unverifiable, not authentic."""
    rng = np.random.default_rng(0)
    near = np.full((300, 300), 128, np.uint8)
    near[5, 5] = 129
    binary = (rng.random((256, 256)) > 0.5).astype(np.uint8) * 255
    strip = rng.integers(0, 255, (40, 2000)).astype(np.uint8)
    for img, why in ((np.full((64, 64), 7, np.uint8), "one flat value"),
                     (near, "too little contrast"), (binary, "too little contrast"),
                     (strip, "too elongated"), (np.full((64, 64), 1e-300), "one flat value")):
        with pytest.raises(CueError, match=why):
            prepare(img)
    with pytest.raises(CueError, match="span more than"):
        prepare(np.r_[np.full((40, 64), -1.7e308), np.full((40, 64), 1.7e308)])


def test_colour_and_alpha_become_grey(chest):
    rgba = np.dstack([chest, chest, chest, np.full_like(chest, 255)])
    assert np.array_equal(prepare(rgba), prepare(chest))


def test_huge_images_are_reduced_to_the_analysis_size():
    big = np.random.default_rng(0).integers(0, 4096, (5000, 3000), dtype=np.uint16)
    a = prepare(big)
    assert min(a.shape) == ANALYSIS_MAX
    assert a.dtype == np.float32 and a.max() <= 255


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((1, 1)), "too small"),
        (np.zeros((0, 0)), "too small"),
        (np.zeros((40, 40, 2)), "expected a 2D"),
        (np.full((64, 64), np.nan), "NaN"),
        (np.array([["a"] * 40] * 40), "numeric"),
    ],
)
def test_hostile_arrays_are_refused(bad, message):
    with pytest.raises(CueError, match=message):
        prepare(bad)


def test_upsampling_raises_the_spectral_peak_cue():
    published = np.asarray(Image.open(SHARED / "cxr-wild" / "images" / "wild0000.png").convert("L"))
    h, w = published.shape
    small = Image.fromarray(published).resize((w // 3, h // 3), Image.Resampling.BOX)
    up = np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))
    real, _ = image_cues(prepare(published))
    fake, _ = image_cues(prepare(up))
    assert fake["upsampling_peaks"] > real["upsampling_peaks"] + 0.8
    assert fake["texture_smoothness"] < real["texture_smoothness"]


def test_signal_independent_grain_breaks_the_noise_brightness_link(chest):
    smooth = ndimage.gaussian_filter(chest.astype(np.float64), 2.0)
    grain = smooth + np.random.default_rng(1).normal(0, 3.0, chest.shape)
    real, _ = image_cues(prepare(chest))
    fake, _ = image_cues(prepare(np.clip(np.round(grain), 0, 255)))
    assert abs(fake["noise_signal_dependence"]) < abs(real["noise_signal_dependence"])
    assert fake["noise_uniformity"] < real["noise_uniformity"]


def test_mirror_image_is_perfectly_symmetric(chest):
    half = chest[:, : chest.shape[1] // 2]
    mirrored = np.hstack([half, half[:, ::-1]])
    cues, _ = image_cues(prepare(mirrored))
    assert cues["bilateral_symmetry"] > 0.99
    assert image_cues(prepare(chest))[0]["bilateral_symmetry"] < 0.9


def test_block_cues_cover_the_image(chest):
    feats, grid = block_cues(prepare(chest))
    assert grid == (16, 16) and feats.shape == (256, 6)
    assert np.isfinite(feats).all()


# -- the fast arithmetic equals the plain formulas it replaced ----------------------------------

_KB = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], dtype=np.float32) / 4.0


def _images():
    rng = np.random.default_rng(3)
    chest = prepare(np.asarray(Image.open(CHEST).convert("L")))
    return [chest, chest[:101, 7:300], rng.integers(0, 256, (64, 97)).astype(np.float32),
            np.full((40, 40), 255, np.float32)]


def test_separable_residual_is_the_kb_correlation_exactly():
    from radguard.forensics.cues import fine_residual

    for a in _images():
        assert np.array_equal(fine_residual(a), ndimage.correlate(a, _KB, mode="reflect"))
    smooth = ndimage.gaussian_filter(_images()[0], 1.5)  # non-integer input: float rounding
    assert np.allclose(fine_residual(smooth), ndimage.correlate(smooth, _KB, mode="reflect"),
                       atol=1e-4)


def test_kirchner_predictor_error_is_minus_the_residual():
    from radguard.forensics.cues import _PREDICT, fine_residual

    for a in _images():
        assert np.array_equal(a - ndimage.correlate(a, _PREDICT, mode="reflect"),
                              -fine_residual(a))


def test_sobel_magnitude_equals_scipy():
    from radguard.forensics.cues import _sobel_magnitude

    for a in _images():
        expected = np.hypot(ndimage.sobel(a, axis=0), ndimage.sobel(a, axis=1))
        assert np.array_equal(_sobel_magnitude(a), expected)


def test_half_plane_spectrum_equals_the_full_fft():
    from radguard.forensics.cues import _blocks, _tile_spectrum

    a = _images()[0]
    for tile in (32, 64):
        win = np.outer(np.hanning(tile), np.hanning(tile))
        tiles = _blocks(a.astype(np.float64), tile).reshape(-1, tile, tile)
        tiles = tiles[:: max(1, len(tiles) // 64)]
        tiles = tiles - tiles.mean(axis=(1, 2), keepdims=True)
        full = (np.abs(np.fft.fft2(tiles * win)) ** 2).mean(axis=0)
        got = _tile_spectrum(a, tile)
        assert got.shape == (tile, tile)
        assert np.allclose(got, full, rtol=1e-4, atol=1e-7 * full.max())


def test_cooccurrence_counts_every_neighbour_pair():
    from radguard.forensics.cues import _cooccurrence

    for a in _images():
        q = a.astype(np.int64)
        hist = np.zeros(25)
        for d in (np.clip(np.diff(q, axis=1), -2, 2) + 2, (np.clip(np.diff(q, axis=0), -2, 2)
                                                           + 2).T):
            for i in range(d.shape[0]):
                for first, second in zip(d[i, :-1], d[i, 1:], strict=True):
                    hist[first * 5 + second] += 1
        assert np.array_equal(_cooccurrence(a), hist / hist.sum())


def _physics(img: np.ndarray) -> dict[str, float]:
    from radguard.forensics.cues import PHYSICS_CUE_NAMES, physics_cues

    return dict(zip(PHYSICS_CUE_NAMES, physics_cues(prepare(img)), strict=True))


def test_photon_noise_rises_with_brightness_and_synthetic_grain_does_not():
    """A ramp with Poisson-like noise (variance following the signal) has a clearly positive
    noise-brightness slope; the same ramp with even Gaussian grain has none."""
    rng = np.random.default_rng(3)
    ramp = np.tile(np.linspace(10, 240, 256), (256, 1))
    photon = ramp + rng.normal(0, 1, ramp.shape) * np.sqrt(ramp) * 0.4
    grain = ramp + rng.normal(0, 3.5, ramp.shape)
    p = _physics(np.clip(np.round(photon), 0, 255))
    g = _physics(np.clip(np.round(grain), 0, 255))
    assert p["noise_brightness_slope"] > 1.0
    assert abs(g["noise_brightness_slope"]) < 0.3


def test_decoder_checkerboard_shows_the_half_rate_grid_peak(chest):
    """Transposed-convolution decoders leave a faint period-2 checkerboard (the CBIS DCGAN's
    visible artefact): a residual spectrum peak at half the sampling rate that the real
    image lacks, even when it is one grey level deep."""
    yy, xx = np.mgrid[: chest.shape[0], : chest.shape[1]]
    board = np.where((yy + xx) % 2 == 0, 1.0, -1.0) * (yy % 2 == 0)
    fake = _physics(np.clip(np.round(chest + board), 0, 255))
    real = _physics(chest)
    assert fake["grid_peak_half"] > real["grid_peak_half"] + 1.0


def test_physics_cues_are_finite_on_tiny_and_flat_images():
    from radguard.forensics.cues import physics_cues

    # (prepare refuses flat images; the cues themselves must still not divide by zero)
    for img in (np.zeros((32, 32), np.float32), np.full((40, 90), 200, np.float32)):
        assert np.isfinite(physics_cues(img)).all()
