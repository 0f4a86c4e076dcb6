"""MRMC benchmark (issue 26 item 2): does radguard's reader-study analysis hold its nominal
error rates on reader studies simulated with known variance components?

Model: Roe & Metz (1997), the standard simulator for MRMC ROC methods. The confidence rating
of reader j for case k (truth s = 0 non-diseased, 1 diseased) in modality i is

    X = s * (mu + tau_i) + R_js + TR_ijs + C_ks + TC_iks + RC_jks + E_ijks,

all random terms independent normal, drawn separately for the two truth states, with the
variance structures of Roe & Metz Table 1 as RJafroc codes them (``RoeMetzVarStr``):
HL1 / LL1 / HH1 / LH1 (first letter: case-related correlation high / low, i.e. var_C = var_TC
= 0.3 or 0.1; second letter: reader variability low / high, var_R = var_TR = 0.0055 or 0.011;
var_RC = 0.2, var_E = 0.2 or 0.6, so the case-level variance is 1) with mu = 0.75 (AUC 0.702),
and HL2 (mu = 1.5, AUC 0.855). Ratings are continuous (no binning).

The population (reader- and case-averaged) AUC of modality i is
Phi((mu + tau_i) / sqrt(2 + 2 var_R + 2 var_TR)), so the true AUC difference is known. Under
the null tau = 0; under the alternative tau_2 is chosen to give a true difference of
``--delta`` (default 0.05).

For every structure, ``--sims`` studies (default 2,000; ``--quick``: 200) of ``--readers``
(5) readers x 2 modalities x ``--cases`` (50 + 50) cases are analysed by ORH with jackknife
covariances (radguard's default), ORH with DeLong covariances and DBM, each for random
readers and cases (RRRC). Printed per structure and analysis:

* type-I error at alpha = 0.05 under the null, with its Monte-Carlo 95% interval, and the
  ratio measured / nominal (anchor: 0.05);
* under the alternative: bias of the estimated difference, coverage of the 95% CI (anchor:
  0.95, ratio measured / nominal) and power;
* for contrast, the fixed-reader (FRRC) type-I error: when readers really are random it is
  inflated, which is why RRRC is the analysis to report.

Finally the runtime of ``radguard.evaluation.mrmc.analyze`` on the three shipped reader
studies next to a naive reference (the jackknife by recomputing every AUC from the full
n0 x n1 comparison matrix for each left-out case), with a check that both give the same F.

    python benchmarks/bench_mrmc.py [--quick] [--sims 2000] [--readers 5] [--cases 50]
        [--delta 0.05] [--seed 2026]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: the machine is shared
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radguard.evaluation import mrmc  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
ALPHA = 0.05

#: Roe & Metz (1997) variance structures (RJafroc RoeMetzVarStr): var_R, var_TR, var_C,
#: var_TC, var_RC, var_E, mu (separation of the diseased mean).
STRUCTURES = {
    "HL1": (0.0055, 0.0055, 0.3, 0.3, 0.2, 0.2, 0.75),
    "LL1": (0.0055, 0.0055, 0.1, 0.1, 0.2, 0.6, 0.75),
    "HH1": (0.011, 0.011, 0.3, 0.3, 0.2, 0.2, 0.75),
    "LH1": (0.011, 0.011, 0.1, 0.1, 0.2, 0.6, 0.75),
    "HL2": (0.0055, 0.0055, 0.3, 0.3, 0.2, 0.2, 1.5),
}
ANALYSES = (("orh-jackknife", "orh", "jackknife"), ("orh-delong", "orh", "delong"),
            ("dbm", "dbm", "jackknife"))


def population_auc(mu: float, var_r: float, var_tr: float) -> float:
    """Reader- and case-averaged AUC under the Roe-Metz model (case-level variance 1)."""
    return float(stats.norm.cdf(mu / math.sqrt(2 + 2 * var_r + 2 * var_tr)))


def tau_for_delta(structure: tuple[float, ...], delta: float) -> float:
    """Shift of modality 2 that makes the true AUC difference equal ``delta``."""
    var_r, var_tr, *_, mu = structure
    scale = math.sqrt(2 + 2 * var_r + 2 * var_tr)
    target = population_auc(mu, var_r, var_tr) + delta
    return float(stats.norm.ppf(target) * scale - mu)


def simulate(rng: np.random.Generator, structure: tuple[float, ...], tau: float,
             readers: int, cases: int) -> mrmc.ReaderStudy:
    """One fully crossed Roe-Metz study: 2 modalities x readers x (cases + cases)."""
    var_r, var_tr, var_c, var_tc, var_rc, var_e, mu = structure
    t, r = 2, readers
    blocks = []
    for s in (0, 1):  # independent random effects for the two truth states
        shift = np.array([0.0, tau])[:, None, None] + mu if s else 0.0
        x = (shift
             + rng.normal(0, math.sqrt(var_r), (1, r, 1))
             + rng.normal(0, math.sqrt(var_tr), (t, r, 1))
             + rng.normal(0, math.sqrt(var_c), (1, 1, cases))
             + rng.normal(0, math.sqrt(var_tc), (t, 1, cases))
             + rng.normal(0, math.sqrt(var_rc), (1, r, cases))
             + rng.normal(0, math.sqrt(var_e), (t, r, cases)))
        blocks.append(x)
    ratings = np.concatenate(blocks, axis=2)
    truth = np.repeat([0, 1], cases)
    return mrmc.ReaderStudy(("1", "2"), tuple(str(j) for j in range(r)),
                            tuple(str(k) for k in range(2 * cases)), truth, ratings)


def interval(k: int, n: int) -> tuple[float, float]:
    """Wilson 95% interval of a Monte-Carlo proportion."""
    z = 1.959964
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def run_structure(name: str, args: argparse.Namespace, rng: np.random.Generator) -> None:
    structure = STRUCTURES[name]
    var_r, var_tr, *_, mu = structure
    tau = tau_for_delta(structure, args.delta)
    rejections = {a: 0 for a, *_ in ANALYSES} | {"frrc": 0}
    covered = {a: 0 for a, *_ in ANALYSES}
    power = {a: 0 for a, *_ in ANALYSES}
    errors = {a: [] for a, *_ in ANALYSES}
    for _ in range(args.sims):
        null = simulate(rng, structure, 0.0, args.readers, args.cases)
        alt = simulate(rng, structure, tau, args.readers, args.cases)
        for label, analysis, method in ANALYSES:
            res = mrmc.analyze(null, analysis=analysis, method=method)
            rejections[label] += res.main.p < ALPHA
            if label == "orh-jackknife":
                rejections["frrc"] += res.tests["frrc"].p < ALPHA
            res = mrmc.analyze(alt, analysis=analysis, method=method)
            cmp = res.main.comparisons[0]
            covered[label] += cmp.low <= args.delta <= cmp.high
            power[label] += res.main.p < ALPHA
            errors[label].append(cmp.difference - args.delta)
    n = args.sims
    print(f"\n{name}: var_R=var_TR={var_r}, var_C=var_TC={structure[2]}, var_RC="
          f"{structure[4]}, var_E={structure[5]}; AUC {population_auc(mu, var_r, var_tr):.3f}"
          f" (alternative: +{args.delta}, tau={tau:.3f})")
    print(f"  {'analysis':<15} {'type I':>7} {'(MC 95%)':>17} {'/0.05':>6}   {'bias':>8} "
          f"{'coverage':>9} {'(MC 95%)':>17} {'/0.95':>6} {'power':>6}")
    for label, *_ in ANALYSES:
        lo, hi = interval(rejections[label], n)
        clo, chi = interval(covered[label], n)
        err = np.asarray(errors[label])
        print(f"  {label:<15} {rejections[label] / n:>7.4f} ({lo:.4f}-{hi:.4f}) "
              f"{rejections[label] / n / ALPHA:>6.2f}   {err.mean():>+8.5f} "
              f"{covered[label] / n:>9.4f} ({clo:.4f}-{chi:.4f}) "
              f"{covered[label] / n / 0.95:>6.3f} {power[label] / n:>6.3f}")
    lo, hi = interval(rejections["frrc"], n)
    print(f"  {'frrc (contrast)':<15} {rejections['frrc'] / n:>7.4f} ({lo:.4f}-{hi:.4f}) "
          f"{rejections['frrc'] / n / ALPHA:>6.2f}   (fixed readers, wrong when readers vary)")


def naive_analyze(study: mrmc.ReaderStudy) -> float:
    """Reference: jackknife by brute force (full comparison matrix per left-out case), then
    the ORH RRRC F. Slow on purpose: it is the textbook definition."""
    t, r, c = study.ratings.shape

    def auc(x: np.ndarray, y: np.ndarray) -> float:
        diff = y[None, :] - x[:, None]
        return float(((diff > 0) + 0.5 * (diff == 0)).mean())

    theta = np.empty((t, r))
    jk = np.empty((t, r, c))
    for i in range(t):
        for j in range(r):
            s = study.ratings[i, j]
            theta[i, j] = auc(s[study.truth == 0], s[study.truth == 1])
            for k in range(c):
                keep = np.arange(c) != k
                y, v = study.truth[keep], s[keep]
                jk[i, j, k] = auc(v[y == 0], v[y == 1])
    cov = mrmc.jackknife_covariance(jk)
    comp = mrmc.or_covariances(cov, t, r)
    ms = mrmc.or_mean_squares(theta)
    return ms["ms_t"] / (ms["ms_tr"] + r * max(comp["cov2"] - comp["cov3"], 0.0))


def runtime() -> None:
    print("\nruntime on the shipped studies (one core): radguard analyze vs naive jackknife")
    print(f"  {'study':<10} {'size':>14} {'radguard ms':>12} {'naive ms':>10} {'ratio':>7} "
          f"{'same F':>7}")
    for name in ("vandyke", "franken", "fedroc"):
        study = mrmc.read_ratings(SHARED / f"reader-study-{name}" / "ratings.csv")
        t, r, c = study.ratings.shape
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            f = mrmc.analyze(study).main.f
        ours = (time.perf_counter() - start) / reps
        start = time.perf_counter()
        f_naive = naive_analyze(study)
        naive = time.perf_counter() - start
        print(f"  {name:<10} {f'{t}x{r}x{c}':>14} {ours * 1e3:>12.2f} {naive * 1e3:>10.0f} "
              f"{ours / naive:>7.4f} {str(math.isclose(f, f_naive, rel_tol=1e-9)):>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 simulations per setting")
    parser.add_argument("--sims", type=int, default=None)
    parser.add_argument("--readers", type=int, default=5)
    parser.add_argument("--cases", type=int, default=50, help="per truth state")
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--structures", default=",".join(STRUCTURES))
    args = parser.parse_args()
    args.sims = args.sims or (200 if args.quick else 2000)
    rng = np.random.default_rng(args.seed)
    print(f"Roe-Metz simulation: {args.sims} studies per setting, {args.readers} readers x 2 "
          f"modalities x {args.cases}+{args.cases} cases, seed {args.seed}; anchors: nominal "
          f"type I 0.05, nominal coverage 0.95 (MC SE of a 0.05 rate: "
          f"{math.sqrt(0.05 * 0.95 / args.sims):.4f})")
    start = time.perf_counter()
    for name in args.structures.split(","):
        run_structure(name.strip(), args, rng)
    print(f"\nsimulation time {time.perf_counter() - start:.1f} s")
    runtime()


if __name__ == "__main__":
    main()
