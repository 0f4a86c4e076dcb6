"""The running gateway: store, DICOM front door, pipeline workers (and, when enabled, the
HTTP side), started and stopped together.

Ingestion only stores and queues; worker threads claim queued instances and run the
pipeline, so a burst of incoming images never waits for forensics or triage, and a restart
resumes the queue (:meth:`Store.recover`). With ``check_processes`` the stateless checks run
in separate processes (:class:`~radguard.gateway.pipeline.CheckPool`), so on a multi-core
server they do not share the receiving process's interpreter lock; the store, the monitor
and forwarding stay in the gateway process.

The workers survive every error. When the store cannot be written (a full disk, an
unreachable database) new objects are refused (C-STORE 0xA700), ``Gateway.problem`` says
since when and why (the web UI shows it), the transition is logged and audited once, and
the workers back off and probe until writes work again. Below the free-space reserve only
intake pauses (the door, STOW-RS): the workers go on checking and forwarding what was
received - the reserve is their room - and ``Gateway.problem`` says "intake paused". An
instance whose result cannot be written - by the store, or by the pipeline itself (the
drift monitor's SQLite on a full disk, any OSError) - goes back to the queue instead of
being judged, and so does one that meets an unexpected error outside the checks (logged
with its traceback); the worker's back-off (1 s doubling to 5 s) lasts until an instance
is processed. A storage error (no room, read-only, locked: :func:`storage_failure`) never
condemns an instance; errors of its own, MAX_ATTEMPTS of them (counted apart from claims:
forwarding retries do not count) with the store working, quarantine it, so it cannot stall
the queue behind it. Nothing acknowledged is lost
and nothing needs a restart.

An instance routed ``done`` is marked ``forwarding`` before it is sent to the PACS, and not
sent if an admin's release of another copy superseded it meanwhile
(:meth:`~radguard.gateway.store.Store.start_forwarding`).

A conflicting copy of a SOP Instance UID already held (different bytes, see
:class:`~radguard.gateway.store.Store`) is checked like any instance but always ends in
quarantine with the reason, never forwarded, so an admin decides; the first copy stays the
one served unless the admin releases the new copy, which then replaces it. Whether it still
conflicts is decided when it is checked: if every earlier copy has been rejected since it
arrived, it is an ordinary instance.

In-process checks run in a :func:`~radguard.dicom.limits.decode_scope`: the data set and
pixels a scan holds count against the decode budget until it ends, so concurrent workers
take turns with large ones instead of each holding one.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from radguard.dicom.limits import decode_scope
from radguard.errors import RadguardError
from radguard.gateway.config import ConfigError, GatewayConfig
from radguard.gateway.dimse import DicomServer
from radguard.gateway.pipeline import (
    RESULTS_SOURCE,
    CheckPool,
    ForwardError,
    Pipeline,
    Routing,
)
from radguard.gateway.store import IN_PROGRESS, Instance, State, Store, StoreError, storage_failure

__all__ = ["MAX_ATTEMPTS", "Gateway"]

log = logging.getLogger("radguard.gateway")

#: failures of one instance with errors of its own (not of the storage, not forwarding;
#: counted in memory until it is processed), the store working, before it is quarantined
#: "unverifiable" instead of requeued once more
MAX_ATTEMPTS = 5

#: the longest wait of a worker for the store (seconds): a worker probes at least this often
#: during an outage, so work resumes within it once the database or disk is back
STORE_WAIT = 5.0

#: a write that failed, in the store or inside the pipeline (the drift monitor's SQLite, a
#: file): the instance goes back to the queue, it is not judged
_STORAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.OperationalError,
                                                    StoreError)


def _oidc_verifier(config: GatewayConfig) -> Any:  # noqa: ANN401
    """The identity provider's token verifier, or None; a JWKS file that cannot be read is a
    configuration error, found before anything listens."""
    settings = config.oidc()
    if settings is None:
        return None
    from radguard.gateway.auth import AuthError
    from radguard.gateway.oidc import OidcVerifier

    try:
        return OidcVerifier(settings)
    except AuthError as exc:
        raise ConfigError(str(exc)) from exc


class Gateway:
    """One gateway instance; ``start()`` returns once it listens."""

    def __init__(self, config: GatewayConfig, *, audit_log: Any = None) -> None:  # noqa: ANN401
        from pathlib import Path

        from radguard.dicom.limits import set_decode_limits
        from radguard.governance.auditlog import AuditLog, DatabaseAuditLog

        self.config = config
        set_decode_limits(config.decode_limits())  # the door and in-process checks
        self.oidc = _oidc_verifier(config)
        self.gateway_id = config.gateway_id()
        self.store = Store(config.data_dir, config.db_url or None,
                           min_free=config.dicom_min_free_mb << 20, gateway_id=self.gateway_id,
                           objects=config.cluster_objects,
                           objects_dir=config.cluster_objects_dir or None,
                           pool_size=config.cluster_db_pool,
                           lease_seconds=config.cluster_lease_seconds,
                           cache_mb=config.cluster_cache_mb)
        self.store.health.listeners.append(self._store_health)
        self.store.intake.listeners.append(self._intake)
        # every entry names the gateway; with a database, one chain for all the cluster's
        # gateways (appends serialised in PostgreSQL), verified by `radguard audit verify
        # --db-url`
        self.audit_log = audit_log or (
            DatabaseAuditLog(config.db_url, actor="radguard-gateway", gateway=self.gateway_id,
                             connections=self.store.connection)
            if config.db_url else AuditLog(Path(config.data_dir) / "audit.jsonl",
                                           actor="radguard-gateway", gateway=self.gateway_id))
        self.pipeline = Pipeline(config, self.store, self.audit_log)
        self.checks: CheckPool | None = None
        self.dicom = DicomServer(config, self.store, on_stored=self.wake_up,
                                 audit=self._audit)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.processed = 0
        self.http_port: int | None = None
        self._http: Any = None
        # claimed (id, attempt), then the store failed: requeue when it works
        self._held: set[tuple[int, int]] = set()
        self._failures: dict[int, int] = {}  # instance id -> errors of its own so far
        self._held_lock = threading.Lock()
        self._sweeping = threading.Lock()  # one sweep at a time
        self._working: set[int] = set()  # claimed and in a worker's hands (the heartbeat
        # extends these leases only: a claim nobody holds lapses and is taken over)

    @property
    def problem(self) -> str | None:
        """What keeps the gateway from working normally, for the web UI's banner (e.g.
        "disk full since ...: new images refused", "intake paused since ..."); None when
        all is well."""
        problems = [p for p in (self.store.health.problem, self.store.intake.problem) if p]
        return "; ".join(problems) or None

    def _audit(self, action: str, target: str, details: dict[str, Any]) -> None:
        """Append to the audit log; a log that cannot be written (the disk is full) is
        logged here and does not stop the caller."""
        try:
            self.audit_log.append(action, target, details)
        except (OSError, RadguardError) as exc:
            log.error("audit log not written (%s): %s %s", exc, action, target)

    def _store_health(self, problem: str | None) -> None:
        """A store health transition (once per outage, not per refused instance)."""
        health = self.store.health
        if problem is not None:
            log.error("store: %s", problem)
            self._audit("store.unavailable", self.config.ae_title, {"problem": problem})
        else:
            log.warning("store: writes work again (failing since %s, %d failed writes); "
                        "taking new images", health.since, health.failures)
            self._audit("store.recovered", self.config.ae_title,
                        {"failing_since": health.since, "failed_writes": health.failures})
            self._wake.set()

    def _intake(self, problem: str | None) -> None:
        """Intake paused below the free-space reserve, or resumed (once per pause)."""
        intake = self.store.intake
        if problem is not None:
            log.error("store: %s", problem)
            self._audit("store.intake_paused", self.config.ae_title, {"problem": problem})
        else:
            log.warning("store: room above the free-space reserve again (paused since %s, "
                        "%d refusals); taking new images", intake.since, intake.failures)
            self._audit("store.intake_resumed", self.config.ae_title,
                        {"paused_since": intake.since, "refused": intake.failures})

    def wake_up(self, _row: int = 0) -> None:
        """A new instance is queued (row id): wake an idle worker now, not at its next poll."""
        self._wake.set()

    def start(self) -> None:
        """Join the cluster, recover from a crash of this gateway, then listen and start
        the workers."""
        import os
        import socket

        from radguard import __version__

        self.store.register(host=socket.gethostname(), pid=os.getpid(), version=__version__)
        recovered = self.store.recover(sweep=False)  # the sweep: in the background
        if any(recovered.values()):
            log.warning("recovered after a crash: %s", recovered)
        if indexed := self.store.backfill_index(_index_header):
            log.info("indexed %d instances stored before QIDO-RS / C-FIND matching", indexed)
        self._audit("gateway.start", self.config.ae_title,
                    {"recovered": recovered, "layers": self.pipeline.layers(),
                     "check_processes": self.config.check_process_count})
        try:
            if self.config.check_process_count:
                self.checks = CheckPool(self.config)  # ready before the first image arrives
            self._start_http()
            self._start_workers()
            # DICOM last: a modality that connects the moment the port opens meets a gateway
            # that is fully up, not one still importing its web stack or starting workers
            self.dicom.start()
        except BaseException:  # a port in use, a failed start, Ctrl-C: nothing of this
            self._shut_down()  # gateway keeps running (no orphaned check processes)
            raise

    def _start_workers(self) -> None:
        # with check processes, enough threads to keep every process busy
        threads = max(self.config.workers, 2 * self.config.check_process_count)
        for n in range(threads):
            t = threading.Thread(target=self._work, name=f"radguard-worker-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        for target, name in ((self._summarise, "radguard-summaries"),
                             (self._heartbeat, "radguard-heartbeat")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _heartbeat(self) -> None:
        """Every quarter of a lease: extend this gateway's claims, reclaim expired ones of
        any gateway (one that died), and now and then sweep orphaned objects and the cache.
        A database that is away is the store's health (the workers wait for it); this
        thread keeps trying."""
        every = self.store.heartbeat_seconds
        beats = 0
        self._sweep_soon()  # after a crash: orphaned objects, without delaying the start
        while not self._stop.wait(every):
            try:
                with self._held_lock:
                    working = set(self._working)
                result = self.store.heartbeat(self.problem, working)
                if result["reclaimed"]:
                    self._audit("cluster.reclaimed", self.gateway_id,
                                {"instances": result["reclaimed"]})
                    self._wake.set()
                beats += 1
                if beats % max(1, int(600 / every)) == 0:  # about every ten minutes
                    self._sweep_soon()
            except _STORAGE_ERRORS as exc:
                log.debug("heartbeat: %s", exc)
                self.store.health.failed(exc)
            except Exception:  # noqa: BLE001 - the heartbeat outlives every error
                log.exception("heartbeat: unexpected error")

    def _sweep_soon(self) -> None:
        """Sweep orphaned objects (and the cache) on a thread of its own: a large store
        takes a while, and leases must go on being extended meanwhile."""
        if self._sweeping.locked():
            return

        def sweep() -> None:
            with self._sweeping:
                try:
                    if removed := self.store.sweep():
                        log.info("swept %d orphaned objects or cached copies", removed)
                except (*_STORAGE_ERRORS, RadguardError) as exc:
                    log.warning("sweep of orphaned objects not done: %s", exc)

        threading.Thread(target=sweep, name="radguard-sweep", daemon=True).start()

    def _summarise(self) -> None:
        """Once a minute: how many refused C-STOREs the throttled log held back."""
        while not self._stop.wait(60):
            self.dicom.summarise()

    def _start_http(self) -> None:
        import socket

        import uvicorn

        from radguard.gateway.httpguard import guarded_protocol
        from radguard.gateway.web import create_app

        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says it is TCP; without it every small answer on a kept-alive
        # connection waits ~40 ms for the client's delayed ACK (Nagle)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.http_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen for HTTP on {self.config.host}:"
                              f"{self.config.http_port} ({exc.strerror or exc}); choose "
                              "another http_port") from exc
        self.http_port = int(sock.getsockname()[1])
        app = create_app(self, bulk_read_limit=self.config.bulk_read_limit)
        settings = uvicorn.Config(app, log_level="warning", access_log=False,
                                  limit_concurrency=self.config.http_max_connections,
                                  timeout_keep_alive=5,
                                  http=guarded_protocol(self.config.http_header_seconds,
                                                        self.config.http_max_per_client,
                                                        list(self.config.trusted_proxies)),
                                  h11_max_incomplete_event_size=16 << 10, server_header=False,
                                  proxy_headers=bool(self.config.trusted_proxies),
                                  forwarded_allow_ips=list(self.config.trusted_proxies),
                                  ssl_certfile=self.config.tls_cert or None,
                                  ssl_keyfile=self.config.tls_key or None)
        self._http = uvicorn.Server(settings)
        thread = threading.Thread(target=self._http.run, kwargs={"sockets": [sock]},
                                  name="radguard-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not self._http.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self._http_thread = thread

    def _work(self) -> None:
        store_wait, forward_wait = 1.0, 1.0  # back-offs, doubling while the trouble lasts
        while not self._stop.is_set():
            try:
                if self.store.intake.problem is not None:
                    self.store.check_intake()  # one statvfs: has space come back?
                if self.store.health.problem is not None and not self.store.probe():
                    raise StoreError(self.store.health.problem)
                self._requeue_held()
                instance = self.store.claim()
            except _STORAGE_ERRORS as exc:
                log.debug("worker waits for the store: %s", exc)
                store_wait = self._back_off(store_wait, STORE_WAIT)
                continue
            except Exception:  # noqa: BLE001 - a worker outlives every error
                log.exception("worker: unexpected error while taking work; trying again")
                store_wait = self._back_off(store_wait, STORE_WAIT)
                continue
            if instance is None:
                store_wait = 1.0  # nothing failing: the next trouble starts afresh
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            with self._held_lock:
                self._working.add(instance.id)
            try:
                self._process(instance)
            except ForwardError as exc:
                log.warning("forwarding %s failed, will retry: %s", instance.sop_uid, exc)
                self._hold(instance)
                forward_wait = self._back_off(forward_wait, 60.0)
                continue
            except Exception as exc:  # noqa: BLE001 - a worker outlives every error
                store_wait = self._failed(instance, exc, store_wait)
                continue
            finally:
                with self._held_lock:
                    self._working.discard(instance.id)
            with self._held_lock:
                self._failures.pop(instance.id, None)
            store_wait = forward_wait = 1.0

    def _failed(self, instance: Instance, exc: Exception, wait: float) -> float:
        """``instance`` failed outside the checks: back to the queue, then the next, longer
        wait. A storage error (:func:`storage_failure`) waits for the storage however long
        it lasts; an error of the instance's own (a file gone missing, a decoder's OSError,
        a bug) is counted, and at MAX_ATTEMPTS with the store working (a probe writes) the
        instance is quarantined instead (:meth:`_poison`)."""
        if storage_failure(exc):
            # during a store outage the outage itself is logged, once
            log.log(logging.DEBUG if self.store.health.problem else logging.WARNING,
                    "instance %s back to the queue (a write failed): %s", instance.sop_uid,
                    exc)
        else:
            with self._held_lock:
                failures = self._failures[instance.id] = self._failures.get(instance.id, 0) + 1
            if failures >= MAX_ATTEMPTS and self._poison(instance, exc, failures):
                return wait
            log.error("instance %s back to the queue after an unexpected error (failure %d; "
                      "quarantined at %d with the store working)", instance.sop_uid, failures,
                      MAX_ATTEMPTS, exc_info=exc)
        self._hold(instance)
        return self._back_off(wait, STORE_WAIT)

    def _poison(self, instance: Instance, exc: Exception, failures: int) -> bool:
        """Quarantine an instance that failed ``failures`` times with errors of its own, if
        the store works (a probe writes): requeueing it for ever would stall the queue
        behind it. False (requeue) when the store does not work."""
        if not self.store.probe():
            return False
        error = f"{type(exc).__name__}: {exc}"
        log.error("instance %s failed %d times with the store working; quarantined: %s",
                  instance.sop_uid, failures, error)
        try:
            self._finish(instance, state=State.QUARANTINED, verdict="unverifiable",
                      trust="unknown",
                      details={"error": error[:500],
                               "reasons": [f"could not be processed in {failures} "
                                           f"attempts: {error}"[:300]]})
        except _STORAGE_ERRORS:
            return False
        with self._held_lock:
            self._failures.pop(instance.id, None)
        self._audit("instance.quarantined", instance.sop_uid,
                    {"study": instance.study_uid, "reasons": ["failed repeatedly"]})
        return True

    def _back_off(self, wait: float, longest: float) -> float:
        """Wait ``wait`` seconds (less if the gateway stops); the next, doubled wait."""
        self._stop.wait(wait)
        return min(wait * 2, longest)

    def _finish(self, instance: Instance, **result: Any) -> bool:  # noqa: ANN401
        """Record a claimed instance's result, fenced by its claim (Store.finish)."""
        return self.store.finish(instance.id, attempt=instance.attempts, **result)

    def _hold(self, instance: Instance) -> None:
        """Put a claimed instance back in the queue, or keep it for later if the store
        cannot take even that now (it must not stay claimed until a restart)."""
        try:
            self.store.requeue(instance.id, instance.attempts)
        except _STORAGE_ERRORS:
            with self._held_lock:
                self._held.add((instance.id, instance.attempts))

    def _requeue_held(self) -> None:
        with self._held_lock:
            held, self._held = self._held, set()
        for number, (instance_id, attempt) in enumerate(sorted(held)):
            try:
                self.store.requeue(instance_id, attempt)
            except _STORAGE_ERRORS:
                with self._held_lock:
                    self._held.update(sorted(held)[number:])
                raise

    def _process(self, instance: Instance) -> None:
        if instance.source == RESULTS_SOURCE:
            self._deliver_result(instance)
            return
        # the copy this one conflicts with as of now (None: none, or all rejected since)
        first = self.store.recheck_original(instance) if instance.duplicate_of else None
        try:
            with decode_scope():  # what the scan holds counts against the decode budget
                if self.checks is not None:
                    routing, observation = self.checks.check(self.store.file(instance),
                                                             instance)
                    if first is None:
                        self.pipeline.observe(instance, observation, routing)
                    else:  # judged against its source, as in-process, but not recorded
                        self.pipeline.rejudge(instance, routing)
                elif first is None:
                    routing = self.pipeline.route(instance)
                else:  # a conflicting copy does not feed the drift monitor
                    routing = self.pipeline.check(self.store.file(instance), instance)[0]
        except (ForwardError, *_STORAGE_ERRORS):
            raise
        except Exception as exc:  # noqa: BLE001 - one bad instance must not stop the queue
            log.exception("pipeline failed on %s", instance.sop_uid)
            self._finish(instance, state="quarantined", verdict="unverifiable",
                      trust="unknown", details={"error": f"{type(exc).__name__}: "
                                                         f"{exc}"[:500]})
            return
        if first is not None:
            _conflict(routing, instance, first)
        forwarded = None
        if routing.state == State.DONE:
            if self.pipeline.forwarders and not self.store.start_forwarding(instance):
                log.warning("instance %s not forwarded: superseded by an admin's release of "
                            "another copy while it was checked", instance.sop_uid)
                return
            forwarded = self.pipeline.forward(instance)
            # after the image reached the PACS, before its result is recorded: a failed
            # store requeues the image, and its set is built again with the same UIDs
            if self.pipeline.store_results(instance, routing):
                self.wake_up()
        if not self._finish(instance, state=routing.state, verdict=routing.verdict,
                         trust=routing.trust,
                         details={**routing.details, "reasons": routing.reasons},
                         ai_probability=routing.ai_probability,
                         ai_suspicion=routing.ai_suspicion, forwarded=forwarded):
            log.warning("instance %s superseded while it was checked; its result is not "
                        "recorded", instance.sop_uid)
            return
        self.processed += 1
        if routing.state != "done":
            details: dict[str, Any] = {"study": instance.study_uid,
                                       "reasons": routing.reasons[:3]}
            if first is not None:
                details["duplicate_of"] = first.id
            self._audit(f"instance.{routing.state}", instance.sop_uid, details)

    def _deliver_result(self, instance: Instance) -> None:
        """One of radguard's own AI result objects (:meth:`Pipeline.store_results`): not
        checked - radguard made it from an image that passed - but forwarded like an image
        ([results] forward), a failure retried like an image's. A copy of a result already
        held (a set built again after a failed attempt) is set aside; the first stands.
        Verdict "authentic" (made here, no detector ran: the reason says so) with the badge
        "radguard", so the study view shows no alarm for it."""
        if instance.duplicate_of is not None and self.store.recheck_original(instance):
            self._finish(instance, state=State.REJECTED, verdict="authentic",
                      trust="radguard", details={"reasons": [
                          "the same AI result built again (a retried result set); "
                          "the copy stored first stands"]})
            return
        forwarded = None
        if self.config.results_forward and self.pipeline.forwarders:
            if not self.store.start_forwarding(instance):
                return
            forwarded = self.pipeline.forward(instance)
        if self._finish(instance, state=State.DONE, verdict="authentic",
                     trust="radguard", forwarded=forwarded,
                     details={"reasons": ["radguard's own AI result, made from a "
                                          "checked image: not checked itself"]}):
            self.processed += 1

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until nothing is queued, processing or forwarding (tests, the demo)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.store.counts()
            if not any(counts.get(state) for state in IN_PROGRESS):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop listening, let the workers finish their current instance, leave the
        cluster's list of gateways, close."""
        self._shut_down()
        try:
            self.store.unregister()
        except StoreError as exc:  # the database is away: the lease and heartbeat lapse
            log.warning("could not leave the cluster's list of gateways: %s", exc)
        self._audit("gateway.stop", self.config.ae_title, {})
        if hasattr(self.audit_log, "close"):
            self.audit_log.close()

    def _shut_down(self) -> None:
        self.dicom.stop()
        self.dicom.summarise()
        if self._http is not None:
            self._http.should_exit = True
            self._http_thread.join(15)
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(30)
        if self.checks is not None:
            self.checks.close()
        self.pipeline.close()


def _index_header(path: Path) -> dict[str, str]:
    """The query attributes of a stored file (rows stored before the query index)."""
    from pydicom import dcmread

    from radguard.gateway.dimse import query_header

    try:
        ds = dcmread(path, stop_before_pixels=True)
        return {"patient_name": str(ds.get("PatientName", "") or ""), **query_header(ds)}
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure: the row stays unindexed
        raise RadguardError(f"{path.name}: {type(exc).__name__}: {exc}"[:200]) from exc


def _conflict(routing: Routing, instance: Instance, first: Instance) -> None:
    """Route a conflicting copy of a SOP Instance UID to quarantine (a rejection stands):
    the first copy keeps being served, an admin decides about this one."""
    routing.reasons.insert(0, f"conflicting duplicate of SOP Instance UID {instance.sop_uid}: "
                              f"different content than the copy first received "
                              f"{first.received_at[:19]}Z from {first.calling_ae or first.source} "
                              f"(row {first.id}); the first copy is kept and served; releasing "
                              "this one replaces it")
    routing.details["duplicate_of"] = first.id
    if routing.state == "done":
        routing.state = "quarantined"
