"""The radguard watermark, scheme "RG-RPEE-RH", on one frame of stored values.

A marked frame has three parts (details per format version in :mod:`.v2` and :mod:`.v1`):

* **tag rows**: the last rows of every block carry that block's keyed tag in their LSBs,
  which localises changes block by block;
* the other rows form the *compact image*. Its first rows (the **header zone**) hold a clear
  header in their LSBs: magic, layout, threshold ``T``, a random nonce, lengths, and the
  zlib-compressed location map;
* the rest of the compact image carries the **payload** reversibly (:mod:`.rhombus`): the
  original LSBs of everything the mark overwrote, encrypted with a keystream bound to the
  nonce, so ``restore`` gives the frame back bit for bit, or a clear error says why not.

Parameters are chosen per frame: the strongest tags (8x8 blocks, 16-bit tags) and the
smallest ``T`` that hold the payload; ``T`` is capped so that PSNR stays at or above 70 dB
for 12-16 bit data (no pixel moves by more than ``T`` plus one LSB of a tag row).

radguard writes version 2 and reads both: the header's magic (or, when an edit destroyed the
header, the anchor's) says which.
"""

from __future__ import annotations

import numpy as np

from radguard.watermark import rhombus, v1, v2
from radguard.watermark.base import (
    LAYOUTS,
    FrameCheck,
    Identity,
    Split,
    UnauthenticatedPayload,
    WatermarkError,
    max_threshold,
    refuse_small,
    split,
    uid_digest,
)
from radguard.watermark.keys import WatermarkKey

__all__ = [
    "SCHEME",
    "VERSION",
    "FrameCheck",
    "Identity",
    "UnauthenticatedPayload",
    "WatermarkError",
    "check_frame",
    "embed_frame",
    "restore_frame",
    "uid_digest",
]

SCHEME = "RG-RPEE-RH"
VERSION = v2.VERSION
_FORMATS = {1: v1, 2: v2}


def embed_frame(frame: np.ndarray, key: WatermarkKey, identity: Identity, *, lo: int, hi: int,
                bits_stored: int, version: int = VERSION) -> tuple[np.ndarray, dict[str, int]]:
    """Watermark one frame of stored values; returns the marked frame and its parameters.
    ``version``: the format to write (1 only to make images for compatibility tests)."""
    if version not in _FORMATS:
        raise WatermarkError(f"unknown watermark format version {version}")
    fmt = _FORMATS[version]
    if frame.ndim != 2:
        raise WatermarkError("only monochrome frames can be watermarked")
    refuse_small(frame)
    width = frame.shape[1]
    original = frame.astype(np.int32)
    if original.min() < lo or original.max() > hi:
        raise WatermarkError("pixel values outside the stored range (Bits Stored)")
    id_bytes = identity.encode()
    t_max = max_threshold(lo, hi, bits_stored)
    # finest / strongest tag layout first, at a threshold that keeps the image pristine
    # (the 70 dB cap on 12-16 bit data, 2 levels below 12 bits); then, for small or noisy
    # images only, larger thresholds up to the cap
    preferred = t_max if bits_stored >= 12 else min(2, t_max)
    cache: dict[tuple[int, int], tuple[Split, int, np.ndarray, int]] = {}

    def candidate(layout: tuple[int, int]) -> tuple[Split, int, np.ndarray, int]:
        # estimated capacity for every T at once (computed once per layout, when needed)
        if layout not in cache:
            sp = split(original, *layout)
            n_tag = int(np.count_nonzero(sp.tag_rows)) * width
            counts = rhombus.error_counts(sp.compact, lo, hi, t_max)
            cache[layout] = (sp, n_tag, counts, fmt.need_bits(id_bytes, n_tag, width))
        return cache[layout]

    order = [(lay, t) for lay in LAYOUTS for t in range(1, preferred + 1)]
    order += [(lay, t) for t in range(preferred + 1, t_max + 1) for lay in LAYOUTS]
    for layout, threshold in order:
        sp, n_tag, counts, need = candidate(layout)
        if counts[threshold] < need * 1.03:  # 3% margin: pass-1 drift, header growth
            continue
        marked = fmt.try_embed(original, sp, key, id_bytes, threshold, lo, hi, n_tag,
                               identity.frame)
        if marked is not None:
            return marked, {"block": layout[0], "tag_rows": layout[1], "threshold": threshold}
    raise WatermarkError(
        "image too small or too flat (or too noisy) to hold the watermark payload "
        f"within the distortion limit (T <= {t_max})")


def restore_frame(frame: np.ndarray, key: WatermarkKey, *, lo: int, hi: int
                  ) -> tuple[np.ndarray, Identity]:
    """The original frame, bit for bit, and the payload's identity."""
    refuse_small(frame)
    restored = v2.extract(frame, key, lo, hi)
    if restored is not None:
        return restored
    original, identity, _ = v1.extract(frame, key, lo, hi)
    return original, identity


def check_frame(frame: np.ndarray, key: WatermarkKey, *, lo: int, hi: int,
                frame_index: int = 0) -> FrameCheck:
    """Localise changed blocks and read the payload's identity if it survived."""
    refuse_small(frame)  # embed_frame refuses these: none can carry a mark
    parsed = v1.read_header(frame)
    if parsed is None:
        result = v2.check(frame, key, frame_index)
        if result is not None:
            return result
    # a version 1 header, or no version 2 header nor anchor: version 1 finds its layout by
    # trial when its own header and anchor are gone
    return v1.check(frame, key, lo, hi, frame_index, parsed)
