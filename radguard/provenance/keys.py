"""Keys and X.509 certificates for a hospital's own small PKI.

A local CA issues certificates to acquisition devices (subject: station name, device serial,
institution) and to technologists (subject: name, staff ID), so that a signature names the
machine and the person behind an image. RSA (2048+) is what PS3.15 profiles define; ECDSA
P-256 is offered as a non-standard option (dcmtk signs with it only without a profile).

Private keys are written 0600, atomically, optionally passphrase-encrypted, and never logged.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from radguard.errors import KeyMaterialError
from radguard.fileio import atomic_write_bytes, read_bytes

__all__ = [
    "KEY_ALGORITHMS",
    "Identity",
    "PrivateKey",
    "Signer",
    "create_ca",
    "create_signer",
    "describe_name",
    "describe_subject",
    "generate_private_key",
    "load_certificates",
    "load_private_key",
    "load_signer",
    "save_certificate",
    "save_private_key",
]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
KEY_ALGORITHMS = ("rsa2048", "rsa3072", "rsa4096", "ecdsa-p256")
Role = Literal["ca", "device", "technologist"]

_ROLE_UNIT = {"ca": "Certification Authority", "device": "Acquisition Device",
              "technologist": "Technologist"}


@dataclass(frozen=True)
class Identity:
    """Who a certificate speaks for. ``serial`` is a device serial or a staff ID."""

    common_name: str
    role: Role = "device"
    organization: str | None = None
    serial: str | None = None
    locality: str | None = None
    email: str | None = None

    def to_name(self) -> x509.Name:
        """The X.509 subject name; the role travels in the OU so verifiers can show it."""
        if not self.common_name.strip():
            raise KeyMaterialError("a certificate needs a non-empty name (common name)")
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, self.common_name)]
        if self.organization:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization))
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _ROLE_UNIT[self.role]))
        if self.serial:
            attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, self.serial))
        if self.locality:
            attrs.append(x509.NameAttribute(NameOID.LOCALITY_NAME, self.locality))
        if self.email:
            attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, self.email))
        return x509.Name(attrs)


@dataclass
class Signer:
    """A private key with its certificate (and any intermediate CA certificates)."""

    key: PrivateKey
    certificate: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)

    @property
    def key_type(self) -> str:
        """``RSA`` or ``ECDSA``."""
        return "RSA" if isinstance(self.key, rsa.RSAPrivateKey) else "ECDSA"

    @functools.cached_property
    def certificate_der(self) -> bytes:
        """The certificate as DER, encoded once: every signature embeds it."""
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @functools.cached_property
    def subject(self) -> str:
        """The signer's identity as reported (see :func:`describe_subject`)."""
        return describe_subject(self.certificate)


def generate_private_key(algorithm: str = "rsa2048") -> PrivateKey:
    """A fresh private key: ``rsa2048``/``rsa3072``/``rsa4096`` or ``ecdsa-p256``."""
    if algorithm.startswith("rsa") and algorithm[3:] in ("2048", "3072", "4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[3:]))
    if algorithm == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise KeyMaterialError(
        f"unknown key algorithm {algorithm!r}; choose one of {', '.join(KEY_ALGORITHMS)}"
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _build_certificate(
    subject: x509.Name,
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    issuer_key: PrivateKey,
    issuer_cert: x509.Certificate | None,
    *,
    is_ca: bool,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    issuer_name = issuer_cert.subject if issuer_cert is not None else subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None),
                       critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=not is_ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    authority_public = (issuer_cert.public_key() if issuer_cert is not None else public_key)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_public),  # type: ignore[arg-type]
        critical=False,
    )
    return builder.sign(issuer_key, hashes.SHA256())


def create_ca(
    name: str,
    *,
    organization: str | None = None,
    days: int = 3650,
    algorithm: str = "rsa3072",
) -> tuple[PrivateKey, x509.Certificate]:
    """A self-signed CA that issues device and technologist certificates."""
    key = generate_private_key(algorithm)
    subject = Identity(name, "ca", organization).to_name()
    start = _now() - dt.timedelta(minutes=5)
    cert = _build_certificate(subject, key.public_key(), key, None, is_ca=True,
                              not_before=start, not_after=start + dt.timedelta(days=days))
    return key, cert


def create_signer(
    identity: Identity,
    *,
    ca_key: PrivateKey | None = None,
    ca_cert: x509.Certificate | None = None,
    days: int = 825,
    algorithm: str = "rsa2048",
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """A signing key and certificate for a device or technologist.

    Issued by ``ca_key``/``ca_cert`` when given, else self-signed (trust it by pinning).
    The validity starts 5 minutes in the past to tolerate clock skew between machines.
    """
    if (ca_key is None) != (ca_cert is None):
        raise KeyMaterialError("a CA needs both its key and its certificate")
    if ca_key is not None and ca_cert is not None:
        _check_pair(ca_key, ca_cert, "CA")
        constraints = _basic_constraints(ca_cert)
        if constraints is None or not constraints.ca:
            raise KeyMaterialError("the issuing certificate is not a CA certificate")
    key = generate_private_key(algorithm)
    start = not_before or (_now() - dt.timedelta(minutes=5))
    end = not_after or (start + dt.timedelta(days=days))
    issuer_key = ca_key if ca_key is not None else key
    cert = _build_certificate(identity.to_name(), key.public_key(), issuer_key, ca_cert,
                              is_ca=False, not_before=start, not_after=end)
    return key, cert


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def save_private_key(
    key: PrivateKey, path: str | os.PathLike[str], passphrase: bytes | None = None
) -> None:
    """Write a PKCS#8 PEM key with mode 0600, encrypted when a passphrase is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            encryption)
    atomic_write_bytes(path, pem, mode=0o600)


def save_certificate(cert: x509.Certificate | list[x509.Certificate],
                     path: str | os.PathLike[str]) -> None:
    """Write one certificate, or a chain (leaf first), as PEM."""
    certs = cert if isinstance(cert, list) else [cert]
    atomic_write_bytes(path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


def load_private_key(path: str | os.PathLike[str], passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM or DER private key; wrong or missing passphrases are clear errors."""
    p = Path(path)
    data = _read(p, "private key")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, passphrase or None)
        else:
            key = serialization.load_der_private_key(data, passphrase or None)
    except TypeError as exc:
        if passphrase:
            raise KeyMaterialError(f"{p}: key is not encrypted but a passphrase was given") from exc
        raise KeyMaterialError(
            f"{p}: key is passphrase-protected; give --passphrase-file or set "
            "RADGUARD_KEY_PASSPHRASE") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        # a wrong passphrase usually fails the decryption's padding check, but about once in
        # 256 tries it decrypts to garbage that fails later as "unreadable": with an encrypted
        # key and a passphrase given, both mean the passphrase is wrong
        encrypted = b"ENCRYPTED" in data[:200]
        if passphrase and (encrypted or "decrypt" in str(exc).lower()
                           or "password" in str(exc).lower()):
            raise KeyMaterialError(f"{p}: wrong passphrase for this private key") from exc
        raise KeyMaterialError(f"{p}: not a readable private key") from exc
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise KeyMaterialError(f"{p}: only RSA and ECDSA keys can sign DICOM")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise KeyMaterialError(f"{p}: RSA key of {key.key_size} bits; at least 2048 are needed")
    return key


def load_certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """All certificates in a PEM bundle or one DER file, in file order."""
    p = Path(path)
    data = _read(p, "certificate")
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise KeyMaterialError(f"{p}: not a readable X.509 certificate") from exc
    if not certs:
        raise KeyMaterialError(f"{p}: contains no certificate")
    return certs


def load_signer(
    key_path: str | os.PathLike[str],
    cert_path: str | os.PathLike[str],
    passphrase: bytes | None = None,
) -> Signer:
    """Key + certificate (+ chain in the same PEM); checks that they belong together."""
    key = load_private_key(key_path, passphrase)
    certs = load_certificates(cert_path)
    _check_pair(key, certs[0], str(cert_path))
    return Signer(key=key, certificate=certs[0], chain=certs[1:])


def _check_pair(key: PrivateKey, cert: x509.Certificate, what: str) -> None:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if key.public_key().public_bytes(enc, fmt) != cert.public_key().public_bytes(enc, fmt):
        raise KeyMaterialError(f"{what}: certificate does not match the private key")


_SHORT_NAMES = {
    NameOID.COMMON_NAME: "CN", NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU", NameOID.SERIAL_NUMBER: "serialNumber",
    NameOID.LOCALITY_NAME: "L", NameOID.COUNTRY_NAME: "C", NameOID.EMAIL_ADDRESS: "email",
    NameOID.STATE_OR_PROVINCE_NAME: "ST", NameOID.USER_ID: "UID",
}


def describe_name(name: x509.Name) -> str:
    """A name in the order it was written, e.g. ``CN=DX Room 3, O=..., serialNumber=SN1``."""
    parts = []
    for attr in name:
        label = _SHORT_NAMES.get(attr.oid, attr.oid.dotted_string)
        parts.append(f"{label}={attr.value!s}")
    return ", ".join(parts)


def describe_subject(cert: x509.Certificate) -> str:
    """The signer as a person reads it: ``CN=DX Room 3, O=..., OU=Acquisition Device, ...``."""
    return describe_name(cert.subject)


def _read(p: Path, what: str) -> bytes:
    return read_bytes(p, what, KeyMaterialError)
