"""Per-instance processing: verify -> watermark -> forensics -> triage -> monitor -> route.

The policy, in order (the first rule that applies decides):

1. Synthetic Data = YES: **rejected** - synthetic images never enter the clinical store.
2. A signature that does not hold (invalid), one too weak to count (MD5 / SHA-1 MAC, short
   key; ``[signatures]`` in the configuration), or a signer not trusted: **quarantined**.
3. From a calling AE title or modality listed in ``must_sign``, without valid top-level
   signatures that vouch for the image (``VerificationReport.pixels_covered``: they cover
   every present, non-empty element that changes what it shows - pixels, how they are read
   and shown, overlays - and, at ``[signatures] coverage = "image"`` (the default), whose
   image it is and where it belongs): **quarantined** (unsigned, signed only inside sequence
   items - such a signature covers its item, not the image - or signed over part of it
   only, or changed by elements added after signing).
4. A watermark that no longer matches the pixels: **quarantined**.
5. Forensics verdict ``tampered`` or ``synthetic``: **quarantined**.
6. Pixel data that cannot be decoded (verdict ``unverifiable``, not readable): **quarantined**.
7. Otherwise **done**: forwarded to the PACS when one is configured; ``suspicious`` and
   ``unverifiable`` images go through with their badge and reasons - a readable image
   nothing could judge (a modality the content detectors do not cover, a source not
   calibrated yet) is not quarantined for that; ``[forensics] uncalibrated = "quarantine"``
   holds the unsigned images of sources not calibrated yet instead.

The content detectors' scores are judged per source (``[forensics] source``: the calling AE
title, optionally with station and modality), against thresholds set conformally on the
source's known-real images (:mod:`radguard.forensics.calibration`): every instance a trusted
signature or radguard's intact watermark vouches for feeds its source's calibration with its
detector scores (of the restored original, for a watermarked one). A source without enough
known-real images is not accused: its unsigned images are ``unverifiable``, "no provenance
and no calibration for this source", with their scores in the details.

Only when valid top-level signatures that chain to the trust store vouch for the image
(``pixels_covered``) is the badge ``signed``. The verdict of a vouched image never depends
on the content detectors (synthetic image, copy-move, fill / splice): it is provably the
device's, and a statistical detector could only add false alarms. With
``trust_signed_pixels`` (on by default) they run on a signed image only while its source is
not calibrated to the target, then on 1 in ``[forensics] sample_vouched`` to keep the
calibration fresh. Header checks, the watermark check (a forgery signed with a stolen device
key still lacks the watermark), triage and monitoring always run.

Every layer that is not configured says so in the instance's details ("not configured")
instead of being silently skipped. Delivery to the PACS is at least once: a crash between
sending and recording resends, which PACSs absorb (the SOP Instance UID identifies it).
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radguard.errors import RadguardError
from radguard.gateway.config import DimseTarget, GatewayConfig
from radguard.gateway.store import Instance, Store

__all__ = ["RESULTS_SOURCE", "CheckPool", "ForwardError", "Observation", "Pipeline",
           "Routing"]

#: the ``source`` of the rows radguard stores of its own AI results ([results]): the
#: gateway forwards them without checking them (:meth:`Gateway._deliver_result`); no
#: intake path (DICOM, STOW-RS) can give a row this source
RESULTS_SOURCE = "radguard-results"

log = logging.getLogger("radguard.gateway")

#: the gateway process's per-source calibration, by the database it lives in: the
#: CheckPool of that gateway reads from it which sources are calibrated and sends that with
#: each request, since a check process has no database
_BOOKS: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()


def _book_key(config: GatewayConfig) -> tuple[str, str]:
    return (str(Path(config.data_dir).resolve()), config.db_url)


def _key_part(value: str) -> str:
    """One part of a source key: printable, at most 64 characters, ``/`` and ``%``
    escaped (so "A/B" + "C" and "A" + "B/C" stay two sources)."""
    text = "".join(c for c in str(value) if c.isprintable()).strip()[:64]
    return text.replace("%", "%25").replace("/", "%2F") or "-"


class ForwardError(RadguardError):
    """The PACS did not take the instance (unreachable or refused); retried later."""


@dataclass
class Routing:
    """What the pipeline decided for one instance."""

    state: str  # done / quarantined / rejected
    verdict: str
    trust: str  # the badge: signed / pixels unsigned / watermarked / unsigned / invalid / ...
    reasons: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    ai_probability: float | None = None
    ai_suspicion: int | None = None
    source: str = ""  # the calibration source key ([forensics] source)
    scan: Any = None  # the scan without its pixels (forensics.scan.ScanResult.portable), so
    # the gateway process can judge it against its source's calibration; not stored


@dataclass
class Observation:
    """What the drift monitor learns of one instance, computed where the pixels were decoded
    (a check process) and applied where the monitor database lives (the gateway process)."""

    features: dict[str, float]  # monitoring.features.IMAGE_FEATURES, by stored bit depth
    metadata: dict[str, str]  # acquisition metadata: a new scanner or protocol is an alarm


class DimseForwarder:
    """C-STORE SCU to the PACS. Each instance goes in its own transfer syntax: converting
    (say, Explicit to Implicit VR) can break a DICOM signature (8-bit pixel data is OB in
    one and OW in the other; dcmtk and radguard agree the signature no longer holds), so the
    association proposes exactly the (SOP class, transfer syntax) pairs it has to send and
    is reopened when a new pair comes along."""

    def __init__(self, target: DimseTarget, calling_ae: str) -> None:
        self.target, self.calling_ae = target, calling_ae
        self._assoc: Any = None
        self._pairs: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _associate(self) -> Any:  # noqa: ANN401
        from pynetdicom import AE

        from radguard.gateway.dimse import open_association

        ae = AE(ae_title=self.calling_ae)
        for sop_class, syntax in sorted(self._pairs)[-120:]:
            ae.add_requested_context(sop_class, syntax)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = open_association(ae, self.target.host, self.target.port, self.target.ae_title)
        if not assoc.is_established:
            raise ForwardError(f"PACS {self.target.ae_title}@{self.target.host}:"
                               f"{self.target.port} refused or is unreachable")
        return assoc

    def _accepts(self, pair: tuple[str, str]) -> bool:
        return self._assoc is not None and self._assoc.is_established and any(
            c.abstract_syntax == pair[0] and c.transfer_syntax[0] == pair[1]
            for c in self._assoc.accepted_contexts)

    def send(self, path: Path) -> str:
        """Send one file unchanged; returns where it went."""
        from pydicom import dcmread

        ds = dcmread(path)
        pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        with self._lock:
            for attempt in (1, 2):
                if not self._accepts(pair):
                    self._pairs.add(pair)
                    if self._assoc is not None and self._assoc.is_established:
                        self._assoc.release()
                    self._assoc = self._associate()
                    if not self._accepts(pair):
                        raise ForwardError(f"the PACS does not accept {pair[0]} in transfer "
                                           f"syntax {pair[1]}")
                try:
                    status = self._assoc.send_c_store(ds)
                except (RuntimeError, ValueError, OSError) as exc:
                    self._assoc = None
                    if attempt == 2:
                        raise ForwardError(f"C-STORE to the PACS failed ({exc})") from exc
                    continue
                if not status or "Status" not in status:
                    self._assoc = None
                    if attempt == 2:
                        raise ForwardError("the PACS sent no C-STORE response")
                    continue
                code = int(status.Status)
                if code in (0x0000, 0xB000, 0xB006, 0xB007):
                    return f"dimse:{self.target.ae_title}"
                raise ForwardError(f"the PACS refused the instance (status 0x{code:04X})")
        raise ForwardError("C-STORE to the PACS failed")

    def close(self) -> None:
        """Release the association."""
        with self._lock:
            if self._assoc is not None and self._assoc.is_established:
                self._assoc.release()
            self._assoc = None


class StowForwarder:
    """STOW-RS to the PACS's DICOMweb root."""

    def __init__(self, url: str) -> None:
        from radguard.dicom.web import DicomWebClient

        self.client = DicomWebClient(url)

    def send(self, path: Path) -> str:
        """Send one file; returns where it went."""
        from radguard.dicom.web import DicomWebError

        try:
            self.client.store([path.read_bytes()])
        except DicomWebError as exc:
            raise ForwardError(str(exc)) from exc
        return "stow"

    def close(self) -> None:
        """Nothing to release."""


class Pipeline:
    """The configured layers, loaded once and shared by the worker threads."""

    def __init__(self, config: GatewayConfig, store: Store | None, audit_log: Any = None,  # noqa: ANN401
                 *, checks_only: bool = False) -> None:
        """``checks_only``: the stateless part for a check process (no monitor database,
        no PACS associations: those stay with the gateway process)."""
        from radguard.forensics.synthetic import load_detector

        self.config, self.store, self.audit_log = config, store, audit_log
        self.policy = config.signature_policy()
        self.coverage = config.signature_coverage()
        self.trust = None
        if config.trust:
            from radguard.provenance.trust import TrustStore

            self.trust = TrustStore.from_paths(config.trust)
        self.key = None
        if config.watermark_key:
            from radguard.watermark import load_key

            self.key = load_key(config.watermark_key)
        self.detector = load_detector()
        self.models: dict[str, Any] = {}
        if config.triage:
            from radguard.triage.model import load_model

            self.models = {m.upper(): load_model(name) for m, name in config.triage.items()}
        self.monitor = None
        self.wants_features = bool(config.monitor_db)
        self.notices: Any = None
        if config.monitor_db and not checks_only:
            from radguard.monitoring import Dispatcher, Monitor

            notifiers = config.notifiers()
            if notifiers:  # episodes are mailed / posted by a thread of their own
                self.notices = Dispatcher(notifiers, audit_log=audit_log)
            self.monitor = Monitor(config.monitor_db, audit_log=audit_log,
                                   notify=self.notices)
        self.forwarders: list[Any] = []
        if checks_only:
            pass
        elif config.forward_dimse:
            self.forwarders.append(DimseForwarder(DimseTarget.parse(config.forward_dimse),
                                                  config.ae_title))
        if config.forward_stow and not checks_only:
            self.forwarders.append(StowForwarder(config.forward_stow))
        self.must_sign = {v.upper() for v in config.must_sign}
        # per-source calibration: the scores live in the store, so only the gateway process
        # keeps them (and tells its check processes which sources are calibrated: CheckPool)
        self.calibration_policy = config.calibration_policy()
        self.source_parts = config.source_parts()
        self.calibration: Any = None
        if store is not None and not checks_only:
            from radguard.forensics.calibration import SourceScores

            self.calibration = SourceScores(store, self.calibration_policy)
            _BOOKS[_book_key(config)] = self.calibration

    def layers(self) -> dict[str, str]:
        """Which layers are on, for the UI and the logs."""
        return {
            "signature": "trust store" if self.trust else "checked, no trust store configured",
            "watermark": "key configured" if self.key else "not configured",
            "forensics": (f"on, calibrated per source ({self.config.forensics_source}, 1 in "
                          f"{1 / self.calibration_policy.target:,.0f} false alarms)"),
            "triage": ", ".join(f"{m}: {model.card.name}" for m, model in self.models.items())
                      or "not configured",
            "monitoring": "on" if self.monitor else "not configured",
            "forwarding": ", ".join(type(f).__name__ for f in self.forwarders)
                          or "not configured (images stay in radguard)",
        }

    # -- one instance ---------------------------------------------------------------------------
    def route(self, instance: Instance) -> Routing:
        """Run every layer on a stored instance and decide where it goes."""
        assert self.store is not None, "a checks-only pipeline has no store"
        routing, observation = self.check(self.store.file(instance), instance)
        self.observe(instance, observation, routing)
        return routing

    def check(self, path: Path, instance: Instance, calibrated: frozenset[str] | None = None,
              ) -> tuple[Routing, Observation | None]:
        """Every stateless layer (signature, watermark, forensics, triage) on the file at
        ``path``, and what the drift monitor should observe (None if it wants nothing).
        Safe to run in another process: it touches no database. ``calibrated``: the sources
        calibrated to the target (None: unknown, so the detectors run on every vouched image
        of every source); in the gateway process it is read from the calibration itself."""
        from radguard.forensics.scan import judge, scan_file

        if calibrated is None and self.calibration is not None:
            calibrated = self.calibration.calibrated_sources()
        sample = self.config.forensics_sample_vouched

        def run_on_vouched(result: Any) -> bool:  # noqa: ANN401
            """A vouched image feeds its source's calibration: every one until the source
            is calibrated, then 1 in ``sample_vouched``."""
            return (calibrated is None or self.source_of(instance, result) not in calibrated
                    or int(instance.sha256[:8] or "0", 16) % sample == 0)

        scan = scan_file(path, trust=self.trust, watermark_key=self.key, detector=self.detector,
                         keep_pixels=bool(self.models or self.wants_features),
                         trust_signed_pixels=self.config.trust_signed_pixels,
                         policy=self.policy, coverage=self.coverage,
                         run_on_vouched=run_on_vouched)
        source = self.source_of(instance, scan)
        judge(scan, self.point(source))
        trust = _badge(scan.signature, scan.watermark, scan.pixels_vouched)
        r = Routing("done", scan.verdict, trust, source=source)
        r.details["layers"] = self.layers()
        self._route(instance, scan, r)
        observation = None
        if r.state != "rejected" and scan.pixels is not None:
            self._triage(instance, scan.pixels, r)
            if self.wants_features:
                observation = _observation(scan, r)
        r.scan = scan.portable()
        return r, observation

    def source_of(self, instance: Instance, scan: Any) -> str:  # noqa: ANN401
        """The instance's calibration source key ([forensics] source): its calling AE title
        (``stow:<user>`` for STOW-RS), then station and modality when configured."""
        values = {"calling_ae": instance.calling_ae or instance.source or "unknown",
                  "station": getattr(scan, "station", "") or "-",
                  "modality": (getattr(scan, "modality", "") or instance.modality or "-")}
        return "/".join(_key_part(values[p]) for p in self.source_parts)

    def point(self, source: str) -> Any:  # noqa: ANN401 (forensics.calibration.OperatingPoint)
        """The thresholds ``source``'s images are judged by: its calibration, or (where the
        gateway process has not judged yet: a check process) none; ``[forensics]
        uncalibrated = "global"``: the shipped thresholds for a source not calibrated."""
        from radguard.forensics.calibration import OperatingPoint

        if self.calibration is None:
            point = OperatingPoint(None, source=source, status="not calibrated",
                                   note="calibration pending")
        else:
            point = self.calibration.point(source)
        if point.status == "not calibrated" and self.config.forensics_uncalibrated == "global":
            return OperatingPoint.shipped(self.detector, source=source)
        return point

    def _route(self, instance: Instance, scan: Any, r: Routing) -> None:  # noqa: ANN401
        """The routing policy (module docstring) for a judged scan; sets ``r``'s verdict,
        reasons, state and scan details afresh."""
        from radguard.forensics.scan import NO_CALIBRATION

        codes = {f.code for f in scan.findings}
        r.verdict, r.reasons, r.state = scan.verdict, list(scan.reasons), "done"
        r.details["scan"] = {k: v for k, v in scan.to_dict().items()
                             if k not in ("path", "operating_point")}
        if scan.point is not None and scan.point.source is not None:
            r.details["calibration"] = {**r.details.get("calibration", {}),
                                        **scan.point.to_dict()}
        if "synthetic-data" in codes:
            r.state = "rejected"
            r.reasons.insert(0, "Synthetic Data = YES: synthetic images are refused into the "
                                "clinical store")
        elif scan.signature in ("invalid", "weak", "untrusted"):
            r.state = "quarantined"
            r.reasons.insert(0, f"signature {scan.signature}")
        elif not scan.pixels_vouched and (instance.calling_ae.upper() in self.must_sign
                                          or instance.modality.upper() in self.must_sign):
            r.state = "quarantined"
            who = instance.calling_ae or instance.modality
            if scan.signature == "valid":  # over part of the image, or added to since
                why = (f"signed, but the signature does not vouch for the image (not all that "
                       f"changes what it shows is covered); {who} must sign")
            else:  # no top-level signature (one in a sequence item covers that item only)
                why = f"unsigned, but {who} must sign"
            r.reasons.insert(0, why)
        elif scan.watermark == "changed":
            r.state = "quarantined"
            r.reasons.insert(0, "watermark no longer matches the pixels")
        elif scan.verdict in ("tampered", "synthetic"):
            r.state = "quarantined"
            r.reasons.insert(0, f"forensics: {scan.verdict}")
        elif scan.verdict == "unverifiable" and not scan.readable and scan.image:
            r.state = "quarantined"
            r.reasons.insert(0, "the image cannot be checked (unreadable pixel data)")
        elif scan.verdict == "unverifiable" and self.config.forensics_uncalibrated == \
                "quarantine" and any(x.startswith(NO_CALIBRATION) for x in scan.reasons):
            r.state = "quarantined"
            r.reasons.insert(0, f"{NO_CALIBRATION} (forensics.uncalibrated = quarantine)")

    def rejudge(self, instance: Instance, r: Routing) -> None:
        """In the gateway process: judge a checked instance against its source's
        calibration as it is now (a check process could not read it) and route it again."""
        from radguard.forensics.scan import judge

        scan = r.scan
        if scan is None or self.calibration is None or r.state == "rejected":
            return
        judge(scan, self.point(r.source))
        self._route(instance, scan, r)

    def _calibrate(self, instance: Instance, r: Routing) -> None:
        """In the gateway process: judge the instance (:meth:`rejudge`), then, if it is a
        vouched, authentic instance that goes through, its scores join its source's
        calibration - held for review instead when they raise an alarm at the thresholds of
        a source calibrated to the target (one odd image must not blind a detector:
        :mod:`radguard.forensics.calibration`)."""
        from radguard.forensics.calibration import known_real_scores

        self.rejudge(instance, r)
        scan = r.scan
        if scan is None or self.calibration is None or r.state != "done" or \
                r.verdict != "authentic":
            return
        scores, origin = known_real_scores(scan)
        if not scores:
            return
        point = self.point(r.source)
        # only at a source calibrated to the target: there 1 in 1 / rate real images is held
        # (a person's review restores the tail); before, the threshold is the highest score
        # so far and holding would hold every new maximum
        alarms = point.alarms(scores) if point.status == "calibrated" else []
        added = self.calibration.record(r.source, scores, item=instance.sha256,
                                        origin=str(origin), held=bool(alarms))
        r.details["calibration"] = {**r.details.get("calibration", {}),
                                    "recorded": bool(added), "as": origin,
                                    "scores": {k: round(v, 4) for k, v in scores.items()}}
        if alarms:
            r.details["calibration"]["held"] = (
                f"held for review, not counted: the {' and '.join(alarms)} score of this "
                f"vouched image raises an alarm at its source's thresholds (radguard "
                f"forensics held)")
            log.warning("calibration: %s from source %r held for review (%s alarm on a "
                        "vouched image)", instance.sop_uid, r.source, ", ".join(alarms))

    def _triage(self, instance: Instance, pixels: Any, r: Routing) -> None:  # noqa: ANN401
        model = self.models.get(instance.modality.upper())
        if model is None:
            r.details["triage"] = "not configured for this modality"
            return
        try:
            prediction = model.predict(pixels, modality=instance.modality)
        except RadguardError as exc:
            r.details["triage"] = f"not scored: {exc}"
            return
        r.ai_probability, r.ai_suspicion = prediction.probability, prediction.suspicion
        r.details["triage"] = prediction.to_dict()

    def observe(self, instance: Instance, observation: Observation | None, r: Routing) -> None:
        """What the gateway process learns of a checked instance (it owns the databases):
        per-source calibration (which may change the verdict and the routing, see
        :meth:`_calibrate`), then the drift monitor."""
        self._calibrate(instance, r)
        if self.monitor is None or observation is None:
            return
        triage = r.details.get("triage")
        version = (f"{triage.get('model')} {triage.get('version')}"
                   if isinstance(triage, dict) and triage.get("version") else None)
        try:
            alarms = self.monitor.observe(instance.sop_uid, observation.features,
                                          score=r.ai_probability,
                                          site=instance.calling_ae or "default",
                                          metadata=observation.metadata,
                                          model_version=version)
        except RadguardError as exc:
            r.details["monitoring"] = f"not updated: {exc}"
            return
        r.details["monitoring"] = [a.to_dict() for a in alarms]

    def forward(self, instance: Instance) -> str | None:
        """Send to every configured PACS; None when none is configured."""
        if not self.forwarders:
            return None
        sent = [f.send(self.store.file(instance)) for f in self.forwarders]
        return ",".join(sent)

    def results(self, instance: Instance, r: Routing) -> Any:  # noqa: ANN401
        """The AI result set (SR + SC + SEG, triage.results.ResultSet) of a scored image
        that goes through, built in memory from the triage result recorded in ``r``; None
        when ``[results] write`` is off or the image was not scored. A RadguardError when
        it cannot be built: then nothing of it is stored. The UIDs derive from the image's
        bytes and the model, so a set built again (a retry) has the same ones."""
        from radguard.images import read_pixels
        from radguard.triage.model import Prediction
        from radguard.triage.results import build_results

        triage = r.details.get("triage")
        model = self.models.get(instance.modality.upper())
        if not self.config.results_write or model is None or not isinstance(triage, dict) \
                or r.state != "done":
            return None
        if (triage.get("model"), triage.get("version")) != (model.card.name, model.card.version):
            raise RadguardError(f"scored by {triage.get('model')} {triage.get('version')}, "
                                f"not the loaded {model.card.name} {model.card.version}")
        assert self.store is not None, "a checks-only pipeline has no store"
        prediction = Prediction(instance.sop_uid, float(triage["score"]),
                                float(triage["probability"]), int(triage["suspicion"]),
                                bool(triage["positive"]), model.card.name, model.card.version)
        image = read_pixels(self.store.file(instance))
        return build_results(model, prediction, image.pixels, image.dataset,
                             uid_seed=f"{instance.sha256}/{model.card.name}/"
                                      f"{model.card.version}")

    def store_results(self, instance: Instance, r: Routing) -> list[int]:
        """Build the result set of an image routed ``done`` (:meth:`results`) and store it
        as new instances of its study; the rows, queued for delivery (forwarded unchecked:
        ``Gateway._deliver_result``). What happened goes into ``r.details["results"]``.

        All or nothing: a set that cannot be built, or whose objects the store's own
        header check refuses, stores nothing and costs the image nothing (it goes on, with
        the reason). A storage error while storing raises (the image goes back to the queue;
        the set built again has the same UIDs, and what was stored already stands)."""
        from radguard.dicom.limits import decode_scope
        from radguard.gateway.dimse import header_of

        try:
            with decode_scope():
                results = self.results(instance, r)
            if results is None:
                return []
            headers = {kind: header_of(data, f"radguard {kind}")
                       for kind, data in results.encoded.items()}
        except Exception as exc:  # noqa: BLE001 - results never cost the image its routing
            if not isinstance(exc, RadguardError):
                log.exception("building the AI results of %s failed", instance.sop_uid)
            log.warning("no AI results for %s: %s", instance.sop_uid, exc)
            r.details["results"] = f"not written: {exc}"[:500]
            return []
        assert self.store is not None, "a checks-only pipeline has no store"
        from radguard.gateway.store import ReserveError

        rows: list[int] = []
        try:
            for kind, header in headers.items():
                rows.append(self.store.ingest(results.encoded[kind], header,
                                              source=RESULTS_SOURCE,
                                              calling_ae=self.config.ae_title))
        except ReserveError as exc:
            # below the free-space reserve (the workers' room): the image goes on without
            # its results rather than waiting; what this set stored is withdrawn
            self._withdraw(rows, "the rest of its result set was not stored (free-space "
                                 "reserve)")
            r.details["results"] = f"not written: {exc}"[:500]
            return []
        r.details["results"] = {**{kind: header["sop_uid"] for kind, header in headers.items()},
                                "notes": results.notes}
        return rows

    def _withdraw(self, rows: list[int], why: str) -> None:
        """Reject result rows not delivered yet (one claimed meanwhile is delivered)."""
        assert self.store is not None
        with self.store.transaction():
            for row in rows:
                self.store.execute("UPDATE instances SET state='rejected', decision_note=? "
                                   "WHERE id=? AND state='queued' AND source=?",
                                   (why, row, RESULTS_SOURCE))

    def close(self) -> None:
        """Release PACS associations; send the notices still queued (a few seconds at
        most)."""
        for f in self.forwarders:
            f.close()
        if self.notices is not None:
            self.notices.flush(5.0)
            self.notices.close()


def _observation(scan: Any, r: Routing) -> Observation | None:  # noqa: ANN401
    """The monitor's view of a scanned DICOM instance, from the pixels the scan decoded."""
    from radguard.monitoring.features import dataset_features, metadata_features

    if scan.dataset is None:
        r.details["monitoring"] = "not updated: not a DICOM image"
        return None
    try:
        return Observation(dataset_features(scan.dataset, scan.stored),
                           metadata_features(scan.dataset))
    except (ValueError, RadguardError) as exc:
        r.details["monitoring"] = f"not updated: {exc}"
        return None


def _badge(signature: str, watermark: str, pixels_vouched: bool) -> str:
    if signature in ("invalid", "weak", "untrusted"):
        return f"signature {signature}"
    if watermark == "changed":
        return "watermark changed"
    if signature == "valid":
        # "signed" only when the signatures vouch for the image, not part of it
        return "signed" if pixels_vouched else "pixels unsigned"
    if watermark == "intact":
        return "watermarked"
    return "unsigned"


# -- checks in separate processes ----------------------------------------------------------

def _serve_checks(conn: Any, config: GatewayConfig, parent: int) -> None:  # noqa: ANN401
    """A check process: load the stateless layers once, then answer (path, instance) requests
    on ``conn`` until it closes or sends None."""
    import torch

    # a check process is of no use without its gateway; when the gateway dies (kill -9, the
    # OOM killer) while this process is busy, nothing would tell it before its next read
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True,
                     name="radguard-parent-watch").start()
    torch.set_num_threads(1)  # one core per check process; parallelism comes from processes
    from radguard.dicom.limits import set_decode_limits

    # the checks refuse the same oversized images as the door, before decoding them
    set_decode_limits(config.decode_limits())
    try:
        checker = Pipeline(config, None, checks_only=True)
    except Exception as exc:  # noqa: BLE001 - reported to the gateway, which refuses to start
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            reply: tuple[str, Any] = ("ok", checker.check(Path(request[0]), request[1],
                                                          request[2]))
        except Exception as exc:  # noqa: BLE001 - the gateway decides what a failure means
            reply = ("error", exc)
        try:
            conn.send(reply)
        except Exception as exc:  # noqa: BLE001 - e.g. an exception that does not pickle
            conn.send(("error", RadguardError(f"{type(exc).__name__}: {exc}")))


def _exit_with_parent(parent: int, every: float = 0.5) -> None:
    """Exit this process as soon as ``parent`` is no longer its parent."""
    import os
    import time

    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


class _CheckProcess:
    """One spawned check process and the gateway's end of its pipe."""

    def __init__(self, config: GatewayConfig) -> None:
        import multiprocessing
        import os

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_checks, args=(child, config, os.getpid()),
                                   name="radguard-check", daemon=True)
        self.process.start()
        child.close()  # the child's end lives in the child only: its death is an EOF here

    def wait_ready(self, timeout: float = 300) -> None:
        """Block until the layers are loaded; a RadguardError if they cannot be."""
        try:
            if not self.conn.poll(timeout):
                raise RadguardError(f"a check process did not start within {timeout:.0f} s")
            kind, detail = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.stop()
            raise RadguardError("a check process died while loading the layers") from exc
        if kind != "ready":
            self.stop()
            raise RadguardError(f"a check process cannot load the layers: {detail}")

    def stop(self, timeout: float = 30) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


class CheckPool:
    """``check_processes`` spawned processes, each with its own copy of the stateless
    layers (models loaded once per process), so checks run on other cores than receiving
    and do not share its interpreter lock. A worker thread takes an idle process, sends it
    one request over its own pipe and waits for the answer (no broker thread in between:
    ``concurrent.futures``' process pool cost the gateway 0.3 ms of CPU per instance in its
    queue and manager threads). A process that dies (a poison image, out of memory) costs
    only the instance it was checking: it is replaced."""

    def __init__(self, config: GatewayConfig) -> None:
        import queue

        self.config = config
        self._idle: queue.Queue[_CheckProcess] = queue.Queue()
        self._all: list[_CheckProcess] = []
        self._lock = threading.Lock()
        try:
            for _ in range(config.check_process_count):
                self._all.append(_CheckProcess(config))
            for proc in self._all:
                proc.wait_ready()  # models loaded before the first image arrives
        except BaseException:
            self.close()
            raise
        for proc in self._all:
            self._idle.put(proc)

    @property
    def pids(self) -> list[int]:
        """The check processes' ids (for logs and tests)."""
        with self._lock:
            return [p.process.pid for p in self._all if p.process.pid is not None]

    def check(self, path: Path, instance: Instance) -> tuple[Routing, Observation | None]:
        """Check one instance in an idle process, with the sources the gateway knows to be
        calibrated (the gateway process judges against them afterwards:
        :meth:`Pipeline.observe`)."""
        book = _BOOKS.get(_book_key(self.config))
        calibrated = book.calibrated_sources() if book is not None else None
        proc = self._idle.get()
        try:
            proc.conn.send((str(path), instance, calibrated))
            kind, value = proc.conn.recv()
        except (EOFError, OSError) as exc:
            proc = self._replace(proc)
            raise RadguardError("the check process died while checking this instance") \
                from exc
        finally:
            self._idle.put(proc)
        if kind == "error":
            raise value
        return value

    def _replace(self, dead: _CheckProcess) -> _CheckProcess:
        """A fresh process in the dead one's place (the dead one again if none starts: the
        next check through it fails the same way and tries once more)."""
        dead.stop(timeout=1)
        try:
            fresh = _CheckProcess(self.config)
            fresh.wait_ready()
        except RadguardError as exc:
            log.error("cannot restart a check process: %s", exc)
            return dead
        with self._lock:
            self._all[self._all.index(dead)] = fresh
        return fresh

    def close(self) -> None:
        with self._lock:
            procs = list(self._all)
        for proc in procs:
            proc.stop()
