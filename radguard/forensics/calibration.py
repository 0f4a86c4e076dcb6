"""Per-source calibration of the content detectors, anchored on provenance.

A content detector's scores on real images move with the device, its vendor processing and
the body parts it images: one global threshold flags some hospitals' ordinary radiographs
by the hundred. But every image whose signature vouches for its pixels, or whose radguard
watermark is intact, is provably its device's own: its detector scores are **known-real**
evidence about its source (a calling AE title, optionally with station and modality). Per
source and detector, radguard keeps those scores and sets the threshold by split-conformal
calibration, so an unsigned image from that source is judged against its own source.

**The guarantee, and what it needs.** With ``n`` known-real scores and rate ``a``, the
threshold is the ``ceil((n + 1)(1 - a))``-th smallest score; a new real image whose score is
exchangeable with them (same source, same processing, no drift) exceeds it with probability
at most ``a`` - distribution-free, averaged over calibration sets (a single set can land
above or below; ``benchmarks/bench_calibration.py`` measures the spread). That quantile
exists only when ``n >= 1/a - 1``. The false-alarm budget of a source (``target``, default
1 in 1,000: the share of its real images the scored detectors may flag) is split evenly
between the :data:`DETECTORS` (a union bound; copy-move has no score and is outside the
budget: it found no copy in any of 1,101 untouched real radiographs of the benchmark), so
each detector needs ``2/target - 1`` known-real scores: 1,999 at 1 in 1,000, 199 at 1 in
100. No tail fit extrapolates beyond the data: below that count a detector is

* **provisional** while ``n >= 2/provisional - 1`` (default ``provisional`` 1 in 100: 199
  scores): its threshold is the highest known-real score, which guarantees the best rate
  ``n`` allows (1 in ``n + 1`` per detector); an alarm is only ``suspicious``, never an
  accusation;
* **not calibrated** below that: its scores are reported, not judged, and an unsigned
  image it alone could judge is ``unverifiable`` - "no provenance and no calibration for
  this source". A source is not accused on statistics it has not earned.

Only a detector calibrated to the target gives strong evidence (``synthetic``, ``tampered``
with its region).

**Who can move a threshold.** Unsigned images never feed a calibration, nor do images whose
verdict is not ``authentic``. But the threshold of a calibrated detector is one of the top
known-real scores (at 1 in 1,000 with 1,999 scores, the highest), so one odd vouched image -
a phantom, a QC image, a forgery signed with a stolen device key - could raise it to the
top of the scale and blind the detector for that source. Once a source is calibrated to
the target, a vouched image whose score raises an alarm at its thresholds (1 in 1 / rate of
its real images) is therefore **held**: recorded, not counted, until a person accepts it
(``radguard forensics held``). Holding only ever makes a threshold lower (more alarms),
never higher; left unreviewed, held images would slowly lower it, so review them. Before a
source is calibrated its threshold is the highest score so far, and holding would hold
every new maximum: an odd image in those first ones stays in its window until it slides
out - ``radguard forensics status`` shows each source's highest known-real scores.

Scores live in a table (:data:`SCHEMA`) in the gateway's database (SQLite or PostgreSQL,
migration 4 of :mod:`radguard.gateway.store`) or in a standalone SQLite file
(:class:`CalibrationFile`, for ``radguard forensics calibrate`` and ``radguard scan
--source``); :class:`SourceScores` reads and writes either through the same two methods.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from radguard.errors import RadguardError

if TYPE_CHECKING:
    from radguard.forensics.scan import ScanResult
    from radguard.forensics.synthetic import SyntheticDetector

__all__ = [
    "DETECTORS",
    "HELD",
    "SCHEMA",
    "CalibrationError",
    "CalibrationFile",
    "CalibrationPolicy",
    "KnownRealRun",
    "OperatingPoint",
    "SourceScores",
    "Threshold",
    "conformal_threshold",
    "known_real_scores",
    "needed",
    "not_known_real",
    "operating_point",
    "record_known_real",
]

#: the origin prefix of scores held for review (recorded, not counted)
HELD = "held:"
_HELD_LIKE = HELD + "%"  # a parameter: a literal % would be a placeholder to psycopg

#: the calibrated content detectors: the synthetic-image score and the learned local-edit
#: (fill / splice) score. Copy-move has no score to calibrate; its finding counts as strong
#: evidence only where the detectors are calibrated to the target (or at the global point).
DETECTORS = ("synthetic", "local_edit")

#: the score table (``{id}``, ``{float}``: the backend's key and double-precision types)
SCHEMA = """
CREATE TABLE calibration_scores (
    id {id},
    source TEXT NOT NULL, detector TEXT NOT NULL, score {float} NOT NULL,
    item TEXT NOT NULL, origin TEXT NOT NULL, recorded_at TEXT NOT NULL
);
CREATE UNIQUE INDEX calibration_scores_item ON calibration_scores(source, detector, item);
CREATE INDEX calibration_scores_recent ON calibration_scores(source, detector, id)
"""


class CalibrationError(RadguardError):
    """A calibration setting or store is unusable."""


def needed(rate: float) -> int:
    """Known-real scores split-conformal calibration needs for ``rate``: n >= 1/rate - 1."""
    if not 0 < rate < 1:
        raise CalibrationError(f"false-alarm rate {rate!r}: a number between 0 and 1")
    return max(1, math.ceil(1.0 / rate - 1.0 - 1e-9))


def conformal_threshold(scores: Sequence[float] | np.ndarray, rate: float) -> float | None:
    """The split-conformal limit for ``rate``: a new score exchangeable with ``scores``
    exceeds it (strictly) with probability at most ``rate``. None when ``scores`` are too
    few for that rate (:func:`needed`)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = int(s.size)
    if n < needed(rate):
        return None
    k = math.ceil((n + 1) * (1.0 - rate) - 1e-9)  # rank of the quantile, 1-based
    return float(s[min(max(k, 1), n) - 1])


@dataclass(frozen=True)
class CalibrationPolicy:
    """How sources are calibrated (``[forensics]`` in the gateway configuration)."""

    target: float = 0.001  # a source's false-alarm budget, all detectors together
    provisional: float = 0.01  # the loosest budget at which a detector judges at all
    window: int = 10_000  # the most recent known-real scores per source and detector

    def __post_init__(self) -> None:
        needed(self.target)
        needed(self.provisional)
        if self.provisional < self.target:
            raise CalibrationError(f"provisional rate {self.provisional} must not be below "
                                   f"the target {self.target}")
        if not isinstance(self.window, int) or self.window < needed(self.target / len(DETECTORS)):
            raise CalibrationError(f"window {self.window!r}: at least the "
                                   f"{needed(self.target / len(DETECTORS))} scores the target "
                                   "needs")

    @property
    def per_detector(self) -> float:
        """Each detector's share of the target budget (union bound)."""
        return self.target / len(DETECTORS)

    @property
    def full(self) -> int:
        """Known-real scores a detector needs to be calibrated to the target."""
        return needed(self.per_detector)

    @property
    def first(self) -> int:
        """Known-real scores a detector needs to judge at all (provisionally)."""
        return needed(self.provisional / len(DETECTORS))


@dataclass(frozen=True)
class Threshold:
    """One detector's operating threshold."""

    value: float
    strong: bool  # an alarm is strong, calibrated evidence (synthetic / tampered)
    strict: bool = False  # alarm when the score is above ``value`` (conformal) or at it
    rate: float | None = None  # the false-alarm rate it guarantees (None: measured only)
    n: int = 0  # known-real scores it rests on (0: the shipped global point)

    def fires(self, score: float) -> bool:
        """Whether ``score`` raises this detector's alarm (a score that is not a number
        does: it cannot be shown to be below the limit)."""
        return not score <= self.value if self.strict else not score < self.value

    def describe(self) -> str:
        """The comparison, in words, for a reason line."""
        if not self.n:
            return f">= threshold {self.value:.2f}"
        return (f"> {self.value:.3f}, this source's limit from {self.n} known-real images "
                f"(at most 1 in {_one_in(self.rate)} real images exceed it)")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"threshold": round(self.value, 6), "above_only": self.strict,
                "strong": self.strong, "rate": self.rate, "known_real": self.n}


def _one_in(rate: float | None) -> str:
    return f"{1 / rate:,.0f}" if rate else "?"


@dataclass(frozen=True)
class OperatingPoint:
    """The thresholds an image is judged against: the shipped global point, or its
    source's calibration. A detector without a threshold is not judged."""

    synthetic: Threshold | None
    local_edit: Threshold | None = None  # None at the global point: the result's own
    synthetic_band: float | None = None  # 'suspicious' from here (global point only)
    source: str | None = None  # None: not a per-source point
    status: str = "global"  # global / calibrated / provisional / not calibrated
    counts: dict[str, int] = field(default_factory=dict)  # known-real scores per detector
    note: str = ""  # why the point is what it is, for the reasons

    @property
    def is_global(self) -> bool:
        return self.status == "global"

    @property
    def strong(self) -> bool:
        """Findings without a score (copy-move) accuse only at a strong point."""
        return self.status in ("global", "calibrated")

    @classmethod
    def shipped(cls, detector: SyntheticDetector, *, source: str | None = None,
                note: str = "") -> OperatingPoint:
        """The detectors' shipped thresholds (what ``radguard scan`` uses without
        ``--source``)."""
        return cls(Threshold(detector.threshold, strong=True), None,
                   detector.suspicious_threshold, source, "global", {}, note)

    def alarms(self, scores: Mapping[str, float]) -> list[str]:
        """The detectors whose score in ``scores`` raises an alarm at this point."""
        limits = {"synthetic": self.synthetic, "local_edit": self.local_edit}
        return [d for d, v in scores.items() if limits.get(d) is not None
                and limits[d].fires(v)]  # type: ignore[union-attr]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "source": self.source, "status": self.status, "known_real": dict(self.counts),
            "synthetic": self.synthetic.to_dict() if self.synthetic else None,
            "local_edit": self.local_edit.to_dict() if self.local_edit else None,
            "note": self.note,
        }


def operating_point(source: str, scores: Mapping[str, Sequence[float] | np.ndarray],
                    policy: CalibrationPolicy | None = None) -> OperatingPoint:
    """A source's thresholds from its known-real ``scores`` per detector (module docstring:
    calibrated, provisional or not calibrated, detector by detector)."""
    policy = policy or CalibrationPolicy()
    thresholds: dict[str, Threshold | None] = {}
    counts = {d: int(np.asarray(scores.get(d, ())).size) for d in DETECTORS}
    for d in DETECTORS:
        values = np.asarray(scores.get(d, ()), dtype=np.float64)
        values = values[np.isfinite(values)][-policy.window:]
        n = int(values.size)
        full = conformal_threshold(values, policy.per_detector)
        if full is not None:
            thresholds[d] = Threshold(full, True, True, policy.per_detector, n)
        elif n >= policy.first:  # the highest known-real score: 1 in n + 1
            thresholds[d] = Threshold(float(values.max()), False, True, 1.0 / (n + 1), n)
        else:
            thresholds[d] = None
    present = [d for d in DETECTORS if counts[d]]
    if present and all(t is not None and t.strong for t in (thresholds[d] for d in present)):
        status, note = "calibrated", ""
    elif any(thresholds[d] is not None for d in present):
        status = "provisional"
        note = (f"source {source} is calibrated provisionally: the alarms of a detector not "
                f"calibrated to the target are suspicious only until {policy.full} known-real "
                f"images per detector reach 1 in {_one_in(policy.target)} (it has "
                f"{_counts(counts)})")
    else:
        status = "not calibrated"
        note = (f"source {source}: {_counts(counts)} known-real images, {policy.first} "
                f"needed before its content can be judged")
    return OperatingPoint(thresholds["synthetic"], thresholds["local_edit"], None, source,
                          status, counts, note)


def _counts(counts: Mapping[str, int]) -> str:
    if len(set(counts.values())) == 1:
        return str(next(iter(counts.values())))
    return ", ".join(f"{d} {n}" for d, n in counts.items())


def known_real_scores(result: ScanResult) -> tuple[dict[str, float], str | None]:
    """The detector scores a scan contributes to its source's calibration, and why it is
    known-real (``signature`` / ``watermark``): only images whose signature vouches for
    them or whose watermark is intact, not declared synthetic, with scores of the device's
    own pixels (the restored original of a watermarked image)."""
    if any(f.code == "synthetic-data" for f in result.findings):
        return {}, None
    if result.marked and not result.restored:  # watermarked pixels, not the device's
        return {}, None
    origin = ("signature" if result.pixels_vouched
              else "watermark" if result.watermark == "intact" else None)
    if origin is None:
        return {}, None
    scores: dict[str, float] = {}
    if result.synthetic_score is not None:
        scores["synthetic"] = float(result.synthetic_score)
    if result.tamper is not None and result.tamper.local_edit_score is not None:
        scores["local_edit"] = float(result.tamper.local_edit_score)
    return scores, origin


# -- persistence ---------------------------------------------------------------------------

class ScoreStore(Protocol):
    """What :class:`SourceScores` needs of a database: the gateway's
    :class:`~radguard.gateway.store.Store` and :class:`CalibrationFile` both have it."""

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """One statement with ``?`` placeholders."""

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        """One write transaction."""


class CalibrationFile:
    """A standalone calibration store: one SQLite file holding :data:`SCHEMA`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise CalibrationError(f"{self.path}: a folder; give a calibration file, or a "
                                   "gateway's data folder holding radguard.db")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            tables = {r[0] for r in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        except (OSError, sqlite3.Error) as exc:
            raise CalibrationError(f"{self.path}: not a usable calibration file ({exc})") \
                from exc
        self._lock = threading.RLock()
        if "calibration_scores" not in tables:
            if tables:
                raise CalibrationError(f"{self.path}: a database, but not a calibration file")
            with self.transaction():
                for statement in filter(str.strip, SCHEMA.format(
                        id="INTEGER PRIMARY KEY AUTOINCREMENT", float="REAL").split(";")):
                    self.execute(statement)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """One statement."""
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise CalibrationError(f"{self.path}: database error ({exc})") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction."""
        with self._lock:
            self.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(CalibrationError):
                    self.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close the file."""
        self._db.close()


class SourceScores:
    """Known-real scores per source and detector in a :class:`ScoreStore`, with the
    operating point of each source kept in memory (reloaded after ``ttl`` seconds, so
    gateways sharing one database see each other's scores; at once after this process
    recorded some). Thread-safe."""

    def __init__(self, store: ScoreStore, policy: CalibrationPolicy | None = None, *,
                 ttl: float = 60.0) -> None:
        self.store, self.policy, self.ttl = store, policy or CalibrationPolicy(), ttl
        self._points: dict[str, tuple[float, OperatingPoint]] = {}
        self._calibrated: tuple[float, frozenset[str]] | None = None
        self._added: dict[str, int] = {}  # rows recorded since the last prune, per source
        self._lock = threading.Lock()

    def record(self, source: str, scores: Mapping[str, float], *, item: str,
               origin: str, held: bool = False) -> int:
        """Add one known-real image's scores (``item``: its content hash, so the same image
        never counts twice); returns how many were new. ``held``: kept for review, not
        counted until :meth:`accept` (module docstring: who can move a threshold)."""
        origin = f"{HELD}{origin}" if held else origin
        rows = [(source, d, float(s), item, origin) for d, s in scores.items()
                if d in DETECTORS and math.isfinite(s)]
        if not rows:
            return 0
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        added = 0
        with self.store.transaction():
            for row in rows:
                added += max(0, self.store.execute(
                    "INSERT INTO calibration_scores (source, detector, score, item, origin, "
                    "recorded_at) VALUES (?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                    (*row, now)).rowcount)
        if added:
            with self._lock:
                self._points.pop(source, None)
                self._added[source] = self._added.get(source, 0) + added
                due = self._added[source] >= max(100, self.policy.window // 4)
                if due:
                    self._added[source] = 0
            if not held:
                self._note_calibrated(source)
            if due:  # the table stays bounded: scores beyond the window no longer count
                self.prune(source)
        return added

    def _note_calibrated(self, source: str) -> None:
        """Add ``source`` to the cached calibrated set once it has the scores (counting its
        own rows only, by index: no scan of the whole table per recorded image)."""
        with self._lock:
            cached = self._calibrated
        if cached is None or source in cached[1]:
            return
        counts = {str(d): int(n) for d, n in self.store.execute(
            "SELECT detector, COUNT(*) FROM calibration_scores WHERE source=? AND "
            "origin NOT LIKE ? GROUP BY detector", (source, _HELD_LIKE)).fetchall()}
        if all(counts.get(d, 0) >= self.policy.full for d in DETECTORS):
            with self._lock:
                if self._calibrated is cached:
                    self._calibrated = (cached[0], cached[1] | {source})

    def scores(self, source: str) -> dict[str, np.ndarray]:
        """The most recent ``window`` known-real scores of ``source``, per detector, oldest
        first."""
        out = {}
        for d in DETECTORS:
            rows = self.store.execute(
                "SELECT score FROM calibration_scores WHERE source=? AND detector=? AND "
                "origin NOT LIKE ? ORDER BY id DESC LIMIT ?",
                (source, d, _HELD_LIKE, self.policy.window)).fetchall()
            out[d] = np.asarray([r[0] for r in reversed(rows)], dtype=np.float64)
        return out

    def point(self, source: str) -> OperatingPoint:
        """``source``'s operating point (cached)."""
        now = time.monotonic()
        with self._lock:
            cached = self._points.get(source)
            if cached is not None and now - cached[0] < self.ttl:
                return cached[1]
        point = operating_point(source, self.scores(source), self.policy)
        with self._lock:
            self._points[source] = (now, point)
        return point

    def counts(self) -> dict[str, dict[str, int]]:
        """Known-real scores held per source and detector (capped at ``window``)."""
        out: dict[str, dict[str, int]] = {}
        for source, detector, n in self.store.execute(
                "SELECT source, detector, COUNT(*) FROM calibration_scores "
                "WHERE origin NOT LIKE ? GROUP BY source, detector", (_HELD_LIKE,)).fetchall():
            out.setdefault(str(source), {})[str(detector)] = min(int(n), self.policy.window)
        return out

    def calibrated_sources(self) -> frozenset[str]:
        """Sources every detector of which is calibrated to the target (cached): their
        vouched images need the content detectors only on a sample."""
        now = time.monotonic()
        with self._lock:
            if self._calibrated is not None and now - self._calibrated[0] < self.ttl:
                return self._calibrated[1]
        done = frozenset(s for s, counts in self.counts().items()
                         if all(counts.get(d, 0) >= self.policy.full for d in DETECTORS))
        with self._lock:
            self._calibrated = (now, done)
        return done

    def prune(self, source: str) -> int:
        """Drop scores of ``source`` older than the ``window`` most recent per detector
        (they no longer count); returns how many went."""
        gone = 0
        with self.store.transaction():
            for d in DETECTORS:
                row = self.store.execute(
                    "SELECT id FROM calibration_scores WHERE source=? AND detector=? AND "
                    "origin NOT LIKE ? ORDER BY id DESC LIMIT 1 OFFSET ?",
                    (source, d, _HELD_LIKE, self.policy.window)).fetchone()
                if row is not None:
                    gone += max(0, self.store.execute(
                        "DELETE FROM calibration_scores WHERE source=? AND detector=? "
                        "AND origin NOT LIKE ? AND id<=?", (source, d, _HELD_LIKE, row[0])
                ).rowcount)
        return gone

    def held(self, source: str | None = None) -> list[dict[str, Any]]:
        """Known-real images held for review (their scores raised an alarm at their
        source's thresholds when they came), one entry per image, oldest first."""
        sql = ("SELECT source, item, detector, score, origin, recorded_at FROM "
               "calibration_scores WHERE origin LIKE ?")
        rows = self.store.execute(sql + (" AND source=?" if source else "") + " ORDER BY id",
                                  (_HELD_LIKE, source) if source else (_HELD_LIKE,)
                                  ).fetchall()
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for src, item, detector, score, origin, at in rows:
            entry = out.setdefault((str(src), str(item)), {
                "source": str(src), "item": str(item), "origin": str(origin)[len(HELD):],
                "recorded_at": str(at), "scores": {}})
            entry["scores"][str(detector)] = float(score)
        return list(out.values())

    def accept(self, source: str, item: str) -> int:
        """Count a held image's scores after all (a person checked it is real and
        typical of its source); returns how many scores now count."""
        with self.store.transaction():
            n = self.store.execute(
                "UPDATE calibration_scores SET origin=substr(origin, ?) WHERE source=? AND "
                "item=? AND origin LIKE ?", (len(HELD) + 1, source, item, _HELD_LIKE)).rowcount
        self._forget(source)
        return max(0, n)

    def discard(self, source: str, item: str) -> int:
        """Drop a held image's scores for good; returns how many went."""
        with self.store.transaction():
            n = self.store.execute(
                "DELETE FROM calibration_scores WHERE source=? AND item=? AND "
                "origin LIKE ?", (source, item, _HELD_LIKE)).rowcount
        return max(0, n)

    def _forget(self, source: str) -> None:
        with self._lock:
            self._points.pop(source, None)
            self._calibrated = None


@dataclass
class KnownRealRun:
    """What :func:`record_known_real` did: images added, already known (same content), and
    the files skipped (``path: reason``)."""

    added: int = 0
    known: int = 0
    skipped: list[str] = field(default_factory=list)


def not_known_real(result: Any) -> str:
    """Why a file given as known-real is not taken as such ('' when it is): what the
    gateway would not record either."""
    if any(f.code == "synthetic-data" for f in result.findings):
        return "declared synthetic (Synthetic Data = YES)"
    if result.signature == "invalid":
        return "its signature no longer matches: not the signed original"
    if result.watermark == "changed":
        return "its watermark shows changed blocks: not the original"
    if result.marked and not result.restored:
        return ("it carries radguard's watermark and was not restored (give "
                "--watermark-key): its pixels are not the device's")
    return ""


def _unscored(result: Any) -> str:
    """Why no detector scored a file: the first reason that says so."""
    for reason in result.reasons:
        if "not applied" in reason or "cannot" in reason or "too small" in reason:
            return reason
    return result.reasons[0] if result.reasons else "no detector could score it"


def record_known_real(scores: SourceScores, source: str,
                      files: Sequence[str | os.PathLike[str]], *,
                      watermark_key: Any = None, detector: Any = None,
                      on_file: Any = None) -> KnownRealRun:
    """Score ``files`` (known-real images of ``source``, as it normally sends them) with the
    content detectors and record them in ``scores`` (origin ``offline``), each image once
    by its content hash; files declared synthetic, altered, still watermarked or that no
    detector scores are skipped with the reason. ``on_file`` is called after each file."""
    import hashlib

    from radguard.forensics.scan import scan_file
    from radguard.forensics.synthetic import load_detector

    detector = detector if detector is not None else load_detector()
    run = KnownRealRun()
    for f in files:
        result = scan_file(f, watermark_key=watermark_key, detector=detector)
        found = {"synthetic": result.synthetic_score,
                 "local_edit": result.tamper.local_edit_score if result.tamper else None}
        values = {k: float(v) for k, v in found.items() if v is not None}
        refused = not_known_real(result)
        if refused or not values:
            run.skipped.append(f"{f}: {refused or _unscored(result)}")
        else:
            item = hashlib.sha256(Path(f).read_bytes()).hexdigest()
            new = scores.record(source, values, item=item, origin="offline")
            run.added += bool(new)
            run.known += not new
        if on_file is not None:
            on_file(f)
    return run
