"""Bit packing helpers shared by the watermark layers."""

from __future__ import annotations

import numpy as np

__all__ = ["bits_to_bytes", "bytes_to_bits", "keystream"]


def bytes_to_bits(data: bytes) -> np.ndarray:
    """Bytes to a 0/1 uint8 array, most significant bit first."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


def bits_to_bytes(bits: np.ndarray) -> bytes:
    """0/1 array (length a multiple of 8 or padded with zeros) back to bytes."""
    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()


def keystream(key: bytes, nonce: bytes, n_bytes: int) -> bytes:
    """A SHAKE-256 keystream: distinct for every (key, nonce) pair."""
    import hashlib

    return hashlib.shake_256(key + b"|" + nonce).digest(n_bytes) if n_bytes else b""
