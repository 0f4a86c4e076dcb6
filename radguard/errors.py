"""The one exception family radguard raises for bad input.

Every user-facing failure (malformed DICOM, wrong key, bad passphrase, unreachable TSA) is a
:class:`RadguardError` with a one-line message that says what is wrong and with which file, so
the CLI can print it and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations


class RadguardError(Exception):
    """Base class: a clear, one-line, user-facing error."""


class DicomReadError(RadguardError):
    """A file is not DICOM, is truncated, or its pixel data cannot be decoded."""


class KeyMaterialError(RadguardError):
    """A key or certificate is missing, malformed, encrypted with another passphrase, or
    does not belong with its partner."""


class SignatureError(RadguardError):
    """A signature cannot be created (profile requirements unmet, unsupported algorithm...)."""


class TimestampError(RadguardError):
    """The time-stamping authority could not be reached or returned an unusable answer."""
