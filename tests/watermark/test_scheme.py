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


def test_version_1_images_still_check_and_restore(marked_set, wm_key):
    """Images marked before format version 2 keep working: bit-exact restore, clean check,
    edits localised."""
    for path in DICOM_IMAGES[:2] + PNG_SAMPLE[:1]:
        frame, lo, hi, bits = load(path)
        marked, _ = embed_frame(frame, wm_key, IDENTITY, lo=lo, hi=hi, bits_stored=bits,
                                version=1)
        restored, identity = restore_frame(marked, wm_key, lo=lo, hi=hi)
        assert np.array_equal(restored, frame) and identity == IDENTITY
        clean = check_frame(marked, wm_key, lo=lo, hi=hi)
        assert clean.intact and clean.params["version"] == 1
        edited = marked.copy()
        y, x = marked.shape[0] // 2, marked.shape[1] // 2
        edited[y : y + 16, x : x + 16] = edited[y : y + 16, x : x + 16] + 1
        result = check_frame(edited, wm_key, lo=lo, hi=hi)
        assert not result.intact and any(_overlaps(r, (x, y, x + 16, y + 16))
                                         for r in result.regions)


def test_blocks_copied_between_frames_marked_with_the_same_key_are_caught(wm_key):
    """Collage: the same picture marked twice, a block of one pasted into the other at the
    same place. Version 2 tags belong to their frame (nonce), so the block fails; version 1
    tags were bound to the position only and let it pass (why the format changed)."""
    frame, lo, hi, bits = load(DICOM_IMAGES[0])
    for version, caught in ((2, True), (1, False)):
        a, p = embed_frame(frame, wm_key, IDENTITY, lo=lo, hi=hi, bits_stored=bits,
                           version=version)
        b, _ = embed_frame(frame, wm_key, IDENTITY, lo=lo, hi=hi, bits_stored=bits,
                           version=version)
        size = p["block"]
        y, x = (a.shape[0] // 2) // size * size, (a.shape[1] // 2) // size * size
        collage = a.copy()
        collage[y : y + size, x : x + size] = b[y : y + size, x : x + size]
        assert not np.array_equal(collage, a)
        result = check_frame(collage, wm_key, lo=lo, hi=hi)
        assert (result.regions == [[x, y, x + size, y + size]]) is caught, (version, result)


def test_damaged_header_or_anchor_still_localises(marked_set, wm_key):
    _o, marked, lo, hi, _b, _p = marked_set[DICOM_IMAGES[0].name]
    h, w = marked.shape
    rng = np.random.default_rng(3)
    top = marked.copy()
    top[:6] = rng.integers(lo, hi + 1, (6, w))  # the header zone is gone
    result = check_frame(top, wm_key, lo=lo, hi=hi)  # the anchor gives layout and nonce
    assert "header damaged" in result.problem and not result.intact
    assert all(r[1] < 8 for r in result.regions) and result.regions
    bottom = marked.copy()
    bottom[-3:] = rng.integers(lo, hi + 1, (3, w))  # the anchor and the frame MAC are gone
    result = check_frame(bottom, wm_key, lo=lo, hi=hi)
    assert result.regions and all(r[3] > h - 16 for r in result.regions)
    assert result.identity == IDENTITY and not result.payload_ok  # readable, not vouched for
    both = top.copy()
    both[-3:] = bottom[-3:]
    with pytest.raises(WatermarkError, match="no radguard watermark"):
        check_frame(both, wm_key, lo=lo, hi=hi)


@pytest.mark.parametrize("shape", [(203, 301), (64, 517), (130, 64)])
def test_every_single_pixel_change_is_caught_in_its_block(wm_key, shape):
    """Odd sizes (partial edge blocks) and one changed pixel at a time: exactly its block."""
    rng = np.random.default_rng(shape[0])
    full, lo, hi, bits = load(DICOM_IMAGES[0])  # a real radiograph, cut to an odd size
    frame = full[: shape[0], : shape[1]] if min(full.shape) >= max(shape) else None
    if frame is None or frame.shape != shape:
        pytest.skip(f"{DICOM_IMAGES[0].name} is smaller than {shape}")
    marked, p = embed_frame(frame, wm_key, IDENTITY, lo=lo, hi=hi, bits_stored=bits)
    assert np.array_equal(restore_frame(marked, wm_key, lo=lo, hi=hi)[0], frame)
    assert check_frame(marked, wm_key, lo=lo, hi=hi).intact
    size = p["block"]
    for _ in range(25):
        y, x = int(rng.integers(0, shape[0])), int(rng.integers(0, shape[1]))
        edited = marked.copy()
        step = int(rng.choice([1, 2, 3, 256]))
        edited[y, x] += step if marked[y, x] + step <= hi else -step
        result = check_frame(edited, wm_key, lo=lo, hi=hi)
        by, bx = y // size * size, x // size * size
        expected = [bx, by, min(bx + size, shape[1]), min(by + size, shape[0])]
        assert result.regions == [expected] and not result.intact, (y, x, result.regions)


def test_block_hash_multipliers_keep_every_bit_of_a_pixel(wm_key):
    """The 16 key rows of each position (k * x^j in GF(2^m)) are linearly independent for
    tags of 16 bits or more: no change of one pixel can leave its tag unchanged."""
    from radguard.watermark.wctags import _tables

    def rank(values):
        values, r = [int(v) for v in values], 0
        for bit in range(64):
            pivots = [v for v in values if (v >> bit) & 1]
            if pivots:
                r += 1
                values = [v ^ pivots[0] if (v >> bit) & 1 else v for v in values
                          if v is not pivots[0]]
        return r

    powers = [1 << b for b in range(8)]
    for block, n_bits in ((8, 16), (16, 16), (32, 32), (64, 64)):
        table = _tables(wm_key.tag, block, n_bits).reshape(block * block, 2, 256)
        rows = np.concatenate([table[:, 0, powers], table[:, 1, powers]], axis=1)
        assert all(rank(r) == 16 for r in rows[:: max(1, rows.shape[0] // 64)])


def test_a_changed_frame_mac_is_not_intact(marked_set, wm_key):
    """The frame MAC's own LSBs are outside every block tag; changing one must still make
    the frame fail (its 128-bit MAC no longer matches) and be localised."""
    from radguard.watermark.v2 import _Geometry

    _o, marked, lo, hi, _b, p = marked_set[DICOM_IMAGES[0].name]
    geo = _Geometry.of(*marked.shape, p["block"], p["tag_rows"])
    edited = marked.copy()
    y, x = geo.mac_px[0][5], geo.mac_px[1][5]
    edited[y, x] ^= 1
    result = check_frame(edited, wm_key, lo=lo, hi=hi)
    assert not result.intact and not result.payload_ok and "frame MAC" in result.problem
    assert result.identity == IDENTITY  # still readable, no longer vouched for
    size = p["block"]  # and the changed pixel's block is the one reported
    assert result.regions == [[x // size * size, y // size * size, x // size * size + size,
                               y // size * size + size]]


def test_hostile_headers_get_a_clear_error(marked_set, wm_key):
    """Frames whose LSBs carry a version 2 magic and then garbage, or a real header with
    fields changed (lengths, layout, threshold, reserved rows): check and restore answer
    with a WatermarkError or a result, never another exception."""
    from radguard.watermark.v2 import HEAD, MAGIC

    _o, marked, lo, hi, _b, _p = marked_set[DICOM_IMAGES[1].name]
    rng = np.random.default_rng(11)
    width = marked.shape[1]
    for trial in range(120):
        frame = marked.copy()
        bits = np.unpackbits(np.frombuffer(MAGIC + bytes([8, 2]), np.uint8)).astype(np.int64)
        if trial % 2:  # garbage after a plausible start
            tail = rng.integers(0, 2, width - bits.size)
        else:  # the real header with one field's bytes replaced
            real = frame[0] & 1
            tail = real[bits.size :].copy()
            start = int(rng.integers(0, HEAD.size - 6)) * 8
            tail[start : start + 16] = rng.integers(0, 2, 16)
        frame[0] = (frame[0] & ~1) | np.concatenate([bits, tail])[:width]
        for call in (lambda f: check_frame(f, wm_key, lo=lo, hi=hi),
                     lambda f: restore_frame(f, wm_key, lo=lo, hi=hi)):
            try:
                call(frame)
            except WatermarkError:
                pass
