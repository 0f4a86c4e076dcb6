"""Verify PS3.15 digital signatures and say exactly what they cover.

Per signature: recompute the MAC byte stream, check the RSA/ECDSA signature with the
certificate embedded in the instance, validate that certificate against the trust store,
check an RFC 3161 timestamp if present, and infer which PS3.15 profiles it satisfies.

Per file: ``valid`` only if every signature is mathematically valid *and* trusted;
``invalid`` if any signature does not match the data (the file changed after signing) or
is malformed; ``untrusted`` if the data is intact but a signer is unknown, its certificate
chain is broken, or it was not valid at the relevant time; ``unsigned`` if there is no
signature; ``error`` if the file cannot be read.

A valid signature does not mean the whole file is vouched for: PS3.15 lets anyone add
elements without breaking a signature. ``uncovered`` lists every present element that no
intact signature covers.

Time policy: with a trusted certified timestamp the signer certificate must have been valid
at the timestamp's time; without one it must be valid both at the claimed signing time and
now (a claimed time is the signer's word, and an expired key may have leaked).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import DT

from radguard.concurrency import background_pool, map_ordered
from radguard.dicom.io import iter_dicom_paths, peek, read_dataset, source_view, stored_element
from radguard.errors import RadguardError, SignatureError
from radguard.provenance.bytestream import (
    MAC_TRANSFER_SYNTAX,
    MacStream,
    element_vr,
    is_signable_element,
    new_hasher,
    signable_tags,
)
from radguard.provenance.keys import describe_name
from radguard.provenance.profiles import VERIFY_MACS, satisfied_profiles
from radguard.provenance.sign import crypto_hash
from radguard.provenance.timestamp import TimestampCheck, verify_timestamp_token
from radguard.provenance.trust import TrustStore

__all__ = [
    "SignatureCheck",
    "Status",
    "VerificationReport",
    "verify_dataset",
    "verify_file",
    "verify_paths",
]

Status = Literal["valid", "invalid", "untrusted", "unsigned", "error"]

#: Elements that are part of the signature machinery or encoding, never "uncovered content".
_MACHINERY = {0x4FFE0001, 0xFFFAFFFA, 0xFFFCFFFC, 0x00080001}


@dataclass
class SignatureCheck:
    """The verdict on one signature item."""

    status: Literal["valid", "invalid", "untrusted"]
    reason: str
    location: str = ""
    mac_id: int | None = None
    uid: str | None = None
    signer: str | None = None
    key_type: str | None = None
    mac_algorithm: str | None = None
    signed_at: dt.datetime | None = None
    profiles: list[str] = field(default_factory=list)
    covered: list[int] = field(default_factory=list)
    timestamp: TimestampCheck | None = None
    intact: bool = False  # the data matches what was signed (whatever the trust verdict)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "status": self.status,
            "reason": self.reason,
            "location": self.location or None,
            "mac_id": self.mac_id,
            "uid": self.uid,
            "signer": self.signer,
            "key_type": self.key_type,
            "mac_algorithm": self.mac_algorithm,
            "signed_at": self.signed_at.isoformat() if self.signed_at else None,
            "profiles": self.profiles,
            "covered": [_name(t) for t in self.covered],
            "timestamp": self.timestamp.to_dict() if self.timestamp else None,
        }


@dataclass
class VerificationReport:
    """The verdict on one file or data set."""

    path: str
    status: Status
    signatures: list[SignatureCheck] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def signer(self) -> str | None:
        """Signer of the first top-level signature (the one that vouches for the content)."""
        for check in self.signatures:
            if not check.location:
                return check.signer
        return self.signatures[0].signer if self.signatures else None

    @property
    def ok(self) -> bool:
        """True when every signature is valid and trusted."""
        return self.status == "valid"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form with the documented keys: path, status, signer, uncovered..."""
        return {
            "path": self.path,
            "status": self.status,
            "signer": self.signer,
            "uncovered": self.uncovered,
            "error": self.error,
            "signatures": [s.to_dict() for s in self.signatures],
        }


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or str(Tag(tag))


def _explicit_little(uid: UID) -> bool:
    """PS3.3 C.12.1.1.3.1.1: the MAC is computed in an explicit-VR little-endian syntax."""
    if uid == MAC_TRANSFER_SYNTAX:
        return True
    try:
        return uid.is_transfer_syntax and uid.is_little_endian and not uid.is_implicit_VR
    except ValueError:
        return False


def _der_trim(blob: bytes) -> bytes:
    """Drop the padding byte DICOM adds to an odd-length DER certificate."""
    if len(blob) < 2 or blob[0] != 0x30:
        return blob
    first = blob[1]
    if first < 0x80:
        return blob[: 2 + first]
    n = first & 0x7F
    return blob[: 2 + n + int.from_bytes(blob[2 : 2 + n], "big")]


def _parse_dt(text: str) -> dt.datetime:
    value = DT(text.strip())
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value


def _seq(ds: Dataset, tag: int) -> list[Dataset]:
    return list(peek(ds, tag) or [])


def _check_one(
    ds: Dataset,
    sig: Dataset,
    mac_params: list[Dataset],
    trust: TrustStore | None,
    now: dt.datetime,
    is_implicit: bool,
    is_little: bool,
    location: str,
    source: memoryview | None,
) -> SignatureCheck:
    check = SignatureCheck(status="invalid", reason="", location=location)
    digest_future: Future[bytes] | None = None
    try:
        check.mac_id = int(sig.MACIDNumber)
        check.uid = str(sig.get("DigitalSignatureUID", "")) or None
        params = next((p for p in mac_params if int(p.get("MACIDNumber", -1)) == check.mac_id),
                      None)
        if params is None:
            check.reason = f"no MAC Parameters item for MAC ID {check.mac_id}"
            return check
        ts_uid = UID(str(params.get("MACCalculationTransferSyntaxUID", "")).strip())
        if not _explicit_little(ts_uid):
            check.reason = f"MAC calculation transfer syntax {ts_uid!r} is not explicit VR LE"
            return check
        mac = str(params.get("MACAlgorithm", "")).strip().upper()
        check.mac_algorithm = mac
        if mac not in VERIFY_MACS:
            check.reason = f"unknown MAC algorithm {mac!r}"
            return check
        if "DataElementsSigned" in params:
            listed = params.DataElementsSigned
            tags = [int(listed)] if isinstance(listed, int) else [int(t) for t in listed]
        else:
            tags = signable_tags(ds, is_implicit)
        check.covered = sorted(tags)
        removed = [t for t in tags if t not in ds]
        if removed:
            check.reason = "signed element(s) removed: " + ", ".join(_name(t) for t in removed)
            return check
        try:
            hasher = new_hasher(mac)
        except ValueError:
            check.reason = f"MAC algorithm {mac} is not available on this system"
            return check
        # a large hash (GIL-free, most of the time) runs while the checks below are made;
        # a small one costs less inline than handing it to another thread
        digest_args = (hasher, ds, sig, tags, is_implicit, is_little, source)
        if _pixel_bytes(ds) >= OVERLAP_SIZE:
            digest_future = background_pool().submit(_digest, *digest_args)
        bad = [t for t in tags if not is_signable_element(ds, t, is_implicit)]
        if bad:
            check.reason = "signature lists unsignable element(s): " + ", ".join(
                f"{_name(t)} ({element_vr(ds, t, is_implicit)})" for t in bad)
            return check
        if str(sig.get("CertificateType", "")).strip() != "X509_1993_SIG":
            check.reason = f"unsupported certificate type {sig.get('CertificateType')!r}"
            return check
        cert = x509.load_der_x509_certificate(_der_trim(bytes(sig.CertificateOfSigner)))
        check.signer = describe_name(cert.subject)
        check.signed_at = _parse_dt(str(sig.DigitalSignatureDateTime))
        signature = bytes(sig.Signature)
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            check.reason = "signer key type is not RSA or ECDSA"
            return check
        check.key_type = "RSA" if isinstance(key, rsa.RSAPublicKey) else "ECDSA"
        timestamp = _timestamp_check(sig, signature, trust)
        trust_problem = _trust_problem(cert, trust, timestamp, check.signed_at, now)
        digest = (digest_future.result() if digest_future is not None
                  else _digest(*digest_args))
        prehashed = utils.Prehashed(crypto_hash(mac))
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, digest, padding.PKCS1v15(), prehashed)
        else:
            # DICOM pads the odd-length DER of an ECDSA signature with a zero byte
            key.verify(_der_trim(signature), digest, ec.ECDSA(prehashed))
    except InvalidSignature:
        check.reason = "data changed after signing: signature does not match the content"
        return check
    except (SignatureError, UnsupportedAlgorithm) as exc:
        check.reason = str(exc)
        return check
    except (AttributeError, KeyError, ValueError, TypeError) as exc:
        check.reason = f"malformed signature item ({' '.join(str(exc).split())[:120]})"
        return check
    finally:
        if digest_future is not None:
            digest_future.cancel()
            wait([digest_future])  # never leave a hash running over a closing file

    check.intact = True
    check.profiles = satisfied_profiles(check.key_type or "", mac, list(ds.keys()), tags)
    check.timestamp = timestamp if isinstance(timestamp, TimestampCheck) else None
    if isinstance(timestamp, str):
        check.reason = timestamp
        return check
    if check.timestamp is not None and not check.timestamp.ok:
        check.reason = f"certified timestamp invalid: {check.timestamp.reason}"
        return check
    check.status = "untrusted"
    if trust_problem:
        check.reason = trust_problem
        return check
    check.status = "valid"
    check.reason = "signature matches the data and the signer is trusted"
    return check


#: pixel data from this size on is hashed in the background while the rest is checked
OVERLAP_SIZE = 1 << 20


def _pixel_bytes(ds: Dataset) -> int:
    elem = stored_element(ds, 0x7FE00010) if 0x7FE00010 in ds else None
    if elem is None:
        return 0
    length = getattr(elem, "length", None)
    if isinstance(length, int) and length != 0xFFFFFFFF:
        return length
    value = getattr(elem, "value", None)
    return len(value) if isinstance(value, bytes | bytearray) else OVERLAP_SIZE


def _digest(hasher: Any, ds: Dataset, sig: Dataset, tags: list[int], is_implicit: bool,  # noqa: ANN401
            is_little: bool, source: memoryview | None) -> bytes:
    stream = MacStream(hasher, is_implicit=is_implicit, is_little_endian=is_little,
                       source=source)
    stream.add_elements(ds, tags)
    stream.add_signature_item(sig)
    return stream.digest()


def _timestamp_check(sig: Dataset, signature: bytes, trust: TrustStore | None
                     ) -> TimestampCheck | str | None:
    """The certified timestamp's verdict, a reason string if it is of an unknown type, or
    None if there is none."""
    if "CertifiedTimestamp" not in sig:
        return None
    ts_type = str(sig.get("CertifiedTimestampType", "")).strip()
    if ts_type != "CMS_TSP":
        return f"unsupported certified timestamp type {ts_type!r}"
    return verify_timestamp_token(bytes(sig.CertifiedTimestamp), signature, trust)


def _trust_problem(cert: x509.Certificate, trust: TrustStore | None,
                   timestamp: TimestampCheck | str | None, signed_at: dt.datetime,
                   now: dt.datetime) -> str:
    """Why the signer is not trusted at the relevant time(s), or "" if it is."""
    if trust is None or not len(trust):
        return "no trust store given"
    if isinstance(timestamp, TimestampCheck) and timestamp.trusted and timestamp.time:
        moments = [("timestamp", timestamp.time)]
    else:
        moments = [("signing", signed_at), ("now", now)]
    for label, moment in moments:
        chain = trust.validate(cert, moment)
        if not chain.trusted:
            return f"{chain.reason} (checked at {label} time {moment:%Y-%m-%d %H:%M:%SZ})"
    return ""


_SIGNATURES_TAG_BYTES = (b"\xfa\xff\xfa\xff", b"\xff\xfa\xff\xfa")  # (FFFA,FFFA) LE, BE


def _signature_sites(ds: Dataset, location: str = "") -> list[tuple[Dataset, str]]:
    """The top-level data set and every sequence item (at any depth) that holds signatures."""
    sites = [(ds, location)] if 0xFFFAFFFA in ds else []
    for tag in sorted(ds.keys()):
        t = int(tag)
        if t in _MACHINERY or (t >> 16) < 0x0008:
            continue
        try:
            raw = stored_element(ds, t)
            if raw.VR not in ("SQ", None) and " or " not in raw.VR:
                continue  # explicit VR says it is not a sequence
            if element_vr(ds, t, bool(ds.original_encoding[0]), raw) != "SQ":
                continue
            if getattr(raw, "is_raw", False) and raw.value is not None \
                    and not any(marker in raw.value for marker in _SIGNATURES_TAG_BYTES):
                continue  # no signature inside: do not parse the sequence at all
            items = _seq(ds, t)
        except Exception:  # an unparsable sequence simply holds no signature we can find
            continue
        for i, item in enumerate(items):
            sites.extend(_signature_sites(item, f"{location}{_name(t)}[{i}]."))
    return sites


def verify_dataset(
    ds: Dataset,
    trust: TrustStore | None = None,
    *,
    now: dt.datetime | None = None,
    path: str = "",
) -> VerificationReport:
    """Verify every signature in ``ds`` (top level and nested in sequence items)."""
    now = now or dt.datetime.now(dt.UTC)
    is_implicit, is_little = ds.original_encoding
    is_implicit = bool(is_implicit)
    is_little = True if is_little is None else bool(is_little)
    report = VerificationReport(path=path or str(getattr(ds, "filename", "") or ""),
                                status="unsigned")
    for site, location in _signature_sites(ds):
        mac_params = _seq(site, 0x4FFE0001)
        for sig in _seq(site, 0xFFFAFFFA):
            report.signatures.append(
                _check_one(site, sig, mac_params, trust, now, is_implicit, is_little,
                           location.rstrip("."), source_view(ds))
            )
    covered: set[int] = set()
    for check in report.signatures:
        if check.intact and not check.location:
            covered.update(check.covered)
    report.uncovered = [
        _name(int(t)) for t in sorted(ds.keys())
        if int(t) not in covered and int(t) not in _MACHINERY and (int(t) & 0xFFFF) != 0
        and (int(t) >> 16) >= 0x0008
    ]
    statuses = {c.status for c in report.signatures}
    if not report.signatures:
        report.status = "unsigned"
    elif "invalid" in statuses:
        report.status = "invalid"
    elif "untrusted" in statuses:
        report.status = "untrusted"
    else:
        report.status = "valid"
    return report


def verify_file(
    path: str | os.PathLike[str],
    trust: TrustStore | None = None,
    *,
    now: dt.datetime | None = None,
) -> VerificationReport:
    """Verify a file; unreadable files give status ``error`` instead of raising."""
    try:
        ds = read_dataset(path)
    except RadguardError as exc:
        return VerificationReport(path=str(path), status="error", error=str(exc))
    return verify_dataset(ds, trust, now=now, path=str(path))


def verify_paths(
    paths: Iterable[str | os.PathLike[str]],
    trust: TrustStore | None = None,
    *,
    workers: int = 1,
    now: dt.datetime | None = None,
) -> Iterator[VerificationReport]:
    """Verify many files (folders expanded), ``workers`` at a time, reports in order."""
    files = list(iter_dicom_paths(paths))
    yield from map_ordered(lambda f: verify_file(f, trust, now=now), files, workers)
