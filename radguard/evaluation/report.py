"""One-command evaluation: predictions CSV in, JSON summary and self-contained HTML report out.

Predictions CSV: one row per case with a ``score`` column and a ``label`` column (0/1, or text
with the positive class named), or the labels in a second CSV joined on ``id`` (or ``file``).
Any other column can be used for subgroups (``--by``).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radguard.evaluation import analysis, metrics
from radguard.evaluation.metrics import EvaluationError
from radguard.fileio import atomic_write_bytes

__all__ = ["Predictions", "binary_labels", "evaluate", "format_p", "read_csv_rows",
           "read_predictions", "render_html"]


@dataclass
class Predictions:
    """Scores, labels and any extra columns of a set of cases."""

    ids: list[str]
    scores: np.ndarray
    labels: np.ndarray
    columns: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""


def read_csv_rows(path: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a UTF-8 CSV, with one-line errors for missing, empty or binary
    files."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise EvaluationError(f"{p}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"{p}: cannot read as UTF-8 CSV") from exc
    if not text.strip():
        raise EvaluationError(f"{p}: empty file")
    reader = csv.DictReader(io.StringIO(text))
    try:
        rows = list(reader)
    except csv.Error as exc:
        raise EvaluationError(f"{p}: not a valid CSV ({exc})") from exc
    if not rows:
        raise EvaluationError(f"{p}: header only, no cases")
    return list(reader.fieldnames or []), rows


def _id_column(path: str | os.PathLike[str], fields: list[str], id_column: str | None) -> str:
    """The column naming each case: the one asked for, else ``id``, else ``file``."""
    if id_column is not None:
        if id_column not in fields:
            raise EvaluationError(f"{path}: no '{id_column}' column to join on (columns: "
                                  f"{', '.join(fields)}); choose one with --id-column")
        return id_column
    for name in ("id", "file"):
        if name in fields:
            return name
    raise EvaluationError(f"{path}: no 'id' or 'file' column to join on (columns: "
                          f"{', '.join(fields)}); choose one with --id-column")


def binary_labels(raw: list[str], positive: str | None, where: str = "labels") -> np.ndarray:
    """0/1 labels from 0/1 text, or from any text with ``positive`` naming the positive
    class (matched ignoring case and surrounding spaces; every other value is negative)."""
    values = [str(v).strip() for v in raw]
    distinct = sorted(set(values))
    shown = ", ".join(repr(v) for v in distinct[:10]) + (" ..." if len(distinct) > 10 else "")
    if positive is None:
        try:
            return np.array([float(v) for v in values])
        except ValueError:
            raise EvaluationError(f"{where} are text ({len(distinct)} distinct values: "
                                  f"{shown}): say which one is positive with --positive VALUE"
                                  ) from None
    wanted = positive.strip().casefold()
    if wanted not in {v.casefold() for v in distinct}:
        raise EvaluationError(f"--positive {positive!r} is not among the {where}' values "
                              f"({shown})")
    return np.array([float(v.casefold() == wanted) for v in values])


def read_predictions(path: str | os.PathLike[str], labels_path: str | None = None,
                     *, score_column: str = "score", label_column: str = "label",
                     id_column: str | None = None, positive: str | None = None
                     ) -> Predictions:
    """Read and validate a predictions CSV (and optionally a separate labels CSV joined on
    ``id_column``: by default ``id``, or ``file`` in a file without an ``id`` column).
    Labels are 0/1, or text with ``positive`` naming the positive class."""
    fields, rows = read_csv_rows(path)
    if score_column not in fields:
        raise EvaluationError(f"{path}: no '{score_column}' column (columns: {', '.join(fields)})")
    key = _id_column(path, fields, id_column) if labels_path else (
        id_column or next((c for c in ("id", "file") if c in fields), None))
    if key is not None and key not in fields:
        raise EvaluationError(f"{path}: no '{key}' column (columns: {', '.join(fields)})")
    ids = [(r.get(key) or "").strip() or str(i) if key else str(i) for i, r in enumerate(rows)]
    if labels_path:
        lfields, lrows = read_csv_rows(labels_path)
        lkey = _id_column(labels_path, lfields, id_column)
        if label_column not in lfields:
            raise EvaluationError(f"{labels_path}: no '{label_column}' column (columns: "
                                  f"{', '.join(lfields)})")
        truth = {(r.get(lkey) or "").strip(): r[label_column] for r in lrows}
        extra = {(r.get(lkey) or "").strip(): r for r in lrows}  # other columns: subgroups
        missing = [i for i in ids if i not in truth]
        if missing:
            raise EvaluationError(
                f"{len(missing)} of {len(ids)} predictions have no label in {labels_path} "
                f"(e.g. {key} {missing[0]!r}; joined on {key!r} = {lkey!r})")
        raw_labels = [truth[i] for i in ids]
    elif label_column in fields:
        raw_labels = [r[label_column] for r in rows]
    else:
        raise EvaluationError(f"{path}: no '{label_column}' column and no --labels file")
    try:
        scores = np.array([float(r[score_column]) for r in rows])
    except ValueError as exc:
        raise EvaluationError(f"{path}: a score is not a number ({exc})") from exc
    labels = binary_labels(raw_labels, positive)
    labels, scores = metrics.check_inputs(labels, scores)
    columns = {f: [r.get(f, "") for r in rows] for f in fields
               if f not in (score_column, label_column)}
    if labels_path:
        for f in lfields:
            if f not in columns and f not in (lkey, label_column):
                columns[f] = [extra[i].get(f, "") for i in ids]
    return Predictions(ids, scores, labels, columns, str(path))


def format_p(p: float) -> str:
    """A p-value for people: ``p<0.001`` or two significant digits, never ``p=0``."""
    if p is None or math.isnan(p):
        return "p=n/a"
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.2g}"


def _choose_threshold(p: Predictions, threshold: float | None) -> float:
    if threshold is not None:
        return float(threshold)
    roc = metrics.roc_curve(p.labels, p.scores)
    j = np.array(roc["tpr"]) - np.array(roc["fpr"])
    best = int(np.argmax(j[1:])) + 1  # Youden's J, skipping the +inf threshold
    return float(roc["thresholds"][best])


def evaluate(p: Predictions, *, threshold: float | None = None, by: list[str] | None = None,
             compare: Predictions | None = None, bootstrap: bool = False) -> dict[str, object]:
    """Everything the report shows, as a JSON-ready dict."""
    t = _choose_threshold(p, threshold)
    out: dict[str, object] = {
        "source": p.source, "cases": len(p.labels), "positives": int(p.labels.sum()),
        "threshold": t, "threshold_rule": "given" if threshold is not None else "Youden J",
        "auc": metrics.delong_auc(p.labels, p.scores).to_dict(),
        "at_threshold": metrics.confusion_metrics(p.labels, p.scores, t),
        "roc": metrics.roc_curve(p.labels, p.scores),
        "pr": metrics.pr_curve(p.labels, p.scores),
        "workload": metrics.workload_curve(p.labels, p.scores),
    }
    if bootstrap:
        out["auc_bootstrap"] = metrics.bootstrap_auc(p.labels, p.scores).to_dict()
    if p.scores.min() >= 0 and p.scores.max() <= 1:
        out["calibration"] = metrics.calibration(p.labels, p.scores)
        out["decision_curve"] = metrics.decision_curve(p.labels, p.scores)
    for column in by or []:
        if column not in p.columns:
            raise EvaluationError(f"no column '{column}' for subgroups "
                                  f"(columns: {', '.join(p.columns)})")
        out.setdefault("subgroups", {})[column] = analysis.subgroups(  # type: ignore[index]
            p.labels, p.scores, p.columns[column], t)
    if compare is not None:
        out["external"] = {"source": compare.source, **analysis.compare_sites(
            (p.labels, p.scores), (compare.labels, compare.scores), t)}
    return out


def _png(fig: object) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    import matplotlib.pyplot as plt

    plt.close(fig)  # type: ignore[arg-type]
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(result: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    roc, pr = result["roc"], result["pr"]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    auc = result["auc"]
    ax.plot(roc["fpr"], roc["tpr"], label=f"AUC {auc['auc']:.3f} ({auc['low']:.3f}-"
            f"{auc['high']:.3f})")
    if "external" in result:
        ax.set_title("ROC (internal)")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    figs["roc"] = _png(fig)
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(pr["recall"], pr["precision"])
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title(f"average precision {pr['average_precision']:.3f}")
    figs["pr"] = _png(fig)
    if "calibration" in result:
        cal = result["calibration"]
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.plot([b["mean_predicted"] for b in cal["bins"]],
                [b["fraction_positive"] for b in cal["bins"]], "o-")
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("fraction positive")
        ax.set_title(f"ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}")
        figs["calibration"] = _png(fig)
        dc = result["decision_curve"]
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.plot(dc["thresholds"], dc["model"], label="model")
        ax.plot(dc["thresholds"], dc["treat_all"], label="treat all")
        ax.plot(dc["thresholds"], dc["treat_none"], label="treat none")
        ax.set_ylim(-0.05, max(0.05, max(dc["model"] + dc["treat_all"]) * 1.1))
        ax.set_xlabel("threshold probability")
        ax.set_ylabel("net benefit")
        ax.legend()
        figs["decision"] = _png(fig)
    wl = result["workload"]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([r["workload_reduction"] for r in wl], [r["positives_deprioritised"] for r in wl],
            "o-")
    ax.set_xlabel("studies no longer read first")
    ax.set_ylabel("positives deprioritised")
    ax.set_title("triage workload trade-off")
    figs["workload"] = _png(fig)
    return figs


def _fmt(ci: dict[str, float]) -> str:
    if any(math.isnan(ci[k]) for k in ("value", "low", "high")):
        return "n/a"
    return f"{ci['value']:.3f} ({ci['low']:.3f}-{ci['high']:.3f})"


def render_html(result: dict[str, Any]) -> str:
    """A self-contained HTML page (plots embedded as PNG data URIs)."""
    figs = _plots(result)
    e = html.escape
    at = result["at_threshold"]
    auc = result["auc"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>radguard evaluation</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:"
        "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
        "th{background:#eee}img{margin:.5em}.flag{color:#b00;font-weight:bold}</style></head>",
        f"<body><h1>Evaluation of {e(str(result['source']))}</h1>",
        f"<p>{result['cases']} cases, {result['positives']} positive. Operating threshold "
        f"{result['threshold']:.4g} ({e(str(result['threshold_rule']))}). Intervals are 95%: "
        "DeLong for AUC, Wilson for proportions, bootstrap for F1.</p>",
        "<h2>Summary</h2><table id='summary'><tr><th>metric</th><th>value (95% CI)</th></tr>",
        f"<tr><td>AUC</td><td>{auc['auc']:.3f} ({auc['low']:.3f}-{auc['high']:.3f})</td></tr>",
    ]
    if "auc_bootstrap" in result:
        parts.append(f"<tr><td>AUC (bootstrap)</td><td>{_fmt(result['auc_bootstrap'])}"
                     "</td></tr>")
    for name in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "f1"):
        parts.append(f"<tr><td>{name}</td><td>{_fmt(at[name])}</td></tr>")
    parts.append(f"</table><p>TP {at['tp']}, FP {at['fp']}, TN {at['tn']}, FN {at['fn']}</p>")
    parts.append("<h2>Curves</h2><div id='plots'>")
    for name, data in figs.items():
        parts.append(f"<img alt='{name}' id='plot-{name}' src='data:image/png;base64,{data}'>")
    parts.append("</div><h2>Workload</h2><table id='workload'><tr><th>cut-off</th>"
                 "<th>studies deprioritised</th><th>positives deprioritised</th></tr>")
    for row in result["workload"]:
        parts.append(f"<tr><td>{row['cutoff']:.4g}</td><td>{row['workload_reduction']:.1%}"
                     f"</td><td>{row['positives_deprioritised']:.1%}</td></tr>")
    parts.append("</table>")
    for column, sub in (result.get("subgroups") or {}).items():
        parts.append(f"<h2>Subgroups by {e(column)}</h2><table class='subgroups'><tr><th>group"
                     "</th><th>n</th><th>AUC</th><th>sensitivity</th><th>specificity</th></tr>")
        for name, row in sub["groups"].items():
            auc_text = (f"{row['auc']['auc']:.3f} ({row['auc']['low']:.3f}-"
                        f"{row['auc']['high']:.3f})" if "auc" in row else "n/a")
            parts.append(f"<tr><td>{e(name)}</td><td>{row['n']}</td><td>{auc_text}</td>"
                         f"<td>{_fmt(row['sensitivity'])}</td><td>{_fmt(row['specificity'])}"
                         "</td></tr>")
        parts.append("</table><ul>")
        for metric, gap in sub["largest_gaps"].items():
            flag = " <span class='flag'>credible gap</span>" if gap["flag"] else ""
            parts.append(f"<li>{metric}: {e(gap['best'])} vs {e(gap['worst'])}, gap "
                         f"{gap['gap']:.3f} ({gap['low']:.3f}-{gap['high']:.3f}){flag}</li>")
        parts.append("</ul>")
    if "external" in result:
        ext = result["external"]
        d = ext["auc_difference"]
        parts.append(f"<h2>External validation: {e(str(ext['source']))}</h2><table id='external'>"
                     f"<tr><th></th><th>internal</th><th>external</th><th>change</th></tr>"
                     f"<tr><td>AUC</td><td>{ext['internal_auc']['auc']:.3f}</td><td>"
                     f"{ext['external_auc']['auc']:.3f}</td><td>{-d['difference']:+.3f} "
                     f"({-d['high']:+.3f} to {-d['low']:+.3f}), {format_p(d['p_value'])}</td></tr>")
        for name in ("sensitivity", "specificity"):
            parts.append(f"<tr><td>{name}</td><td>{_fmt(ext[name]['internal'])}</td><td>"
                         f"{_fmt(ext[name]['external'])}</td><td>{ext[name]['change']:+.3f}"
                         "</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result: dict[str, object], path: str | os.PathLike[str]) -> None:
    """Write the HTML report atomically."""
    atomic_write_bytes(path, render_html(result).encode("utf-8"))


def to_json(result: dict[str, object]) -> str:
    """The JSON summary (curves included), NaN written as null."""
    def clean(value: object) -> object:
        if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    return json.dumps(clean(result))
