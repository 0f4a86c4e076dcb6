"""QIDO-RS and C-FIND: one query model, one matcher, two front ends.

A query is a level (patient, study, series, image), matching keys and the attributes to
return. :func:`from_qido` builds one from a QIDO-RS request (PS3.18 10.6), :func:`from_identifier`
from a C-FIND identifier (PS3.4 C.4.1); :func:`search` runs it on the store's index (the
attributes migration 5 added, filled at ingest) under the visibility rule of
:meth:`~radguard.gateway.store.Store.visible_where` (clinical instances; quarantined ones
only for roles that decide about them); :func:`to_json` and :func:`to_dataset` render the
matches. Matching follows PS3.4 C.2.2.2: single value (exact; person names
case-insensitive), wildcard (``*``, ``?``), range (dates and times, open at either end), UID
list, and ``ModalitiesInStudy`` matching any modality of the study. What cannot be
understood is refused (:class:`QueryError`: HTTP 400, C-FIND 0xA900/0xC000) - never
answered with everything.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from radguard.errors import RadguardError

if TYPE_CHECKING:
    from radguard.gateway.store import Instance, Store

__all__ = ["ATTRIBUTES", "Level", "Query", "QueryError", "TooManyMatches", "find_datasets",
           "find_encoded",
           "from_identifier", "from_qido", "instances_for", "search", "to_bytes", "to_dataset",
           "to_json"]

MAX_RESULTS = 5000  # per answer: the rest is announced (QIDO) or refused (C-FIND)
MAX_KEYS = 100  # keys of a C-FIND identifier: each comes back in every match
MAX_UIDS = 1000  # UIDs of one list-of-UID match


class QueryError(RadguardError):
    """A query that cannot be understood (unknown parameter, malformed value, key at a
    level the query does not reach)."""


class TooManyMatches(QueryError):
    """A C-FIND that would match more than :data:`MAX_RESULTS` (DIMSE has no paging)."""


class Level(StrEnum):
    """Query/Retrieve levels, in order (QIDO's instance level is C-FIND's IMAGE)."""

    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {level: n for n, level in enumerate(Level)}


class Match(StrEnum):
    """How a key's value is matched (PS3.4 C.2.2.2)."""

    UID = "uid"  # single value or UID list
    TEXT = "text"  # single value or wildcard, case-sensitive
    NAME = "name"  # person name: wildcard, case-insensitive (folded column)
    DATE = "date"  # single value or range
    TIME = "time"  # single value or range
    MODALITIES = "modalities"  # any modality of the study (list allowed)
    NONE = "none"  # returned only (counts)


@dataclass(frozen=True)
class Attribute:
    keyword: str
    level: Level
    column: str | None  # the store column; None: computed from the matches
    match: Match

    @property
    def tag(self) -> int:
        return int(tag_for_keyword(self.keyword))  # type: ignore[arg-type]

    @property
    def vr(self) -> str:
        return dictionary_VR(self.tag)


_A = Attribute
ATTRIBUTES: tuple[Attribute, ...] = (
    _A("PatientName", Level.PATIENT, "patient_name", Match.NAME),
    _A("PatientID", Level.PATIENT, "patient_id", Match.TEXT),
    _A("PatientBirthDate", Level.PATIENT, "patient_birth_date", Match.DATE),
    _A("PatientSex", Level.PATIENT, "patient_sex", Match.TEXT),
    _A("NumberOfPatientRelatedStudies", Level.PATIENT, None, Match.NONE),
    _A("NumberOfPatientRelatedSeries", Level.PATIENT, None, Match.NONE),
    _A("NumberOfPatientRelatedInstances", Level.PATIENT, None, Match.NONE),
    _A("StudyInstanceUID", Level.STUDY, "study_uid", Match.UID),
    _A("StudyDate", Level.STUDY, "study_date", Match.DATE),
    _A("StudyTime", Level.STUDY, "study_time", Match.TIME),
    _A("AccessionNumber", Level.STUDY, "accession", Match.TEXT),
    _A("ReferringPhysicianName", Level.STUDY, "referring_physician", Match.NAME),
    _A("StudyID", Level.STUDY, "study_id", Match.TEXT),
    _A("StudyDescription", Level.STUDY, "study_description", Match.TEXT),
    _A("ModalitiesInStudy", Level.STUDY, None, Match.MODALITIES),
    _A("NumberOfStudyRelatedSeries", Level.STUDY, None, Match.NONE),
    _A("NumberOfStudyRelatedInstances", Level.STUDY, None, Match.NONE),
    _A("SeriesInstanceUID", Level.SERIES, "series_uid", Match.UID),
    _A("Modality", Level.SERIES, "modality", Match.TEXT),
    _A("SeriesNumber", Level.SERIES, "series_number", Match.TEXT),
    _A("SeriesDescription", Level.SERIES, "series_description", Match.TEXT),
    _A("PerformedProcedureStepStartDate", Level.SERIES, "pps_start_date", Match.DATE),
    _A("PerformedProcedureStepStartTime", Level.SERIES, "pps_start_time", Match.TIME),
    _A("NumberOfSeriesRelatedInstances", Level.SERIES, None, Match.NONE),
    _A("SOPInstanceUID", Level.IMAGE, "sop_uid", Match.UID),
    _A("SOPClassUID", Level.IMAGE, "sop_class", Match.UID),
    _A("InstanceNumber", Level.IMAGE, "instance_number", Match.TEXT),
    _A("Rows", Level.IMAGE, "pixel_rows", Match.NONE),
    _A("Columns", Level.IMAGE, "pixel_columns", Match.NONE),
    _A("BitsAllocated", Level.IMAGE, "bits_allocated", Match.NONE),
    _A("NumberOfFrames", Level.IMAGE, "frames", Match.NONE),
)
_BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}
_FOLDED = {"patient_name": "patient_name_fold", "referring_physician": "referring_fold"}
_GROUP = {Level.PATIENT: "patient_id", Level.STUDY: "study_uid", Level.SERIES: "series_uid",
          Level.IMAGE: "id"}
_COLUMNS = ["id", "sha256", "path", "charset", *dict.fromkeys(
    a.column for a in ATTRIBUTES if a.column is not None)]
# what each level returns by default (PS3.18 QIDO return attributes; C-FIND returns what
# the identifier asks for)
_DEFAULT = {
    Level.PATIENT: ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                    "NumberOfPatientRelatedInstances"),
    Level.STUDY: ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                  "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
                  "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
                  "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    Level.SERIES: ("Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
                   "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                   "NumberOfSeriesRelatedInstances", "StudyInstanceUID"),
    Level.IMAGE: ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                  "BitsAllocated", "NumberOfFrames", "StudyInstanceUID",
                  "SeriesInstanceUID"),
}
_SELECT = ", ".join(f"instances.{c}" for c in _COLUMNS)
# the stored attributes each level returns: (keyword, column)
_STORED = {level: [(a.keyword, a.column) for a in ATTRIBUTES
                   if a.column is not None and _RANK[a.level] <= _RANK[level]]
           for level in Level}
_QIDO_PARAMETERS = {"limit", "offset", "fuzzymatching", "includefield"}
_DATE = re.compile(r"\d{8}")
_TIME = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")


@dataclass
class Query:
    """What to find: the level, ``matches`` (keyword -> value as in a C-FIND identifier:
    wildcards, ranges, backslash lists), what to return, paging and visibility."""

    level: Level
    matches: dict[str, str] = field(default_factory=dict)
    returns: list[str] = field(default_factory=list)
    limit: int | None = None
    offset: int = 0
    quarantine: bool = False
    warnings: list[str] = field(default_factory=list)
    from_file: list[str] = field(default_factory=list)  # includefield keys read from files


# -- building queries ---------------------------------------------------------------------------

def _keyword(key: str) -> str | None:
    """A QIDO attribute ID (keyword or 8 hex digits) as a keyword; None: no attribute."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return keyword_for_tag(int(key, 16)) or None
    return key if tag_for_keyword(key) is not None else None


def _check_value(attribute: Attribute, value: str) -> None:
    """Refuse a value its matching cannot understand (a malformed date range matches
    nothing a user meant; answering all would be worse)."""
    if attribute.match in (Match.DATE, Match.TIME):
        pattern = _DATE if attribute.match is Match.DATE else _TIME
        parts = value.split("-")
        if len(parts) > 2 or not all(p == "" or pattern.fullmatch(p) for p in parts) or \
                value == "-":
            kind = "YYYYMMDD" if attribute.match is Match.DATE else "HHMMSS"
            raise QueryError(f"{attribute.keyword}={value!r}: not a {kind} value or range")
    if attribute.match is Match.UID:
        if value.count(",") + value.count("\\") >= MAX_UIDS:
            raise QueryError(f"{attribute.keyword}: at most {MAX_UIDS} UIDs in a list")
        for uid in re.split(r"[\\,]", value):
            if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) or len(uid) > 64:
                raise QueryError(f"{attribute.keyword}={value[:80]!r}: not a UID or UID list")


def _add_match(query: Query, keyword: str, value: str, extra_ok: bool) -> None:
    attribute = _BY_KEYWORD.get(keyword)
    if attribute is None or attribute.match is Match.NONE:
        if extra_ok:  # a real attribute radguard does not match on: said, not hidden
            query.warnings.append(f"{keyword} is not supported for matching and was ignored")
            return
        raise QueryError(f"{keyword} cannot be matched at {query.level} level")
    if attribute.level.rank > query.level.rank:
        raise QueryError(f"{keyword} is a {attribute.level.lower()}-level attribute: it "
                         f"cannot be matched in a {query.level.lower()}-level query")
    if value not in ("", "*"):  # empty and a lone * match everything (universal)
        _check_value(attribute, value)
        query.matches[keyword] = value


def from_qido(level: Level, params: Iterable[tuple[str, str]], *,
              scope: dict[str, str] | None = None, quarantine: bool = False) -> Query:
    """A QIDO-RS request as a query: ``params`` the query string's items, ``scope`` the
    UIDs of the path (``/studies/{uid}/series``). Unknown parameters, malformed values and
    paging are refused with :class:`QueryError` (400)."""
    query = Query(level, quarantine=quarantine, returns=list(_DEFAULT[level]))
    for keyword, uid in (scope or {}).items():
        _check_value(_BY_KEYWORD[keyword], uid)
        query.matches[keyword] = uid
    for key, value in params:
        if key in _QIDO_PARAMETERS:
            _qido_parameter(query, key, value)
            continue
        keyword = _keyword(key)
        if keyword is None:
            raise QueryError(f"unknown query parameter {key[:60]!r} (neither a QIDO-RS "
                             "parameter nor a DICOM attribute)")
        _add_match(query, keyword, value, extra_ok=True)
        if keyword not in query.returns and keyword in _BY_KEYWORD:
            query.returns.append(keyword)
    return query


def _qido_parameter(query: Query, key: str, value: str) -> None:
    if key in ("limit", "offset"):
        if not value.isdigit() or len(value) > 9 or (key == "limit" and int(value) == 0):
            kind = "positive" if key == "limit" else "non-negative"
            raise QueryError(f"{key}={value[:20]!r}: not a {kind} integer")
        if key == "limit" and int(value) > MAX_RESULTS:
            query.limit = MAX_RESULTS
            query.warnings.append(f"limit {value} lowered to {MAX_RESULTS} (use offset for "
                                  "the rest)")
        elif key == "limit":
            query.limit = int(value)
        else:
            query.offset = int(value)
    elif key == "fuzzymatching":
        if value.lower() not in ("true", "false"):
            raise QueryError(f"fuzzymatching={value[:20]!r}: true or false")
        if value.lower() == "true":
            query.warnings.append("fuzzymatching is not supported: only literal matching "
                                  "(person names case-insensitive) was performed")
    else:  # includefield: repeatable, comma-separated, or all
        for item in filter(None, (v.strip() for v in value.split(","))):
            _include(query, item)


# what ``includefield=all`` adds beyond the index, read from one instance of each answer
# (the attributes of the level's modules a reader looks for: PS3.4 C.6.2.1.2, PS3.3 C.7)
_FILE_ALL = {
    Level.PATIENT: ("IssuerOfPatientID", "PatientComments"),
    Level.STUDY: ("PatientAge", "PatientSize", "PatientWeight", "AdditionalPatientHistory",
                  "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
                  "IssuerOfPatientID", "TimezoneOffsetFromUTC"),
    Level.SERIES: ("SeriesDate", "SeriesTime", "BodyPartExamined", "ProtocolName",
                   "Laterality", "Manufacturer", "InstitutionName", "StationName",
                   "OperatorsName", "PerformingPhysicianName"),
    Level.IMAGE: ("ImageType", "ContentDate", "ContentTime", "AcquisitionDateTime",
                  "PhotometricInterpretation", "SamplesPerPixel", "BitsStored",
                  "ImageLaterality", "ViewPosition", "PatientOrientation"),
}


def _include(query: Query, item: str) -> None:
    if item == "all":
        for a in ATTRIBUTES:
            if a.level.rank <= query.level.rank and a.keyword not in query.returns and \
                    not a.keyword.startswith("NumberOfPatient"):
                query.returns.append(a.keyword)
        for level in Level:
            if level.rank <= query.level.rank and (query.level is Level.PATIENT
                                                   or level is not Level.PATIENT):
                query.from_file.extend(k for k in _FILE_ALL[level]
                                       if k not in query.from_file)
        return
    keyword = _keyword(item)
    if keyword is None:
        raise QueryError(f"includefield={item[:60]!r}: not a DICOM attribute")
    if keyword in query.returns:
        return
    if keyword in _BY_KEYWORD:
        if _BY_KEYWORD[keyword].level.rank <= query.level.rank:
            query.returns.append(keyword)
    elif keyword not in query.from_file:
        query.from_file.append(keyword)


def from_identifier(identifier: Dataset, model: str, *, quarantine: bool = False) -> Query:
    """A C-FIND identifier as a query; ``model`` "patient" or "study" (the information
    model negotiated: Patient Root or Study Root). Every key is returned; keys with a value
    are matched; keys radguard does not index come back empty."""
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if raw not in Level.__members__:
        raise QueryError(f"QueryRetrieveLevel {raw[:16]!r}: PATIENT, STUDY, SERIES or IMAGE")
    level = Level(raw)
    if model == "study" and level is Level.PATIENT:
        raise QueryError("the Study Root model has no PATIENT level")
    query = Query(level, quarantine=quarantine)
    if len(identifier) > MAX_KEYS:
        raise QueryError(f"at most {MAX_KEYS} keys in an identifier")
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in ("QueryRetrieveLevel", "SpecificCharacterSet") or \
                element.VR == "SQ":
            continue
        query.returns.append(keyword)
        attribute = _BY_KEYWORD.get(keyword)
        if attribute is not None and attribute.level.rank > level.rank:
            raise QueryError(f"{keyword} is a {attribute.level.lower()}-level key in a "
                             f"{level.lower()}-level query")
        value = _text(element.value)
        if value and attribute is not None and attribute.match is not Match.NONE:
            _add_match(query, keyword, value, extra_ok=False)
    return query


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[union-attr]
    return str(value).strip()


# -- running them -------------------------------------------------------------------------------

def _like(value: str) -> str:
    """A DICOM wildcard pattern as a SQL LIKE pattern (escape character ``!``)."""
    out = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return out.replace("*", "%").replace("?", "_")


def _condition(attribute: Attribute, value: str, visible: str = "1=1"
               ) -> tuple[str, list[Any]] | None:
    """SQL for one match (None: matched afterwards, in Python); ``visible``: what the
    ModalitiesInStudy subquery may see (an instance the caller may not see must not
    decide whether a study matches)."""
    column = attribute.column
    if attribute.match is Match.UID:
        uids = re.split(r"[\\,]", value)
        return f"{column} IN ({','.join('?' * len(uids))})", uids
    if attribute.match is Match.MODALITIES:
        modalities = [m for m in re.split(r"[\\,]", value) if m]
        pattern = " OR ".join("m.modality LIKE ? ESCAPE '!'" for _ in modalities)
        pattern = pattern.replace("m.modality", "instances.modality")
        return (f"instances.study_uid IN (SELECT instances.study_uid FROM instances WHERE "
                f"{visible} AND ({pattern}))", [_like(m) for m in modalities])
    if attribute.match is Match.DATE:
        low, _, high = value.partition("-")
        if "-" not in value:
            return f"{column} = ?", [value]
        parts, args = [f"{column} <> ''"], []
        if low:
            parts.append(f"{column} >= ?")
            args.append(low)
        if high:
            parts.append(f"{column} <= ?")
            args.append(high)
        return " AND ".join(parts), args
    if attribute.match is Match.TIME:
        return None
    if attribute.match is Match.NAME:
        column, value = _FOLDED[column], value.casefold()  # type: ignore[index]
    if "*" in value or "?" in value:
        return f"{column} LIKE ? ESCAPE '!'", [_like(value)]
    return f"{column} = ?", [value]


def _time_key(value: str, high: bool) -> str:
    """A DICOM time (or the end of a range) as HHMMSS.ffffff for comparison; an upper
    bound given to the minute covers that whole minute."""
    head, _, frac = value.partition(".")
    if high:
        head += "235959"[len(head):]
        frac = (frac + "999999")[:6]
    else:
        head += "000000"[len(head):]
        frac = (frac + "000000")[:6]
    return f"{head}.{frac}"


def _time_matches(stored: str, value: str) -> bool:
    stored = stored.strip()
    if not stored:
        return False
    key = _time_key(stored.split("\\")[0], high=False)
    if "-" not in value:
        return key[:len(value)] == _time_key(value, False)[:len(value)] if "." not in value \
            else key == _time_key(value, False)
    low, _, high = value.partition("-")
    return (not low or key >= _time_key(low, False)) and (not high or key <= _time_key(high, True))


def search(store: Store, query: Query) -> list[dict[str, Any]]:
    """The matches of ``query``, one dict per entity at its level (keyword -> value; the
    ``_path`` key names one instance file of the entity), in the order first stored, paged
    by ``limit``/``offset``; an answer cut at :data:`MAX_RESULTS` says so in
    ``query.warnings``.

    What is read is bounded by the answer, not by the archive: an entity above the image
    level is one row of SQL aggregates (its first instance, the counts) plus its first
    instance's row and its modalities, so a study of 2,000 instances costs what a study
    of one does; paging runs in SQL, or - when a time range is matched in Python - the
    rows are read a batch at a time until the page is full."""
    where, args, later = [store.visible_where(query.quarantine)], [], []
    for keyword, value in query.matches.items():
        sql = _condition(_BY_KEYWORD[keyword], value, where[0])
        if sql is None:
            later.append((_BY_KEYWORD[keyword], value))
        else:
            where.append(sql[0])
            args.extend(sql[1])
    cond = " AND ".join(where)
    cap = query.limit if query.limit is not None else MAX_RESULTS + 1
    page = "" if later else f" LIMIT {int(cap)} OFFSET {int(query.offset)}"
    if query.level is Level.IMAGE:
        cursor = store.execute(f"SELECT {_SELECT} FROM instances WHERE {cond} "
                               f"ORDER BY instances.id{page}", tuple(args))
        rows = _page(cursor, later, query, cap)
        found = [(row, {}) for row in rows]
    else:
        group = f"instances.{_GROUP[query.level]}"
        cursor = store.execute(
            f"SELECT MIN(instances.id), COUNT(*), COUNT(DISTINCT instances.series_uid), "
            f"COUNT(DISTINCT instances.study_uid) FROM instances WHERE {cond} "
            f"GROUP BY {group} ORDER BY MIN(instances.id){page}", tuple(args))
        groups = {int(first): counts for first, *counts in cursor.fetchall()}
        firsts = {row["id"]: row for row in _rows_by_id(store, list(groups))}
        rows = _page(iter([firsts[i] for i in groups]), later, query, cap, raw=False)
        found = [(row, _counts(*groups[row["id"]])) for row in rows]
        if query.level.rank <= Level.STUDY.rank:
            _add_modalities(store, query, found, cond, args)
    if query.limit is None and len(found) > MAX_RESULTS:
        found = found[:MAX_RESULTS]
        query.warnings.append("there are additional results that can be requested (use "
                              "limit and offset)")
    return [_entity(query, row, extra, store) for row, extra in found]


def _page(rows: Iterable[Any], later: list[tuple[Attribute, str]], query: Query, cap: int,
          *, raw: bool = True) -> list[dict[str, Any]]:
    """The rows of the page: all of them when SQL paged them already (no ``later``
    matches), else those passing the time matches, from ``offset``, at most ``cap`` -
    read one at a time, so a time range over a large archive stops at a full page."""
    out: list[dict[str, Any]] = []
    skip = query.offset if later else 0
    for raw_row in rows:
        row = dict(zip(_COLUMNS, raw_row, strict=True)) if raw else raw_row
        if later and not all(_time_matches(row[a.column] or "", v)  # type: ignore[index]
                             for a, v in later):
            continue
        if skip:
            skip -= 1
            continue
        out.append(row)
        if len(out) >= cap:
            break
    return out


_CHUNK = 500  # values per IN (...) list: well inside SQLite's 32,766 parameters


def _rows_by_id(store: Store, ids: list[int]) -> Iterator[dict[str, Any]]:
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        for raw in store.execute(f"SELECT {_SELECT} FROM instances WHERE instances.id IN "
                                 f"({','.join('?' * len(chunk))})", tuple(chunk)).fetchall():
            yield dict(zip(_COLUMNS, raw, strict=True))


def _counts(instances: int, series: int, studies: int) -> dict[str, Any]:
    return {"NumberOfPatientRelatedStudies": studies, "NumberOfPatientRelatedSeries": series,
            "NumberOfPatientRelatedInstances": instances,
            "NumberOfStudyRelatedSeries": series, "NumberOfStudyRelatedInstances": instances,
            "NumberOfSeriesRelatedInstances": instances}


def _add_modalities(store: Store, query: Query, found: list[tuple[dict[str, Any],
                    dict[str, Any]]], cond: str, args: list[Any]) -> None:
    """ModalitiesInStudy of each patient or study found (of its visible instances)."""
    column = _GROUP[query.level]
    keys = [row[column] for row, _ in found]
    modalities: dict[Any, set[str]] = {k: set() for k in keys}
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start:start + _CHUNK]
        for key, modality in store.execute(
                f"SELECT instances.{column}, instances.modality FROM instances WHERE {cond} "
                f"AND instances.{column} IN ({','.join('?' * len(chunk))}) "
                f"GROUP BY instances.{column}, instances.modality",
                (*args, *chunk)).fetchall():
            if modality:
                modalities[key].add(modality)
    for row, extra in found:
        extra["ModalitiesInStudy"] = sorted(modalities[row[column]])


def _entity(query: Query, first: dict[str, Any], extra: dict[str, Any], store: Store
            ) -> dict[str, Any]:
    # the file only when a return key must be read from it (objects in the database are
    # fetched to the local cache then, not for every match)
    out: dict[str, Any] = {"_file": partial(store.locate, first["sha256"], first["path"]),
                           "_charset": first["charset"]}
    for keyword, column in _STORED[query.level]:
        out[keyword] = first[column]
    out.update(extra)
    return out


# -- rendering ----------------------------------------------------------------------------------

_NUMERIC = {"IS", "US", "UL", "SS", "SL", "DS", "FL", "FD"}


@lru_cache(maxsize=4096)
def _tag_vr(keyword: str) -> tuple[str, str]:
    """A keyword's tag (8 hex digits) and VR (looked up once: answers hold thousands)."""
    tag = int(tag_for_keyword(keyword))  # type: ignore[arg-type]
    return f"{tag:08X}", dictionary_VR(tag)


def _values(keyword: str, value: Any) -> list[Any]:  # noqa: ANN401
    """The value(s) of a match as a list for DICOM JSON / a data set (empty: none)."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return value
    vr = _tag_vr(keyword)[1]
    if vr in _NUMERIC:
        try:
            return [int(v) if vr != "DS" else float(v) for v in str(value).split("\\")]
        except ValueError:
            return []
    return str(value).split("\\") if vr not in ("LT", "ST", "UT") else [str(value)]


def to_json(match: dict[str, Any], query: Query, retrieve_base: str = "") -> dict[str, Any]:
    """A match as a DICOM JSON object (PS3.18 F.2) with the query's return attributes and,
    given ``retrieve_base`` (``https://host/dicom-web``), its RetrieveURL."""
    out: dict[str, Any] = {}
    for keyword in query.returns:
        if keyword not in match:
            continue
        tag, vr = _tag_vr(keyword)
        values = _values(keyword, match[keyword])
        if vr == "PN":
            values = [{"Alphabetic": v} for v in values]
        out[tag] = {"vr": vr, **({"Value": values} if values else {})}
    if query.from_file:
        out.update(_from_file(match["_file"], query.from_file))
    if retrieve_base and query.level is not Level.PATIENT:
        url = f"{retrieve_base}/studies/{match['StudyInstanceUID']}"
        if query.level.rank >= Level.SERIES.rank:
            url += f"/series/{match['SeriesInstanceUID']}"
        if query.level is Level.IMAGE:
            url += f"/instances/{match['SOPInstanceUID']}"
        out["00081190"] = {"vr": "UR", "Value": [url]}
    return dict(sorted(out.items()))


def _from_file(locate: Callable[[], Path], keywords: Sequence[str]) -> dict[str, Any]:
    """includefield attributes radguard does not index, read from one instance's header
    (a file that cannot be read adds nothing)."""
    from pydicom import dcmread

    try:
        ds = dcmread(locate(), stop_before_pixels=True,
                     specific_tags=[tag_for_keyword(k) for k in keywords])  # type: ignore[misc]
        return {k: v for k, v in ds.to_json_dict(bulk_data_threshold=1024,
                                                 bulk_data_element_handler=lambda _e: "")
                .items() if "BulkDataURI" not in v and "InlineBinary" not in v}
    except Exception:  # noqa: BLE001 - an unreadable header adds nothing to a search answer
        return {}


def to_dataset(match: dict[str, Any], query: Query, *, retrieve_ae: str = "") -> Dataset:
    """A match as a C-FIND response identifier: the identifier's keys (radguard's values,
    empty where it has none), QueryRetrieveLevel and, when asked, RetrieveAETitle."""
    ds = Dataset()
    if match.get("_charset"):
        ds.SpecificCharacterSet = match["_charset"].split("\\")
    ds.QueryRetrieveLevel = str(query.level)
    for keyword in query.returns:
        if keyword == "RetrieveAETitle":
            setattr(ds, keyword, retrieve_ae)
            continue
        values = _values(keyword, match.get(keyword))
        setattr(ds, keyword, values[0] if len(values) == 1 else values or None)
    return ds


_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}
_BINARY = {"US": "<H", "UL": "<I", "SS": "<h", "SL": "<l", "FL": "<f", "FD": "<d"}


def _element_bytes(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in _LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def _value_bytes(vr: str, values: list[Any], encodings: list[str]) -> bytes:
    """Values as the VR stores them: binary numbers packed, text joined with backslashes
    in the answer's character set (person names with ISO 2022 escapes where needed)."""
    from pydicom.charset import encode_string

    if vr in _BINARY:
        return b"".join(struct.pack(_BINARY[vr], v) for v in values)
    text = "\\".join(str(v) for v in values)
    if text.isascii():
        return text.encode("ascii")
    return encode_string(text, encodings)


def to_bytes(match: dict[str, Any], query: Query, *, implicit: bool,
             retrieve_ae: str = "") -> bytes:
    """:func:`to_dataset` encoded in (Implicit or Explicit VR) Little Endian without
    building a pydicom data set: a C-FIND answer of hundreds of matches spends its time
    on the network, not on thousands of validated element objects (same bytes as
    pydicom writes; ``tests/gateway/test_query.py`` compares them)."""
    from pydicom.charset import convert_encodings

    charset = [c for c in (match.get("_charset") or "").split("\\") if c]
    encodings = convert_encodings(charset or None)
    elements: list[tuple[int, bytes]] = []
    if charset:
        elements.append((0x00080005, _element_bytes(
            0x00080005, "CS", "\\".join(charset).encode("ascii"), implicit)))
    elements.append((0x00080052, _element_bytes(0x00080052, "CS", str(query.level).encode(),
                                                implicit)))
    for keyword in query.returns:
        tag_text, vr = _tag_vr(keyword)
        vr = vr.split(" or ")[0]
        tag = int(tag_text, 16)
        if keyword == "RetrieveAETitle":
            values: list[Any] = [retrieve_ae] if retrieve_ae else []
        else:
            values = _values(keyword, match.get(keyword))
        elements.append((tag, _element_bytes(tag, vr, _value_bytes(vr, values, encodings)
                                             if values else b"", implicit)))
    elements.sort(key=lambda e: e[0])
    return b"".join(raw for _, raw in elements)


# -- the C-FIND / C-MOVE / C-GET side ------------------------------------------------------------

def find_datasets(store: Store, identifier: Dataset, model: str, *,
                  quarantine: bool = False, retrieve_ae: str = "") -> list[Dataset]:
    """C-FIND: the response identifiers for ``identifier`` (raises :class:`QueryError`)."""
    query = from_identifier(identifier, model, quarantine=quarantine)
    return [to_dataset(m, query, retrieve_ae=retrieve_ae) for m in _all(store, query)]


def _all(store: Store, query: Query) -> list[dict[str, Any]]:
    """Every match of a C-FIND, or TooManyMatches: DIMSE has no paging, and a cut answer
    ending in Success would say "that is all"."""
    matches = search(store, query)
    if query.warnings and any("additional results" in w for w in query.warnings):
        raise TooManyMatches(f"more than {MAX_RESULTS} matches: narrow the query")
    return matches


def find_encoded(store: Store, identifier: Dataset, model: str, *, implicit: bool,
                 quarantine: bool = False, retrieve_ae: str = "") -> list[bytes]:
    """C-FIND: the response identifiers for ``identifier``, encoded (:func:`to_bytes`)."""
    query = from_identifier(identifier, model, quarantine=quarantine)
    return [to_bytes(m, query, implicit=implicit, retrieve_ae=retrieve_ae)
            for m in _all(store, query)]


def instances_for(store: Store, identifier: Dataset, model: str, *,
                  quarantine: bool = False) -> list[Instance]:
    """C-MOVE / C-GET: the stored instances an identifier names by its unique keys
    (PatientID at the patient level; Study, Series, SOP Instance UIDs or UID lists)."""
    query = from_identifier(identifier, model, quarantine=quarantine)
    keys = {Level.PATIENT: "PatientID", Level.STUDY: "StudyInstanceUID",
            Level.SERIES: "SeriesInstanceUID", Level.IMAGE: "SOPInstanceUID"}
    if keys[query.level] not in query.matches:
        raise QueryError(f"a {query.level.lower()}-level retrieve needs "
                         f"{keys[query.level]}")
    where, args = [], []
    for keyword in keys.values():
        if keyword in query.matches:
            value = query.matches[keyword]
            if "*" in value or "?" in value:
                raise QueryError(f"{keyword}: a retrieve names its objects; no wildcards")
            sql = _condition(_BY_KEYWORD[keyword], value)
            assert sql is not None
            where.append(sql[0])
            args.extend(sql[1])
    return store.visible_instances(" AND ".join(where), tuple(args), quarantine=quarantine)
