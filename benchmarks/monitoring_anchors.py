"""Established monitoring tools as anchors for the monitoring benchmark (issue 30).

NannyML 0.13.1 and Evidently 0.7.23 are run on the same streams as radguard's ``Monitor``;
each function returns the chunks on which the tool's *own default* alert rule fires, so the
benchmark can print delay to alarm and false alarms side by side. Install the pins with
``pip install -r benchmarks/requirements-anchors.txt`` (benchmark only, not a radguard
dependency). Both packages are imported lazily; a missing one raises ImportError naming the pip
command. Numpy in, python out: no pandas object crosses the API.

Chunking (all anchors): consecutive, non-overlapping chunks of ``chunk_size`` studies in stream
order; an incomplete trailing chunk is dropped (``SizeBasedChunker(chunk_size,
incomplete="drop")``, NannyML's ``chunk_size=`` would keep it as a smaller, noisier chunk).
The reference is chunked the same way. ``Alert.end`` is the stream position (0-based,
exclusive) of the chunk's last study, i.e. the number of studies seen when the alert exists.
One Alert per (alerting chunk, metric); the first alert is ``min(a.end for a in alerts)``.

Anchors, each exactly the tool's defaults unless said:

* ``nannyml_cbpe`` / ``NannyCbpe``: ``nml.CBPE(problem_type="classification_binary",
  y_pred_proba=score, y_pred=(score >= threshold), y_true=label, metrics=["recall",
  "specificity"])``; default isotonic calibration (fitted only if the reference needs it)
  and default ``StandardDeviationThreshold()``: alert when the chunk's *estimated* metric is
  outside mean +- 3 std of the *realized* metric over the reference chunks (clipped to
  [0, 1]). Labels are used on the reference only. metric = "cbpe:recall" / "cbpe:specificity",
  value = the estimate.
* ``nannyml_univariate``: ``nml.UnivariateDriftCalculator(column_names=names,
  treat_as_numerical=names)``, default continuous method ``jensen_shannon`` and default
  threshold ``StandardDeviationThreshold(std_lower_multiplier=None)``: alert when a column's
  JS distance to the reference exceeds mean + 3 std of the reference chunks' JS distances.
  ``treat_as_numerical`` only stops NannyML guessing that a low-cardinality float feature is
  categorical. metric = "js:<name>", value = the distance.
* ``nannyml_realized``: ``nml.PerformanceCalculator(problem_type="classification_binary",
  metrics=["recall", "specificity"], ...)`` on the labelled studies only (rows whose label
  is NaN are dropped, chunks are ``chunk_size`` *labelled* studies; ``end`` maps back to the
  stream position of the chunk's last labelled study + 1). Default rule as CBPE: realized
  metric outside mean +- 3 std of the reference chunks. metric = "realized:recall" / ...
* ``evidently_drift``: ``Report([DataDriftPreset()], include_tests=True)`` semantics, per
  chunk vs the whole reference. Per column Evidently's default stat test, chosen by its
  ``get_stattest(ref, cur, ColumnType.Numerical, None)``: two-sample K-S, drift when p <= 0.05,
  if the reference has <= 1000 rows (and > 5 distinct values); else normed Wasserstein, drift
  when >= 0.1. Dataset drift (the preset's ``DriftedColumnsCount`` test "share < 0.5") fires
  when the share of drifted columns >= 0.5. metric = "drift:<name>" (value = p-value or
  distance) and "dataset_drift" (value = share of drifted columns). By default the stat test
  objects are called directly (the same functions and thresholds the Report calls, ~100x
  faster); ``exact=True`` runs the full Report per chunk and reads its test statuses.
* ``evidently_classification``: ``Report([Recall(), TNR()], include_tests=True)`` with a
  reference: Evidently's default test with reference is ``eq(Reference(relative=0.2))``, i.e.
  fail when |chunk value - reference value| > 0.2 * reference value, on the labels predicted
  as ``score >= threshold``. Unlabelled (NaN) rows dropped as in ``nannyml_realized``.
  Fast path computes recall/TNR with numpy and applies that rule; ``exact=True`` runs the
  Report per chunk. metric = "evidently:recall" / "evidently:specificity".

Telemetry: NannyML's usage logging and Evidently's telemetry are switched off through their
environment variables before import (NML_DISABLE_USAGE_LOGGING, EVIDENTLY_DISABLE_TELEMETRY,
ITERATIVE_DO_NOT_TRACK); their warnings ("The resulting number of chunks is too low" when the
reference has < 6 chunks, ...) and logger output are silenced inside the calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

INSTALL_HINT = ("pip install -r benchmarks/requirements-anchors.txt "
                "(nannyml==0.13.1 evidently==0.7.23 pandas==2.3.3)")
CBPE_METRICS = ("recall", "specificity")


@dataclass(frozen=True)
class Alert:
    end: int  # stream position (0-based, exclusive) where the alerting chunk ends
    metric: str
    value: float


# ---------------------------------------------------------------------------------------------
# lazy imports, quiet calls


def _no_telemetry() -> None:
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("ITERATIVE_DO_NOT_TRACK", "1")


def _import(name: str) -> object:
    _no_telemetry()
    try:
        with _quiet():
            return __import__(name)
    except ImportError as exc:
        raise ImportError(f"the {name} anchor needs {name}: {INSTALL_HINT} ({exc})") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("nannyml", "evidently")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _pd():
    _import("pandas")
    import pandas as pd

    return pd


def _nml():
    _import("nannyml")
    import nannyml as nml

    return nml


def _chunker(chunk_size: int):
    from nannyml.chunk import SizeBasedChunker

    return SizeBasedChunker(int(chunk_size), incomplete="drop")


def _labelled(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with a label: (scores, int labels, their stream positions)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=float)
    keep = np.flatnonzero(~np.isnan(labels))
    return scores[keep], labels[keep].astype(int), keep


def _frame(scores: np.ndarray, threshold: float, labels: np.ndarray | None = None):
    pd = _pd()
    scores = np.asarray(scores, dtype=float)
    cols = {"score": scores, "pred": (scores >= threshold).astype(int)}
    if labels is not None:
        cols["label"] = np.asarray(labels).astype(int)
    return pd.DataFrame(cols)


def _nml_alerts(df, metrics: Sequence[str], prefix: str,
                positions: np.ndarray | None = None) -> list[Alert]:
    """Alerts from a NannyML result frame with ('chunk', 'end_index') and (metric, 'alert')."""
    out = []
    ends = df[("chunk", "end_index")].to_numpy(dtype=int)  # inclusive index of the last row
    for m in metrics:
        flags = df[(m, "alert")].to_numpy()
        vals = df[(m, "value")].to_numpy(dtype=float)
        for e, f, v in zip(ends, flags, vals, strict=True):
            if f is True or f == 1:  # NaN (metric not computable) is no alert
                pos = int(positions[e]) if positions is not None else int(e)
                out.append(Alert(pos + 1, f"{prefix}:{m}", float(v)))
    return sorted(out, key=lambda a: (a.end, a.metric))


# ---------------------------------------------------------------------------------------------
# NannyML


def _fitted_binary(kind: str, ref_scores: np.ndarray, ref_labels: np.ndarray,
                   threshold: float, chunk_size: int, metrics: Sequence[str]):
    """NannyML's ``kind`` (CBPE or PerformanceCalculator) for a binary classifier at
    ``threshold``, fitted on the labelled reference."""
    scores, labels, _ = _labelled(ref_scores, ref_labels)
    fitted = getattr(_nml(), kind)(
        problem_type="classification_binary", y_pred_proba="score", y_pred="pred",
        y_true="label", metrics=list(metrics), chunker=_chunker(chunk_size))
    with _quiet():
        fitted.fit(_frame(scores, threshold, labels))
    return fitted


class NannyCbpe:
    """CBPE fitted once on a reference; ``.alerts(stream_scores)`` per stream."""

    def __init__(self, ref_scores: np.ndarray, ref_labels: np.ndarray, *, threshold: float,
                 chunk_size: int, metrics: Sequence[str] = CBPE_METRICS) -> None:
        self.threshold, self.chunk_size, self.metrics = float(threshold), int(chunk_size), tuple(
            metrics)
        self._estimator = _fitted_binary("CBPE", ref_scores, ref_labels, self.threshold,
                                         self.chunk_size, self.metrics)

    def alerts(self, stream_scores: np.ndarray) -> list[Alert]:
        if len(stream_scores) < self.chunk_size:
            return []
        with _quiet():
            res = self._estimator.estimate(_frame(stream_scores, self.threshold))
            df = res.filter(period="analysis").to_df()
        return _nml_alerts(df, self.metrics, "cbpe")


def nannyml_cbpe(ref_scores: np.ndarray, ref_labels: np.ndarray, stream_scores: np.ndarray, *,
                 threshold: float, chunk_size: int, metrics: Sequence[str] = CBPE_METRICS
                 ) -> list[Alert]:
    return NannyCbpe(ref_scores, ref_labels, threshold=threshold, chunk_size=chunk_size,
                     metrics=metrics).alerts(stream_scores)


class NannyUnivariate:
    """UnivariateDriftCalculator (jensen_shannon) fitted once; ``.alerts(stream_features)``."""

    def __init__(self, ref_features: np.ndarray, names: Sequence[str], *, chunk_size: int) -> None:
        nml, pd = _nml(), _pd()
        self.names, self.chunk_size = [str(n) for n in names], int(chunk_size)
        self._calc = nml.UnivariateDriftCalculator(
            column_names=self.names, treat_as_numerical=self.names, chunker=_chunker(chunk_size))
        with _quiet():
            self._calc.fit(pd.DataFrame(np.asarray(ref_features, dtype=float), columns=self.names))

    def alerts(self, stream_features: np.ndarray) -> list[Alert]:
        if len(stream_features) < self.chunk_size:
            return []
        pd = _pd()
        with _quiet():
            res = self._calc.calculate(
                pd.DataFrame(np.asarray(stream_features, dtype=float), columns=self.names))
            df = res.filter(period="analysis").to_df()
        out = []
        ends = df[("chunk", "chunk", "end_index")].to_numpy(dtype=int)
        for n in self.names:
            flags = df[(n, "jensen_shannon", "alert")].to_numpy()
            vals = df[(n, "jensen_shannon", "value")].to_numpy(dtype=float)
            out += [Alert(int(e) + 1, f"js:{n}", float(v))
                    for e, f, v in zip(ends, flags, vals, strict=True) if f is True or f == 1]
        return sorted(out, key=lambda a: (a.end, a.metric))


def nannyml_univariate(ref_features: np.ndarray, stream_features: np.ndarray,
                       names: Sequence[str], *, chunk_size: int) -> list[Alert]:
    return NannyUnivariate(ref_features, names, chunk_size=chunk_size).alerts(stream_features)


class NannyRealized:
    """PerformanceCalculator fitted once; ``.alerts(stream_scores, stream_labels)``."""

    def __init__(self, ref_scores: np.ndarray, ref_labels: np.ndarray, *, threshold: float,
                 chunk_size: int, metrics: Sequence[str] = CBPE_METRICS) -> None:
        unknown = set(metrics) - set(CBPE_METRICS)
        if unknown:
            raise ValueError(f"NannyRealized supports {CBPE_METRICS}, not {sorted(unknown)}")
        self.threshold, self.chunk_size, self.metrics = float(threshold), int(chunk_size), tuple(
            metrics)
        self._calc = _fitted_binary("PerformanceCalculator", ref_scores, ref_labels,
                                    self.threshold, self.chunk_size, self.metrics)

    def alerts(self, stream_scores: np.ndarray, stream_labels: np.ndarray, *,
               exact: bool = False) -> list[Alert]:
        scores, labels, positions = _labelled(stream_scores, stream_labels)
        n_chunks = len(scores) // self.chunk_size
        if n_chunks == 0:
            return []
        if exact:
            with _quiet():
                res = self._calc.calculate(_frame(scores, self.threshold, labels))
                df = res.filter(period="analysis").to_df()
            return _nml_alerts(df, self.metrics, "realized", positions)
        # Fast path (default): NannyML's calculate() costs ~15 ms a chunk (sklearn input
        # checks); the realized metrics are recomputed here with numpy as NannyML defines them
        # (NaN when the chunk's labels, or for recall its predictions, hold a single class)
        # and judged by the fitted NannyML metric's own alert() and thresholds.
        pred = (scores >= self.threshold).astype(int)
        out = []
        for c in range(n_chunks):
            sl = slice(c * self.chunk_size, (c + 1) * self.chunk_size)
            y, p = labels[sl], pred[sl]
            single = y.min() == y.max()
            values = {"recall": np.nan if single or p.min() == p.max() else p[y == 1].mean(),
                      "specificity": np.nan if single else 1 - p[y == 0].mean()}
            end = int(positions[sl.stop - 1]) + 1
            for metric in self._calc.metrics:
                v = float(values[metric.name])
                if metric.alert(v):
                    out.append(Alert(end, f"realized:{metric.name}", v))
        return out


def nannyml_realized(ref_scores: np.ndarray, ref_labels: np.ndarray, stream_scores: np.ndarray,
                     stream_labels: np.ndarray, *, threshold: float, chunk_size: int,
                     exact: bool = False) -> list[Alert]:
    return NannyRealized(ref_scores, ref_labels, threshold=threshold,
                         chunk_size=chunk_size).alerts(stream_scores, stream_labels, exact=exact)


# ---------------------------------------------------------------------------------------------
# Evidently

DRIFT_SHARE = 0.5  # DataDriftPreset(drift_share=0.5), its default
RELATIVE = 0.2  # ClassificationQuality._default_tests_with_reference: eq(Reference(relative=0.2))


def _evidently():
    _import("evidently")
    import evidently

    return evidently


def _finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]  # Evidently drops +-inf and NaN before its stat test


def evidently_drift(ref_features: np.ndarray, stream_features: np.ndarray, names: Sequence[str],
                    *, chunk_size: int, exact: bool = False) -> list[Alert]:
    _evidently()
    ref = np.asarray(ref_features, dtype=float)
    stream = np.asarray(stream_features, dtype=float)
    names = [str(n) for n in names]
    chunk_size = int(chunk_size)
    n_chunks = len(stream) // chunk_size
    if n_chunks == 0:
        return []
    if exact:
        return _evidently_drift_report(ref, stream, names, chunk_size, n_chunks)
    pd = _pd()
    from evidently.legacy.calculations.stattests.registry import get_stattest
    from evidently.legacy.core import ColumnType
    from scipy.stats import ks_2samp

    num = ColumnType.Numerical
    ref_cols = [pd.Series(_finite(ref[:, j])) for j in range(len(names))]
    chunks = stream[: n_chunks * chunk_size].reshape(n_chunks, chunk_size, len(names))
    all_finite = bool(np.isfinite(chunks).all())
    drifted = np.zeros((n_chunks, len(names)), dtype=bool)
    scores = np.full((n_chunks, len(names)), np.nan)
    with _quiet():
        for j in range(len(names)):
            # Evidently's choice depends on len(ref) and on the number of distinct values in
            # ref + chunk; once the reference alone has > 5 it is the same for every chunk.
            fixed = ref_cols[j].nunique() > 5
            test = get_stattest(ref_cols[j], pd.Series(chunks[0, :, j]), num, None) if fixed \
                else None
            if fixed and test.name == "ks" and all_finite:
                # exactly Evidently's _ks_stat_test (scipy ks_2samp, drift when p <= 0.05),
                # vectorised over chunks: same p-values, ~5x faster than one call per chunk
                p = ks_2samp(ref_cols[j].to_numpy()[:, None], chunks[:, :, j].T, axis=0).pvalue
                scores[:, j], drifted[:, j] = p, p <= test.default_threshold
                continue
            for c in range(n_chunks):
                cur = pd.Series(_finite(chunks[c, :, j]))
                t = test if fixed else get_stattest(ref_cols[j], cur, num, None)
                r = t(ref_cols[j], cur, num, None)
                scores[c, j], drifted[c, j] = r.drift_score, bool(r.drifted)
    out = []
    for c in range(n_chunks):
        end = (c + 1) * chunk_size
        out += [Alert(end, f"drift:{n}", float(scores[c, j]))
                for j, n in enumerate(names) if drifted[c, j]]
        share = float(drifted[c].mean())
        if share >= DRIFT_SHARE:
            out.append(Alert(end, "dataset_drift", share))
    return out


def _evidently_drift_report(ref: np.ndarray, stream: np.ndarray, names: list[str],
                            chunk_size: int, n_chunks: int) -> list[Alert]:
    pd = _pd()
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    dd = DataDefinition(numerical_columns=names)
    reference = Dataset.from_pandas(pd.DataFrame(ref, columns=names), data_definition=dd)
    report = Report([DataDriftPreset()], include_tests=True)
    out = []
    with _quiet():
        for c in range(n_chunks):
            end = (c + 1) * chunk_size
            cur = Dataset.from_pandas(
                pd.DataFrame(stream[c * chunk_size:end], columns=names), data_definition=dd)
            d = report.run(cur, reference).dict()
            values = {m["id"]: m["value"] for m in d["metrics"]}
            for t in d["tests"]:
                if str(t["status"]).split(".")[-1].upper() != "FAIL":
                    continue
                params = t["metric_config"]["params"]
                value = values[t["metric_config"]["metric_id"]]
                if "column" in params:
                    out.append(Alert(end, f"drift:{params['column']}", float(value)))
                else:
                    out.append(Alert(end, "dataset_drift", float(value["share"])))
    return sorted(out, key=lambda a: (a.end, a.metric))


def _rates(labels: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    pos, neg = labels == 1, labels == 0
    return {"recall": float(pred[pos].mean()) if pos.any() else float("nan"),
            "specificity": float(1 - pred[neg].mean()) if neg.any() else float("nan")}


def evidently_classification(ref_scores: np.ndarray, ref_labels: np.ndarray,
                             stream_scores: np.ndarray, stream_labels: np.ndarray, *,
                             threshold: float, chunk_size: int, exact: bool = False
                             ) -> list[Alert]:
    _evidently()
    rs, rl, _ = _labelled(ref_scores, ref_labels)
    ss, sl, positions = _labelled(stream_scores, stream_labels)
    chunk_size = int(chunk_size)
    n_chunks = len(ss) // chunk_size
    if exact:
        return _evidently_classification_report(rs, rl, ss, sl, positions, float(threshold),
                                                chunk_size, n_chunks)
    ref = _rates(rl, (rs >= threshold).astype(int))
    out = []
    for c in range(n_chunks):
        sl_c = slice(c * chunk_size, (c + 1) * chunk_size)
        cur = _rates(sl[sl_c], (ss[sl_c] >= threshold).astype(int))
        end = int(positions[(c + 1) * chunk_size - 1]) + 1
        for m in CBPE_METRICS:
            # Evidently's ApproxValue: |value - ref| <= relative * |ref|; NaN never equals
            if not abs(cur[m] - ref[m]) <= RELATIVE * abs(ref[m]):
                out.append(Alert(end, f"evidently:{m}", cur[m]))
    return out


def _evidently_classification_report(rs: np.ndarray, rl: np.ndarray, ss: np.ndarray,
                                     sl: np.ndarray, positions: np.ndarray, threshold: float,
                                     chunk_size: int, n_chunks: int) -> list[Alert]:
    pd = _pd()
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.metrics import TNR, Recall

    dd = DataDefinition(
        classification=[BinaryClassification(target="target", prediction_labels="prediction",
                                             pos_label=1)],
        categorical_columns=["target", "prediction"])

    def ds(labels: np.ndarray, scores: np.ndarray):
        return Dataset.from_pandas(
            pd.DataFrame({"target": labels, "prediction": (scores >= threshold).astype(int)}),
            data_definition=dd)

    reference = ds(rl, rs)
    report = Report([Recall(), TNR()], include_tests=True)
    names = {"Recall": "recall", "TNR": "specificity"}
    out = []
    with _quiet():
        for c in range(n_chunks):
            sl_c = slice(c * chunk_size, (c + 1) * chunk_size)
            end = int(positions[(c + 1) * chunk_size - 1]) + 1
            d = report.run(ds(sl[sl_c], ss[sl_c]), reference).dict()
            values = {m["id"]: m["value"] for m in d["metrics"]}
            for t in d["tests"]:
                if str(t["status"]).split(".")[-1].upper() != "FAIL":
                    continue
                kind = t["metric_config"]["params"]["type"].split(":")[-1]
                out.append(Alert(end, f"evidently:{names.get(kind, kind)}",
                                 float(values[t["metric_config"]["metric_id"]])))
    return sorted(out, key=lambda a: (a.end, a.metric))
