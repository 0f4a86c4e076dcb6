"""Verify PS3.15 digital signatures and say exactly what they cover.

Per signature: recompute the MAC byte stream, check the RSA/ECDSA signature with the
certificate embedded in the instance, validate that certificate against the trust store,
check an RFC 3161 timestamp if present, and infer which PS3.15 profiles it satisfies.

Per file, judged by the signatures in the *top-level* data set only: ``valid`` if every
one is mathematically valid, made with algorithms the :class:`AlgorithmPolicy` accepts, and
trusted; ``invalid`` if any does not match the data (the file changed after signing) or is
malformed; ``weak`` if the data matches but a MAC algorithm or key is too weak (MD5, SHA-1,
short keys); ``untrusted`` if the data is intact but a signer is unknown, its certificate
chain is broken, or it was not valid at the relevant time; ``unsigned`` if the top level has
no signature; ``error`` if the file cannot be read.

Signatures inside sequence items are verified and reported with their location, but they
never vouch for the file: PS3.15 C.12.1.1.3 makes an item's signature cover that item only,
and anyone can paste a validly signed data set (signatures included) into an item of a forged
image. A file whose only signatures are nested is ``unsigned``; a nested signature that does
not hold changes nothing at file level (the scan reports it as weak evidence).

A valid signature does not mean the whole file is vouched for: PS3.15 lets anyone add
elements without breaking a signature, and a signature may list only some elements.
``covered`` / ``uncovered`` list the present elements that an intact top-level signature does
/ does not cover. ``pixels_covered`` says whether the signatures vouch for the image: the file
is ``valid`` and they cover every element present *now* that changes what the image shows
and (at the default :class:`~radguard.provenance.profiles.Coverage` ``image``) whose it is
(:func:`~radguard.provenance.profiles.uncovered_image`); ``pixels_uncovered`` lists the
present ones they leave out. Judging what is present now matters: an element added after
signing (an inverting Presentation LUT Shape, a rescale, an overlay) is uncovered by every
signature, whatever it lists.

Cost is bounded before any hashing: at most :data:`MAX_SIGNATURES_PER_ITEM` signature items
per data set or item and :data:`MAX_SIGNATURES_PER_FILE` per file (more: ``invalid``, none
checked); every check that needs no hash (MAC parameters, certificate, key, timestamp, trust,
policy) runs first, signatures over the same elements with the same MAC share one hash of
them, and at most :data:`MAX_HASH_PASSES_PER_FILE` different (MAC, elements) hashes are made
per file (the signatures that would need another are ``invalid``, unhashed).

Time policy: with a trusted certified timestamp the signer certificate must have been valid
at the timestamp's time; without one it must be valid both at the claimed signing time and
now (a claimed time is the signer's word, and an expired key may have leaked).
"""

from __future__ import annotations

import datetime as dt
import hmac
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pydicom.valuerep import DT

from radguard.concurrency import map_ordered
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
from radguard.provenance.policy import DEFAULT_POLICY, AlgorithmPolicy, AlgorithmVerdict
from radguard.provenance.profiles import (
    PIXEL_DATA,
    VERIFY_MACS,
    Coverage,
    satisfied_profiles,
    uncovered_image,
)
from radguard.provenance.sign import crypto_hash
from radguard.provenance.timestamp import TimestampCheck, verify_timestamp_token
from radguard.provenance.trust import TrustStore

__all__ = [
    "MAX_HASH_PASSES_PER_FILE",
    "MAX_SIGNATURES_PER_FILE",
    "MAX_SIGNATURES_PER_ITEM",
    "PIXEL_DATA",
    "SignatureCheck",
    "Status",
    "VerificationReport",
    "name_list",
    "verify_dataset",
    "verify_file",
    "verify_paths",
]

Status = Literal["valid", "invalid", "weak", "untrusted", "unsigned", "error"]
SignatureStatus = Literal["valid", "invalid", "weak", "untrusted"]

#: Elements that are part of the signature machinery or encoding, never "uncovered content".
_MACHINERY = {0x4FFE0001, 0xFFFAFFFA, 0xFFFCFFFC, 0x00080001}


@dataclass
class SignatureCheck:
    """The verdict on one signature item."""

    status: SignatureStatus
    reason: str
    location: str = ""  # "" for the top-level data set, else e.g. "ReferencedImageSequence[0]"
    mac_id: int | None = None
    uid: str | None = None
    signer: str | None = None
    key_type: str | None = None
    key_bits: int | None = None
    mac_algorithm: str | None = None
    algorithm: AlgorithmVerdict | None = None  # the algorithm policy's verdict (if intact)
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
            "key_bits": self.key_bits,
            "mac_algorithm": self.mac_algorithm,
            "algorithm": self.algorithm.value if self.algorithm else None,
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
    error: str | None = None  # why the file could not be read, or was refused unverified
    covered: list[str] = field(default_factory=list)  # present, covered at the top level
    #: The signatures vouch for the image: the file is ``valid``, it has pixel data, and
    #: valid top-level signatures cover every present, non-empty element that changes what
    #: the image shows - the pixels and how they are read (Image Pixel, Multi-frame and
    #: functional groups, palettes, ICC profile, frame timing), how they are shown and
    #: measured (rescale and Modality LUT, window and VOI LUT, Presentation LUT, overlays
    #: 60xx, pixel spacing and aspect, ultrasound regions, orientation, laterality, view) -
    #: and, at coverage ``image`` (the default), whose image it is and where it belongs
    #: (patient name / ID / birth date / sex, Study / Series / SOP Instance UIDs, Modality,
    #: General Image). Only then does the gateway badge it ``signed``, skip the content
    #: detectors and count it for ``must_sign``.
    pixels_covered: bool = False
    #: Present elements that change what the image shows or means and that no valid
    #: top-level signature covers: why ``pixels_covered`` is false (beside the status).
    pixels_uncovered: list[str] = field(default_factory=list)

    @property
    def top_level(self) -> list[SignatureCheck]:
        """The signatures that can vouch for the file."""
        return [s for s in self.signatures if not s.location]

    @property
    def nested(self) -> list[SignatureCheck]:
        """Signatures inside sequence items: they vouch for their item only."""
        return [s for s in self.signatures if s.location]

    @property
    def signer(self) -> str | None:
        """Signer of the first top-level signature (None if there is none: a signature in
        an item never speaks for the file)."""
        top = self.top_level
        return top[0].signer if top else None

    @property
    def ok(self) -> bool:
        """True when every top-level signature is valid and trusted (and there is one)."""
        return self.status == "valid"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form with the documented keys: path, status, signer, uncovered..."""
        return {
            "path": self.path,
            "status": self.status,
            "signer": self.signer,
            "covered": self.covered,
            "uncovered": self.uncovered,
            "pixels_covered": self.pixels_covered,
            "pixels_uncovered": self.pixels_uncovered,
            "error": self.error,
            "signatures": [s.to_dict() for s in self.signatures],
        }


def _name(tag: int) -> str:
    return keyword_for_tag(tag) or str(Tag(tag))


def name_list(names: list[str], shown: int = 12) -> str:
    """``names`` joined, the first ``shown`` only (a forged file may leave out hundreds)."""
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


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


#: Signature items verified per data set or sequence item, and per file. A device signs
#: once, a technologist or a gateway perhaps once more; every signature hashes all it
#: covers (at the top level: the whole pixel data), so a file with more is ``invalid``
#: without hashing anything.
MAX_SIGNATURES_PER_ITEM = 8
MAX_SIGNATURES_PER_FILE = 32
#: Different hashes (MAC algorithm, signed elements, data set or item) made per file: the
#: device's signature, a technologist's and an authorization signature, and a gateway's
#: re-signing after de-identification. Signatures that would
#: need another are ``invalid`` unhashed, whoever signed them: a self-signed certificate
#: costs nothing to make, and every hash may be a pass over the whole pixel data (the
#: pure-Python RIPEMD-160 manages about 1 MB/s).
MAX_HASH_PASSES_PER_FILE = 4


@dataclass
class _Inspected:
    """A signature item that passed every check that needs no hashing."""

    check: SignatureCheck
    sig: Dataset
    mac: str
    tags: list[int]
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    signature: bytes
    timestamp: TimestampCheck | str | None
    trust_problem: str
    verdict: AlgorithmVerdict
    weaknesses: list[str]


def _mac_parameters(site: Dataset) -> dict[int, Dataset]:
    """MAC Parameters items by MAC ID Number (the first of each; malformed ones skipped)."""
    found: dict[int, Dataset] = {}
    for params in _seq(site, 0x4FFE0001):
        try:
            found.setdefault(int(params.get("MACIDNumber", -1)), params)
        except (TypeError, ValueError):
            continue
    return found


def _inspect(
    site: Dataset,
    sig: Dataset,
    mac_params: dict[int, Dataset],
    trust: TrustStore | None,
    now: dt.datetime,
    is_implicit: bool,
    location: str,
    policy: AlgorithmPolicy,
) -> _Inspected | SignatureCheck:
    """Every check of one signature item that needs no hash (MAC parameters, signed
    elements, certificate, key, timestamp, trust, algorithm policy), so that hashing is
    spent on signatures that can hold only. A failure is an ``invalid`` SignatureCheck."""
    check = SignatureCheck(status="invalid", reason="", location=location)
    try:
        check.mac_id = int(sig.MACIDNumber)
        check.uid = str(sig.get("DigitalSignatureUID", "")) or None
        params = mac_params.get(check.mac_id)
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
        try:
            new_hasher(mac)
        except ValueError:
            check.reason = f"MAC algorithm {mac} is not available on this system"
            return check
        if "DataElementsSigned" in params:
            listed = params.DataElementsSigned
            tags = [int(listed)] if isinstance(listed, int) else [int(t) for t in listed]
        else:
            tags = signable_tags(site, is_implicit)
        check.covered = sorted(tags)
        removed = [t for t in tags if t not in site]
        if removed:
            check.reason = "signed element(s) removed: " + ", ".join(_name(t) for t in removed)
            return check
        bad = [t for t in tags if not is_signable_element(site, t, is_implicit)]
        if bad:
            check.reason = "signature lists unsignable element(s): " + ", ".join(
                f"{_name(t)} ({element_vr(site, t, is_implicit)})" for t in bad)
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
        key_type, key_bits = (("RSA", key.key_size) if isinstance(key, rsa.RSAPublicKey)
                               else ("ECDSA", key.curve.key_size))
        check.key_type, check.key_bits = key_type, key_bits
        timestamp = _timestamp_check(sig, signature, trust)
        trust_problem = _trust_problem(cert, trust, timestamp, check.signed_at, now)
    except _ITEM_ERRORS as exc:
        check.reason = _item_error(exc)
        return check
    verdict, weaknesses = policy.judge(mac, key_type, key_bits)
    return _Inspected(check, sig, mac, tags, key, signature, timestamp, trust_problem,
                      verdict, weaknesses)


#: what reading or checking one signature item may raise: its reason, not a crash
_ITEM_ERRORS = (SignatureError, UnsupportedAlgorithm, AttributeError, KeyError, ValueError,
                TypeError)


def _item_error(exc: BaseException) -> str:
    """The reason a signature item failed: our own and cryptography's messages as they are,
    anything else as a malformed item."""
    if isinstance(exc, SignatureError | UnsupportedAlgorithm):
        return str(exc)
    return _malformed(exc)


def _malformed(exc: BaseException) -> str:
    return f"malformed signature item ({' '.join(str(exc).split())[:120]})"


class _Digests:
    """MAC digests of one file's signatures. Signatures over the same elements of the same
    data set or item with the same algorithm share the hash of those elements (computed
    once, then copied), so extra signature items cost their own few bytes, not another pass
    over the pixel data; at most :data:`MAX_HASH_PASSES_PER_FILE` such hashes are made."""

    def __init__(self, ds: Dataset, is_implicit: bool, is_little: bool) -> None:
        self._ds = ds
        self._implicit, self._little = is_implicit, is_little
        self._prefixes: dict[tuple[int, str, tuple[int, ...]], MacStream] = {}
        self.refused = 0  # signatures left unhashed: the file had used up its passes

    def of(self, site: Dataset, item: _Inspected) -> bytes | None:
        """The digest ``item``'s signature (in ``site``) must sign; None if that needs one
        hash more than a file may cost."""
        key = (id(site), item.mac, tuple(item.tags))  # sites live as long as the file
        prefix = self._prefixes.get(key)
        if prefix is None:
            if len(self._prefixes) >= MAX_HASH_PASSES_PER_FILE:
                self.refused += 1
                return None
            # the file's bytes serve top-level values only: an item's elements record
            # offsets within their sequence's value, not within the file
            source = source_view(self._ds) if site is self._ds else None
            prefix = MacStream(new_hasher(item.mac), is_implicit=self._implicit,
                               is_little_endian=self._little, source=source)
            prefix.add_elements(site, item.tags)
            self._prefixes[key] = prefix
        stream = prefix.fork()
        stream.add_signature_item(item.sig)
        return stream.digest()


def _conclude(item: _Inspected, digests: _Digests, site: Dataset) -> SignatureCheck:
    """Hash, check the signature, and give the verdict on an inspected signature item."""
    check = item.check
    try:
        digest = digests.of(site, item)
        if digest is None:
            check.reason = (f"not checked: a hash over other elements or with another MAC "
                            f"than the {MAX_HASH_PASSES_PER_FILE} already made for this file "
                            "(each may be a pass over all the pixel data)")
            return check
        _verify_signature(item.key, item.signature, digest, item.mac)
    except InvalidSignature:
        check.reason = "data changed after signing: signature does not match the content"
        return check
    except _ITEM_ERRORS as exc:
        check.reason = _item_error(exc)
        return check

    check.intact = True
    check.profiles = satisfied_profiles(check.key_type or "", item.mac, list(site.keys()),
                                        item.tags)
    timestamp = item.timestamp
    check.timestamp = timestamp if isinstance(timestamp, TimestampCheck) else None
    if isinstance(timestamp, str):
        check.reason = timestamp
        return check
    if check.timestamp is not None and not check.timestamp.ok:
        check.reason = f"certified timestamp invalid: {check.timestamp.reason}"
        return check
    check.algorithm, weaknesses, trust_problem = item.verdict, item.weaknesses, item.trust_problem
    if check.algorithm is AlgorithmVerdict.WEAK:
        check.status = "weak"
        check.reason = ("signature matches the data but its algorithms are too weak to vouch "
                        "for it: " + "; ".join(weaknesses)
                        + (f"; signer not trusted either: {trust_problem}" if trust_problem
                           else ""))
        return check
    check.status = "untrusted"
    if trust_problem:
        check.reason = trust_problem
        return check
    check.status = "valid"
    check.reason = "signature matches the data and the signer is trusted"
    if check.algorithm is AlgorithmVerdict.WEAK_ALLOWED:
        check.reason += " (weak algorithm accepted by policy: " + "; ".join(weaknesses) + ")"
    return check


def _verify_site(site: Dataset, location: str, sigs: list[Dataset], trust: TrustStore | None,
                 now: dt.datetime, is_implicit: bool, digests: _Digests,
                 policy: AlgorithmPolicy) -> list[SignatureCheck]:
    """The verdicts on the signature items of one data set or item, in their order: every
    cheap check first, then one hash per distinct set of signed elements."""
    mac_params = _mac_parameters(site)
    inspected = [_inspect(site, sig, mac_params, trust, now, is_implicit, location, policy)
                 for sig in sigs]
    return [item if isinstance(item, SignatureCheck) else _conclude(item, digests, site)
            for item in inspected]


#: PKCS #1 v1.5 DigestInfo header for RIPEMD-160 (OID 1.3.36.3.2.1, NULL parameters), as
#: OpenSSL (and so dcmtk) writes it.
_RIPEMD160_DIGEST_INFO = bytes.fromhex("3021300906052b2403020105000414")


def _verify_signature(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, signature: bytes,
                      digest: bytes, mac: str) -> None:
    """Check ``signature`` over a MAC ``digest``; InvalidSignature if it does not hold.

    ``cryptography`` has no RIPEMD-160 for prehashed digests. For RSA the signed DigestInfo
    is recovered (PKCS #1 v1.5 decoding of the signature) and compared with the expected one;
    ECDSA signs the bare digest, so any hash of the same size (SHA-1: 20 bytes) names it.
    """
    if mac == "RIPEMD160":
        if isinstance(key, rsa.RSAPublicKey):
            recovered = key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
            if not hmac.compare_digest(recovered, _RIPEMD160_DIGEST_INFO + digest):
                raise InvalidSignature("RIPEMD-160 digest does not match")
            return
        # DICOM pads the odd-length DER of an ECDSA signature with a zero byte
        key.verify(_der_trim(signature), digest, ec.ECDSA(utils.Prehashed(hashes.SHA1())))
        return
    prehashed = utils.Prehashed(crypto_hash(mac))
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, digest, padding.PKCS1v15(), prehashed)
    else:
        key.verify(_der_trim(signature), digest, ec.ECDSA(prehashed))


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
            if raw is None:
                continue
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
    policy: AlgorithmPolicy = DEFAULT_POLICY,
    coverage: Coverage = Coverage.IMAGE,
) -> VerificationReport:
    """Verify every signature in ``ds`` (top level and nested in sequence items); only the
    top-level ones decide the file's status (see the module docstring). ``coverage``: what
    they must cover to vouch for the image (``pixels_covered``)."""
    now = now or dt.datetime.now(dt.UTC)
    is_implicit, is_little = ds.original_encoding
    is_implicit = bool(is_implicit)
    is_little = True if is_little is None else bool(is_little)
    report = VerificationReport(path=path or str(getattr(ds, "filename", "") or ""),
                                status="unsigned")
    sites = [(site, location.rstrip("."), _seq(site, 0xFFFAFFFA))
             for site, location in _signature_sites(ds)]
    too_many = _too_many(sites)
    if too_many:
        report.status, report.error = "invalid", too_many  # nothing verified or hashed
    else:
        digests = _Digests(ds, is_implicit, is_little)
        for site, location, sigs in sites:  # the top level first: it decides the status
            report.signatures += _verify_site(site, location, sigs, trust, now, is_implicit,
                                              digests, policy)
        report.status = _file_status(report.top_level)
        if digests.refused:
            report.status = "invalid"
            report.error = (f"{digests.refused} signature(s) not checked: they need more than "
                            f"the {MAX_HASH_PASSES_PER_FILE} different hashes made per file")
    _add_coverage(report, ds, coverage)
    return report


def _too_many(sites: list[tuple[Dataset, str, list[Dataset]]]) -> str:
    """Why a file holds more signature items than are verified ("" if it does not)."""
    for _site, location, sigs in sites:
        if len(sigs) > MAX_SIGNATURES_PER_ITEM:
            return (f"{len(sigs)} signatures in {location or 'the top-level data set'}: more "
                    f"than the {MAX_SIGNATURES_PER_ITEM} verified per data set or item, so "
                    "none was checked")
    total = sum(len(sigs) for *_, sigs in sites)
    if total > MAX_SIGNATURES_PER_FILE:
        return (f"{total} signatures in the file: more than the {MAX_SIGNATURES_PER_FILE} "
                "verified per file, so none was checked")
    return ""


def _file_status(top: list[SignatureCheck]) -> Status:
    """The file's status from its top-level signatures (the worst one decides)."""
    statuses = {c.status for c in top}
    worst_first: tuple[Status, ...] = ("invalid", "weak", "untrusted", "valid")
    return next((s for s in worst_first if s in statuses), "unsigned")


def _add_coverage(report: VerificationReport, ds: Dataset, coverage: Coverage) -> None:
    """Fill in what the top-level signatures cover (once the status is known)."""
    covered: set[int] = set()
    vouched: set[int] = set()  # covered by valid (policy-accepted, trusted) signatures
    for check in report.top_level:
        if check.intact:
            covered.update(check.covered)
        if check.status == "valid":
            vouched.update(check.covered)
    content = [t for t in (int(t) for t in sorted(ds.keys()))
               if t not in _MACHINERY and (t & 0xFFFF) != 0 and (t >> 16) >= 0x0008]
    report.covered = [_name(t) for t in content if t in covered]
    report.uncovered = [_name(t) for t in content if t not in covered]
    if any(t in PIXEL_DATA for t in content):
        report.pixels_uncovered = [_name(t) for t in uncovered_image(ds, vouched, coverage)]
        report.pixels_covered = report.status == "valid" and not report.pixels_uncovered


def verify_file(
    path: str | os.PathLike[str],
    trust: TrustStore | None = None,
    *,
    now: dt.datetime | None = None,
    policy: AlgorithmPolicy = DEFAULT_POLICY,
    coverage: Coverage = Coverage.IMAGE,
) -> VerificationReport:
    """Verify a file; unreadable files give status ``error`` instead of raising."""
    try:
        ds = read_dataset(path)
    except RadguardError as exc:
        return VerificationReport(path=str(path), status="error", error=str(exc))
    return verify_dataset(ds, trust, now=now, path=str(path), policy=policy, coverage=coverage)


def verify_paths(
    paths: Iterable[str | os.PathLike[str]],
    trust: TrustStore | None = None,
    *,
    workers: int = 1,
    now: dt.datetime | None = None,
    policy: AlgorithmPolicy = DEFAULT_POLICY,
    coverage: Coverage = Coverage.IMAGE,
) -> Iterator[VerificationReport]:
    """Verify many files (folders expanded), ``workers`` at a time, reports in order."""
    files = list(iter_dicom_paths(paths))
    yield from map_ordered(
        lambda f: verify_file(f, trust, now=now, policy=policy, coverage=coverage), files,
        workers)
