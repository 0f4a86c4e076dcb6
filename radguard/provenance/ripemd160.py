"""RIPEMD-160 in pure Python, for the OpenSSL builds whose ``hashlib`` lacks it.

dcmtk's ``dcmsign`` signs with RIPEMD-160 unless told otherwise, so files from dcmtk-based
modalities must verify wherever radguard runs. OpenSSL 3 moved RIPEMD-160 to its legacy
provider until 3.0.7, and some distributions still build it that way: ``hashlib.new(
"ripemd160")`` then raises ValueError. :func:`new` returns hashlib's implementation when there
is one and this class otherwise. It hashes about 1 MB/s (OpenSSL: hundreds), so a large
image signed with RIPEMD-160 takes seconds to verify on such a system, never elsewhere.

Algorithm and test vectors: Dobbertin, Bosselaers, Preneel, "RIPEMD-160: a strengthened
version of RIPEMD" (1996), and ISO/IEC 10118-3.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Protocol

__all__ = ["RIPEMD160", "HashObject", "new"]


class HashObject(Protocol):
    """What radguard uses of a hashlib hash object; :class:`RIPEMD160` has it too."""

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        """Hash more bytes."""

    def digest(self) -> bytes:
        """The hash of everything passed so far."""

    def copy(self) -> HashObject:
        """An independent copy of the current state."""

_MASK = 0xFFFFFFFF

# message word order and rotation amounts, left and right lines, rounds 1-5
_R_LEFT = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    7, 4, 13, 1, 10, 6, 15, 3, 12, 0, 9, 5, 2, 14, 11, 8,
    3, 10, 14, 4, 9, 15, 8, 1, 2, 7, 0, 6, 13, 11, 5, 12,
    1, 9, 11, 10, 0, 8, 12, 4, 13, 3, 7, 15, 14, 5, 6, 2,
    4, 0, 5, 9, 7, 12, 2, 10, 14, 1, 3, 8, 11, 6, 15, 13,
)
_R_RIGHT = (
    5, 14, 7, 0, 9, 2, 11, 4, 13, 6, 15, 8, 1, 10, 3, 12,
    6, 11, 3, 7, 0, 13, 5, 10, 14, 15, 8, 12, 4, 9, 1, 2,
    15, 5, 1, 3, 7, 14, 6, 9, 11, 8, 12, 2, 10, 0, 4, 13,
    8, 6, 4, 1, 3, 11, 15, 0, 5, 12, 2, 13, 9, 7, 10, 14,
    12, 15, 10, 4, 1, 5, 8, 7, 6, 2, 13, 14, 0, 3, 9, 11,
)
_S_LEFT = (
    11, 14, 15, 12, 5, 8, 7, 9, 11, 13, 14, 15, 6, 7, 9, 8,
    7, 6, 8, 13, 11, 9, 7, 15, 7, 12, 15, 9, 11, 7, 13, 12,
    11, 13, 6, 7, 14, 9, 13, 15, 14, 8, 13, 6, 5, 12, 7, 5,
    11, 12, 14, 15, 14, 15, 9, 8, 9, 14, 5, 6, 8, 6, 5, 12,
    9, 15, 5, 11, 6, 8, 13, 12, 5, 12, 13, 14, 11, 8, 5, 6,
)
_S_RIGHT = (
    8, 9, 9, 11, 13, 15, 15, 5, 7, 7, 8, 11, 14, 14, 12, 6,
    9, 13, 15, 7, 12, 8, 9, 11, 7, 7, 12, 7, 6, 15, 13, 11,
    9, 7, 15, 11, 8, 6, 6, 14, 12, 13, 5, 14, 13, 13, 7, 5,
    15, 5, 8, 11, 14, 14, 6, 14, 6, 9, 12, 9, 12, 5, 15, 8,
    8, 5, 12, 9, 12, 5, 14, 6, 8, 13, 6, 5, 15, 13, 11, 11,
)
_K_LEFT = (0x00000000, 0x5A827999, 0x6ED9EBA1, 0x8F1BBCDC, 0xA953FD4E)
_K_RIGHT = (0x50A28BE6, 0x5C4DD124, 0x6D703EF3, 0x7A6D76E9, 0x00000000)
_INITIAL = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0)

# per line, the five rounds in order as (boolean function, ((word, shift, constant) * 16)):
# the left line applies functions 0..4, the right line 4..0
_LEFT = tuple((r, tuple((_R_LEFT[j], _S_LEFT[j], _K_LEFT[r]) for j in range(16 * r, 16 * r + 16)))
              for r in range(5))
_RIGHT = tuple((4 - r, tuple((_R_RIGHT[j], _S_RIGHT[j], _K_RIGHT[r])
                             for j in range(16 * r, 16 * r + 16))) for r in range(5))
_WORDS = struct.Struct("<16I")


def _line(state: tuple[int, int, int, int, int], words: tuple[int, ...],
          schedule: tuple[tuple[int, tuple[tuple[int, int, int], ...]], ...]
          ) -> tuple[int, int, int, int, int]:
    """80 steps of one line, in five groups of 16 that share a boolean function (written
    out per function: no call and no branch per step)."""
    a, b, c, d, e = state
    m = _MASK
    for function, steps in schedule:
        if function == 0:
            for word, shift, k in steps:
                t = (a + (b ^ c ^ d) + words[word] + k) & m
                a, e, d, c, b = e, d, ((c << 10) | (c >> 22)) & m, b, \
                    ((((t << shift) | (t >> (32 - shift))) & m) + e) & m
        elif function == 1:
            for word, shift, k in steps:
                t = (a + ((b & c) | (~b & d)) + words[word] + k) & m
                a, e, d, c, b = e, d, ((c << 10) | (c >> 22)) & m, b, \
                    ((((t << shift) | (t >> (32 - shift))) & m) + e) & m
        elif function == 2:
            for word, shift, k in steps:
                t = (a + ((b | (~c & m)) ^ d) + words[word] + k) & m
                a, e, d, c, b = e, d, ((c << 10) | (c >> 22)) & m, b, \
                    ((((t << shift) | (t >> (32 - shift))) & m) + e) & m
        elif function == 3:
            for word, shift, k in steps:
                t = (a + ((b & d) | (c & ~d)) + words[word] + k) & m
                a, e, d, c, b = e, d, ((c << 10) | (c >> 22)) & m, b, \
                    ((((t << shift) | (t >> (32 - shift))) & m) + e) & m
        else:
            for word, shift, k in steps:
                t = (a + (b ^ (c | (~d & m))) + words[word] + k) & m
                a, e, d, c, b = e, d, ((c << 10) | (c >> 22)) & m, b, \
                    ((((t << shift) | (t >> (32 - shift))) & m) + e) & m
    return a, b, c, d, e


class RIPEMD160:
    """A hashlib-style RIPEMD-160 object: ``update``, ``digest``, ``hexdigest``, ``copy``."""

    name = "ripemd160"
    digest_size = 20
    block_size = 64

    def __init__(self, data: bytes | bytearray | memoryview = b"") -> None:
        self._state = _INITIAL
        self._pending = b""
        self._length = 0
        self.update(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Hash more bytes."""
        data = bytes(data)
        self._length += len(data)
        data = self._pending + data
        full = len(data) - len(data) % 64
        state = self._state
        for offset in range(0, full, 64):
            state = self._compress(state, _WORDS.unpack_from(data, offset))
        self._state = state
        self._pending = data[full:]

    @staticmethod
    def _compress(state: tuple[int, int, int, int, int], words: tuple[int, ...]
                  ) -> tuple[int, int, int, int, int]:
        al, bl, cl, dl, el = _line(state, words, _LEFT)
        ar, br, cr, dr, er = _line(state, words, _RIGHT)
        h0, h1, h2, h3, h4 = state
        return ((h1 + cl + dr) & _MASK, (h2 + dl + er) & _MASK, (h3 + el + ar) & _MASK,
                (h4 + al + br) & _MASK, (h0 + bl + cr) & _MASK)

    def digest(self) -> bytes:
        """The 20-byte hash of everything passed so far (the object stays usable)."""
        tail = self._pending + b"\x80"
        tail += b"\0" * ((56 - len(tail)) % 64) + struct.pack("<Q", (self._length * 8)
                                                              & 0xFFFFFFFFFFFFFFFF)
        state = self._state
        for offset in range(0, len(tail), 64):
            state = self._compress(state, _WORDS.unpack_from(tail, offset))
        return struct.pack("<5I", *state)

    def hexdigest(self) -> str:
        """The hash as 40 hex digits."""
        return self.digest().hex()

    def copy(self) -> RIPEMD160:
        """An independent copy of the current state."""
        other = RIPEMD160()
        other._state, other._pending, other._length = self._state, self._pending, self._length
        return other


def new(data: bytes = b"", *, prefer_hashlib: bool = True) -> HashObject:
    """A RIPEMD-160 hash object: OpenSSL's through hashlib if it has one, else this module's."""
    if prefer_hashlib:
        try:
            return hashlib.new("ripemd160", data)
        except ValueError:
            pass
    return RIPEMD160(data)
