"""Patient-level train / validation / test splits that every script and test agrees on.

A case's split is a hash of its grouping key (dataset and patient, woman or image), so a
patient's images never straddle two splits and the assignment is the same on every machine,
in every run, whatever the file order.
"""

from __future__ import annotations

import zlib

__all__ = ["split_of"]


def split_of(source: str, group: str, *, train: int = 70, val: int = 15) -> str:
    """'train' (train %), 'val' (val %) or 'test' (the rest) for one grouping key."""
    h = zlib.crc32(f"{source}:{group}".encode()) % 100
    return "train" if h < train else "val" if h < train + val else "test"
