"""Multi-reader multi-case (MRMC) analysis of ROC reader studies.

A reader study asks whether readers are more accurate with one modality (image type,
processing, AI aid...) than with another. Every reader reads every case in every modality
("fully crossed"), so the reader AUCs are correlated through the shared cases and through the
readers' own skill; an ordinary t-test on AUCs ignores the case correlation and a single pooled
AUC ignores reader variability. The methods here are the established ones, so that a result
can be compared line by line with what the reference programs print:

* figure of merit: the empirical (trapezoidal, Wilcoxon-Mann-Whitney) AUC per reader and
  modality, ties counted one half;
* **Obuchowski-Rockette (OR)** with the **Hillis (2007)** denominator degrees of freedom
  (``analysis="orh"``): an ANOVA of the reader AUCs whose error term carries the case-induced
  covariances Var, Cov1 (same reader, different modality), Cov2 (different reader, same
  modality) and Cov3 (different reader, different modality), estimated by the **jackknife**
  over cases (default, what the Iowa OR-DBM MRMC program and RJafroc do) or by **DeLong**'s
  structural components (``method="delong"``);
* **Dorfman-Berbaum-Metz (DBM)** (``analysis="dbm"``): a treatment x reader x case ANOVA of
  jackknife pseudovalues, with the Hillis error term and ddf. For the Wilcoxon AUC it gives
  the same F, ddf and p as ORH-jackknife for random readers and cases (Hillis et al. 2008);
  its fixed-reader analysis differs (ddf (t-1)(c-1) instead of infinity);
* three generalisations: random readers and random cases (**RRRC**, the one to report: the
  result is about new readers and new cases), fixed readers / random cases (**FRRC**: only
  these readers) and random readers / fixed cases (**RRFC**: only these cases);
* with more than two modalities: the global F test and every pairwise difference with its
  confidence interval and p-value (no multiplicity adjustment, as in the reference programs:
  read the pairwise results only when the global test rejects).

Validation (see ``tests/evaluation/test_mrmc.py`` and ``docs/reader-studies.md``): the Van
Dyke (1993), Franken (1992) and FedRoc (Zanca 2009) studies give, to 4 decimals or better,
the numbers published by OR-DBM MRMC 2.51 (Iowa), JAFROC 4.2.1 and RJafroc.

References: Obuchowski & Rockette, Commun Stat Simul Comput 1995;24:285-308. Hillis et al.,
Stat Med 2005;24:1579-1607. Hillis, Stat Med 2007;26:596-619. Hillis, Berbaum & Metz, Acad
Radiol 2008;15:647-661. Dorfman, Berbaum & Metz, Invest Radiol 1992;27:723-731. DeLong et al.,
Biometrics 1988;44:837-845.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from radguard.evaluation.metrics import EvaluationError, case_components
from radguard.evaluation.report import read_csv_rows

__all__ = [
    "COLUMNS",
    "Comparison",
    "DesignTest",
    "MrmcResult",
    "ReaderStudy",
    "ReaderStudyError",
    "analyze",
    "case_components",
    "dbm_mean_squares",
    "delong_covariance",
    "empirical_auc",
    "format_table",
    "jackknife_aucs",
    "jackknife_covariance",
    "or_covariances",
    "or_mean_squares",
    "read_ratings",
    "render_html",
    "study_from_rows",
    "to_json",
    "write_html",
]

#: The columns of a ratings CSV, in the order they are documented.
COLUMNS = ("reader", "modality", "case", "truth", "rating")
METHODS = ("jackknife", "delong")
ANALYSES = ("orh", "dbm")
DESIGNS = ("rrrc", "frrc", "rrfc")
ALPHA = 0.05


class ReaderStudyError(EvaluationError):
    """A ratings table that cannot be analysed as a fully crossed MRMC ROC study."""


# -- input ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReaderStudy:
    """A fully crossed study: ``ratings[modality, reader, case]`` and ``truth[case]``.

    Labels keep the order of first appearance in the input, so "the second modality minus the
    first" means what the person who wrote the CSV expects.
    """

    modalities: tuple[str, ...]
    readers: tuple[str, ...]
    cases: tuple[str, ...]
    truth: np.ndarray
    ratings: np.ndarray
    source: str = ""

    @property
    def positives(self) -> int:
        """Number of diseased (truth 1) cases."""
        return int(self.truth.sum())

    @property
    def negatives(self) -> int:
        """Number of non-diseased (truth 0) cases."""
        return int(len(self.truth) - self.truth.sum())


def _parse_truth(value: str, where: str) -> int:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number not in (0.0, 1.0):
        raise ReaderStudyError(f"{where}: truth must be 0 or 1, got {value!r}")
    return int(number)


def _parse_rating(value: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError as exc:
        raise ReaderStudyError(f"{where}: rating {value!r} is not a number") from exc
    if not math.isfinite(number):
        raise ReaderStudyError(f"{where}: rating {value!r} is not a finite number")
    return number


def _check_columns(fields: list[str], source: str) -> None:
    names = [f.strip() for f in fields]
    unknown = [f for f in names if f not in COLUMNS]
    missing = [c for c in COLUMNS if c not in names]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(repr(u) for u in unknown)}")
        raise ReaderStudyError(f"{source}: {'; '.join(parts)} (expected exactly: "
                               f"{', '.join(COLUMNS)})")
    if len(set(names)) != len(names):
        raise ReaderStudyError(f"{source}: a column name appears twice")


def study_from_rows(rows: list[dict[str, str]], source: str = "ratings") -> ReaderStudy:
    """Validate rows (dicts with the five columns) and arrange them as a crossed study.

    Every check raises :class:`ReaderStudyError` with the line that is wrong, because a reader
    study is expensive and a silently dropped row changes the answer.
    """
    if not rows:
        raise ReaderStudyError(f"{source}: no ratings")
    order: dict[str, dict[str, int]] = {"modality": {}, "reader": {}, "case": {}}
    truth: dict[str, int] = {}
    cells: dict[tuple[str, str, str], float] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{source} line {line}"
        if None in row or any(row.get(c) is None for c in COLUMNS):
            raise ReaderStudyError(f"{where}: expected {len(COLUMNS)} fields "
                                   f"({', '.join(COLUMNS)})")
        key = {c: row[c].strip() for c in ("modality", "reader", "case")}
        for column, value in key.items():
            if not value:
                raise ReaderStudyError(f"{where}: empty {column}")
            order[column].setdefault(value, len(order[column]))
        if not row["rating"].strip():
            raise ReaderStudyError(f"{where}: missing rating")
        rating = _parse_rating(row["rating"].strip(), where)
        t = _parse_truth(row["truth"].strip(), where)
        previous = truth.setdefault(key["case"], t)
        if previous != t:
            raise ReaderStudyError(f"{where}: case {key['case']!r} has truth {t} here but "
                                   f"{previous} on an earlier row")
        cell = (key["modality"], key["reader"], key["case"])
        if cell in cells:
            raise ReaderStudyError(f"{where}: a second rating by reader {key['reader']!r} of "
                                   f"case {key['case']!r} in modality {key['modality']!r}")
        cells[cell] = rating
    modalities, readers, cases = (tuple(order[c]) for c in ("modality", "reader", "case"))
    _check_design(modalities, readers, cases, cells, truth, source)
    ratings = np.empty((len(modalities), len(readers), len(cases)))
    for (m, r, c), score in cells.items():
        ratings[order["modality"][m], order["reader"][r], order["case"][c]] = score
    return ReaderStudy(modalities, readers, cases, np.array([truth[c] for c in cases]),
                       ratings, source)


def _check_design(modalities: tuple[str, ...], readers: tuple[str, ...],
                  cases: tuple[str, ...], cells: dict[tuple[str, str, str], float],
                  truth: dict[str, int], source: str) -> None:
    """Fully crossed, two modalities or more, two readers or more, two cases of each truth."""
    if len(modalities) < 2:
        raise ReaderStudyError(f"{source}: only one modality ({modalities[0]!r}); an MRMC "
                               "comparison needs two or more")
    if len(readers) < 2:
        raise ReaderStudyError(f"{source}: only one reader ({readers[0]!r}); random-reader "
                               "analysis needs two or more")
    expected = len(modalities) * len(readers) * len(cases)
    if len(cells) != expected:
        for m in modalities:
            for r in readers:
                for c in cases:
                    if (m, r, c) not in cells:
                        raise ReaderStudyError(
                            f"{source}: not fully crossed: {len(cells)} of {expected} "
                            f"reader x modality x case ratings present (e.g. none by reader "
                            f"{r!r} of case {c!r} in modality {m!r})")
    positives = sum(truth.values())
    negatives = len(truth) - positives
    if positives < 2 or negatives < 2:
        raise ReaderStudyError(f"{source}: {positives} diseased and {negatives} non-diseased "
                               "cases; the jackknife needs at least two of each")


def read_ratings(path: str | os.PathLike[str]) -> ReaderStudy:
    """Read a ``reader, modality, case, truth, rating`` CSV (UTF-8, header first)."""
    p = Path(path)
    if p.is_dir():
        raise ReaderStudyError(f"{p}: is a directory, not a CSV file")
    try:
        fields, rows = read_csv_rows(p)
    except EvaluationError as exc:
        raise ReaderStudyError(str(exc).replace("no cases", "no ratings")) from exc
    _check_columns(fields, str(p))
    rows = [{(k.strip() if isinstance(k, str) else k): v for k, v in row.items()}
            for row in rows]
    return study_from_rows(rows, str(p))


# -- figure of merit and its case-level components -----------------------------------------

def empirical_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Wilcoxon-Mann-Whitney AUC: P(positive rated higher) + P(tie) / 2.

    Equal to the trapezoidal area under the empirical ROC curve, the figure of merit every
    reference program calls "Wilcoxon" or "trapezoidal".
    """
    x = np.asarray(negatives, dtype=np.float64)
    y = np.asarray(positives, dtype=np.float64)
    return float(case_components(x, y)[1].mean())


def _components(study: ReaderStudy) -> tuple[np.ndarray, np.ndarray]:
    """Structural components for every modality and reader: ``(t, r, n0)``, ``(t, r, n1)``."""
    neg = study.ratings[:, :, study.truth == 0]
    pos = study.ratings[:, :, study.truth == 1]
    t, r = study.ratings.shape[:2]
    v_neg = np.empty(neg.shape)
    v_pos = np.empty(pos.shape)
    for i in range(t):
        for j in range(r):
            v_neg[i, j], v_pos[i, j] = case_components(neg[i, j], pos[i, j])
    return v_neg, v_pos


def jackknife_aucs(study: ReaderStudy, components: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> np.ndarray:
    """AUC with each case left out in turn: ``(t, r, c)``, cases in the study's order.

    Closed form instead of c re-computations: without non-diseased case k the AUC is
    (n0 * AUC - v_neg[k]) / (n0 - 1), likewise for a diseased case.
    """
    v_neg, v_pos = components if components is not None else _components(study)
    n0, n1 = v_neg.shape[2], v_pos.shape[2]
    auc = v_pos.mean(axis=2, keepdims=True)
    out = np.empty(study.ratings.shape)
    out[:, :, study.truth == 0] = (n0 * auc - v_neg) / (n0 - 1)
    out[:, :, study.truth == 1] = (n1 * auc - v_pos) / (n1 - 1)
    return out


def jackknife_covariance(jk: np.ndarray) -> np.ndarray:
    """Jackknife covariance of the t*r AUCs: (c-1)/c * sum over cases of the cross-products.

    Flattened in (modality, reader) order, so entry [i*r + j, i2*r + j2] is the covariance of
    reader j in modality i with reader j2 in modality i2.
    """
    t, r, c = jk.shape
    flat = jk.reshape(t * r, c)
    centred = flat - flat.mean(axis=1, keepdims=True)
    return (c - 1) / c * centred @ centred.T


def delong_covariance(v_neg: np.ndarray, v_pos: np.ndarray) -> np.ndarray:
    """DeLong (1988) covariance of the t*r AUCs: S10 / n1 + S01 / n0 (unbiased S)."""
    t, r, n0 = v_neg.shape
    n1 = v_pos.shape[2]
    s_neg = np.cov(v_neg.reshape(t * r, n0))
    s_pos = np.cov(v_pos.reshape(t * r, n1))
    return np.atleast_2d(s_pos / n1 + s_neg / n0)


def or_covariances(cov: np.ndarray, t: int, r: int) -> dict[str, float]:
    """Average the AUC covariance matrix into the OR error terms.

    Var: same modality, same reader; Cov1: different modality, same reader; Cov2: same
    modality, different reader; Cov3: both different. These four numbers are all the OR model
    needs from the cases.
    """
    c4 = cov.reshape(t, r, t, r)
    same_m = np.eye(t, dtype=bool)[:, None, :, None]
    same_r = np.eye(r, dtype=bool)[None, :, None, :]
    shape = c4.shape

    def mean(mask: np.ndarray) -> float:
        m = np.broadcast_to(mask, shape)
        return float(c4[m].mean()) if m.any() else math.nan

    return {"var": mean(same_m & same_r), "cov1": mean(~same_m & same_r),
            "cov2": mean(same_m & ~same_r), "cov3": mean(~same_m & ~same_r)}


def or_mean_squares(theta: np.ndarray) -> dict[str, float]:
    """Treatment x reader ANOVA of the AUCs ``theta[t, r]``: MS(T), MS(R), MS(T*R)."""
    t, r = theta.shape
    grand = theta.mean()
    m_t = theta.mean(axis=1)
    m_r = theta.mean(axis=0)
    resid = theta - m_t[:, None] - m_r[None, :] + grand
    return {"ms_t": float(r * np.sum((m_t - grand) ** 2) / (t - 1)),
            "ms_r": float(t * np.sum((m_r - grand) ** 2) / (r - 1)),
            "ms_tr": float(np.sum(resid ** 2) / ((t - 1) * (r - 1)))}


def dbm_mean_squares(pseudo: np.ndarray) -> dict[str, float]:
    """Treatment x reader x case ANOVA (one observation per cell) of pseudovalues."""
    t, r, c = pseudo.shape
    g = pseudo.mean()
    m_t = pseudo.mean(axis=(1, 2))
    m_r = pseudo.mean(axis=(0, 2))
    m_c = pseudo.mean(axis=(0, 1))
    m_tr = pseudo.mean(axis=2)
    m_tc = pseudo.mean(axis=1)
    m_rc = pseudo.mean(axis=0)
    tr = m_tr - m_t[:, None] - m_r[None, :] + g
    tc = m_tc - m_t[:, None] - m_c[None, :] + g
    rc = m_rc - m_r[:, None] - m_c[None, :] + g
    trc = (pseudo - m_tr[:, :, None] - m_tc[:, None, :] - m_rc[None, :, :]
           + m_t[:, None, None] + m_r[None, :, None] + m_c[None, None, :] - g)
    return {
        "ms_t": float(r * c * np.sum((m_t - g) ** 2) / (t - 1)),
        "ms_r": float(t * c * np.sum((m_r - g) ** 2) / (r - 1)),
        "ms_c": float(t * r * np.sum((m_c - g) ** 2) / (c - 1)),
        "ms_tr": float(c * np.sum(tr ** 2) / ((t - 1) * (r - 1))),
        "ms_tc": float(r * np.sum(tc ** 2) / ((t - 1) * (c - 1))),
        "ms_rc": float(t * np.sum(rc ** 2) / ((r - 1) * (c - 1))),
        "ms_trc": float(np.sum(trc ** 2) / ((t - 1) * (r - 1) * (c - 1))),
    }


def _reader_case_ms(pseudo: np.ndarray) -> tuple[float, float, float]:
    """Reader x case ANOVA of one modality's pseudovalues: MS(R), MS(C), MS(R*C)."""
    r, c = pseudo.shape
    g = pseudo.mean()
    m_r = pseudo.mean(axis=1)
    m_c = pseudo.mean(axis=0)
    resid = pseudo - m_r[:, None] - m_c[None, :] + g
    return (float(c * np.sum((m_r - g) ** 2) / (r - 1)),
            float(r * np.sum((m_c - g) ** 2) / (c - 1)),
            float(np.sum(resid ** 2) / ((r - 1) * (c - 1))))


def _pseudovalues(theta: np.ndarray, jk: np.ndarray) -> np.ndarray:
    """DBM pseudovalues c*AUC - (c-1)*AUC(-k), centred so each reader-modality mean is its
    AUC (Hillis 2005 "normalised" pseudovalues; a no-op for the Wilcoxon AUC)."""
    c = jk.shape[2]
    pseudo = c * theta[:, :, None] - (c - 1) * jk
    return pseudo + (theta - pseudo.mean(axis=2))[:, :, None]


# -- tests ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """One modality difference ``second - first`` with its standard error, test and CI.

    ``df`` is infinite for the normal (z) tests of the OR fixed-reader analysis.
    """

    first: str
    second: str
    difference: float
    se: float
    df: float
    statistic: float
    p: float
    low: float
    high: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (infinite df written as null)."""
        return {"first": self.first, "second": self.second,
                "comparison": f"{self.second} - {self.first}", "difference": self.difference,
                "se": self.se, "df": self.df, "t": self.statistic, "p": self.p,
                "ci95": [self.low, self.high]}


@dataclass(frozen=True)
class DesignTest:
    """Global test and pairwise comparisons under one generalisation (rrrc, frrc, rrfc)."""

    design: str
    f: float
    ndf: int
    ddf: float
    p: float
    error_term: float
    comparisons: tuple[Comparison, ...]
    modality_ci: dict[str, tuple[float, float, float, float, float]] = field(
        default_factory=dict)  # modality -> (auc, se, df, low, high)


def _comparison(first: str, second: str, diff: float, se: float, df: float) -> Comparison:
    """t (or z when df is infinite) test and 95% CI of one difference."""
    if not se > 0 or math.isnan(df):
        return Comparison(first, second, diff, se, df, math.nan, math.nan, math.nan, math.nan)
    stat = diff / se
    if math.isinf(df):
        p = float(2 * stats.norm.sf(abs(stat)))
        q = float(stats.norm.isf(ALPHA / 2))
    else:
        p = float(2 * stats.t.sf(abs(stat), df))
        q = float(stats.t.isf(ALPHA / 2, df))
    return Comparison(first, second, diff, se, df, stat, p, diff - q * se, diff + q * se)


def _f_test(ms_t: float, error: float, ndf: int, ddf: float) -> tuple[float, float]:
    """F statistic and p; with infinite ddf, the chi-square limit (ndf * F ~ chi2(ndf))."""
    if not error > 0 or math.isnan(ddf):
        return math.nan, math.nan
    f = ms_t / error
    if math.isinf(ddf):
        return f, float(stats.chi2.sf(ndf * f, ndf))
    return f, float(stats.f.sf(f, ndf, ddf))


def _hillis_ddf(error: float, ms_tr: float, df_tr: int) -> float:
    """Hillis (2007) ddf_H = error^2 / (MS(T*R)^2 / ((t-1)(r-1)))."""
    if ms_tr <= 0:
        return math.inf
    return error ** 2 / (ms_tr ** 2 / df_tr)


def _ci(est: float, se: float, df: float) -> tuple[float, float, float, float, float]:
    if not se >= 0 or math.isnan(df):
        return (est, se, df, math.nan, math.nan)
    q = float(stats.norm.isf(ALPHA / 2) if math.isinf(df) else stats.t.isf(ALPHA / 2, df))
    return (est, se, df, est - q * se, est + q * se)


def _pairs(order: list[int]) -> list[tuple[int, int]]:
    """Every pair (a, b), a before b in the analysis order: the difference is b - a."""
    return [(order[x], order[y]) for x in range(len(order)) for y in range(x + 1, len(order))]


def _or_tests(theta: np.ndarray, cov: np.ndarray, names: tuple[str, ...], order: list[int]
              ) -> tuple[dict[str, DesignTest], dict[str, float]]:
    """OR analysis with Hillis ddf for the three generalisations (Hillis 2007, Table I)."""
    t, r = theta.shape
    ms = or_mean_squares(theta)
    comp = or_covariances(cov, t, r)
    df_tr = (t - 1) * (r - 1)
    spread = max(comp["cov2"] - comp["cov3"], 0.0)
    errors = {"rrrc": ms["ms_tr"] + r * spread,
              "frrc": comp["var"] - comp["cov1"] + (r - 1) * spread,
              "rrfc": ms["ms_tr"]}
    ddfs = {"rrrc": _hillis_ddf(errors["rrrc"], ms["ms_tr"], df_tr), "frrc": math.inf,
            "rrfc": float(df_tr)}
    means = theta.mean(axis=1)
    # single-modality CIs: each modality's own reader ANOVA and Var/Cov2 (Iowa part c)
    single: dict[str, dict[str, tuple[float, float, float, float, float]]] = {d: {} for d in
                                                                              DESIGNS}
    c4 = cov.reshape(t, r, t, r)
    off = ~np.eye(r, dtype=bool)
    for i in range(t):
        ms_r = float(np.var(theta[i], ddof=1))
        var_i = float(np.mean(np.diag(c4[i, :, i, :])))
        cov2_i = float(c4[i, :, i, :][off].mean())
        err = ms_r + r * max(cov2_i, 0.0)
        df = err ** 2 / (ms_r ** 2 / (r - 1)) if ms_r > 0 else math.inf
        single["rrrc"][names[i]] = _ci(float(means[i]), math.sqrt(err / r), df)
        single["frrc"][names[i]] = _ci(float(means[i]),
                                       math.sqrt(max(var_i + (r - 1) * max(cov2_i, 0.0), 0.0)
                                                 / r), math.inf)
        single["rrfc"][names[i]] = _ci(float(means[i]), math.sqrt(ms_r / r), float(r - 1))
    tests = {}
    for design in DESIGNS:
        f, p = _f_test(ms["ms_t"], errors[design], t - 1, ddfs[design])
        se = math.sqrt(2 / r * errors[design]) if errors[design] > 0 else math.nan
        comps = tuple(_comparison(names[a], names[b], float(means[b] - means[a]), se,
                                  ddfs[design]) for a, b in _pairs(order))
        tests[design] = DesignTest(design, f, t - 1, ddfs[design], p, errors[design], comps,
                                   single[design])
    # OR variance components (the Iowa program's table; unbiased, can be negative)
    var_tr = ms["ms_tr"] - comp["var"] + comp["cov1"] + (comp["cov2"] - comp["cov3"])
    var_r = (ms["ms_r"] - var_tr - comp["var"] - (t - 1) * comp["cov1"] + comp["cov2"]
             + (t - 1) * comp["cov3"]) / t
    components = {**ms, **comp, "var_r": var_r, "var_tr": var_tr}
    return tests, components


def _dbm_tests(theta: np.ndarray, jk: np.ndarray, names: tuple[str, ...], order: list[int]
               ) -> tuple[dict[str, DesignTest], dict[str, float]]:
    """DBM analysis of pseudovalues with the Hillis error term and ddf (Hillis et al. 2008)."""
    t, r, c = jk.shape
    pseudo = _pseudovalues(theta, jk)
    ms = dbm_mean_squares(pseudo)
    df_tr = (t - 1) * (r - 1)
    errors = {"rrrc": ms["ms_tr"] + max(ms["ms_tc"] - ms["ms_trc"], 0.0),
              "frrc": ms["ms_tc"], "rrfc": ms["ms_tr"]}
    ddfs = {"rrrc": _hillis_ddf(errors["rrrc"], ms["ms_tr"], df_tr),
            "frrc": float((t - 1) * (c - 1)), "rrfc": float(df_tr)}
    means = theta.mean(axis=1)
    single: dict[str, dict[str, tuple[float, float, float, float, float]]] = {d: {} for d in
                                                                              DESIGNS}
    for i in range(t):
        ms_r, ms_c, ms_rc = _reader_case_ms(pseudo[i])
        err = ms_r + max(ms_c - ms_rc, 0.0)
        df = err ** 2 / (ms_r ** 2 / (r - 1)) if ms_r > 0 else math.inf
        single["rrrc"][names[i]] = _ci(float(means[i]), math.sqrt(err / (r * c)), df)
        single["frrc"][names[i]] = _ci(float(means[i]), math.sqrt(ms_c / (r * c)),
                                       float(c - 1))
        single["rrfc"][names[i]] = _ci(float(means[i]), math.sqrt(ms_r / (r * c)),
                                       float(r - 1))
    tests = {}
    for design in DESIGNS:
        f, p = _f_test(ms["ms_t"], errors[design], t - 1, ddfs[design])
        se = math.sqrt(2 * errors[design] / (r * c)) if errors[design] > 0 else math.nan
        comps = tuple(_comparison(names[a], names[b], float(means[b] - means[a]), se,
                                  ddfs[design]) for a, b in _pairs(order))
        tests[design] = DesignTest(design, f, t - 1, ddfs[design], p, errors[design], comps,
                                   single[design])
    return tests, ms


# -- the analysis --------------------------------------------------------------------------

@dataclass(frozen=True)
class MrmcResult:
    """Everything one analysis produced; ``to_dict`` gives the JSON summary."""

    study: ReaderStudy
    method: str
    analysis: str
    design: str
    order: tuple[str, ...]  # modalities in analysis order (reference first)
    aucs: np.ndarray  # [modality, reader], the study's modality and reader order
    tests: dict[str, DesignTest]
    components: dict[str, float]

    @property
    def fom(self) -> dict[str, float]:
        """Reader-averaged AUC per modality, in analysis order."""
        means = self.aucs.mean(axis=1)
        return {m: float(means[self.study.modalities.index(m)]) for m in self.order}

    @property
    def main(self) -> DesignTest:
        """The test of the requested generalisation (RRRC unless asked otherwise)."""
        return self.tests[self.design]

    def to_dict(self) -> dict[str, object]:
        """The JSON summary: ``fom``, ``difference`` (second minus first in analysis order),
        ``ci95``, ``f``, ``ddf``, ``p``, ``readers``, ``method``, ``analysis``; ``pairs`` with
        more than two modalities; ``design`` when not RRRC. ddf is null when infinite."""
        test = self.main
        first = test.comparisons[0]
        out: dict[str, object] = {
            "fom": self.fom,
            "difference": first.difference,
            "ci95": [first.low, first.high],
            "f": test.f,
            "ddf": test.ddf,
            "p": test.p,
            "readers": {reader: {m: float(self.aucs[self.study.modalities.index(m), j])
                                 for m in self.order}
                        for j, reader in enumerate(self.study.readers)},
            "method": self.method,
            "analysis": self.analysis,
        }
        if len(self.order) > 2:
            out["pairs"] = [c.to_dict() for c in test.comparisons]
        if self.design != "rrrc":
            out["design"] = self.design
        return out


def _analysis_order(study: ReaderStudy, reference: str | None) -> tuple[str, ...]:
    if reference is None:
        return study.modalities
    if reference not in study.modalities:
        raise ReaderStudyError(f"reference modality {reference!r} is not in the study "
                               f"(modalities: {', '.join(study.modalities)})")
    return (reference, *[m for m in study.modalities if m != reference])


def analyze(study: ReaderStudy, *, method: str = "jackknife", analysis: str = "orh",
            reference: str | None = None, design: str = "rrrc") -> MrmcResult:
    """Run the MRMC analysis of a crossed study.

    ``method``: covariance estimate for ORH (``jackknife`` or ``delong``); DBM is defined on
    jackknife pseudovalues, so ``dbm`` with ``delong`` is refused rather than silently changed.
    ``reference``: the modality every difference is taken against (default: the first one in
    the input). ``design``: which generalisation fills the summary (all three are computed).
    """
    if method not in METHODS:
        raise ReaderStudyError(f"unknown method {method!r} (choose {', '.join(METHODS)})")
    if analysis not in ANALYSES:
        raise ReaderStudyError(f"unknown analysis {analysis!r} (choose {', '.join(ANALYSES)})")
    if design not in DESIGNS:
        raise ReaderStudyError(f"unknown design {design!r} (choose {', '.join(DESIGNS)})")
    if analysis == "dbm" and method != "jackknife":
        raise ReaderStudyError("DBM works on jackknife pseudovalues: use --method jackknife "
                               "with --analysis dbm (DeLong covariances are for orh)")
    order = _analysis_order(study, reference)
    index = [study.modalities.index(m) for m in order]
    v_neg, v_pos = _components(study)
    theta = v_pos.mean(axis=2)
    if analysis == "dbm":
        jk = jackknife_aucs(study, (v_neg, v_pos))
        tests, components = _dbm_tests(theta, jk, study.modalities, index)
    else:
        cov = (jackknife_covariance(jackknife_aucs(study, (v_neg, v_pos)))
               if method == "jackknife" else delong_covariance(v_neg, v_pos))
        tests, components = _or_tests(theta, cov, study.modalities, index)
    return MrmcResult(study, method, analysis, design, order, theta, tests, components)


# -- output --------------------------------------------------------------------------------

def _clean(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def to_json(result: MrmcResult) -> str:
    """The JSON summary; infinite or undefined numbers are written as null."""
    return json.dumps(_clean(result.to_dict()), indent=2)


_DESIGN_TITLES = {"rrrc": "random readers, random cases",
                  "frrc": "fixed readers, random cases",
                  "rrfc": "random readers, fixed cases"}


def _num(x: float, digits: int = 4) -> str:
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def _pval(p: float) -> str:
    return "n/a" if math.isnan(p) else ("<0.0001" if p < 1e-4 else f"{p:.4f}")


def format_table(result: MrmcResult) -> str:
    """Plain-text report: per-reader AUCs, modality means, then the three analyses."""
    s = result.study
    lines = [f"{s.source or 'reader study'}: {len(s.readers)} readers x {len(s.modalities)} "
             f"modalities x {len(s.cases)} cases ({s.positives} diseased, {s.negatives} "
             f"non-diseased)",
             f"figure of merit: empirical (Wilcoxon) AUC; analysis {result.analysis.upper()}"
             + (f", {result.method} covariances" if result.analysis == "orh" else
                ", jackknife pseudovalues"), ""]
    width = max(8, *(len(m) for m in result.order))
    rw = max(6, *(len(r) for r in s.readers), len("mean"))
    lines.append(f"{'reader':<{rw}}  " + "  ".join(f"{m:>{width}}" for m in result.order))
    for j, reader in enumerate(s.readers):
        lines.append(f"{reader:<{rw}}  " + "  ".join(
            f"{result.aucs[s.modalities.index(m), j]:>{width}.4f}" for m in result.order))
    lines.append(f"{'mean':<{rw}}  " + "  ".join(f"{v:>{width}.4f}"
                                                 for v in result.fom.values()))
    for design in DESIGNS:
        test = result.tests[design]
        mark = " (summary)" if design == result.design else ""
        lines += ["", f"{design.upper()}: {_DESIGN_TITLES[design]}{mark}",
                  f"  F({test.ndf}, {_num(test.ddf, 2)}) = {_num(test.f)}, "
                  f"p = {_pval(test.p)}"
                  + ("  [ddf infinite: chi-square test]" if math.isinf(test.ddf) else "")]
        lines.append(f"  {'comparison':<{2 * width + 3}}  {'diff':>8}  {'se':>7}  "
                     f"{'df':>7}  {'p':>7}  95% CI")
        for c in test.comparisons:
            name = f"{c.second} - {c.first}"
            lines.append(f"  {name:<{2 * width + 3}}  {c.difference:>+8.4f}  {_num(c.se):>7}"
                         f"  {_num(c.df, 2):>7}  {_pval(c.p):>7}  "
                         f"[{_num(c.low)}, {_num(c.high)}]")
    return "\n".join(lines)


def _reader_plot(result: MrmcResult) -> str:
    """Per-reader AUC by modality (one line per reader, reader mean in bold), PNG base64."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.study
    x = np.arange(len(result.order))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(x) + 2), 4))
    for j, reader in enumerate(s.readers):
        y = [result.aucs[s.modalities.index(m), j] for m in result.order]
        ax.plot(x, y, "o-", alpha=0.6, label=f"reader {reader}")
    ci = result.main.modality_ci
    mean = [ci[m][0] for m in result.order]
    err = np.array([[ci[m][0] - ci[m][3], ci[m][4] - ci[m][0]] for m in result.order]).T
    ax.errorbar(x, mean, yerr=err, fmt="s-", color="black", lw=2.5, capsize=5,
                label=f"mean (95% CI, {result.design.upper()})")
    ax.set_xticks(x, [str(m) for m in result.order])
    ax.set_xlabel("modality")
    ax.set_ylabel("empirical AUC")
    ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(result: MrmcResult) -> str:
    """A small self-contained HTML report (the plot is an embedded PNG)."""
    e = html.escape
    s = result.study
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>radguard reader study</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:"
        "collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}"
        "th{background:#eee}</style></head>",
        f"<body><h1>MRMC reader study: {e(s.source or 'ratings')}</h1>",
        f"<p>{len(s.readers)} readers x {len(s.modalities)} modalities x {len(s.cases)} cases "
        f"({s.positives} diseased, {s.negatives} non-diseased), fully crossed. Figure of merit: "
        f"empirical (Wilcoxon) AUC. Analysis: {e(result.analysis.upper())}"
        + (f" with {e(result.method)} covariances" if result.analysis == "orh" else "")
        + ", Hillis (2007) denominator degrees of freedom.</p>",
        "<h2>Per-reader AUC</h2>",
        f"<img id='plot-readers' alt='per-reader AUC' src='data:image/png;base64,"
        f"{_reader_plot(result)}'>",
        "<table id='readers'><tr><th>reader</th>"
        + "".join(f"<th>{e(m)}</th>" for m in result.order) + "</tr>",
    ]
    for j, reader in enumerate(s.readers):
        parts.append(f"<tr><td>{e(reader)}</td>" + "".join(
            f"<td>{result.aucs[s.modalities.index(m), j]:.4f}</td>" for m in result.order)
            + "</tr>")
    parts.append("<tr><th>mean</th>" + "".join(f"<th>{v:.4f}</th>"
                                                for v in result.fom.values()) + "</tr></table>")
    for design in DESIGNS:
        test = result.tests[design]
        parts.append(f"<h2 id='{design}'>{design.upper()}: {e(_DESIGN_TITLES[design])}</h2>"
                     f"<p>F({test.ndf}, {_num(test.ddf, 2)}) = {_num(test.f)}, p = "
                     f"{_pval(test.p)}</p><table class='comparisons'><tr><th>comparison</th>"
                     "<th>difference</th><th>SE</th><th>df</th><th>p</th><th>95% CI</th></tr>")
        for c in test.comparisons:
            parts.append(f"<tr><td>{e(c.second)} - {e(c.first)}</td><td>{c.difference:+.4f}"
                         f"</td><td>{_num(c.se)}</td><td>{_num(c.df, 2)}</td><td>"
                         f"{_pval(c.p)}</td><td>{_num(c.low)} to {_num(c.high)}</td></tr>")
        parts.append("</table>")
    parts.append("<p>RRRC generalises to new readers and new cases and is the analysis to "
                 "report; FRRC holds only for these readers, RRFC only for these cases. "
                 "Pairwise p-values are not adjusted for multiplicity: read them when the "
                 "global F test rejects.</p></body></html>")
    return "\n".join(parts)


def write_html(result: MrmcResult, path: str | os.PathLike[str]) -> None:
    """Write the HTML report atomically (no half-written file on error)."""
    from radguard.fileio import atomic_write_bytes

    atomic_write_bytes(path, render_html(result).encode("utf-8"))
