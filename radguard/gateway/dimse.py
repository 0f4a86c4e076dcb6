"""The DICOM front door: a C-STORE / C-ECHO SCP in front of the store, with query/retrieve
and Storage Commitment (:mod:`radguard.gateway.qr`) on the same port.

The protocol runs on :mod:`radguard.gateway.acceptor` (event-driven, pynetdicom's codecs and
negotiation); this module decides what each C-STORE gets.

A C-STORE is answered Success (0x0000) only after the instance is parsed strictly, written
and fsync'd, and its row committed (:meth:`Store.ingest`): an acknowledged image is never
lost. Anything that is not a well-formed Part 10 data set - malformed UIDs and images above
the decode limits included (:func:`header_of`) - gets 0xC000 (cannot understand) and nothing
is stored; a full disk, a disk below the free-space reserve or a database failure gets
0xA700 (out of resources), and the store takes objects again as soon as it can. Every
refusal says why in its Error Comment (0000,0902). Calling
AE titles can be restricted, and every socket gets TCP_NODELAY: without it a small instance
waits 40-90 ms on Nagle's algorithm and delayed ACKs (about 20 instances/s instead of
hundreds). Whatever sends with pynetdicom (the forwarder, the demo, the load benchmark) opens
its association with :func:`open_association`, which sets TCP_NODELAY too and closes a race
in pynetdicom's requestor.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from typing import Any

from radguard.dicom.limits import decode_scope
from radguard.errors import DicomReadError, RadguardError
from radguard.gateway.acceptor import Acceptor, Status, StoreRequest, no_delay
from radguard.gateway.config import ConfigError, GatewayConfig
from radguard.gateway.ratelimit import Throttle, peer_key
from radguard.gateway.store import ReserveError, Store

__all__ = ["DicomServer", "header_of", "open_association"]

log = logging.getLogger("radguard.gateway")

SUCCESS, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0000, 0xC000, 0xA700
_SOP_MISMATCH = 0xC001  # our own failure code: header and request disagree


def _set_nodelay(event: Any) -> None:  # noqa: ANN401
    """EVT_CONN_OPEN handler: switch off Nagle's algorithm on the association's socket."""
    no_delay(getattr(getattr(getattr(event.assoc, "dul", None), "socket", None), "socket", None))


def open_association(ae: Any, host: str, port: int, ae_title: str,  # noqa: ANN401
                     ext_neg: list[Any] | None = None) -> Any:  # noqa: ANN401
    """``ae.associate`` for a sender of requests (C-STORE, C-ECHO, N-EVENT-REPORT):
    TCP_NODELAY on, and pynetdicom's reactor thread kept off the DIMSE message queue.
    ``ext_neg``: extended negotiation items (SCP/SCU role selection).

    pynetdicom's requestor pauses its reactor thread around ``send_c_store`` with a flag
    that can be stale, so the reactor sometimes takes the response off the queue first
    (logging "Received unexpected C-STORE service message") and the sender waits out its
    DIMSE timeout, then aborts. A pure sender never needs the reactor to see a message: the
    reactor is the only caller that polls without blocking, so those polls get nothing and
    every message stays for the thread that waits for it."""
    from pynetdicom import evt

    assoc = ae.associate(host, port, ae_title=ae_title, ext_neg=ext_neg,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)])
    dimse = getattr(assoc, "dimse", None)
    if dimse is not None:
        wait_for_message = dimse.get_msg

        def get_msg(block: bool = False) -> Any:  # noqa: ANN401, FBT001, FBT002
            return wait_for_message(block=True) if block else (None, None)

        dimse.get_msg = get_msg
    return assoc


def header_of(data: bytes | os.PathLike[str], name: str = "instance", *,
              decode_compressed: bool = True) -> dict[str, str]:
    """Parse a Part 10 object - its bytes, or a file holding it (a large object spooled
    while it arrived) - strictly and pull out what the store indexes.

    Refused with a :class:`DicomReadError`: a truncated or inconsistent object (pixel data
    included), a Study, Series or SOP Instance UID or SOP Class UID that is missing or not
    a UID (PS3.5 9.1: these end up in paths, URLs and web pages), an image larger than the
    decode limits, and - unless ``decode_compressed`` is off - compressed pixel data that
    does not decode. Values over 1 MiB are checked where they lie, never copied. A deflated
    data set's inflated copy, and decoded pixels, count against the decode budget until
    the check is done (:func:`~radguard.dicom.limits.decode_scope`), so concurrent stores
    take turns with large ones instead of each holding one."""
    try:
        with decode_scope():
            return _header(data, name, decode_compressed)
    except RadguardError:
        raise
    except Exception as exc:  # noqa: BLE001 - hostile input: any decoder failure is a refusal
        raise DicomReadError(f"{name}: malformed ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:160]})") from exc


_UIDS = (("SOPInstanceUID", "SOP Instance UID"), ("SOPClassUID", "SOP Class UID"),
         ("StudyInstanceUID", "Study Instance UID"),
         ("SeriesInstanceUID", "Series Instance UID"))


def _header(data: bytes | os.PathLike[str], name: str, decode_compressed: bool
            ) -> dict[str, str]:
    from radguard.dicom.io import peek, read_dataset, read_dataset_bytes
    from radguard.dicom.pixels import validate_pixel_data
    from radguard.dicom.uids import uid_problem

    if isinstance(data, bytes | bytearray | memoryview):
        ds = read_dataset_bytes(data, name, defer=True)
    else:
        try:
            ds = read_dataset(data)
        except DicomReadError as exc:  # say who sent it, not where it was spooled
            raise DicomReadError(str(exc).replace(str(data), name)) from exc
        ds.filename = name
    uids = {}
    for keyword, label in _UIDS:
        value = peek(ds, keyword)  # several values (a backslash) are not a UID either
        text = "" if value is None else str(value).rstrip("\0 ")
        problem = uid_problem(text, label)
        if problem:
            raise DicomReadError(f"{name}: {problem}")
        uids[keyword] = text
    if "PixelData" in ds:
        validate_pixel_data(ds, decode_compressed=decode_compressed)
    return {
        "sop_uid": uids["SOPInstanceUID"], "study_uid": uids["StudyInstanceUID"],
        "series_uid": uids["SeriesInstanceUID"], "sop_class": uids["SOPClassUID"],
        "patient_id": str(ds.get("PatientID", "") or ""),
        "patient_name": str(ds.get("PatientName", "") or ""),
        "modality": str(ds.get("Modality", "") or ""),
        "study_date": str(ds.get("StudyDate", "") or ""),
        **query_header(ds),
    }


#: what QIDO-RS and C-FIND match and return, by the store's column (radguard.gateway.query)
_QUERY_KEYWORDS = {
    "accession": "AccessionNumber", "study_time": "StudyTime",
    "study_description": "StudyDescription", "referring_physician": "ReferringPhysicianName",
    "study_id": "StudyID", "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex", "series_number": "SeriesNumber",
    "series_description": "SeriesDescription",
    "pps_start_date": "PerformedProcedureStepStartDate",
    "pps_start_time": "PerformedProcedureStepStartTime", "instance_number": "InstanceNumber",
    "pixel_rows": "Rows", "pixel_columns": "Columns", "bits_allocated": "BitsAllocated",
    "frames": "NumberOfFrames", "charset": "SpecificCharacterSet"}


def query_header(ds: Any) -> dict[str, str]:  # noqa: ANN401 - a pydicom Dataset
    """The query attributes of a data set as text, by store column; a value that cannot
    be read (odd but legal, or not) is left empty rather than refusing the object."""
    out: dict[str, str] = {}
    for column, keyword in _QUERY_KEYWORDS.items():
        try:
            value = ds.get(keyword, "")
            if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
                value = "\\".join(str(v) for v in value)
            out[column] = str(value if value is not None else "").strip()[:256]
        except Exception:  # noqa: BLE001 - a malformed optional value is no refusal
            out[column] = ""
    return out


class DicomServer:
    """The SCP, running in background threads until :meth:`stop`."""

    def __init__(self, config: GatewayConfig, store: Store,
                 on_stored: Callable[[int], None] | None = None,
                 audit: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        self.config, self.store = config, store
        self.on_stored = on_stored
        self.audit = audit
        self._server: Acceptor | None = None
        self._qr: Any = None  # the query/retrieve and commitment service, while running
        self.port = config.dicom_port
        self.refused = 0
        self._count_lock = threading.Lock()
        self._throttle = Throttle()  # which refusals get a log line and an audit entry
        self._held_back = 0  # refusals without either since the last summary

    def _handle_store(self, request: StoreRequest) -> int:
        """Status for one received C-STORE (runs on the acceptor's thread pool). A spooled
        object (``request.path``) is moved into the store or deleted here."""
        try:
            return self._store(request)
        finally:
            if request.path is not None:
                request.path.unlink(missing_ok=True)

    def _store(self, request: StoreRequest) -> int:
        calling = request.calling_ae
        source = request.path if request.path is not None else request.data
        try:
            header = header_of(source, f"C-STORE from {calling}",
                               decode_compressed=self.config.validate_compressed_pixels)
        except RadguardError as exc:
            return self._refuse(request, str(exc))
        if request.sop_instance_uid and request.sop_instance_uid != header["sop_uid"]:
            why = "SOP Instance UID differs from the C-STORE request"
            self._refuse(request, why)
            return Status(_SOP_MISMATCH, why)
        try:
            row = self.store.ingest(source, header, source="dimse", calling_ae=calling)
        except (OSError, RadguardError) as exc:
            # the first failure of an outage or a pause is logged and audited by the
            # gateway (Store.health, Store.intake); each refusal after it only at debug level
            state = self.store.intake if isinstance(exc, ReserveError) else self.store.health
            log.log(logging.DEBUG if state.problem and state.failures > 1 else logging.ERROR,
                    "C-STORE from %s not stored (0xA700): %s", calling, exc)
            return Status(OUT_OF_RESOURCES, "gateway store paused (disk below its reserve)"
                          if isinstance(exc, ReserveError) else "gateway store unavailable")
        if self.on_stored:
            self.on_stored(row)
        return SUCCESS

    def _refuse(self, request: StoreRequest, why: str) -> Status:
        """Count a refusal; log and audit it as the throttle allows per peer - its IPv4
        address or IPv6 /64, not the calling AE title, which the sender chooses freely - so
        a flood of junk becomes neither a flood of fsyncs nor of log lines. Each entry says
        how many of that peer's refusals it stands for; :meth:`summarise` reports the rest."""
        peer = peer_key(request.peer)
        write, held = self._throttle.allow(peer)
        with self._count_lock:
            self.refused += 1
            if not write:
                self._held_back += 1
        # the Error Comment: the reason without the "C-STORE from <AE>: " it starts with
        status = Status(CANNOT_UNDERSTAND, why.split(": ", 1)[-1]
                        if why.startswith("C-STORE from ") else why)
        if not write:
            log.debug("C-STORE from %r (%s) refused: %s", request.calling_ae, peer, why)
            return status
        log.warning("C-STORE from %r (%s) refused: %s%s", request.calling_ae, peer or "?", why,
                    f" ({held} earlier refusals of this peer not logged)" if held else "")
        if self.audit:
            self.audit("dimse.refused", request.calling_ae,
                       {"reason": why[:300], "peer": peer, "held_back": held})
        return status

    def summarise(self) -> None:
        """Log and audit how many refusals got no entry of their own since the last summary
        (the gateway calls this once a minute and on stopping); nothing if none."""
        with self._count_lock:
            held, self._held_back = self._held_back, 0
            total = self.refused
        if not held:
            return
        log.warning("%d refused C-STOREs were not logged one by one since the last summary "
                    "(%d refused since the start)", held, total)
        if self.audit:
            self.audit("dimse.refused_summary", self.config.ae_title,
                       {"held_back": held, "refused_total": total})

    def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        from pathlib import Path

        from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
        from pynetdicom.presentation import build_context
        from pynetdicom.sop_class import Verification

        from radguard.gateway.acceptor import DimseLimits

        # every storage class in every transfer syntax: compressed ones accepted as sent
        contexts = [build_context(c.abstract_syntax, ALL_TRANSFER_SYNTAXES)
                    for c in AllStoragePresentationContexts]
        contexts.append(build_context(Verification))
        from radguard.gateway.qr import QrService

        self._qr = QrService(self.config, self.store, self.audit)
        contexts += self._qr.contexts()
        ssl_context = None
        if self.config.tls_cert:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        c = self.config
        limits = DimseLimits(
            max_associations=c.dicom_max_associations, max_per_ip=c.dicom_max_per_ip,
            max_per_ae=c.dicom_max_per_ae, connect_timeout=c.dicom_connect_timeout,
            idle_timeout=c.dicom_idle_timeout, min_rate=c.dicom_min_rate_kib << 10,
            max_association_time=c.dicom_max_association_time,
            max_data_set=c.dicom_max_data_set_mb << 20,
            memory_per_message=c.dicom_memory_per_message_mb << 20,
            memory_budget=c.dicom_memory_budget_mb << 20,
            spool_budget=c.dicom_spool_budget_mb << 20, min_free=c.dicom_min_free_mb << 20,
            peer_limits=tuple(c.dicom_peer_limits.items()), ipv6_prefix=c.ipv6_peer_prefix)
        # large data sets are spooled beside the store, so a rename moves them into place
        spool = Path(c.data_dir) / "incoming"
        try:
            spool.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{spool}: cannot create the DICOM spool folder "
                              f"({exc.strerror or exc})") from exc
        # a disk below its reserve refuses C-STOREs at the door: the store pauses intake
        # (the "intake paused" banner) until a worker sees room again; other spool write
        # failures are the store's health
        self._server = Acceptor(c.ae_title, contexts, self._handle_store,
                                allowed_calling_aes=list(c.allowed_calling_aes),
                                ssl_context=ssl_context, limits=limits, spool_dir=spool,
                                on_unwritable=self.store.door_refused, service=self._qr)
        try:
            self.port = self._server.start(self.config.host, self.config.dicom_port)
        except OSError as exc:
            self._server = None
            self._qr.close()
            self._qr = None
            raise ConfigError(f"cannot listen for DICOM on {self.config.host}:"
                              f"{self.config.dicom_port} ({exc.strerror or exc}); choose "
                              "another dicom_port") from exc
        return self.port

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._qr is not None:
            self._qr.close()
            self._qr = None
