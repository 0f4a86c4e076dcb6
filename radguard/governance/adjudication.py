"""Label adjudication: several readers label each case, an adjudicator settles what they do
not agree on, and the result becomes a new dataset version whose parent is the unadjudicated
one, so ``dataset diff`` shows exactly the labels adjudication changed.

Flow::

    study = read_study("readers.csv")                   # case, reader, label
    plan(study, rule="disagreement").write("worklist.csv")   # the adjudicator fills `label`
    res = resolve(study, "worklist.csv")                 # adjudicated, else majority
    res.write_labels("labels.csv", parent=load_manifest("v1.manifest.json"))

Design choices (see docs/reader-studies.md, "Label adjudication"):

* the majority among the readers who labelled a case stands where nobody is asked to look
  again; a tie is never broken silently (``analysis.majority_vote`` breaks 0/1 ties to
  positive, which is right for scoring readers but not for deciding a reference label): ties
  always go to the adjudicator, whatever the rule;
* a case needs at least two readers: one read has no majority and no disagreement to detect;
* labels are category strings compared after trimming spaces (``"1"`` and ``"1.0"`` differ);
  a blank label is a read that was not made;
* the adjudicator's label wins wherever given, also on cases the rule did not send; a label
  no reader used is refused unless allowed (it is far more often a typo than a new class);
* agreement reuses :func:`radguard.evaluation.analysis.cohen_kappa` (per reader pair, on the
  cases both read) and :func:`~radguard.evaluation.analysis.fleiss_kappa` (on the cases every
  reader read, since it needs a full cases x readers table).
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from radguard.errors import RadguardError
from radguard.evaluation.analysis import cohen_kappa, fleiss_kappa
from radguard.evaluation.report import read_csv_rows
from radguard.fileio import write_csv
from radguard.governance.datasets import Manifest, snapshot

__all__ = [
    "RULES",
    "AdjudicationError",
    "Resolution",
    "Study",
    "Worklist",
    "adjudicated_snapshot",
    "majority",
    "plan",
    "read_study",
    "resolve",
    "select_cases",
]

RULES = ("disagreement", "all-positive", "all")
TIE = "(tie)"  # stands for "no majority" in label counts


class AdjudicationError(RadguardError):
    """A readers' or adjudicator's CSV, or a rule, that adjudication cannot use."""


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# -- the readers' labels -----------------------------------------------------------------------

@dataclass
class Study:
    """Who labelled which case how. ``reads[case][reader]`` is a label; cases and readers
    keep the order of their first appearance."""

    readers: list[str]
    cases: list[str]
    reads: dict[str, dict[str, str]]
    missing: int = 0  # reader x case combinations without a label
    source: str = ""

    @property
    def labels(self) -> list[str]:
        """Every label some reader used, sorted."""
        return sorted({v for votes in self.reads.values() for v in votes.values()})


def _require_columns(path: str | os.PathLike[str], fields: list[str],
                     needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in fields]
    if missing:
        raise AdjudicationError(f"{path}: no column {', '.join(repr(c) for c in missing)} "
                                f"(columns: {', '.join(fields)}; need {', '.join(needed)})")


def read_study(path: str | os.PathLike[str]) -> Study:
    """A CSV with columns ``case, reader, label``, one row per reader x case (other columns are
    ignored). A blank label is a read not made; a repeated row is harmless, a contradicting
    one an error. Every case needs labels from at least two readers."""
    fields, rows = read_csv_rows(path)
    _require_columns(path, fields, ("case", "reader", "label"))
    reads: dict[str, dict[str, str]] = {}
    readers: dict[str, None] = {}
    for n, row in enumerate(rows, 2):
        if None in row:
            raise AdjudicationError(f"{path}: line {n} has more fields than the header")
        case, reader = (row.get("case") or "").strip(), (row.get("reader") or "").strip()
        label = (row.get("label") or "").strip()
        if not case or not reader:
            raise AdjudicationError(f"{path}: line {n} has an empty case or reader")
        readers.setdefault(reader)
        votes = reads.setdefault(case, {})
        if not label:
            continue
        if votes.get(reader, label) != label:
            raise AdjudicationError(f"{path}: reader {reader!r} labelled case {case!r} twice, "
                                    f"{votes[reader]!r} and {label!r} (line {n})")
        votes[reader] = label
    if len(readers) < 2:
        raise AdjudicationError(f"{path}: adjudication needs at least 2 readers, found "
                                f"{len(readers)} ({_listing(list(readers))})")
    thin = [c for c, votes in reads.items() if len(votes) < 2]
    if thin:
        raise AdjudicationError(f"{path}: {len(thin)} case(s) labelled by fewer than 2 "
                                f"readers: {_listing(thin)}")
    missing = sum(len(readers) - len(votes) for votes in reads.values())
    return Study(list(readers), list(reads), reads, missing, str(path))


def _study(study: Study | str | os.PathLike[str]) -> Study:
    return study if isinstance(study, Study) else read_study(study)


def majority(votes: Mapping[str, str]) -> str | None:
    """The label most readers gave; None on a tie (which the adjudicator must settle).

    Not :func:`analysis.majority_vote`: that one takes 0/1 only and breaks ties to positive."""
    counts = Counter(votes.values()).most_common()
    if not counts or (len(counts) > 1 and counts[0][1] == counts[1][1]):
        return None
    return counts[0][0]


def select_cases(study: Study, rule: str = "disagreement", positive: str | None = None
                 ) -> dict[str, str]:
    """The cases the rule sends to the adjudicator, each with why (``tie`` first: a tie is
    always sent, whatever the rule)."""
    if rule not in RULES:
        raise AdjudicationError(f"unknown rule {rule!r} (one of {', '.join(RULES)})")
    if rule == "all-positive":
        if not positive:
            raise AdjudicationError("rule all-positive needs the positive label (--positive)")
        if positive not in study.labels:
            raise AdjudicationError(f"positive label {positive!r}: no reader used it (labels: "
                                    f"{', '.join(study.labels)})")
    elif positive:
        raise AdjudicationError(f"a positive label is only used by rule all-positive, not "
                                f"{rule!r}")
    chosen: dict[str, str] = {}
    for case in study.cases:
        votes = study.reads[case]
        if majority(votes) is None:
            chosen[case] = "tie"
        elif rule == "all":
            chosen[case] = "all"
        elif rule == "disagreement" and len(set(votes.values())) > 1:
            chosen[case] = "disagreement"
        elif rule == "all-positive" and positive in votes.values():
            chosen[case] = "positive"
    return chosen


def _votes_text(votes: Mapping[str, str]) -> str:
    return "; ".join(f"{label}={n}" for label, n in sorted(Counter(votes.values()).items()))


# -- the worklist ------------------------------------------------------------------------------

@dataclass
class Worklist:
    """The cases for the adjudicator: ``case`` and a blank ``label`` to fill, then read-only
    context (why the case is there, the vote counts, each reader's label unless blinded)."""

    fields: list[str]
    rows: list[dict[str, str]]
    rule: str
    blind: bool

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: an adjudicator never opens half a worklist."""
        write_csv(path, self.rows, self.fields)
        return Path(path)


def plan(study: Study | str | os.PathLike[str], rule: str = "disagreement",
         positive: str | None = None, *, blind: bool = False) -> Worklist:
    """The adjudication worklist. ``blind`` leaves out reader names (only the vote counts
    remain), so who said what, e.g. seniority, cannot sway the adjudicator."""
    s = _study(study)
    chosen = select_cases(s, rule, positive)
    fields = ["case", "label", "reason", "readers", "votes"]
    if not blind:
        fields += [f"reader:{r}" for r in s.readers]
    rows = []
    for case, reason in chosen.items():
        votes = s.reads[case]
        row = {"case": case, "label": "", "reason": reason, "readers": str(len(votes)),
               "votes": _votes_text(votes)}
        if not blind:
            row |= {f"reader:{r}": votes.get(r, "") for r in s.readers}
        rows.append(row)
    return Worklist(fields, rows, rule, blind)


# -- resolution --------------------------------------------------------------------------------

def read_adjudications(path: str | os.PathLike[str]) -> dict[str, str]:
    """``case -> label`` from the adjudicator's CSV (a filled worklist or any CSV with
    ``case, label``); blank labels are cases not (yet) adjudicated."""
    fields, rows = read_csv_rows(path)
    _require_columns(path, fields, ("case", "label"))
    out: dict[str, str] = {}
    for n, row in enumerate(rows, 2):
        case, label = (row.get("case") or "").strip(), (row.get("label") or "").strip()
        if not case:
            raise AdjudicationError(f"{path}: line {n} has an empty case")
        if not label:
            continue
        if out.get(case, label) != label:
            raise AdjudicationError(f"{path}: case {case!r} adjudicated twice, "
                                    f"{out[case]!r} and {label!r} (line {n})")
        out[case] = label
    return out


@dataclass
class Resolution:
    """Final labels (adjudicated where adjudicated, majority elsewhere) and the report."""

    study: Study
    rule: str
    positive: str | None
    sent: dict[str, str]  # case -> why the rule sent it
    majority: dict[str, str | None]  # case -> majority label, None on a tie
    adjudicated: dict[str, str]
    final: dict[str, str]
    new_labels: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[dict[str, str]]:
        """Cases where the adjudicator overruled a majority."""
        return [{"case": c, "majority": m, "adjudicated": self.adjudicated[c]}
                for c, m in self.majority.items()
                if m is not None and c in self.adjudicated and self.adjudicated[c] != m]

    @property
    def ties(self) -> list[dict[str, str]]:
        """Cases without a majority, with the adjudicator's label."""
        return [{"case": c, "adjudicated": self.adjudicated[c]}
                for c, m in self.majority.items() if m is None]

    def pair_kappas(self) -> list[dict[str, Any]]:
        """Cohen's kappa of every reader pair, on the cases both labelled."""
        out = []
        for a, b in combinations(self.study.readers, 2):
            both = [c for c in self.study.cases
                    if a in self.study.reads[c] and b in self.study.reads[c]]
            kappa = cohen_kappa([self.study.reads[c][a] for c in both],
                                [self.study.reads[c][b] for c in both]) if both else None
            out.append({"readers": [a, b], "cases": len(both), "kappa": kappa})
        return out

    def fleiss(self) -> dict[str, Any]:
        """Fleiss' kappa over the cases every reader labelled (it needs a full table)."""
        full = [c for c in self.study.cases if len(self.study.reads[c]) == len(self.study.readers)]
        table = np.array([[self.study.reads[c][r] for r in self.study.readers] for c in full])
        return {"cases": len(full), "kappa": fleiss_kappa(table) if full else None}

    def reader_agreement(self) -> list[dict[str, Any]]:
        """Each reader against the final labels: share agreeing and Cohen's kappa."""
        out = []
        for r in self.study.readers:
            cases = [c for c in self.study.cases if r in self.study.reads[c]]
            mine = [self.study.reads[c][r] for c in cases]
            truth = [self.final[c] for c in cases]
            out.append({"reader": r, "cases": len(cases),
                        "agreement": float(np.mean(np.array(mine) == np.array(truth))),
                        "kappa": cohen_kappa(mine, truth)})
        return out

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Cases per label by majority (ties as ``(tie)``) and after adjudication."""
        before = Counter(m if m is not None else TIE for m in self.majority.values())
        return {"majority": dict(sorted(before.items())),
                "final": dict(sorted(Counter(self.final.values()).items()))}

    def to_dict(self) -> dict[str, Any]:
        """The JSON report."""
        return {
            "source": self.study.source, "rule": self.rule, "positive": self.positive,
            "readers": self.study.readers, "cases": len(self.study.cases),
            "missing_reads": self.study.missing, "sent_to_adjudicator": len(self.sent),
            "adjudicated": len(self.adjudicated), "changed_from_majority": self.changed,
            "ties": self.ties, "new_labels": self.new_labels,
            "label_counts": self.label_counts(), "pair_kappa": self.pair_kappas(),
            "fleiss_kappa": self.fleiss(), "reader_agreement": self.reader_agreement(),
        }

    def summary(self) -> list[str]:
        """The report for people."""
        s = self.study
        lines = [f"{len(s.cases)} cases, {len(s.readers)} readers"
                 + (f", {s.missing} read(s) missing" if s.missing else ""),
                 f"rule {self.rule}: {len(self.sent)} case(s) sent to the adjudicator, "
                 f"{len(self.adjudicated)} adjudicated"]
        changed, ties = self.changed, self.ties
        lines.append(f"adjudicator changed the majority label of {len(changed)} case(s)")
        lines += [f"  {c['case']}: {c['majority']} -> {c['adjudicated']}" for c in changed]
        if ties:
            lines.append(f"ties settled by the adjudicator: {len(ties)}")
            lines += [f"  {t['case']}: {t['adjudicated']}" for t in ties]
        if self.new_labels:
            lines.append(f"labels no reader used: {', '.join(self.new_labels)}")
        counts = self.label_counts()
        lines.append("cases per label:")
        for label in sorted(set(counts["majority"]) | set(counts["final"])):
            lines.append(f"  {label}: {counts['majority'].get(label, 0)} by majority, "
                         f"{counts['final'].get(label, 0)} final")
        lines.append("Cohen's kappa per reader pair:")
        for p in self.pair_kappas():
            k = "n/a" if p["kappa"] is None else f"{p['kappa']:.3f}"
            lines.append(f"  {p['readers'][0]} / {p['readers'][1]}: {k} ({p['cases']} cases)")
        f = self.fleiss()
        lines.append("Fleiss' kappa: " + ("n/a" if f["kappa"] is None else f"{f['kappa']:.3f}")
                     + f" ({f['cases']} cases read by every reader)")
        lines.append("agreement with the final labels:")
        lines += [f"  {a['reader']}: {a['agreement']:.1%}, kappa {a['kappa']:.3f} "
                  f"({a['cases']} cases)" for a in self.reader_agreement()]
        return lines

    def label_table(self, parent: Manifest | None = None, label_column: str = "label"
                    ) -> tuple[str, list[str], list[dict[str, str]]]:
        """(key column, columns, rows) of the adjudicated label set.

        Without ``parent``: ``file, label``, one row per case (what ``dataset snapshot
        --labels`` reads: ``case`` names the image by relative path or file name). With a
        parent manifest that has labels: the parent's own layout, its rows unchanged except
        ``label_column`` of the study's cases (new cases are appended), so that diffing the
        two versions shows the relabels and nothing else."""
        if parent is None or not parent.labels:
            return "file", ["file", label_column], [
                {"file": c, label_column: self.final[c]} for c in self.study.cases]
        key, columns = parent.label_key or "file", list(parent.label_columns)
        if label_column not in columns:
            raise AdjudicationError(f"the parent version's labels have no column "
                                    f"{label_column!r} (columns: {', '.join(columns)})")
        rows = {k: dict(v["row"]) for k, v in parent.labels.items()}
        by_name: dict[str, list[str]] = {}
        for k in rows:
            by_name.setdefault(posixpath.basename(k), []).append(k)
        for case in self.study.cases:
            target = case if case in rows else None
            if target is None:
                same = by_name.get(posixpath.basename(case), [])
                target = same[0] if len(same) == 1 else None
            if target is None:
                rows[case] = {c: "" for c in columns} | {key: case}
                target = case
            rows[target][label_column] = self.final[case]
        return key, columns, list(rows.values())

    def write_labels(self, path: str | os.PathLike[str], parent: Manifest | None = None,
                     label_column: str = "label") -> Path:
        """Write the adjudicated labels CSV (see :meth:`label_table`) atomically."""
        _, columns, rows = self.label_table(parent, label_column)
        write_csv(path, rows, columns)
        return Path(path)


def resolve(readers: Study | str | os.PathLike[str], adjudicator: str | os.PathLike[str]
            | Mapping[str, str], rule: str = "disagreement", positive: str | None = None, *,
            allow_new_labels: bool = False) -> Resolution:
    """Final labels: the adjudicator's where given, the majority elsewhere.

    Errors name the cases: a case the rule sends (or a tie) without an adjudicated label, an
    adjudicated case not in the study, a label no reader used (unless ``allow_new_labels``)."""
    s = _study(readers)
    sent = select_cases(s, rule, positive)
    adj = dict(adjudicator) if isinstance(adjudicator, Mapping) else \
        read_adjudications(adjudicator)
    where = "" if isinstance(adjudicator, Mapping) else f"{adjudicator}: "
    unknown = [c for c in adj if c not in s.reads]
    if unknown:
        raise AdjudicationError(f"{where}{len(unknown)} adjudicated case(s) not in the study: "
                                f"{_listing(unknown)}")
    open_cases = [c for c in sent if c not in adj]
    if open_cases:
        raise AdjudicationError(f"{where}{len(open_cases)} case(s) sent to the adjudicator "
                                f"(rule {rule}) have no adjudicated label: "
                                f"{_listing(open_cases)}")
    new = sorted(set(adj.values()) - set(s.labels))
    if new and not allow_new_labels:
        cases = [c for c, label in adj.items() if label in new]
        raise AdjudicationError(f"{where}label(s) no reader used: {', '.join(new)} (cases "
                                f"{_listing(cases)}); a typo? If meant, allow new labels")
    votes = {c: majority(s.reads[c]) for c in s.cases}
    final = {c: adj[c] if c in adj else votes[c] for c in s.cases}
    return Resolution(s, rule, positive, sent, votes, adj,
                      {c: v for c, v in final.items() if v is not None}, new)


def adjudicated_snapshot(resolution: Resolution, folder: str | os.PathLike[str],
                         parent: Manifest, labels_out: str | os.PathLike[str], *,
                         label_column: str = "label", actor: str = "", workers: int = 1,
                         progress: Callable[[int], None] | None = None) -> Manifest:
    """Write the adjudicated labels in the parent's layout and snapshot ``folder`` with them
    as a new version whose parent is ``parent`` (the unadjudicated version)."""
    key, _, _ = resolution.label_table(parent, label_column)
    resolution.write_labels(labels_out, parent, label_column)
    return snapshot(folder, labels_out, label_key=key, parent=parent, actor=actor,
                    workers=workers, progress=progress)
