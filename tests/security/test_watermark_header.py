"""The watermark's location map is inflated before any MAC is checked, so whoever holds one
marked image could plant a zlib bomb there. Its declared length (two header fields outside
the 16 bytes the key check covers) is bounded by what the frame can hold before anything is
inflated, and the stream is inflated no further than that."""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import Callable

import numpy as np
import pytest

from radguard.watermark import WatermarkKey, check_frame, embed_frame, restore_frame, v1, v2
from radguard.watermark.base import WatermarkError, inflate_location_map
from radguard.watermark.bits import bits_to_bytes, bytes_to_bits
from radguard.watermark.scheme import Identity
from tests.conftest import NIH_DX
from tests.watermark.conftest import load

KEY = WatermarkKey.from_secret(b"radguard test watermark key 0001")
#: 32 MiB of zeros in a ~32 KB zlib stream: 2^28 location-map bits once inflated
BOMB_BITS = 1 << 28
BOMB = zlib.compress(bytes(BOMB_BITS // 8), 9)


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


# -- a forged header on a really marked image ----------------------------------------------

def _write_lsbs(frame: np.ndarray, rows: np.ndarray, blob: bytes) -> np.ndarray:
    """``frame`` with ``blob``'s bits in the LSBs of ``rows`` (in order), as an attacker
    who holds the marked image can write them without the key."""
    width = frame.shape[1]
    bits = bytes_to_bits(blob).astype(frame.dtype)
    used = rows[: -(-bits.size // width)]
    region = frame[used, :].ravel()
    region[: bits.size] = (region[: bits.size] & ~1) | bits
    out = frame.copy()
    out[used, :] = region.reshape(used.size, width)
    return out


def _forge_v2(marked: np.ndarray, declared: tuple[int, int]) -> np.ndarray:
    """A version 2 header whose first 16 bytes (what the key check covers) are untouched and
    whose location map is :data:`BOMB`, declared ``declared`` bits long."""
    header = v2.read_header(marked)
    fixed = bits_to_bytes(header.geo.header_bits(marked, (v2.HEAD.size + 16) * 8))
    fields = list(v2.HEAD.unpack(fixed[: v2.HEAD.size]))
    tail = fixed[v2.HEAD.size :] + header.enc_id + header.mac_original  # frame MAC, identity
    fields[6], fields[7], fields[8] = *declared, len(BOMB)  # lm0, lm1, location-map bytes
    fields[9] = -(-8 * (v2.HEAD.size + len(tail) + len(BOMB)) // marked.shape[1])  # rows
    return _write_lsbs(marked, header.geo.compact_rows, v2.HEAD.pack(*fields) + tail + BOMB)


def _forge_v1(marked: np.ndarray, declared: tuple[int, int]) -> np.ndarray:
    """The same for a version 1 header (read by ``check`` too, which inflates the map)."""
    fields, split, _blob, _reserved = v1.read_header(marked)
    forged = list(fields)
    forged[6], forged[7], forged[8] = *declared, len(BOMB)
    forged[9] = -(-8 * (v1.HEAD.size + len(BOMB)) // marked.shape[1])
    return _write_lsbs(marked, np.nonzero(~split.tag_rows)[0], v1.HEAD.pack(*forged) + BOMB)


def _peak_mib(call: Callable[[], object]) -> tuple[float, object]:
    """Peak traced memory of ``call`` (numpy arrays and zlib output are traced) and what it
    returned or raised."""
    tracemalloc.start()
    try:
        try:
            outcome: object = call()
        except WatermarkError as exc:
            outcome = exc
        return tracemalloc.get_traced_memory()[1] / 2**20, outcome
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def marked() -> dict[int, tuple[np.ndarray, int, int]]:
    """NIH_DX marked in format versions 2 and 1: {version: (frame, lo, hi)}."""
    frame, lo, hi, bits = load(NIH_DX)
    identity = Identity("CN=DX Room 3", "", "20260101120000", 0)
    return {version: (embed_frame(frame, KEY, identity, lo=lo, hi=hi, bits_stored=bits,
                                  version=version)[0], lo, hi) for version in (2, 1)}


@pytest.mark.parametrize("declared", [(BOMB_BITS // 2, BOMB_BITS // 2),
                                      (0xFFFFFFFF, 0xFFFFFFFF)], ids=["bomb-sized", "max"])
@pytest.mark.parametrize("version", [2, 1])
def test_a_forged_location_map_length_is_refused_before_inflating(marked, version, declared):
    frame, lo, hi = marked[version]
    forged = (_forge_v2 if version == 2 else _forge_v1)(frame, declared)
    # the forgery keeps the key check: the header is read and the key accepted
    if version == 2:
        assert v2.read_header(forged).key_check == v2.read_header(frame).key_check
    peak, outcome = _peak_mib(lambda: restore_frame(forged, KEY, lo=lo, hi=hi))
    assert isinstance(outcome, WatermarkError), outcome
    assert "declares location maps" in str(outcome) and "forged or damaged" in str(outcome)
    # far below the 32 MiB the declared map takes even packed (before: 520 MiB / 80 MiB)
    assert peak < 32, peak
    if version == 1:  # version 1's check reads the payload, and so the map, too
        peak, result = _peak_mib(lambda: check_frame(forged, KEY, lo=lo, hi=hi))
        assert not result.intact and "declares location maps" in result.problem, result
        assert peak < 32, peak
    restored, _identity = restore_frame(frame, KEY, lo=lo, hi=hi)  # the real one still works
    assert np.array_equal(restored, load(NIH_DX)[0])
