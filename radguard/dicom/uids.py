"""UID generation under one configurable root, and UID checks for what arrives.

The default root is pydicom's (1.2.826.0.1.3680043.8.498), which its owners allow anyone to
use; a hospital with its own ISO OID sets ``RADGUARD_UID_ROOT``.

UIDs that arrive end up in database rows, file paths, URLs and web pages, so the gateway
admits only what PS3.5 9.1 allows: digits in dot-separated components, at most 64
characters (:func:`uid_problem`). One flaw of real archives is tolerated on input: a
component with a leading zero ("1.2.840.0113619...", written by some older devices). It is
digits and dots like any UID and cannot carry markup, and refusing it would refuse real
studies; radguard never creates such a UID (:func:`is_valid_uid` stays strict).
"""

from __future__ import annotations

import os
import re

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

__all__ = ["is_valid_uid", "new_uid", "uid_problem", "uid_root"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LENIENT_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_root() -> str:
    """The root under which radguard creates UIDs, always ending in a dot."""
    root = os.environ.get("RADGUARD_UID_ROOT", PYDICOM_ROOT_UID)
    return root if root.endswith(".") else root + "."


def new_uid() -> str:
    """A new globally unique UID (random suffix under :func:`uid_root`)."""
    return str(generate_uid(prefix=uid_root()))


def is_valid_uid(value: str) -> bool:
    """True if ``value`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return len(value) <= 64 and bool(_UID_RE.fullmatch(value))


def uid_problem(value: str, what: str = "UID") -> str | None:
    """Why ``value`` cannot be admitted as a UID, or None when it can. The padding of the
    encoding (trailing NUL or space) is ignored, a leading zero in a component tolerated
    (see the module docstring); the reason never repeats the value, which may be hostile."""
    value = value.rstrip("\0 ")
    if not value:
        return f"{what} is empty"
    if len(value) > 64:
        return f"{what} is {len(value)} characters long (at most 64)"
    if _LENIENT_UID_RE.fullmatch(value):
        return None
    if value.replace(".", "").isdigit() and value.isascii():
        return f"{what} has an empty component (leading, trailing or double dot)"
    return f"{what} holds characters other than digits and dots"
