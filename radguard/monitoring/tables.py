"""CSV tables for the monitor: a reference (features, optional score and label), a stream of
studies, and late labels, each read and fed to a :class:`~radguard.monitoring.Monitor` the
way ``radguard monitor init|ingest|labels`` do. Metadata columns (manufacturer, model,
protocol...) are categories even where they look numeric (KVP "120")."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radguard.errors import RadguardError
from radguard.monitoring.features import METADATA_FIELDS
from radguard.monitoring.monitor import Alarm, Monitor, MonitorError

__all__ = ["LabelRows", "LabelsResult", "ReferenceTable", "apply_labels", "fit_reference_table",
           "ingest_table", "read_labels", "read_reference", "read_table", "split_columns"]

#: Columns that are never features: what names a study, its score, label and site.
RESERVED = ("id", "score", "label", "site")


def read_table(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a UTF-8 CSV, with one-line errors for bad files."""
    from radguard.evaluation.report import read_csv_rows

    return read_csv_rows(path)


def split_columns(fields: list[str], rows: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(numeric feature columns, categorical columns) of a reference table: a column is a
    numeric feature when every value parses as a number and it is not acquisition
    metadata; every other non-reserved column is a category."""

    def numeric(column: str) -> bool:
        try:
            [float(r[column]) for r in rows]
        except (TypeError, ValueError):
            return False
        return True

    candidates = [f for f in fields if f not in RESERVED]
    names = [f for f in candidates if f not in METADATA_FIELDS and numeric(f)]
    return names, [f for f in candidates if f not in names]


@dataclass
class ReferenceTable:
    """A reference table as arrays: features (one column per name), optional scores and
    labels, and the categorical metadata of each study."""

    names: list[str]
    categorical: list[str]
    x: np.ndarray
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    metadata: list[dict[str, str]] | None = None

    def __len__(self) -> int:
        return len(self.x)


def read_reference(path: str | os.PathLike[str]) -> ReferenceTable:
    """The reference table at ``path`` (columns: features, optional score, label, id, site,
    metadata)."""
    fields, rows = read_table(path)
    names, categorical = split_columns(fields, rows)
    try:
        x = np.array([[float(r[n]) for n in names] for r in rows])
        scores = np.array([float(r["score"]) for r in rows]) if "score" in fields else None
        labels = np.array([int(r["label"]) for r in rows]) if "label" in fields else None
    except ValueError as exc:
        raise RadguardError(f"{path}: non-numeric value ({exc})") from exc
    metadata = [{c: r[c] for c in categorical} for r in rows] if categorical else None
    return ReferenceTable(names, categorical, x, scores, labels, metadata)


def fit_reference_table(monitor: Monitor, reference: ReferenceTable | str | os.PathLike[str], *,
                        false_alarms_per: float = 10_000, threshold: float | None = None,
                        drop: float = 0.10, model_version: str = ""
                        ) -> tuple[ReferenceTable, dict[str, Any]]:
    """Fit ``monitor`` to a reference table (or the one at a path); returns the table and
    the calibrated thresholds (:meth:`Monitor.fit_reference`)."""
    table = reference if isinstance(reference, ReferenceTable) else read_reference(reference)
    thresholds = monitor.fit_reference(table.x, table.names, scores=table.scores,
                                       labels=table.labels, metadata=table.metadata,
                                       false_alarms_per=false_alarms_per,
                                       threshold=threshold, drop=drop,
                                       model_version=model_version)
    return table, thresholds


def ingest_table(monitor: Monitor, path: str | os.PathLike[str],
                 on_alarm: Callable[[Alarm], None] = lambda _alarm: None) -> int:
    """Feed the studies of ``path`` in order (id, features, optional score, site, label);
    each alarm goes to ``on_alarm``. Returns how many studies were fed."""
    _fields, rows = read_table(path)
    known_meta = set((monitor.meta.get("metadata") or {}).keys())
    count = 0
    for r in rows:
        features = {k: v for k, v in r.items() if k not in RESERVED and k not in known_meta}
        metadata = {k: r[k] for k in known_meta if k in r}
        score = float(r["score"]) if r.get("score") not in (None, "") else None
        study = r.get("id") or f"{path}:{count}"
        for alarm in monitor.observe(study, features, score=score,
                                     site=r.get("site") or "default", metadata=metadata):
            on_alarm(alarm)
        if r.get("label") not in (None, ""):
            for alarm in monitor.add_label(study, int(r["label"])):
                on_alarm(alarm)
        count += 1
    return count


@dataclass
class LabelsResult:
    """What :func:`apply_labels` did: labels taken, of which waiting for their study, and
    the rows refused (``path:line: reason``)."""

    applied: int = 0
    waiting: int = 0
    refused: list[str] = field(default_factory=list)


@dataclass
class LabelRows:
    """The rows of a labels file, checked to have its id and label columns."""

    path: str
    rows: list[dict[str, str]]
    id_column: str = "id"
    label_column: str = "label"


def read_labels(path: str | os.PathLike[str], *, id_column: str = "id",
                label_column: str = "label") -> LabelRows:
    """The labels file at ``path``; raises when it lacks the id or label column."""
    fields, rows = read_table(path)
    for column in (id_column, label_column):
        if column not in fields:
            raise RadguardError(f"{path}: no column {column!r} (columns: "
                                f"{', '.join(fields)})")
    return LabelRows(os.fspath(path), rows, id_column, label_column)


def apply_labels(monitor: Monitor, labels: LabelRows | str | os.PathLike[str], *,
                 id_column: str = "id", label_column: str = "label",
                 positive: str | None = None,
                 on_alarm: Callable[[Alarm], None] = lambda _alarm: None,
                 on_refused: Callable[[str], None] = lambda _reason: None) -> LabelsResult:
    """Feed the radiologists' labels of ``path`` as they arrive: each steps the sensitivity
    or specificity detector of its study's site and model version; a label for a study not
    observed yet waits for it. A bad row is refused (``on_refused``) and skipped; a file
    without the id or label column raises. ``labels`` read already (:func:`read_labels`)
    keep their own columns."""
    if not isinstance(labels, LabelRows):
        labels = read_labels(labels, id_column=id_column, label_column=label_column)
    path, rows = labels.path, labels.rows
    id_column, label_column = labels.id_column, labels.label_column
    before = int(monitor.status()["labels_waiting_for_their_study"])
    result = LabelsResult()

    def refuse(reason: str) -> None:
        result.refused.append(reason)
        on_refused(reason)

    for line, r in enumerate(rows, start=2):
        value = (r.get(label_column) or "").strip()
        if positive is not None:
            label = 1 if value == positive else 0
        elif value in ("0", "1"):
            label = int(value)
        else:
            refuse(f"{path}:{line}: label {value!r} is not 0 or 1 (say which value is "
                   "positive with --positive)")
            continue
        study = (r.get(id_column) or "").strip()
        if not study:
            refuse(f"{path}:{line}: no study id")
            continue
        try:
            for alarm in monitor.add_label(study, label):
                on_alarm(alarm)
            result.applied += 1
        except MonitorError as exc:
            refuse(f"{path}:{line}: {exc}")
    result.waiting = int(monitor.status()["labels_waiting_for_their_study"]) - before
    return result
