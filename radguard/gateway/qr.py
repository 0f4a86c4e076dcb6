"""Query/Retrieve and Storage Commitment on the DICOM port: what C-FIND, C-MOVE, C-GET and
N-ACTION requests get (the protocol mechanics are :mod:`radguard.gateway.acceptor`'s, the
matching :mod:`radguard.gateway.query`'s).

* Who: C-FIND, C-MOVE and C-GET only for ``[dicom] query_callers`` (empty: nobody - a
  DICOM port that any peer could read from would hand out every patient's images), each
  entry an AE title, best bound to the address it must come from ("AE@10.1.2.7"); answers
  hold clinical instances only, quarantined ones too for C-FIND and C-GET of the
  ``quarantine_viewers`` (DIMSE has no users: the AE title and its address are the role) -
  never for C-MOVE, which would push an object nobody released into another system.
* C-FIND (Patient and Study Root): one Pending response per match, then Success; a
  C-CANCEL ends it with 0xFE00.
* C-MOVE: the destination is looked up in ``[dicom.destinations]`` (0xA801 if absent) and
  its C-STOREs run on a worker thread (the loop serves the other associations), C-GET's
  on the same association; each instance goes in its stored transfer syntax - a conversion
  would break a signature - and is converted (decompressed) only when the peer accepts
  none but an uncompressed one. A Pending response follows each sub-operation; the final
  one is Success, or 0xB000 with the Failed SOP Instance UID List (0xA702 if the
  destination cannot be reached, 0xFE00 after a C-CANCEL).
* Storage Commitment (push model): the N-ACTION is answered at once; the N-EVENT-REPORT
  follows once every instance named is durably stored and checked (``done`` or
  ``quarantined``; ``rejected`` fails), or ``commitment_timeout`` has passed - on the same
  association if it is still open, else on a new one to the requester's destination entry.
* Every refusal carries an Error Comment saying why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from radguard.errors import RadguardError
from radguard.gateway.acceptor import (
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    N_ACTION_RQ,
    PENDING,
    SUCCESS,
    Link,
    ServiceRequest,
)
from radguard.gateway.store import IN_PROGRESS, State

if TYPE_CHECKING:
    from pydicom import Dataset
    from pynetdicom.presentation import PresentationContext

    from radguard.gateway.config import DimseTarget, GatewayConfig
    from radguard.gateway.store import Instance, Store

__all__ = ["COMMITMENT", "MODELS", "QrService"]

log = logging.getLogger("radguard.gateway")
T = TypeVar("T")

#: SOP class -> (operation, information model of query.py)
MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.1": ("find", "patient"),
    "1.2.840.10008.5.1.4.1.2.1.2": ("move", "patient"),
    "1.2.840.10008.5.1.4.1.2.1.3": ("get", "patient"),
    "1.2.840.10008.5.1.4.1.2.2.1": ("find", "study"),
    "1.2.840.10008.5.1.4.1.2.2.2": ("move", "study"),
    "1.2.840.10008.5.1.4.1.2.2.3": ("get", "study"),
}
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP instance
EXPLICIT, IMPLICIT, BIG_ENDIAN = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT, IMPLICIT, BIG_ENDIAN)
# statuses (PS3.4 C.4, PS3.7 C and 10.1.4)
CANCEL, SUB_FAILURES, NOT_AUTHORISED = 0xFE00, 0xB000, 0x0124
UNKNOWN_DESTINATION, NO_SUB_OPERATIONS = 0xA801, 0xA702
IDENTIFIER_MISMATCH, UNABLE_TO_PROCESS, OUT_OF_RESOURCES = 0xA900, 0xC000, 0xA700
UNRECOGNISED_OPERATION, NO_SUCH_ACTION, NO_SUCH_INSTANCE = 0x0211, 0x0123, 0x0112
INVALID_INSTANCE, MISSING_ATTRIBUTE, PROCESSING_FAILURE = 0x0117, 0x0120, 0x0110
CLASS_INSTANCE_CONFLICT, OUT_OF_RESOURCES_N = 0x0119, 0x0213  # 0x0213: resource limitation
FIND_BATCH = 32 << 10  # C-FIND matches written together (a C-CANCEL is seen between)
MAX_COMMITMENTS = 16  # commitment requests waiting for their report, all peers together
MAX_COMMITTED = 10_000  # instances one commitment request may name
WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)  # a C-STORE kept, with a warning
POLL_SECONDS = 0.5  # how often a commitment looks at the store again
REPORT_TIMEOUT = 30.0  # seconds a peer has to answer our N-EVENT-REPORT / association


class RequestError(RadguardError):
    """A request this service refuses: the status and the Error Comment."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass
class Tally:
    """Sub-operation counts of a C-MOVE or C-GET (PS3.4 C.4.2.1.4)."""

    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def add(self, sop_uid: str, status: int | None) -> None:
        """Count one finished sub-operation (None: no answer)."""
        self.remaining -= 1
        if status == SUCCESS:
            self.completed += 1
        elif status in WARNINGS:
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(sop_uid)

    def fail_rest(self, sop_uids: Iterable[str]) -> None:
        for uid in sop_uids:
            self.add(uid, None)

    def counts(self, *, remaining: bool = True) -> dict[int, int | str]:
        out: dict[int, int | str] = {0x1021: self.completed, 0x1022: self.failed,
                                     0x1023: self.warning}
        if remaining:
            out[0x1020] = self.remaining
        return out


def _commitment_request(request: ServiceRequest) -> tuple[str, list[tuple[str, str]]]:
    """The Transaction UID and the (SOP Class, SOP Instance) references of an N-ACTION;
    RequestError when they are missing or more than :data:`MAX_COMMITTED` are named."""
    ds = decode_data_set(request.data, request.transfer_syntax)
    transaction = str(ds.get("TransactionUID", "") or "")
    items = ds.get("ReferencedSOPSequence", None) or []
    if len(items) > MAX_COMMITTED:
        raise RequestError(MISSING_ATTRIBUTE, f"at most {MAX_COMMITTED} instances per "
                                              "commitment request")
    references = [(str(item.get("ReferencedSOPClassUID", "") or ""),
                   str(item.get("ReferencedSOPInstanceUID", "") or "")) for item in items]
    if not transaction or not references or not all(a and b for a, b in references):
        raise RequestError(MISSING_ATTRIBUTE, "needs Transaction UID and Referenced "
                                              "SOP Sequence items with both UIDs")
    return transaction, references


# -- data sets in a transfer syntax -------------------------------------------------------------
def _flags(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(implicit VR, little endian, deflated) of an uncompressed transfer syntax."""
    deflated = transfer_syntax == "1.2.840.10008.1.2.1.99"
    return transfer_syntax == IMPLICIT, transfer_syntax != BIG_ENDIAN, deflated


def decode_data_set(data: bytes, transfer_syntax: str) -> Dataset:
    """A request's data set, every element decoded now (a malformed one fails here, not
    half-way through a query): RequestError 0xA900 if it is not one."""
    from pynetdicom.dsutils import decode

    if not data:
        raise RequestError(IDENTIFIER_MISMATCH, "the request has no data set")
    try:
        ds = decode(BytesIO(data), *_flags(transfer_syntax))
        for element in ds.iterall():
            _ = element.value
    except Exception as exc:  # noqa: BLE001 - hostile input: any decoder failure
        raise RequestError(IDENTIFIER_MISMATCH, f"undecodable data set "
                                                f"({type(exc).__name__})") from exc
    return ds


def encode_data_set(ds: Dataset, transfer_syntax: str) -> bytes:
    """``ds`` in an uncompressed transfer syntax (a response identifier, an event report)."""
    from pynetdicom.dsutils import encode

    data = encode(ds, *_flags(transfer_syntax))
    if data is None:
        raise RequestError(UNABLE_TO_PROCESS, "a response could not be encoded")
    return data


def _stored_syntax(path: Path) -> tuple[str, int]:
    """The transfer syntax of a Part 10 file and where its data set starts."""
    from pynetdicom.dsutils import split_dataset

    meta, offset = split_dataset(path)
    return str(meta.get("TransferSyntaxUID", IMPLICIT)), offset


def _converted(path: Path, transfer_syntax: str) -> Dataset:
    """The instance in an uncompressed transfer syntax, for a peer that takes no other
    (decompressed if need be): the last resort, a conversion breaks a signature."""
    from pydicom import dcmread
    from pydicom.uid import UID

    ds = dcmread(path)
    if UID(str(ds.file_meta.TransferSyntaxUID)).is_compressed:
        ds.decompress(generate_instance_uid=False)  # the same instance, decoded
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


# -- the service ---------------------------------------------------------------------------------
class QrService:
    """The :data:`~radguard.gateway.acceptor.ServiceHandler` of the DICOM port."""

    def __init__(self, config: GatewayConfig, store: Store,
                 audit: Callable[[str, str, dict[str, Any]], None] | None = None) -> None:
        self.config, self.store, self.audit = config, store, audit
        # queries and commitment polls (short), and C-MOVEs (as long as their transfers):
        # a few long moves must not hold up every query
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="radguard-qr")
        self._commitments = 0  # commitment requests waiting for their report (on the loop)
        self._movers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="radguard-move")

    @staticmethod
    def contexts() -> list[PresentationContext]:
        """The presentation contexts this service adds to the port's."""
        from pynetdicom.presentation import build_context

        syntaxes = [IMPLICIT, EXPLICIT, BIG_ENDIAN]
        return [build_context(uid, syntaxes) for uid in (*MODELS, COMMITMENT)]

    def close(self) -> None:
        """Stop the worker threads (after the acceptor: no operation is running)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._movers.shutdown(wait=True, cancel_futures=True)

    async def __call__(self, request: ServiceRequest, link: Link) -> None:
        try:
            await self._serve(request, link)
        except RequestError as exc:
            if not link.finished:
                log.info("DICOM request 0x%04X from %s (%s) refused (0x%04X): %s",
                         request.command_field, request.calling_ae, request.peer,
                         exc.status, exc)
                await link.respond(exc.status, str(exc))

    async def _serve(self, request: ServiceRequest, link: Link) -> None:
        field_, syntax = request.command_field, request.abstract_syntax
        if syntax == COMMITMENT and field_ == N_ACTION_RQ:
            await self._commit(request, link)
            return
        operation, model = MODELS.get(syntax, ("", ""))
        wanted = {"find": C_FIND_RQ, "move": C_MOVE_RQ, "get": C_GET_RQ}.get(operation)
        if wanted != field_:
            raise RequestError(UNRECOGNISED_OPERATION, "operation not supported for this "
                                                       "SOP class")
        if not self.config.caller_in("query_callers", request.calling_ae, request.peer):
            raise RequestError(NOT_AUTHORISED, f"calling AE {request.calling_ae} may not "
                                               "query or retrieve")
        identifier = decode_data_set(request.data, request.transfer_syntax)
        if operation == "find":
            await self._find(request, link, identifier, model)
        else:
            await self._retrieve(request, link, identifier, model, operation)

    async def _audit(self, action: str, target: str, details: dict[str, Any]) -> None:
        """An audit entry, written on a worker thread (not on the loop: it may fsync)."""
        if self.audit is not None:
            await self._run(self.audit, action, target, details)

    def _quarantine(self, request: ServiceRequest) -> bool:
        """Whether the request sees quarantined instances (C-MOVE never does)."""
        if request.command_field == C_MOVE_RQ:
            return False
        return self.config.caller_in("quarantine_viewers", request.calling_ae, request.peer)

    async def _run(self, work: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    async def _query(self, work: Callable[..., T], *args: Any) -> T:  # noqa: ANN401
        """A query.py call on a worker thread; its refusals and store failures as statuses."""
        from radguard.gateway import query

        try:
            return await self._run(work, *args)
        except RequestError:
            raise
        except query.TooManyMatches as exc:
            raise RequestError(OUT_OF_RESOURCES, str(exc)) from exc
        except query.QueryError as exc:
            raise RequestError(IDENTIFIER_MISMATCH, str(exc)) from exc
        except (OSError, RadguardError) as exc:
            log.error("DICOM query failed: %s", exc)
            raise RequestError(OUT_OF_RESOURCES, "the store cannot be read now") from exc

    # -- C-FIND ---------------------------------------------------------------------------------
    async def _find(self, request: ServiceRequest, link: Link, identifier: Dataset,
                    model: str) -> None:
        from radguard.gateway import query

        quarantine, syntax = self._quarantine(request), request.transfer_syntax

        def answers() -> list[bytes]:  # matched and encoded on a worker thread
            if syntax in (IMPLICIT, EXPLICIT):  # the common case, encoded directly
                return query.find_encoded(self.store, identifier, model,
                                          implicit=syntax == IMPLICIT, quarantine=quarantine,
                                          retrieve_ae=self.config.ae_title)
            found = query.find_datasets(self.store, identifier, model, quarantine=quarantine,
                                        retrieve_ae=self.config.ae_title)
            return [encode_data_set(match, syntax) for match in found]

        matches = await self._query(answers)
        # like every HTTP access: who asked what, from where
        await self._audit("dimse.find", request.calling_ae,
                          {"level": str(identifier.get("QueryRetrieveLevel", "")),
                           "model": model, "matches": len(matches), "peer": request.peer})
        batch: list[bytes] = []
        for number, match in enumerate(matches, 1):
            batch.append(match)
            if sum(map(len, batch)) < FIND_BATCH and number < len(matches):
                continue
            if link.cancelled.is_set() or not link.open:  # C-CANCEL: seen between batches
                await link.respond(CANCEL, "cancelled by the requestor")
                return
            await link.pending(batch)
            batch = []
        await link.respond(SUCCESS)

    # -- C-MOVE and C-GET ---------------------------------------------------------------------
    async def _retrieve(self, request: ServiceRequest, link: Link, identifier: Dataset,
                        model: str, operation: str) -> None:
        from radguard.gateway import query

        target = None
        if operation == "move":
            name = request.command.get(0x0600, b"").rstrip(b"\x00 ").decode("ascii", "replace")
            target = self.config.destination(name.strip())
            if target is None:
                raise RequestError(UNKNOWN_DESTINATION, f"move destination {name.strip()!r} "
                                                        "unknown")
        quarantine = self._quarantine(request)
        instances = await self._query(
            lambda: query.instances_for(self.store, identifier, model, quarantine=quarantine))
        tally = Tally(len(instances))
        if target is not None:
            reached = await self._move(request, link, instances, target, tally)
        else:
            reached = await self._get(request, link, instances, tally)
        await self._finish(request, link, tally, reached, operation, target)

    async def _finish(self, request: ServiceRequest, link: Link, tally: Tally, reached: str,
                      operation: str, target: DimseTarget | None) -> None:
        """The final response: Success, 0xB000 with the failed UIDs, Cancel, or 0xA702 when
        the destination could not be reached (``reached`` says why)."""
        from pydicom import Dataset

        await self._audit(f"dimse.{operation}", request.calling_ae,
                          {"destination": target.ae_title if target else request.calling_ae,
                           "completed": tally.completed, "failed": tally.failed,
                           "warning": tally.warning, "peer": request.peer})
        data = None
        if tally.failed_uids:
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = tally.failed_uids
            data = encode_data_set(failed, request.transfer_syntax)
        if link.cancelled.is_set() and tally.remaining:
            await link.respond(CANCEL, "cancelled by the requestor", data=data,
                               extra=tally.counts())
        elif reached:
            await link.respond(NO_SUB_OPERATIONS, reached, data=data,
                               extra=tally.counts(remaining=False))
        elif tally.failed or tally.warning:
            await link.respond(SUB_FAILURES, f"{tally.failed} failed, {tally.warning} with "
                               "warnings", data=data, extra=tally.counts(remaining=False))
        else:
            await link.respond(SUCCESS, extra=tally.counts(remaining=False))

    async def _move(self, request: ServiceRequest, link: Link, instances: list[Instance],
                    target: DimseTarget, tally: Tally) -> str:
        """C-STOREs to the destination on a worker thread; a Pending response after each.
        Returns why the destination could not be reached ("" if it was)."""
        loop = asyncio.get_running_loop()

        def progress() -> None:  # on the worker thread: wait until it is sent
            if link.cancelled.is_set():
                return
            sent = asyncio.run_coroutine_threadsafe(
                link.respond(PENDING, extra=tally.counts()), loop)
            try:
                sent.result(REPORT_TIMEOUT)
            except Exception:  # noqa: BLE001 - the association or the loop is gone
                link.cancelled.set()

        return await asyncio.get_running_loop().run_in_executor(
            self._movers, self._move_thread, request, link, instances, target, tally, progress)

    def _move_thread(self, request: ServiceRequest, link: Link, instances: list[Instance],
                     target: DimseTarget, tally: Tally, progress: Callable[[], None]) -> str:
        files = [(i, self.store.file(i)) for i in instances]
        syntaxes = {}  # an instance whose file cannot be read has none: it fails
        for instance, path in files:
            try:
                syntaxes[instance.id] = _stored_syntax(path)[0]
            except Exception as exc:  # noqa: BLE001 - a missing or damaged file
                log.warning("C-MOVE: %s unreadable: %s", path, exc)
        pairs = sorted({(i.sop_class, syntaxes.get(i.id, EXPLICIT)) for i in instances})
        batches = []  # two contexts a pair: at most 120 contexts an association
        for start in range(0, len(pairs), 60):
            batch = set(pairs[start:start + 60])
            batches.append([(i, p) for i, p in files
                            if (i.sop_class, syntaxes.get(i.id, EXPLICIT)) in batch])
        for number, batch in enumerate(batches):
            if link.cancelled.is_set():
                break
            why = self._move_batch(request, link, batch, syntaxes, target, tally, progress)
            if why:  # the destination cannot be reached: the rest fails too
                tally.fail_rest(i.sop_uid for later in batches[number + 1:] for i, _ in later)
                return why
        return ""

    def _move_batch(self, request: ServiceRequest, link: Link,
                    files: list[tuple[Instance, Path]], syntaxes: dict[int, str],
                    target: DimseTarget, tally: Tally, progress: Callable[[], None]) -> str:
        from pynetdicom import AE

        from radguard.gateway.dimse import open_association

        ae = AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = REPORT_TIMEOUT
        for sop_class, syntax in sorted({(i.sop_class, syntaxes.get(i.id, EXPLICIT))
                                         for i, _ in files}):
            ae.add_requested_context(sop_class, [syntax])
            if syntax != EXPLICIT:
                ae.add_requested_context(sop_class, [EXPLICIT])
        assoc = open_association(ae, target.host, target.port, target.ae_title)
        if not assoc.is_established:
            tally.fail_rest(i.sop_uid for i, _ in files)
            return f"move destination {target.ae_title} refused or unreachable"
        try:
            for position, (instance, path) in enumerate(files):
                if link.cancelled.is_set() or not assoc.is_established:
                    if not assoc.is_established:
                        tally.fail_rest(i.sop_uid for i, _ in files[position:])
                    break
                status = self._store_one(assoc, instance, path, syntaxes, request)
                tally.add(instance.sop_uid, status)
                progress()
        finally:
            if assoc.is_established:
                assoc.release()
        return ""

    @staticmethod
    def _store_one(assoc: Any, instance: Instance, path: Path,  # noqa: ANN401
                   syntaxes: dict[int, str], request: ServiceRequest) -> int | None:
        """One C-STORE to the destination, in the stored syntax if it was accepted."""
        from pydicom import dcmread

        stored = syntaxes.get(instance.id)
        accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts
                    if str(c.abstract_syntax) == instance.sop_class}
        try:
            if stored is None:
                return None  # the file is gone
            if stored in accepted:
                ds = dcmread(path)
            elif EXPLICIT in accepted:
                ds = _converted(path, EXPLICIT)
            else:
                return None
            answer = assoc.send_c_store(ds, originator_aet=request.calling_ae,
                                        originator_id=request.message_id)
        except Exception as exc:  # noqa: BLE001 - one unreadable instance is one failure
            log.warning("C-MOVE of %s failed: %s: %s", instance.sop_uid, type(exc).__name__,
                        exc)
            return None
        return int(answer.Status) if answer and "Status" in answer else None

    async def _get(self, request: ServiceRequest, link: Link, instances: list[Instance],
                   tally: Tally) -> str:
        """C-STORE sub-operations on the requestor's own association."""
        for position, instance in enumerate(instances):
            if link.cancelled.is_set() or not link.open:
                if not link.open:
                    tally.fail_rest(i.sop_uid for i in instances[position:])
                break
            status = await self._get_one(link, instance)
            tally.add(instance.sop_uid, status)
            if status is None and not link.open:  # it went away, or never answered a
                tally.fail_rest(i.sop_uid for i in instances[position + 1:])  # C-STORE:
                break  # one idle timeout, not one per instance, holds the slot
            await link.respond(PENDING, extra=tally.counts())
        return ""

    async def _get_one(self, link: Link, instance: Instance) -> int | None:
        path = self.store.file(instance)
        contexts = link.storage_contexts(instance.sop_class)
        if not contexts:
            return None  # the requestor did not take the SCP role for this SOP class
        try:
            stored, offset = await self._run(_stored_syntax, path)
            same = [cid for cid, syntax in contexts if syntax == stored]
            timeout = self.config.dicom_idle_timeout
            if same:
                return await link.store(same[0], instance.sop_class, instance.sop_uid,
                                        (path, offset), timeout)
            plain = [(cid, syntax) for cid, syntax in contexts if syntax in UNCOMPRESSED]
            if not plain:
                return None
            cid, syntax = plain[0]
            ds = await self._run(_converted, path, syntax)
            data = await self._run(encode_data_set, ds, syntax)
        except Exception as exc:  # noqa: BLE001 - an unreadable or undecodable instance fails
            log.warning("C-GET of %s failed: %s: %s", instance.sop_uid, type(exc).__name__, exc)
            return None
        return await link.store(cid, instance.sop_class, instance.sop_uid, data, timeout)

    # -- Storage Commitment -------------------------------------------------------------------
    async def _commit(self, request: ServiceRequest, link: Link) -> None:
        """N-ACTION: checked and answered now; the result is reported when known."""
        command = request.command
        action = int.from_bytes(command.get(0x1008, b"")[:2], "little") \
            if len(command.get(0x1008, b"")) == 2 else None
        if action != 1:
            raise RequestError(NO_SUCH_ACTION, f"no such action type ({action})")
        instance = command.get(0x1001, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        if instance != COMMITMENT_INSTANCE:
            raise RequestError(INVALID_INSTANCE, "requested SOP instance is not "
                                                 f"{COMMITMENT_INSTANCE}")
        if self._commitments >= MAX_COMMITMENTS:  # each waits up to commitment_timeout
            raise RequestError(OUT_OF_RESOURCES_N, f"{MAX_COMMITMENTS} commitment requests "
                                                   "are waiting: ask again later")
        try:  # decoded on a worker thread: a 1 MiB request would stall every association
            transaction, references = await self._run(_commitment_request, request)
        except RequestError as exc:
            raise RequestError(MISSING_ATTRIBUTE, str(exc)) from exc
        await link.respond(SUCCESS, extra={0x1008: 1})
        self._commitments += 1
        link.background(self._report(request, link, transaction, references))

    async def _report(self, request: ServiceRequest, link: Link, transaction: str,
                      references: list[tuple[str, str]]) -> None:
        """Wait for the checks (up to commitment_timeout), then deliver the result."""
        try:
            await self._wait_and_report(request, link, transaction, references)
        finally:
            self._commitments -= 1

    async def _wait_and_report(self, request: ServiceRequest, link: Link, transaction: str,
                               references: list[tuple[str, str]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.dicom_commitment_timeout
        done: list[tuple[str, str]] = []
        failed: list[tuple[str, str, int]] = []
        waiting = references
        with link.ours():  # the requester waits for our checks, not idles
            while True:  # decided instances stay decided: only the others are looked at
                try:
                    now_done, now_failed, waiting = await self._run(self.commitment_state,
                                                                    waiting)
                except (OSError, RadguardError) as exc:  # the store is down: ask again
                    log.warning("Storage Commitment %s: the store cannot be read (%s)",
                                transaction, exc)
                    now_done, now_failed = [], []
                done += now_done
                failed += now_failed
                if not waiting or loop.time() >= deadline:
                    break
                await asyncio.sleep(POLL_SECONDS)
        failed += [(cls, uid, PROCESSING_FAILURE) for cls, uid in waiting]
        event = 1 if not failed else 2
        report = _event_data(transaction, done, failed)
        details = {"transaction": transaction, "committed": len(done), "failed": len(failed),
                   "unchecked": len(waiting), "peer": request.peer}
        delivered = ""
        if link.open:
            data = await self._run(encode_data_set, report, request.transfer_syntax)
            status = await link.event_report(event, COMMITMENT_INSTANCE, data, REPORT_TIMEOUT)
            if status is not None:  # answered: delivered, whatever the requester made of it
                delivered = "same association"
                details["answer"] = f"0x{status:04X}"
        if not delivered:
            delivered = await self._run(self._report_anew, request.calling_ae, event, report)
        details["delivered"] = delivered or "no"
        if not delivered:
            log.warning("Storage Commitment result %s for %s could not be delivered: its "
                        "association ended and %s is not in [dicom.destinations] or did not "
                        "answer", transaction, request.calling_ae, request.calling_ae)
        await self._audit("dimse.commitment", request.calling_ae, details)

    def commitment_state(self, references: list[tuple[str, str]]
                         ) -> tuple[list[tuple[str, str]], list[tuple[str, str, int]],
                                    list[tuple[str, str]]]:
        """(committed, failed with their reason, still being checked) among ``references``
        of (SOP Class UID, SOP Instance UID). Committed: a row of that instance and class
        whose checks ended with the object kept (done or quarantined)."""
        rows: dict[str, list[Instance]] = {}
        uids = sorted({uid for _, uid in references})
        for start in range(0, len(uids), 500):
            chunk = uids[start:start + 500]
            for row in self.store.instances(f"sop_uid IN ({', '.join('?' * len(chunk))})",
                                            tuple(chunk)):
                rows.setdefault(row.sop_uid, []).append(row)
        done, failed, waiting = [], [], []
        for sop_class, uid in references:
            same = [r.state for r in rows.get(uid, []) if r.sop_class == sop_class]
            if State.DONE in same or State.QUARANTINED in same:
                done.append((sop_class, uid))
            elif any(s in IN_PROGRESS for s in same):
                waiting.append((sop_class, uid))
            elif same:
                failed.append((sop_class, uid, PROCESSING_FAILURE))  # rejected
            elif uid in rows:
                failed.append((sop_class, uid, CLASS_INSTANCE_CONFLICT))
            else:
                failed.append((sop_class, uid, NO_SUCH_INSTANCE))
        return done, failed, waiting

    def _report_anew(self, calling_ae: str, event: int, report: Dataset) -> str:
        """The N-EVENT-REPORT on a new association to the requester ("" if impossible)."""
        from pynetdicom import AE, build_role

        from radguard.gateway.dimse import open_association

        target = self.config.destination(calling_ae)
        if target is None:
            return ""
        ae = AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = REPORT_TIMEOUT
        ae.add_requested_context(COMMITMENT, [EXPLICIT, IMPLICIT])
        roles = [build_role(COMMITMENT, scp_role=True)]
        try:
            assoc = open_association(ae, target.host, target.port, target.ae_title,
                                     ext_neg=roles)
        except Exception as exc:  # noqa: BLE001 - any failure: not delivered
            log.warning("Storage Commitment report to %s failed: %s", target.ae_title, exc)
            return ""
        if not assoc.is_established:
            return ""
        try:
            answer = assoc.send_n_event_report(report, event, COMMITMENT, COMMITMENT_INSTANCE)
        except Exception as exc:  # noqa: BLE001 - any failure: not delivered
            log.warning("Storage Commitment report to %s failed: %s", target.ae_title, exc)
            return ""
        finally:
            if assoc.is_established:
                assoc.release()
        status = answer[0] if isinstance(answer, tuple) else answer
        ok = status is not None and "Status" in status and int(status.Status) == SUCCESS
        return f"new association to {target.ae_title}" if ok else ""


def _event_data(transaction: str, done: list[tuple[str, str]],
                failed: list[tuple[str, str, int]]) -> Dataset:
    """The Event Information of a Storage Commitment result (PS3.4 J.3.3.1)."""
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    def item(sop_class: str, uid: str, reason: int | None = None) -> Dataset:
        ds = Dataset()
        ds.ReferencedSOPClassUID, ds.ReferencedSOPInstanceUID = sop_class, uid
        if reason is not None:
            ds.FailureReason = reason
        return ds

    report = Dataset()
    report.TransactionUID = transaction
    if done:
        report.ReferencedSOPSequence = Sequence([item(c, u) for c, u in done])
    if failed:
        report.FailedSOPSequence = Sequence([item(c, u, r) for c, u, r in failed])
    return report
