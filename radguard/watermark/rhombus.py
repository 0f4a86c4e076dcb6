"""Reversible data hiding by rhombus prediction-error expansion with histogram shifting.

Each pixel is predicted from its four neighbours (north, south, east, west). The image is
split like a checkerboard: pass 0 marks the "black" squares predicted from the untouched
"white" ones, pass 1 marks the white squares predicted from the (already marked) black
ones. Both passes are therefore vectorised with numpy in either direction, and extraction
undoes pass 1 before pass 0 (Sachnev et al., IEEE TCSVT 2009).

With threshold ``T``, a prediction error ``e`` in [-T, T-1] is expanded to ``2e + b`` and
carries the bit ``b``; other errors are shifted by ``T`` away from zero. No pixel moves by
more than ``T``. Pixels within ``T`` of the stored range's ends are left alone (they could
overflow); a location map records, for every pixel whose *marked* value lies in that
boundary zone, whether it was left alone, so the decoder can tell the two apart.

Pixels of one colour are visited as two strided sub-grids (even rows, then odd rows), each
in raster order; bits and location-map entries follow that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PassPlan", "capacity", "embed", "error_counts", "extract", "pass_sizes"]


def _predict(img: np.ndarray) -> np.ndarray:
    """floor((N + S + E + W) / 4) with mirrored borders (neighbours keep the other colour)."""
    if min(img.shape) < 2:
        raise ValueError("image must be at least 2x2")
    total = np.empty_like(img)
    total[1:-1] = img[:-2] + img[2:]
    total[0] = 2 * img[1]  # mirror: the missing north neighbour is the south one
    total[-1] = 2 * img[-2]
    total[:, 1:-1] += img[:, :-2] + img[:, 2:]
    total[:, 0] += 2 * img[:, 1]
    total[:, -1] += 2 * img[:, -2]
    return total >> 2  # floor division by 4, also for negative sums


def _slices(colour: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """The two strided sub-grids holding the pixels with (row + col) % 2 == colour."""
    return (slice(0, None, 2), slice(colour, None, 2)), (slice(1, None, 2),
                                                         slice(1 - colour, None, 2))


def pass_sizes(img: np.ndarray) -> tuple[int, int]:
    """Pixels each pass visits in ``img``: the most its location map can list."""
    a0, b0 = _slices(0)
    a1, b1 = _slices(1)
    return img[a0].size + img[b0].size, img[a1].size + img[b1].size


def _gather(arr: np.ndarray, colour: int) -> np.ndarray:
    a, b = _slices(colour)
    return np.concatenate([arr[a].ravel(), arr[b].ravel()])


def _scatter(arr: np.ndarray, colour: int, values: np.ndarray) -> None:
    a, b = _slices(colour)
    n = arr[a].size
    arr[a] = values[:n].reshape(arr[a].shape)
    arr[b] = values[n:].reshape(arr[b].shape)


@dataclass(frozen=True)
class PassPlan:
    """Per-pass facts the decoder needs: the location map of the boundary zone."""

    location_map: np.ndarray  # bool per boundary-zone pixel (after marking), visiting order


def error_counts(img: np.ndarray, lo: int, hi: int, max_threshold: int) -> np.ndarray:
    """counts[T] = pixels that could carry a bit at threshold T (both passes, estimated on
    the unmarked image), for T = 0..max_threshold."""
    work = img.astype(np.int32)
    e = (work - _predict(work)).ravel()
    x = work.ravel()
    # a pixel carries a bit for every T with  max(-e, e + 1) <= T <= min(x - lo, hi - x)
    first = np.maximum(-e, e + 1)
    last = np.minimum(x - lo, hi - x)
    ok = first <= np.minimum(last, max_threshold)
    top = max_threshold + 2
    starts = np.bincount(first[ok], minlength=top)[:top]
    stops = np.bincount(np.minimum(last[ok], max_threshold) + 1, minlength=top)[:top]
    return np.cumsum(starts - stops)[: max_threshold + 1]


def capacity(img: np.ndarray, threshold: int, lo: int, hi: int) -> int:
    """Bits the two passes can carry (pass 1 is estimated on the unmarked image)."""
    return int(error_counts(img, lo, hi, threshold)[threshold])


def embed(
    img: np.ndarray, bits: np.ndarray, threshold: int, lo: int, hi: int
) -> tuple[np.ndarray, list[PassPlan], int]:
    """Hide ``bits`` (uint8 0/1) in ``img`` (integer, 2-D).

    Returns the marked image (int32), the two location maps, and how many bits were
    embedded (all of them, or fewer if capacity ran out: the caller checks).
    """
    out = img.astype(np.int32, copy=True)
    plans: list[PassPlan] = []
    used = 0
    t = threshold
    for colour in (0, 1):
        pred = _predict(out)
        x = _gather(out, colour)
        p = _gather(pred, colour)
        e = x - p
        usable = (x >= lo + t) & (x <= hi - t)
        expand = usable & (e >= -t) & (e < t)
        n_expand = int(np.count_nonzero(expand))
        carried = np.zeros(n_expand, dtype=np.int32)
        take = min(n_expand, max(0, len(bits) - used))
        carried[:take] = bits[used : used + take]
        used += take
        new_e = e + np.where(e >= t, t, 0) - np.where(e < -t, t, 0)
        new_e[expand] = 2 * e[expand] + carried
        marked = np.where(usable, p + new_e, x)
        zone = (marked < lo + t) | (marked > hi - t)
        plans.append(PassPlan(location_map=~usable[zone]))
        _scatter(out, colour, marked)
    return out, plans, used


def extract(
    marked: np.ndarray, plans: list[PassPlan], threshold: int, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """Undo :func:`embed`: return the original image (int32) and every carried bit."""
    out = marked.astype(np.int32, copy=True)
    carried: list[np.ndarray] = [np.empty(0, np.uint8), np.empty(0, np.uint8)]
    t = threshold
    for colour in (1, 0):
        pred = _predict(out)
        xm = _gather(out, colour)
        p = _gather(pred, colour)
        zone = (xm < lo + t) | (xm > hi - t)
        lm = plans[colour].location_map
        if int(np.count_nonzero(zone)) != len(lm):
            raise ValueError("location map does not fit this image")
        skipped = np.zeros(xm.shape, dtype=bool)
        skipped[zone] = lm
        em = xm - p  # int32 throughout: pixel ranges keep every value far from overflow
        inner = ~skipped & (em >= -2 * t) & (em < 2 * t)
        e = em.copy()
        e[em >= 2 * t] -= t  # shifted errors move back by t
        e[em < -2 * t] += t
        expanded = em[inner]
        half = expanded >> 1
        carried[colour] = (expanded & 1).astype(np.uint8)  # 2e + b: b is the low bit
        e[inner] = half
        restored = p + e
        restored[skipped] = xm[skipped]
        _scatter(out, colour, restored)
    return out, np.concatenate(carried)
