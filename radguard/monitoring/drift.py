"""Two-sample drift tests and sequential (CUSUM) alarms, on numpy and scipy.

Window tests compare a recent window with the reference: Kolmogorov-Smirnov for continuous
features, chi-squared for categories (manufacturer, view...), the population stability index
(PSI) on reference deciles, and the maximum mean discrepancy (MMD, RBF kernel, median
bandwidth, permutation p-value) for embeddings.

Alarms are sequential: every feature is turned into a normal score with the reference's
empirical distribution (rank -> probit), and a two-sided CUSUM runs on it. Its threshold
``h`` is calibrated by simulation on streams resampled from the reference, so the false-alarm
budget (e.g. at most one false alarm per 10,000 studies over all features) holds for the data
actually seen, not for a textbook normal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import special, stats

__all__ = [
    "Cusum",
    "NormalScorer",
    "calibrate_threshold",
    "chi2_test",
    "ks_test",
    "mmd_test",
    "psi",
]


def ks_test(reference: np.ndarray, current: np.ndarray) -> dict[str, float]:
    """Two-sample Kolmogorov-Smirnov test."""
    res = stats.ks_2samp(np.asarray(reference, float), np.asarray(current, float))
    return {"statistic": float(res.statistic), "p_value": float(res.pvalue)}


def chi2_test(reference: list[str], current: list[str]) -> dict[str, float]:
    """Chi-squared test of homogeneity for a categorical feature."""
    cats = sorted(set(reference) | set(current))
    table = np.array([[reference.count(c) for c in cats], [current.count(c) for c in cats]])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return {"statistic": 0.0, "p_value": 1.0}
    chi2, p, _dof, _exp = stats.chi2_contingency(table)
    return {"statistic": float(chi2), "p_value": float(p)}


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index on the reference's quantile bins (0.1 moderate, 0.25 large)."""
    ref = np.asarray(reference, float)
    cur = np.asarray(current, float)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))
    edges[0], edges[-1] = -np.inf, np.inf
    r = np.histogram(ref, edges)[0] / len(ref)
    c = np.histogram(cur, edges)[0] / len(cur)
    r, c = np.clip(r, 1e-6, None), np.clip(c, 1e-6, None)
    return float(np.sum((c - r) * np.log(c / r)))


def mmd_test(reference: np.ndarray, current: np.ndarray, *, permutations: int = 200,
             seed: int = 0) -> dict[str, float]:
    """Unbiased MMD^2 with an RBF kernel (median heuristic) and a permutation p-value."""
    x = np.asarray(reference, float)
    y = np.asarray(current, float)
    if x.ndim == 1:
        x, y = x[:, None], y[:, None]
    z = np.vstack([x, y])
    d2 = np.sum((z[:, None, :] - z[None, :, :]) ** 2, axis=-1)
    bandwidth = np.median(d2[d2 > 0]) if np.any(d2 > 0) else 1.0
    k = np.exp(-d2 / bandwidth)
    n = len(x)

    def stat(idx: np.ndarray) -> float:
        a, b = idx[:n], idx[n:]
        kxx, kyy, kxy = k[np.ix_(a, a)], k[np.ix_(b, b)], k[np.ix_(a, b)]
        m1, m2 = len(a), len(b)
        return float((kxx.sum() - np.trace(kxx)) / (m1 * (m1 - 1))
                     + (kyy.sum() - np.trace(kyy)) / (m2 * (m2 - 1)) - 2 * kxy.mean())

    base = np.arange(len(z))
    observed = stat(base)
    rng = np.random.default_rng(seed)
    null = [stat(rng.permutation(base)) for _ in range(permutations)]
    p = (1 + sum(v >= observed for v in null)) / (1 + permutations)
    return {"mmd2": observed, "p_value": float(p)}


@dataclass
class NormalScorer:
    """Maps raw feature values to N(0, 1) scores through the reference's empirical CDF."""

    sorted_reference: np.ndarray  # (n, features), each column sorted

    @classmethod
    def fit(cls, reference: np.ndarray) -> NormalScorer:
        """Learn the reference distribution of every feature (columns)."""
        ref = np.asarray(reference, float)
        if ref.ndim == 1:
            ref = ref[:, None]
        return cls(np.sort(ref, axis=0))

    def transform(self, values: np.ndarray) -> np.ndarray:
        """Normal scores of one row or of a (rows, features) array."""
        v = np.atleast_2d(np.asarray(values, float))
        n = self.sorted_reference.shape[0]
        rank = np.empty_like(v)
        for j in range(v.shape[1]):
            col = self.sorted_reference[:, j]
            rank[:, j] = (np.searchsorted(col, v[:, j], "left") + np.searchsorted(col, v[:, j],
                                                                                  "right")) / 2
        # the standard normal quantile (what stats.norm.ppf computes, without its
        # per-call overhead: the gateway scores every instance)
        return special.ndtri((rank + 0.5) / (n + 1))


@dataclass
class Cusum:
    """Two-sided CUSUM per feature on normal scores: S+ = max(0, S+ + z - k), likewise S-."""

    k: float = 0.5
    h: float = 10.0
    upper: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lower: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def update(self, z: np.ndarray) -> np.ndarray:
        """Feed one study's scores; returns the indices of features that alarm (and resets
        their statistics, so a persisting shift alarms again after another h/(shift-k))."""
        z = np.asarray(z, float).ravel()
        if self.upper.shape != z.shape:
            self.upper, self.lower = np.zeros_like(z), np.zeros_like(z)
        self.upper = np.maximum(0.0, self.upper + z - self.k)
        self.lower = np.maximum(0.0, self.lower - z - self.k)
        alarms = np.nonzero((self.upper > self.h) | (self.lower > self.h))[0]
        self.upper[alarms] = 0.0
        self.lower[alarms] = 0.0
        return alarms


def calibrate_threshold(reference_scores: np.ndarray | list[np.ndarray], *,
                        false_alarms_per: float = 10_000, k: float = 0.5,
                        length: int = 100_000, seed: int = 0) -> float:
    """Smallest h whose simulated false-alarm rate over *all* features, on streams resampled
    from the given score sets, stays within half of one alarm per ``false_alarms_per``
    studies (a safety factor of two against the simulation's own noise).

    Pass a list of score sets (e.g. each half of the reference scored against the other) to
    simulate each as its own stream: a stream keeps its own small offset, as real studies
    keep theirs against a finite reference.
    """
    sets = reference_scores if isinstance(reference_scores, list) else [reference_scores]
    rng = np.random.default_rng(seed)
    candidates = np.round(np.arange(2.0, 40.01, 0.5), 2)
    counts = np.zeros(len(candidates), dtype=np.int64)
    per_set = max(1, length // len(sets))
    for scores in sets:
        z = np.atleast_2d(np.asarray(scores, float))
        if z.shape[0] == 1 and z.shape[1] > 1 and np.ndim(scores) == 1:
            z = z.T
        counts += _count_alarms(z[rng.integers(0, len(z), per_set)], k, candidates)
    budget = 0.5 * per_set * len(sets) / false_alarms_per
    ok = candidates[counts <= budget]
    return float(ok.min()) if len(ok) else float(candidates[-1])


def _count_alarms(stream: np.ndarray, k: float, hs: np.ndarray) -> np.ndarray:
    """False alarms over the stream for every candidate threshold at once."""
    hs = hs[:, None]
    up = np.zeros((len(hs), stream.shape[1]))
    low = np.zeros_like(up)
    counts = np.zeros(len(hs), dtype=np.int64)
    for z in stream:
        up = np.maximum(0.0, up + z - k)
        low = np.maximum(0.0, low - z - k)
        hit = (up > hs) | (low > hs)
        counts += hit.sum(axis=1)
        up[hit] = 0.0
        low[hit] = 0.0
    return counts
