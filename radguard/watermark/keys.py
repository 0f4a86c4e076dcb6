"""Watermark keys: one secret file, separate derived keys for each job.

A watermark key file holds 32 random bytes (hex). Any file can serve as key material (a
hospital may reuse a secret it already manages); its bytes are run through HMAC-SHA256 with
a label per purpose, so the tag key, the payload encryption key and the payload MAC key are
independent.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from radguard.errors import KeyMaterialError
from radguard.fileio import atomic_write_bytes, read_bytes

__all__ = ["WatermarkKey", "generate_key_file", "load_key"]


@dataclass(frozen=True)
class WatermarkKey:
    """Derived sub-keys of one watermark secret."""

    tag: bytes  # block authentication tags (BLAKE2s key, 32 bytes)
    encrypt: bytes  # payload keystream
    mac: bytes  # payload + original-pixel MAC
    export: bytes  # robust export mark dither
    fingerprint: str  # short public identifier of the key (not secret-revealing)

    @classmethod
    def from_secret(cls, secret: bytes) -> WatermarkKey:
        """Derive the sub-keys from raw key material (at least 16 bytes)."""
        if len(secret) < 16:
            raise KeyMaterialError("watermark key material must be at least 16 bytes")

        def derive(label: str) -> bytes:
            return hmac.new(secret, b"radguard-watermark-v1/" + label.encode(),
                            hashlib.sha256).digest()

        return cls(derive("tag"), derive("encrypt"), derive("mac"), derive("export"),
                   derive("fingerprint")[:6].hex())


def generate_key_file(path: str | os.PathLike[str], *, force: bool = False) -> WatermarkKey:
    """Write a new random watermark key (hex, mode 0600) and return it."""
    p = Path(path)
    if p.exists() and not force:
        raise KeyMaterialError(f"{p} exists; refusing to overwrite a key (use --force)")
    secret = secrets.token_bytes(32)
    atomic_write_bytes(p, secret.hex().encode() + b"\n", mode=0o600)
    return WatermarkKey.from_secret(secret)


def load_key(path: str | os.PathLike[str]) -> WatermarkKey:
    """Load a key file: hex from :func:`generate_key_file`, or any file's raw bytes."""
    data = read_bytes(path, "watermark key", KeyMaterialError)
    text = data.strip()
    try:
        secret = bytes.fromhex(text.decode("ascii")) if len(text) >= 32 else data
    except (UnicodeDecodeError, ValueError):
        secret = data
    return WatermarkKey.from_secret(secret)
