"""Create PS3.15 digital signatures on DICOM datasets and files.

A signature adds one item to the MAC Parameters Sequence (4FFE,0001) and one to the Digital
Signatures Sequence (FFFA,FFFA). Earlier signatures are kept, so an instance can carry the
device's creator signature and later a technologist's or a gateway's.

Files read in Implicit VR or big-endian transfer syntaxes are written back in Explicit VR
Little Endian: the VR of every element is then stated in the file, so no verifier has to
guess it from a dictionary (dcmtk 3.6.7, for example, does not know Synthetic Data
(0008,001C) and silently leaves it out of an implicit-VR signature). A signature survives
this transcoding because the signed byte stream is always Explicit VR Little Endian.
"""

from __future__ import annotations

import datetime as dt
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from radguard.concurrency import map_ordered
from radguard.dicom.io import (
    iter_dicom_paths,
    read_dataset,
    source_view,
    stored_element,
    write_dataset,
)
from radguard.dicom.pixels import validate_pixel_data
from radguard.dicom.splice import encode_element, source_layout, write_spliced
from radguard.dicom.uids import new_uid
from radguard.errors import RadguardError, SignatureError
from radguard.provenance.bytestream import (
    MAC_TRANSFER_SYNTAX,
    MacStream,
    is_signable_element,
    new_hasher,
    signable_tags,
)
from radguard.provenance.keys import Signer
from radguard.provenance.profiles import PROFILES, SIGNING_MACS, missing_for_profile

__all__ = [
    "PURPOSES",
    "SignatureInfo",
    "Timestamper",
    "PendingSignature",
    "crypto_hash",
    "prepare_signature",
    "sign_dataset",
    "sign_file",
    "sign_paths",
]

#: ASTM E1762-95 signature purposes (CID 7007 / coding scheme "ASTM-sigpurpose").
PURPOSES = {
    1: "Author's Signature", 2: "Coauthor's Signature", 3: "Co-participant's Signature",
    4: "Transcriptionist/Recorder Signature", 5: "Verification Signature",
    6: "Validation Signature", 7: "Consent Signature", 8: "Signature Witness Signature",
    9: "Event Witness Signature", 10: "Identity Witness Signature",
    11: "Consent Witness Signature", 12: "Interpreter Signature", 13: "Review Signature",
    14: "Source Signature", 15: "Addendum Signature", 16: "Modification Signature",
    17: "Administrative (Error/Edit) Signature", 18: "Timestamp Signature",
}

#: Called with the Signature (0400,0120) value; returns a DER RFC 3161 TimeStampToken.
Timestamper = Callable[[bytes], bytes]

_CRYPTO_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512,
    "SHA1": hashes.SHA1, "MD5": hashes.MD5,
}


def crypto_hash(mac_algorithm: str) -> hashes.HashAlgorithm:
    """The ``cryptography`` hash object for a DICOM MAC Algorithm defined term."""
    cls = _CRYPTO_HASHES.get(mac_algorithm.strip().upper())
    if cls is None:
        raise SignatureError(f"MAC algorithm {mac_algorithm!r} is not supported here")
    return cls()


@dataclass(frozen=True)
class SignatureInfo:
    """What was signed, by whom, when."""

    mac_id: int
    uid: str
    signed_at: dt.datetime
    signer: str
    profile: str
    mac_algorithm: str
    covered: tuple[int, ...]
    timestamped: bool = False

    @property
    def covered_keywords(self) -> list[str]:
        """Covered elements by keyword (tag text for private or unknown elements)."""
        return [keyword_for_tag(t) or str(Tag(t)) for t in self.covered]


def _format_dt(moment: dt.datetime) -> str:
    moment = moment.astimezone(dt.UTC)
    return moment.strftime("%Y%m%d%H%M%S.%f") + "+0000"


def _normalise_mac(mac: str) -> str:
    name = mac.replace("-", "").strip().upper()
    if name not in SIGNING_MACS:
        raise SignatureError(
            f"MAC {mac!r} is not offered for signing; choose one of "
            f"{', '.join(m.lower() for m in SIGNING_MACS)}"
        )
    return name


def _items(ds: Dataset, tag: int) -> DicomSequence:
    if tag in ds:
        value = ds[tag].value
        return value if value is not None else DicomSequence()
    return DicomSequence()


def _choose_covered(
    ds: Dataset, is_implicit: bool, tags: Iterable[int] | None
) -> list[int]:
    if tags is None:
        return signable_tags(ds, is_implicit)
    chosen: list[int] = []
    for tag in sorted(set(int(t) for t in tags)):
        name = keyword_for_tag(tag) or str(Tag(tag))
        if tag not in ds:
            raise SignatureError(f"cannot sign {name}: it is not in the data set")
        if not is_signable_element(ds, tag, is_implicit):
            raise SignatureError(f"cannot sign {name}: PS3.15 makes it unsignable "
                                 "(group length, signature group, or UN value)")
        chosen.append(tag)
    return chosen


def sign_dataset(
    ds: Dataset,
    signer: Signer,
    *,
    profile: str = "base",
    mac: str = "sha256",
    tags: Iterable[int] | None = None,
    purpose: int | None = None,
    timestamper: Timestamper | None = None,
    signed_at: dt.datetime | None = None,
) -> SignatureInfo:
    """Add a PS3.15 digital signature to ``ds`` (in place) and describe it.

    ``tags`` restricts the signature to those top-level elements (default: every signable
    element). ``profile`` enforces Base/Creator/Authorization RSA requirements; ``none`` is
    the only choice for ECDSA keys. ``timestamper`` adds an RFC 3161 certified timestamp.
    On any error ``ds`` is left as it was.
    """
    return prepare_signature(ds, signer, profile=profile, mac=mac, tags=tags, purpose=purpose,
                             timestamper=timestamper, signed_at=signed_at).finish()


@dataclass
class PendingSignature:
    """A signature whose MAC Parameters item is in the data set but whose MAC is not yet
    computed. Splitting the two lets a writer copy the file while the hash runs."""

    ds: Dataset
    signer: Signer
    params: Dataset
    item: Dataset
    covered: list[int]
    mac_name: str
    profile: str
    moment: dt.datetime
    timestamper: Timestamper | None
    mac_id: int
    uid: str

    def open_stream(self, hold: tuple[int, int] | None = None) -> MacStream:
        """A MAC stream with every covered element added (see :meth:`MacStream.take_held`
        for ``hold``); :meth:`finish` completes it."""
        is_implicit, is_little = self.ds.original_encoding
        stream = MacStream(new_hasher(self.mac_name), is_implicit=bool(is_implicit),
                           is_little_endian=is_little is not False,
                           source=source_view(self.ds), hold=hold)
        try:
            stream.add_elements(self.ds, self.covered)
        except BaseException:
            self.abandon()
            raise
        return stream

    def finish(self, stream: MacStream | None = None) -> SignatureInfo:
        """Hash, sign, timestamp and append the Digital Signatures item."""
        try:
            return self._finish(stream if stream is not None else self.open_stream())
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Take the MAC Parameters item back out (the data set is as before)."""
        seq = self.ds.get("MACParametersSequence")
        if seq is not None and any(p is self.params for p in seq):
            remaining = [p for p in seq if p is not self.params]
            if remaining:
                self.ds.MACParametersSequence = DicomSequence(remaining)
            else:
                del self.ds.MACParametersSequence

    def _finish(self, stream: MacStream) -> SignatureInfo:
        ds, item = self.ds, self.item
        stream.add_signature_item(item)
        digest = stream.digest()
        algorithm = utils.Prehashed(crypto_hash(self.mac_name))
        if isinstance(self.signer.key, rsa.RSAPrivateKey):
            signature = self.signer.key.sign(digest, padding.PKCS1v15(), algorithm)
        else:
            signature = self.signer.key.sign(digest, ec.ECDSA(algorithm))
        _put_raw(item, 0x04000115, "OB", self.signer.certificate_der)
        _put_raw(item, 0x04000120, "OB", signature)
        if self.timestamper is not None:
            _put_raw(item, 0x04000305, "CS", b"CMS_TSP")
            _put_raw(item, 0x04000310, "OB", self.timestamper(signature))
        signatures = _items(ds, 0xFFFAFFFA)
        signatures.append(item)
        ds.DigitalSignaturesSequence = signatures
        return SignatureInfo(
            mac_id=self.mac_id,
            uid=self.uid,
            signed_at=self.moment,
            signer=self.signer.subject,
            profile=self.profile,
            mac_algorithm=self.mac_name,
            covered=tuple(self.covered),
            timestamped=self.timestamper is not None,
        )


def prepare_signature(
    ds: Dataset,
    signer: Signer,
    *,
    profile: str = "base",
    mac: str = "sha256",
    tags: Iterable[int] | None = None,
    purpose: int | None = None,
    timestamper: Timestamper | None = None,
    signed_at: dt.datetime | None = None,
) -> PendingSignature:
    """Check the request and add the MAC Parameters item; see :func:`sign_dataset`."""
    if profile not in PROFILES:
        raise SignatureError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    mac_name = _normalise_mac(mac)
    if profile != "none" and signer.key_type != "RSA":
        raise SignatureError("PS3.15 profiles are RSA-only; sign ECDSA keys with --profile none")
    if purpose is not None and purpose not in PURPOSES:
        raise SignatureError(f"signature purpose must be 1..18, not {purpose}")

    covered = _choose_covered(ds, bool(ds.original_encoding[0]), tags)
    if not covered:
        raise SignatureError("nothing to sign: the data set has no signable element")
    missing = missing_for_profile(profile, [int(t) for t in ds.keys()], covered)
    if missing:
        names = ", ".join(keyword_for_tag(t) or str(Tag(t)) for t in missing)
        raise SignatureError(f"the {profile} profile requires signing: {names}")

    mac_params = _items(ds, 0x4FFE0001)
    used_ids = {int(p.MACIDNumber) for p in mac_params if "MACIDNumber" in p}
    used_ids |= {int(s.MACIDNumber) for s in _items(ds, 0xFFFAFFFA) if "MACIDNumber" in s}
    mac_id = max(used_ids) + 1 if used_ids else 0
    if mac_id > 0xFFFF:
        raise SignatureError("no free MAC ID number left in this instance")

    moment = (signed_at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    uid = new_uid()
    item = Dataset()
    _put_raw(item, 0x04000005, "US", struct.pack("<H", mac_id))
    _put_raw(item, 0x04000100, "UI", uid.encode("ascii"))
    _put_raw(item, 0x04000105, "DT", _format_dt(moment).encode("ascii"))
    _put_raw(item, 0x04000110, "CS", b"X509_1993_SIG")
    if purpose is not None:
        code = Dataset()
        code.CodeValue = str(purpose)
        code.CodingSchemeDesignator = "ASTM-sigpurpose"
        code.CodeMeaning = PURPOSES[purpose]
        item.DigitalSignaturePurposeCodeSequence = DicomSequence([code])

    params = Dataset()
    _put_raw(params, 0x04000005, "US", struct.pack("<H", mac_id))
    _put_raw(params, 0x04000010, "UI", mac_transfer_syntax(ds).encode("ascii"))
    _put_raw(params, 0x04000015, "CS", mac_name.encode("ascii"))
    _put_raw(params, 0x04000020, "AT",
             b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in covered))
    mac_params.append(params)
    ds.MACParametersSequence = mac_params
    return PendingSignature(ds, signer, params, item, covered, mac_name, profile, moment,
                            timestamper, mac_id, uid)


def _put_raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Store an element already encoded (Explicit VR Little Endian, padded to even length).

    The signature items are built from raw elements: pydicom's attribute setting validates
    and converts every value and then encodes it again, which cost more than a millisecond
    per signed file, and the bytes written are the bytes hashed.
    """
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB") else b" "
    ds[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True)


def mac_transfer_syntax(ds: Dataset) -> str:
    """The MAC Calculation Transfer Syntax UID to record.

    PS3.3 C.12.1.1.3.1.1 allows any explicit-VR little-endian syntax. With encapsulated
    (compressed) pixel data it must name the compressed syntax: the fragments are hashed as
    they are, and a verifier such as dcmsign refuses to compute an Explicit VR Little Endian
    MAC over pixel data it would first have to decompress.
    """
    raw = stored_element(ds, 0x7FE00010) if 0x7FE00010 in ds else None
    meta = getattr(ds, "file_meta", None)
    encapsulated = raw is not None and (
        getattr(raw, "length", None) == 0xFFFFFFFF or getattr(raw, "is_undefined_length", False)
    )
    if encapsulated and meta is not None and "TransferSyntaxUID" in meta:
        uid = UID(str(meta.TransferSyntaxUID))
        if uid.is_little_endian and not uid.is_implicit_VR:
            return str(uid)
    return MAC_TRANSFER_SYNTAX


def output_transfer_syntax(ds: Dataset) -> str:
    """Keep the file's transfer syntax unless it leaves VRs implicit or is big endian."""
    ts = str(ds.file_meta.TransferSyntaxUID)
    is_implicit, is_little = ds.original_encoding
    if is_implicit or is_little is False:
        return str(ExplicitVRLittleEndian)
    return ts


def sign_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    signer: Signer,
    *,
    check_pixels: bool = True,
    durable: bool = False,
    **options: object,
) -> SignatureInfo:
    """Sign one file into ``dst`` (written atomically; ``src`` may equal ``dst``).

    With ``check_pixels`` the pixel data is checked first (compressed data decoded): a
    signer must not vouch for an image that cannot be displayed. ``durable`` fsyncs the
    output (see :func:`radguard.fileio.atomic_writer`).

    Explicit VR Little Endian sources are rewritten by splicing the two signature sequences
    into the original bytes. The pixel data (usually all but a few kilobytes of the file)
    is read once, in pieces that are hashed and then written while still in the CPU cache.
    """
    path = Path(src)
    ds = read_dataset(path)
    if check_pixels and ("PixelData" in ds or "FloatPixelData" in ds):
        validate_pixel_data(ds)
    view = source_view(ds)
    layout = source_layout(ds, path, len(view), view) if view is not None else None
    pending = prepare_signature(ds, signer, **options)  # type: ignore[arg-type]
    out_ts = output_transfer_syntax(ds)
    if layout is None or out_ts != str(ds.file_meta.TransferSyntaxUID):
        info = pending.finish()
        write_dataset(ds, dst, transfer_syntax=out_ts, durable=durable)
        return info
    # the bytes between the two signature sequences are copied in one piece: hash them then
    stream = pending.open_stream(hold=layout.between(0x4FFE0001, 0xFFFAFFFA))
    held = stream.take_held()
    done: list[SignatureInfo] = []

    def signatures() -> bytes:
        done.append(pending.finish(stream))
        return encode_element(ds, 0xFFFAFFFA)

    edits: dict[int, bytes | Callable[[], bytes]] = {
        0x4FFE0001: encode_element(ds, 0x4FFE0001), 0xFFFAFFFA: signatures}
    tap = (held[0], held[1], stream.feed) if held is not None else None
    try:
        spliced = write_spliced(layout, edits, dst, durable=durable, tap=tap)
    except BaseException:
        if not done:
            pending.abandon()
        raise
    if not spliced:  # the source changed since it was read: encode the data set instead
        info = done[0] if done else pending.finish(pending.open_stream())
        write_dataset(ds, dst, transfer_syntax=out_ts, durable=durable)
        return info
    return done[0]





@dataclass
class BatchResult:
    """Outcome for one input of a batch: ``info`` on success, ``error`` otherwise."""

    source: Path
    destination: Path | None
    info: SignatureInfo | None = None
    error: str | None = None


def plan_outputs(inputs: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str]
                 ) -> list[tuple[Path, Path]]:
    """Map inputs to outputs: one file to a file path, or anything to a folder that mirrors
    the input folders' structure."""
    out = Path(output)
    sources = [Path(p) for p in inputs]
    if len(sources) == 1 and sources[0].is_file() and not out.is_dir():
        return [(sources[0], out)]
    plan: list[tuple[Path, Path]] = []
    for root in sources:
        if root.is_dir():
            plan.extend((f, out / root.name / f.relative_to(root))
                        for f in iter_dicom_paths([root]))
        else:
            plan.append((root, out / root.name))
    return plan


def sign_paths(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    signer: Signer,
    *,
    workers: int = 1,
    on_result: Callable[[BatchResult], None] | None = None,
    **options: object,
) -> list[BatchResult]:
    """Sign files and folders; a bad file is reported and skipped, never half-written.

    ``workers`` threads sign files concurrently: hashing, kernel copies and RSA release
    the GIL, so two cores sign nearly twice as many files per second. Results come back in
    input order.
    """
    plan = plan_outputs(inputs, output)

    def one(pair: tuple[Path, Path]) -> BatchResult:
        src, dst = pair
        result = BatchResult(src, dst)
        try:
            result.info = sign_file(src, dst, signer, **options)  # type: ignore[arg-type]
        except RadguardError as exc:
            result.error = str(exc)
            result.destination = None
        except OSError as exc:  # no permission, read-only, file too large, disk full
            # (outputs are written atomically: nothing half-written is left)
            result.error = f"{dst}: cannot write ({exc.strerror or exc})"
            result.destination = None
        return result

    results = []
    for result in map_ordered(one, plan, workers):
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
