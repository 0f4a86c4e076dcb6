"""RFC 3161 certified timestamps for DICOM signatures (Certified Timestamp Type "CMS_TSP").

A time-stamping authority (TSA) signs the hash of the Signature (0400,0120) value together
with its own clock reading. That proves the signature existed at that time, which lets a
verifier accept a signature whose certificate has expired since, and stops a holder of a
stolen key from back-dating a forgery.

The client speaks the RFC 3161 HTTP transport (POST ``application/timestamp-query``). The
token check verifies the CMS signature of the TSA, the message imprint, the TSA's
``timeStamping`` extended key usage, and (through the trust store) the TSA's certificate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from asn1crypto import algos, cms, core, tsp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from radguard.errors import TimestampError
from radguard.provenance.keys import describe_name
from radguard.provenance.trust import TrustStore

__all__ = ["TimestampCheck", "http_timestamper", "verify_timestamp_token"]

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512, "sha1": hashes.SHA1}


def build_request(data: bytes, hash_name: str = "sha256") -> tuple[bytes, int]:
    """DER TimeStampReq over ``data`` with a random nonce; returns (request, nonce)."""
    nonce = secrets.randbits(63) | 1
    req = tsp.TimeStampReq({
        "version": "v1",
        "message_imprint": {
            "hash_algorithm": {"algorithm": hash_name},
            "hashed_message": hashlib.new(hash_name, data).digest(),
        },
        "nonce": nonce,
        "cert_req": True,
    })
    return req.dump(), nonce


def token_from_response(response: bytes, data: bytes, nonce: int | None) -> bytes:
    """Check a TimeStampResp against the request and return the DER TimeStampToken."""
    try:
        resp = tsp.TimeStampResp.load(response)
        status = resp["status"]["status"].native
    except (ValueError, TypeError) as exc:
        raise TimestampError("the TSA's answer is not an RFC 3161 response") from exc
    if status not in ("granted", "granted_with_mods"):
        text = resp["status"]["status_string"].native or ""
        raise TimestampError(f"the TSA refused the request ({status}{': ' if text else ''}{text})")
    token = resp["time_stamp_token"]
    info = _tst_info(token)
    imprint = info["message_imprint"]
    algo = imprint["hash_algorithm"]["algorithm"].native
    if imprint["hashed_message"].native != hashlib.new(algo, data).digest():
        raise TimestampError("the TSA stamped a different hash than the one requested")
    if nonce is not None and info["nonce"].native != nonce:
        raise TimestampError("the TSA's answer does not carry our nonce (replayed answer?)")
    return token.dump()


def http_timestamper(
    url: str, *, hash_name: str = "sha256", timeout: float = 15.0
) -> Callable[[bytes], bytes]:
    """A :data:`~radguard.provenance.sign.Timestamper` that asks the TSA at ``url``."""
    if not url.startswith(("http://", "https://")):
        raise TimestampError(f"TSA address must be an http(s) URL, not {url!r}")

    def stamp(data: bytes) -> bytes:
        request, nonce = build_request(data, hash_name)
        http_req = urllib.request.Request(
            url, data=request, method="POST",
            headers={"Content-Type": "application/timestamp-query",
                     "Accept": "application/timestamp-reply"},
        )
        try:
            with urllib.request.urlopen(http_req, timeout=timeout) as answer:
                body = answer.read(1 << 20)
        except urllib.error.HTTPError as exc:
            raise TimestampError(f"TSA {url} answered HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TimestampError(f"TSA {url} unreachable ({reason})") from exc
        return token_from_response(body, data, nonce)

    return stamp


@dataclass(frozen=True)
class TimestampCheck:
    """What a certified timestamp proves, and whether its TSA is trusted."""

    ok: bool
    trusted: bool
    time: dt.datetime | None
    tsa: str | None
    reason: str

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"ok": self.ok, "trusted": self.trusted,
                "time": self.time.isoformat() if self.time else None,
                "tsa": self.tsa, "reason": self.reason}


def _tst_info(token: cms.ContentInfo) -> tsp.TSTInfo:
    if token["content_type"].native != "signed_data":
        raise TimestampError("timestamp token is not CMS SignedData")
    encap = token["content"]["encap_content_info"]
    if encap["content_type"].native != "tst_info":
        raise TimestampError("timestamp token does not hold a TSTInfo")
    content = encap["content"]
    parsed = content.parsed if isinstance(content, core.ParsableOctetString) else content
    return parsed


def verify_timestamp_token(
    token_der: bytes, signature_value: bytes, trust: TrustStore | None
) -> TimestampCheck:
    """Verify a CMS_TSP token that should stamp ``signature_value``."""
    try:
        token = cms.ContentInfo.load(token_der)
        info = _tst_info(token)
        signed = token["content"]
        imprint = info["message_imprint"]
        algo = imprint["hash_algorithm"]["algorithm"].native
        if imprint["hashed_message"].native != hashlib.new(algo, signature_value).digest():
            return TimestampCheck(False, False, None, None,
                                  "timestamp does not stamp this signature")
        gen_time: dt.datetime = info["gen_time"].native
        signer_info = signed["signer_infos"][0]
        tsa_cert = _find_signer_cert(signed, signer_info)
        if tsa_cert is None:
            return TimestampCheck(False, False, gen_time, None,
                                  "timestamp token carries no TSA certificate")
        tsa_name = describe_name(tsa_cert.subject)
        problem = _check_cms_signature(signer_info, encap_bytes(signed), tsa_cert)
        if problem:
            return TimestampCheck(False, False, gen_time, tsa_name, problem)
        if not _has_timestamping_eku(tsa_cert):
            return TimestampCheck(False, False, gen_time, tsa_name,
                                  "TSA certificate lacks the timeStamping key usage")
    except TimestampError as exc:
        return TimestampCheck(False, False, None, None, str(exc))
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return TimestampCheck(False, False, None, None, f"malformed timestamp token ({exc})")
    if trust is None or not len(trust):
        return TimestampCheck(True, False, gen_time, tsa_name, "no trust store for the TSA")
    chain = trust.validate(tsa_cert, gen_time, _token_certs(signed))
    if not chain.trusted:
        return TimestampCheck(True, False, gen_time, tsa_name, f"TSA not trusted: {chain.reason}")
    return TimestampCheck(True, True, gen_time, tsa_name, "trusted timestamp")


def encap_bytes(signed: cms.SignedData) -> bytes:
    """The bytes the CMS message digest attribute covers (the DER TSTInfo)."""
    content = signed["encap_content_info"]["content"]
    return bytes(content.contents) if content.contents is not None else b""


def _token_certs(signed: cms.SignedData) -> list[x509.Certificate]:
    out = []
    for choice in signed["certificates"] or []:
        if choice.name == "certificate":
            out.append(x509.load_der_x509_certificate(choice.chosen.dump()))
    return out


def _find_signer_cert(signed: cms.SignedData, signer_info: cms.SignerInfo
                      ) -> x509.Certificate | None:
    sid = signer_info["sid"]
    for choice in signed["certificates"] or []:
        if choice.name != "certificate":
            continue
        cert = choice.chosen
        if sid.name == "issuer_and_serial_number":
            if (cert.issuer == sid.chosen["issuer"]
                    and cert.serial_number == sid.chosen["serial_number"].native):
                return x509.load_der_x509_certificate(cert.dump())
        elif cert.key_identifier == sid.chosen.native:
            return x509.load_der_x509_certificate(cert.dump())
    return None


def _check_cms_signature(signer_info: cms.SignerInfo, content: bytes,
                         cert: x509.Certificate) -> str:
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    if digest_name not in _HASHES:
        return f"timestamp uses unsupported digest {digest_name}"
    hash_algo = _HASHES[digest_name]()
    signed_attrs = signer_info["signed_attrs"]
    if not signed_attrs:
        return "timestamp signature has no signed attributes"
    message_digest = None
    for attr in signed_attrs:
        if attr["type"].native == "message_digest":
            message_digest = attr["values"][0].native
    if message_digest != hashlib.new(digest_name, content).digest():
        return "timestamp content does not match its signed digest"
    to_verify = signed_attrs.untag().dump(force=True)
    to_verify = b"\x31" + to_verify[1:]  # signed attributes are signed as a SET OF
    sig = signer_info["signature"].native
    sig_algo: algos.SignedDigestAlgorithm = signer_info["signature_algorithm"]
    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            if sig_algo.signature_algo == "rsassa_pss":
                params = sig_algo["parameters"]
                pss = padding.PSS(padding.MGF1(hash_algo), params["salt_length"].native)
                key.verify(sig, to_verify, pss, hash_algo)
            else:
                key.verify(sig, to_verify, padding.PKCS1v15(), hash_algo)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(sig, to_verify, ec.ECDSA(hash_algo))
        else:
            return "timestamp signed with an unsupported key type"
    except InvalidSignature:
        return "TSA signature on the timestamp is invalid"
    return ""


def _has_timestamping_eku(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.TIME_STAMPING in eku
