"""How large an image radguard agrees to inflate or decode, checked before any allocation.

A DICOM header states its image size, and a few hundred bytes of compressed or deflated data
can state an enormous one: 261 KB of deflate inflate to a 16384 x 16384 data set, and a JPEG
or JPEG 2000 header declaring 16384 x 16384 makes its decoder allocate gigabytes before it
finds the stream too short. Every inflate and decode path of :mod:`radguard.dicom` therefore
checks the header's numbers against :class:`DecodeLimits` first (a few integer
multiplications, no parse), and the large allocations that pass take their size from a
per-process :class:`ByteBudget`, so many concurrent decodes cannot add up either. A caller
that keeps what was inflated or decoded (the parsed data set, the pixel array) beyond the
call that made it opens a :func:`decode_scope`, and the budget counts it until the scope
ends.

Native (uncompressed) pixel data cannot expand: it is as large as what was received, so its
total size is not a reason to refuse it at the door (``check_total=False``); decoding it
later for the checks is bounded like any other decode ("too large to check").

The defaults sit far above real images - a 4096 x 5120 16-bit mammogram is 21 megapixels
and 42 MB, a large tomosynthesis or multi-frame CT about 1 GB - and far below what breaks a
server. The gateway installs its configured limits in every process it runs
(:func:`set_decode_limits`); command-line tools use the defaults.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from radguard.errors import DicomReadError

__all__ = [
    "ByteBudget",
    "DecodeLimits",
    "check_ratio",
    "decode_budget",
    "decode_scope",
    "decode_limits",
    "decoded_size",
    "set_decode_limits",
]

#: Above this decoded size the compression ratio is checked (smaller images may be blank
#: and compress without bound; they cost little memory either way).
RATIO_FLOOR = 64 << 20


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds for one image (and for all decodes of one process at once). Positive
    whole numbers (the ratio may be 0); the gateway's configuration validates them."""

    #: Rows x Columns of one frame (16384 x 16384 = 268 M is refused)
    max_frame_pixels: int = 100_000_000
    #: Rows x Columns x frames x samples x bytes per decoded sample, all frames together
    max_decoded_bytes: int = 2 << 30
    #: a Deflated Explicit VR Little Endian data set after inflating (deflate is for reports
    #: and waveforms; images travel native or with an image codec)
    max_inflated_bytes: int = 512 << 20
    #: decoded / encoded bytes of compressed pixel data larger than :data:`RATIO_FLOOR`
    #: (real images: 2-50, lossy at most a few hundred); 0 switches the check off
    max_compression_ratio: int = 1000
    #: bytes that inflates and decodes of one process may hold at once (one thread may
    #: go over it by one image, see :class:`ByteBudget`); one larger image waits until it
    #: runs alone
    decode_budget_bytes: int = 1 << 30


class ByteBudget:
    """A semaphore counted in bytes: :meth:`reserve` waits until the bytes fit beside what
    other threads hold. A request larger than the whole budget waits until nothing else is
    held, then runs alone (a real image larger than the budget is slow, never refused).

    A thread that already holds part of the budget (in a :func:`decode_scope`) and needs
    more than fits cannot simply wait for room: two such threads would wait for each other
    for ever. It waits for the budget or for the one *overdraft* instead - a token that lets
    its thread go over the budget and stays with it until it holds nothing. So at most one
    thread is over budget at a time, and all together hold at most the budget plus what
    that one thread adds (a deflated data set's decoded pixels: one image)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._cond = threading.Condition()
        self._held: dict[int, int] = {}  # thread id -> bytes that thread holds
        self._overdraft: int | None = None  # the thread allowed over the budget

    def acquire(self, size: int) -> int:
        """Take ``size`` bytes (capped at the whole budget); returns what was taken, for
        :meth:`release`."""
        size = max(0, min(size, self.total))
        if not size:
            return 0
        me = threading.get_ident()
        with self._cond:
            held = self._held.get(me, 0)

            def fits() -> bool:
                return self.used + size <= self.total

            if not held:
                self._cond.wait_for(fits)
            elif not fits():
                self._cond.wait_for(lambda: fits() or self._overdraft in (None, me))
                if not fits():
                    self._overdraft = me
            self.used += size
            self._held[me] = held + size
        return size

    def release(self, size: int) -> None:
        """Give back what :meth:`acquire` returned (on the thread that acquired it); a
        thread that holds nothing any more gives back the overdraft too."""
        me = threading.get_ident()
        with self._cond:
            self.used -= size
            left = self._held.pop(me, 0) - size
            if left > 0:
                self._held[me] = left
            elif self._overdraft == me:
                self._overdraft = None
            self._cond.notify_all()

    @contextlib.contextmanager
    def reserve(self, size: int) -> Iterator[None]:
        """Hold ``size`` bytes of the budget for the duration of the block - or, inside a
        :func:`decode_scope`, until the scope ends (the caller keeps the result)."""
        taken = self.acquire(size)
        scope = getattr(_scopes, "held", None)
        if scope is not None:
            scope.append((self, taken))
            yield
            return
        try:
            yield
        finally:
            self.release(taken)


_scopes = threading.local()  # .held: the reservations of this thread's open scope


@contextlib.contextmanager
def decode_scope() -> Iterator[None]:
    """Keep every decode-budget reservation made in the block until the block ends.

    For callers that hold a parsed deflated data set (its inflated copy) or a decoded pixel
    array while they work on it - the door's header check, a pipeline scan, rendering: the
    budget then bounds what concurrent callers hold, not only what they allocate at one
    moment. Scopes nest; the outermost one releases. Outside a scope a reservation ends
    with the call that made it (tools that handle one object at a time)."""
    if getattr(_scopes, "held", None) is not None:
        yield
        return
    held: list[tuple[ByteBudget, int]] = []
    _scopes.held = held
    try:
        yield
    finally:
        _scopes.held = None
        for budget, size in held:
            budget.release(size)


_limits = DecodeLimits()
_budget = ByteBudget(_limits.decode_budget_bytes)
_lock = threading.Lock()


def decode_limits() -> DecodeLimits:
    """The limits in force in this process."""
    return _limits


def decode_budget() -> ByteBudget:
    """This process's budget for large inflates and decodes."""
    return _budget


def set_decode_limits(limits: DecodeLimits) -> None:
    """Put ``limits`` in force for every later inflate and decode in this process."""
    global _limits, _budget
    with _lock:
        if limits.decode_budget_bytes != _budget.total:
            _budget = ByteBudget(limits.decode_budget_bytes)
        _limits = limits


def decoded_size(name: str, rows: int, columns: int, frames: int, samples: int,
                 bits_allocated: int, limits: DecodeLimits | None = None, *,
                 check_total: bool = True) -> int:
    """Bytes the decoded pixels of an image with this Image Pixel Module take (one to eight
    bytes per sample, as numpy holds them); a :class:`DicomReadError` when the numbers are
    impossible or exceed ``limits`` (default: those in force). ``check_total=False``: the
    frame size is checked but not the total (native pixel data received whole, which
    decoding cannot make larger)."""
    limits = limits or _limits
    if min(rows, columns, frames, samples) < 1 or not 1 <= bits_allocated <= 64:
        raise DicomReadError(
            f"{name}: impossible Image Pixel Module ({rows} x {columns} pixels, {frames} "
            f"frame(s), {samples} sample(s) per pixel, {bits_allocated} bits allocated)")
    pixels = rows * columns
    if pixels > limits.max_frame_pixels:
        raise DicomReadError(
            f"{name}: a frame of {rows} x {columns} pixels is larger than this system decodes "
            f"({limits.max_frame_pixels:,} pixels per frame at most)")
    width = next(w for w in (1, 2, 4, 8) if bits_allocated <= 8 * w)
    total = pixels * frames * samples * width
    if check_total and total > limits.max_decoded_bytes:
        raise DicomReadError(
            f"{name}: {frames} frame(s) of {rows} x {columns} pixels decode to {total:,} "
            f"bytes, more than this system decodes ({limits.max_decoded_bytes:,} at most): "
            "too large to check")
    return total


def check_ratio(name: str, decoded: int, encoded: int,
                limits: DecodeLimits | None = None) -> None:
    """Refuse compressed pixel data that claims to expand beyond any real image's ratio."""
    limits = limits or _limits
    ratio = limits.max_compression_ratio
    if ratio and decoded > RATIO_FLOOR and decoded > max(encoded, 1) * ratio:
        raise DicomReadError(
            f"{name}: {encoded:,} bytes of compressed pixel data cannot hold {decoded:,} "
            f"decoded bytes (more than {ratio}:1, no real image compresses so far)")
