"""Trust store and certificate path validation.

Deliberately small and explicit: a signer is trusted if its certificate is itself a trust
anchor (a pinned device certificate) or chains, through intermediates whose signatures check
out, to an anchor; every certificate on the path must be valid at the time asked about; CA
certificates must say ``cA=TRUE`` (and allow certificate signing if they carry key usage);
the signer's key usage, if present, must allow digital signatures or non-repudiation.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

from radguard.errors import KeyMaterialError
from radguard.provenance.keys import describe_name, load_certificates

__all__ = ["ChainResult", "TrustStore"]

_MAX_DEPTH = 8


@dataclass(frozen=True)
class ChainResult:
    """Outcome of a path validation; ``reason`` says why when ``trusted`` is False."""

    trusted: bool
    reason: str
    chain: tuple[x509.Certificate, ...] = ()


def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


class TrustStore:
    """Trust anchors (CA or pinned signer certificates) plus optional intermediates."""

    def __init__(
        self,
        anchors: Iterable[x509.Certificate] = (),
        intermediates: Iterable[x509.Certificate] = (),
    ) -> None:
        self.anchors = list(anchors)
        self.intermediates = list(intermediates)
        self._anchor_prints = {_fingerprint(c) for c in self.anchors}
        self._paths: dict[tuple[bytes, tuple[bytes, ...]],
                          tuple[bool, str, tuple[x509.Certificate, ...]]] = {}

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]]) -> TrustStore:
        """Load anchors from PEM/DER files or folders of them (``*.pem``, ``*.crt``, ``*.der``)."""
        anchors: list[x509.Certificate] = []
        for entry in paths:
            p = Path(entry)
            if p.is_dir():
                files = sorted(f for f in p.iterdir()
                               if f.suffix.lower() in (".pem", ".crt", ".cer", ".der"))
                if not files:
                    raise KeyMaterialError(f"{p}: trust folder holds no certificate files")
                for f in files:
                    anchors.extend(load_certificates(f))
            else:
                anchors.extend(load_certificates(p))
        return cls(anchors)

    def __len__(self) -> int:
        return len(self.anchors)

    def validate(
        self,
        cert: x509.Certificate,
        at: dt.datetime,
        extra_intermediates: Iterable[x509.Certificate] = (),
    ) -> ChainResult:
        """Validate ``cert`` for signing at time ``at`` (timezone-aware).

        The path (whose signatures are the expensive part) is built once per certificate and
        cached; validity dates are checked on every call, for the time asked about.
        """
        extra = tuple(extra_intermediates)
        key = (_fingerprint(cert), tuple(_fingerprint(c) for c in extra))
        cached = self._paths.get(key)
        if cached is None:
            cached = self._build_path(cert, extra)
            if len(self._paths) > 4096:
                self._paths.clear()
            self._paths[key] = cached
        trusted, reason, path = cached
        for member in path:
            dates = _date_problem(member, at)
            if dates:
                return ChainResult(False, dates, path)
        return ChainResult(trusted, reason, path)

    def _build_path(self, cert: x509.Certificate, extra: tuple[x509.Certificate, ...]
                    ) -> tuple[bool, str, tuple[x509.Certificate, ...]]:
        usage_problem = _signer_usage_problem(cert)
        if usage_problem:
            return False, usage_problem, (cert,)
        pool = self.anchors + self.intermediates + list(extra)
        path = [cert]
        current = cert
        for _ in range(_MAX_DEPTH):
            if _fingerprint(current) in self._anchor_prints:
                return True, "chains to a trusted certificate", tuple(path)
            issuer = _find_issuer(current, pool)
            if issuer is None:
                return (False, f"issuer '{describe_name(current.issuer)}' is not in the "
                        "trust store", tuple(path))
            if _fingerprint(issuer) == _fingerprint(current):
                return False, "self-signed certificate not in the trust store", tuple(path)
            ca_problem = _ca_problem(issuer)
            if ca_problem:
                return False, ca_problem, tuple(path)
            path.append(issuer)
            current = issuer
        return False, "certificate chain too long", tuple(path)


def _find_issuer(cert: x509.Certificate, pool: list[x509.Certificate]) -> x509.Certificate | None:
    for candidate in pool:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return candidate
    return None


def _date_problem(cert: x509.Certificate, at: dt.datetime) -> str:
    if at < cert.not_valid_before_utc:
        return (f"certificate '{describe_name(cert.subject)}' not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ}")
    if at > cert.not_valid_after_utc:
        return (f"certificate '{describe_name(cert.subject)}' expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
    return ""


def _ca_problem(cert: x509.Certificate) -> str:
    name = describe_name(cert.subject)
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return f"issuer '{name}' is not marked as a CA"
    if not bc.ca:
        return f"issuer '{name}' is not a CA certificate"
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return ""
    return "" if ku.key_cert_sign else f"issuer '{name}' may not sign certificates"


def _signer_usage_problem(cert: x509.Certificate) -> str:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return ""
    if ku.digital_signature or ku.content_commitment:
        return ""
    return "signer certificate's key usage does not allow digital signatures"
