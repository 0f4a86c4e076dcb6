"""The watermark's location map is inflated before any MAC is checked, so whoever holds one
marked image could plant a zlib bomb there: it is inflated no further than the bits it
declares."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from radguard.watermark.base import WatermarkError, inflate_location_map
from radguard.watermark.bits import bits_to_bytes


def test_the_location_map_is_inflated_only_as_far_as_declared():
    bits = np.random.default_rng(0).integers(0, 2, 1000).astype(np.uint8)
    blob = zlib.compress(bits_to_bytes(bits), 9)
    assert np.array_equal(inflate_location_map(blob, 1000), bits)
    # 256 MiB of zeros in a ~260 KB stream: only the 125 declared bytes come out
    bomb = zlib.compress(bytes(256 << 20), 9)
    assert len(bomb) < 300_000
    out = inflate_location_map(bomb, 1000)
    assert out.shape == (1000,) and not out.any()


@pytest.mark.parametrize("blob", [b"", b"not zlib at all", zlib.compress(b"short")])
def test_corrupt_or_short_location_maps_are_a_watermark_error(blob):
    with pytest.raises(WatermarkError, match="location map is corrupt"):
        inflate_location_map(blob, 1000)
