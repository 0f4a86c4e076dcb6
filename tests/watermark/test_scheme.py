"""The reversible payload mark and the fragile tags on real radiographs."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from radguard.watermark import WatermarkError, WatermarkKey, check_frame, embed_frame, restore_frame
from radguard.watermark.scheme import Identity, uid_digest
from tests.watermark.conftest import DICOM_IMAGES, PNG_SAMPLE, load

IDENTITY = Identity("CN=DX Room 3, serialNumber=SN-3", uid_digest("1.2.840.113619.2.1"),
                    "20261123101500", 0)


@pytest.fixture(scope="module")
def marked_set(wm_key):
    """Every test image, watermarked once: {name: (original, marked, lo, hi, bits, params)}."""
    out = {}
    for path in DICOM_IMAGES + PNG_SAMPLE:
        frame, lo, hi, bits = load(path)
        marked, params = embed_frame(frame, wm_key, IDENTITY, lo=lo, hi=hi, bits_stored=bits)
        out[path.name] = (frame, marked, lo, hi, bits, params)
    return out


def test_the_test_set_spans_bit_depths(marked_set):
    assert {v[4] for v in marked_set.values()} >= {8, 10, 12, 14, 15, 16}


@pytest.mark.parametrize("name", [p.name for p in DICOM_IMAGES + PNG_SAMPLE])
def test_restore_is_bit_exact_and_payload_decodes(marked_set, wm_key, name):
    original, marked, lo, hi, _bits, _params = marked_set[name]
    assert marked.min() >= lo and marked.max() <= hi  # never leaves the stored range
    assert not np.array_equal(marked, original)
    restored, identity = restore_frame(marked, wm_key, lo=lo, hi=hi)
    assert np.array_equal(restored, original)
    assert identity == IDENTITY


@pytest.mark.parametrize("name", [p.name for p in DICOM_IMAGES])
def test_psnr_at_least_70_db_for_12_to_16_bits(marked_set, name):
    original, marked, lo, hi, bits, params = marked_set[name]
    diff = marked.astype(np.float64) - original
    assert np.abs(diff).max() <= params["threshold"] + 1
    if bits >= 12:
        psnr = 10 * np.log10((hi - lo) ** 2 / np.mean(diff**2))
        assert psnr >= 70, (name, psnr)


def _overlaps(region, box):
    x0, y0, x1, y1 = region
    return x0 < box[2] and box[0] < x1 and y0 < box[3] and box[1] < y1


def _edits(marked, hi, rng):
    h, w = marked.shape
    for kind in ("patch16", "patch32", "inpaint", "pixel"):
        t = marked.copy()
        size = {"patch16": 16, "patch32": 32, "inpaint": 20, "pixel": 1}[kind]
        y, x = rng.integers(0, h - size), rng.integers(0, w - size)
        if kind.startswith("patch"):  # copy-move from elsewhere, as in CT-GAN injections
            sy, sx = (y + h // 2) % (h - size), (x + w // 3) % (w - size)
            t[y : y + size, x : x + size] = marked[sy : sy + size, sx : sx + size]
        elif kind == "inpaint":  # erase by smoothing towards the surroundings
            ring = marked[max(0, y - 2) : y + size + 2, max(0, x - 2) : x + size + 2]
            t[y : y + size, x : x + size] = int(np.median(ring))
        else:
            t[y, x] = t[y, x] - 1 if t[y, x] > 0 else t[y, x] + 1
        if np.array_equal(t, marked):
            continue  # the copy happened to be identical: nothing to find
        yield kind, t, (x, y, x + size, y + size)


@pytest.mark.parametrize("name", [p.name for p in DICOM_IMAGES + PNG_SAMPLE])
def test_edits_are_localised_and_untouched_images_are_clean(marked_set, wm_key, name):
    _original, marked, lo, hi, _bits, _params = marked_set[name]
    clean = check_frame(marked, wm_key, lo=lo, hi=hi)
    assert clean.intact and clean.regions == [] and clean.failed_blocks == 0
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for kind, tampered, box in _edits(marked, hi, rng):
        result = check_frame(tampered, wm_key, lo=lo, hi=hi)
        assert not result.intact
        assert any(_overlaps(r, box) for r in result.regions), (kind, box, result.regions)


def test_wrong_key_no_mark_small_and_flat_images(marked_set, wm_key):
    _o, marked, lo, hi, _b, _p = marked_set[DICOM_IMAGES[0].name]
    other = WatermarkKey.from_secret(b"some other key, not the right one")
    with pytest.raises(WatermarkError, match="key does not match"):
        check_frame(marked, other, lo=lo, hi=hi)
    with pytest.raises(WatermarkError):
        restore_frame(marked, other, lo=lo, hi=hi)
    original = marked_set[DICOM_IMAGES[0].name][0]
    with pytest.raises(WatermarkError, match="no radguard watermark"):
        check_frame(original, wm_key, lo=lo, hi=hi)
    with pytest.raises(WatermarkError, match="too small"):
        embed_frame(np.zeros((30, 30), np.int64) + 100, wm_key, IDENTITY, lo=0, hi=255,
                    bits_stored=8)
    with pytest.raises(WatermarkError, match="too flat"):  # all at the range's end
        embed_frame(np.zeros((256, 256), np.int64), wm_key, IDENTITY, lo=0, hi=4095,
                    bits_stored=12)


def test_cropped_image_cannot_be_restored_but_says_why(marked_set, wm_key):
    _o, marked, lo, hi, _b, _p = marked_set[DICOM_IMAGES[0].name]
    with pytest.raises(WatermarkError):
        restore_frame(marked[: marked.shape[0] // 2], wm_key, lo=lo, hi=hi)


def test_full_range_16_bit_and_flat_regions(wm_key):
    rng = np.random.default_rng(7)
    img = np.zeros((512, 512), np.int64)
    img[:, 256:] = 65535  # saturated half: nothing may overflow
    img[100:400, 50:200] = rng.integers(20000, 40000, size=(300, 150))
    img[300:500, 300:500] = 30000  # flat plateau
    marked, _ = embed_frame(img, wm_key, IDENTITY, lo=0, hi=65535, bits_stored=16)
    assert marked.min() >= 0 and marked.max() <= 65535
    restored, _ = restore_frame(marked, wm_key, lo=0, hi=65535)
    assert np.array_equal(restored, img)


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (7, 300), (300, 40)])
def test_frames_too_small_to_carry_a_mark_are_refused_clearly(wm_key, shape):
    frame = np.random.default_rng(0).integers(0, 256, shape)
    with pytest.raises(WatermarkError, match="too small to carry"):
        check_frame(frame, wm_key, lo=0, hi=255)


def test_chance_matches_of_tiny_edge_tags_are_not_a_watermark(wm_key):
    """Unmarked small images whose edge blocks hold 1-2 bit tags: some pass by chance, which
    must not read as a watermarked image with changed blocks (the gateway would quarantine
    it as edited instead of reporting no watermark)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = int(rng.integers(8, 80)), int(rng.integers(64, 140))
        frame = rng.integers(0, 4, (h, w))  # 2-bit data: random LSBs everywhere
        with pytest.raises(WatermarkError, match="no radguard watermark"):
            check_frame(frame, wm_key, lo=0, hi=3)
