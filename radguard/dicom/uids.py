"""UID generation under one configurable root.

The default root is pydicom's (1.2.826.0.1.3680043.8.498), which its owners allow anyone to
use; a hospital with its own ISO OID sets ``RADGUARD_UID_ROOT``.
"""

from __future__ import annotations

import os
import re

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

__all__ = ["is_valid_uid", "new_uid", "uid_root"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def uid_root() -> str:
    """The root under which radguard creates UIDs, always ending in a dot."""
    root = os.environ.get("RADGUARD_UID_ROOT", PYDICOM_ROOT_UID)
    return root if root.endswith(".") else root + "."


def new_uid() -> str:
    """A new globally unique UID (random suffix under :func:`uid_root`)."""
    return str(generate_uid(prefix=uid_root()))


def is_valid_uid(value: str) -> bool:
    """True if ``value`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return len(value) <= 64 and bool(_UID_RE.match(value))
