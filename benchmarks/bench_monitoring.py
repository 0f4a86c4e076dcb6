"""Monitoring benchmark: delay to alarm after a real population/scanner shift, false alarms
on a stream without shift, and delay to a sensitivity/specificity decay at the operating
point from late and partial labels - with NannyML and Evidently on the same streams.

Data (../shared/data): NIH adult chest X-rays (reference and in-distribution stream) and
Kermany paediatric chest X-rays (the shifted site). Features per study: the ten image
statistics of radguard.monitoring.features plus a model score: by default the shipped chest
triage model's calibrated probability, with reference and stream drawn from the NIH patients
it was not trained on (its validation and test splits); ``--score standin`` uses a logistic
regression on image statistics instead (scikit-learn, benchmark only), as before the model
existed.

Decay (issue 30): the population is the NIH studies the model never saw; each run's
reference is 150 of them drawn at random (as a site's reference is a sample of its
population; ``--references`` of them), its streams are drawn from the population. From study
300 on, a fraction of positives is scored as the population's negatives are (the model stops
seeing the finding in a subgroup) so that sensitivity at the model's operating point falls by
5, 10 or 20 points; also the positives' scores sliding down (a shape the detector does not
model) and a specificity drop. Labels come back for 100%, 30% or 10% of studies, 0-100
studies late. Delay = labelled studies after the onset when the episode opens (median over
runs; studies in brackets). False alarms: streams without decay, every study labelled.

Anchors (benchmarks/monitoring_anchors.py; pip install -r benchmarks/requirements-anchors.txt):
NannyML realized performance and CBPE, NannyML univariate drift, Evidently's dataset drift and
its recall/TNR tests, all with their default alert rules, on the same references and streams,
chunks of 25 studies (the reference then has the 6 chunks NannyML asks for).

Targets: shift detected within 30 studies; at most 1 false alarm per 10,000 studies; a
10-point sensitivity drop found within 200 labelled studies (median).

    python benchmarks/bench_monitoring.py [--runs 20] [--null-studies 30000]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radguard.monitoring import IMAGE_FEATURES, Monitor  # noqa: E402
from radguard.monitoring.features import features_of_file  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def _load(folder: str, model: object = None
          ) -> tuple[np.ndarray, np.ndarray, list[str], list[str], np.ndarray]:
    from radguard.images import read_for_analysis

    rows = list(csv.DictReader(open(SHARED / folder / "labels.csv")))
    feats, labels, patients, files, scores = [], [], [], [], []
    for r in rows:
        path = next((SHARED / folder).rglob(r["file"]), None)
        if path is None:
            continue
        f = features_of_file(str(path))
        feats.append([f[n] for n in IMAGE_FEATURES])
        labels.append(1 if r["label"] == "pneumonia" else 0)
        patients.append(r["patient_id"])
        files.append(r["file"])
        if model is not None:
            scores.append(model.predict(read_for_analysis(path)).probability)  # type: ignore[attr-defined]
    return np.array(feats), np.array(labels), patients, files, np.array(scores)


def _first_alarm(monitor: Monitor, stream: np.ndarray, scores: np.ndarray, prefix: str,
                 labels: np.ndarray | None = None, kind: str = "drift") -> list[int]:
    hits = []
    for i, (row, score) in enumerate(zip(stream, scores, strict=True)):
        sid = f"{prefix}-{i}"
        alarms = monitor.observe(sid, dict(zip(IMAGE_FEATURES, row, strict=True)),
                                 score=float(score))
        if labels is not None:
            alarms += monitor.add_label(sid, int(labels[i]))
        if any(a.detector == kind for a in alarms):
            hits.append(i)
    return hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--null-studies", type=int, default=30_000)
    parser.add_argument("--score", choices=["chest", "standin"], default="chest")
    parser.add_argument("--references", type=int, default=10,
                        help="references drawn from the population for the decay part")
    parser.add_argument("--decay-studies", type=int, default=4_000,
                        help="studies per decay stream (the onset at 300)")
    args = parser.parse_args()

    model = None
    if args.score == "chest":
        from radguard.triage.model import load_model

        model = load_model("chest")
    t0 = time.perf_counter()
    nih_x, nih_y, nih_p, nih_f, nih_s = _load("cxr-nih", model)
    ker_x, ker_y, _, _, ker_s = _load("cxr-kermany", model)
    print(f"features: {len(nih_x)} NIH, {len(ker_x)} Kermany studies "
          f"({time.perf_counter() - t0:.0f} s)")
    rng = np.random.default_rng(0)
    if model is not None:
        from radguard.evaluation.splits import split_of

        # reference and stream: the patients the model never trained on, split in two
        unseen = np.array([split_of("cxr-nih", p) != "train" for p in nih_p])
        patients = rng.permutation(sorted({p for p, u in zip(nih_p, unseen, strict=True) if u}))
        half = set(patients[: len(patients) // 2])
        is_ref = unseen & np.array([p in half for p in nih_p])
        hold = unseen & ~is_ref
        what = f"chest triage model (trained on the other {(~unseen).sum()} NIH studies)"
    else:
        from sklearn.linear_model import LogisticRegression

        # three patient-disjoint thirds: the stand-in model learns on one, the reference is
        # the second (out-of-sample scores, as in deployment), the stream the third
        patients = rng.permutation(sorted(set(nih_p)))
        third = len(patients) // 3
        part = {p: 0 if i < third else (1 if i < 2 * third else 2)
                for i, p in enumerate(patients)}
        split = np.array([part[p] for p in nih_p])
        standin = LogisticRegression(max_iter=2000).fit(nih_x[split == 0], nih_y[split == 0])
        nih_s, ker_s = standin.predict_proba(nih_x)[:, 1], standin.predict_proba(ker_x)[:, 1]
        is_ref, hold = split == 1, split == 2
        unseen = is_ref | hold
        what = f"stand-in logistic regression (trained on {(split == 0).sum()} NIH studies)"
    hold_x, hold_y, hold_s = nih_x[hold], nih_y[hold], nih_s[hold]
    print(f"reference: {is_ref.sum()} NIH studies, stream pool {hold.sum()} (patient-disjoint); "
          f"score: {what}, AUC on the stream pool {_auc(hold_y, hold_s):.3f}")
    point = float(model.threshold) if model is not None else 0.5  # type: ignore[attr-defined]
    work = Path(tempfile.mkdtemp(prefix="bench_monitor_"))
    shift_part(args, work, nih_x[is_ref], nih_s[is_ref], hold_x, hold_s, ker_x, ker_s)
    population = Population(nih_x[unseen], nih_y[unseen], nih_s[unseen], point)
    references = population.references(args.references, work)
    null_part(args, population, references)
    decay_table(args, population, references)
    return 0


ANCHOR_CHUNK = 25


def shift_part(args: argparse.Namespace, work: Path, ref_x: np.ndarray, ref_s: np.ndarray,
               hold_x: np.ndarray, hold_s: np.ndarray, ker_x: np.ndarray,
               ker_s: np.ndarray) -> None:
    """NIH held-out studies, then Kermany from study 300 on: delay, alarms before the switch,
    alarm lines per shift; the drift anchors on the same streams."""
    base = Monitor(work / "shift.db")
    h = base.fit_reference(ref_x, list(IMAGE_FEATURES), scores=ref_s,
                           false_alarms_per=10_000)["h"]
    anchors = _drift_anchors(ref_x)
    delays, early, lines = [], 0, []
    anchor_delays: dict[str, list[int | None]] = {}
    for run in range(args.runs):
        r = np.random.default_rng(100 + run)
        # the NIH part is resampled: the pool of studies the model never saw is smaller than
        # 300, and a shorter NIH part would put Kermany studies before "the switch"
        a = r.integers(0, len(hold_x), 300)
        b = r.permutation(len(ker_x))[:200]
        stream = np.vstack([hold_x[a], ker_x[b]])
        scores = np.r_[hold_s[a], ker_s[b]]
        hits = _first_alarm(base.copy(":memory:"), stream, scores, f"shift{run}")
        early += sum(h < 300 for h in hits)
        after = [h - 300 + 1 for h in hits if h >= 300]
        lines.append(len(after))
        delays.append(after[0] if after else None)
        for name, ends in anchors(stream).items():
            anchor_delays.setdefault(name, []).append(_first_after(ends, 300))
    found = [d for d in delays if d is not None]
    print(f"\nshift NIH -> Kermany (drift h={h}), {args.runs} runs: detected "
          f"{len(found)}/{args.runs}, delay median "
          f"{statistics.median(found) if found else 'n/a'} studies, max "
          f"{max(found) if found else 'n/a'} (target <= 30); alarms before the switch: "
          f"{early} in {300 * args.runs} studies; alarms for the 200 shifted studies: "
          f"median {statistics.median(lines):.0f}, max {max(lines)} (one per episode)")
    for name, got in anchor_delays.items():
        seen = [d for d in got if d is not None]
        print(f"  {name:<24} detected {len(seen)}/{len(got)}, delay median "
              f"{statistics.median(seen) if seen else 'n/a'} studies (chunks of "
              f"{ANCHOR_CHUNK})")


class Population:
    """The studies the model never saw: what references are drawn from and streams are."""

    def __init__(self, x: np.ndarray, y: np.ndarray, s: np.ndarray, point: float) -> None:
        self.x, self.y, self.s, self.point = x, y, s, point
        self.sensitivity = float(np.mean(s[y == 1] >= point))
        self.fpr = float(np.mean(s[y == 0] >= point))

    def references(self, count: int, work: Path) -> list[Reference]:
        rng = np.random.default_rng(42)
        out = []
        t0 = time.perf_counter()
        for k in range(count):
            pick = rng.choice(len(self.s), min(150, len(self.s)), replace=False)
            monitor = Monitor(work / f"reference{k}.db")
            h = monitor.fit_reference(self.x[pick], list(IMAGE_FEATURES), scores=self.s[pick],
                                      labels=self.y[pick], false_alarms_per=10_000,
                                      threshold=self.point, drop=0.10)
            out.append(Reference(monitor, h, pick, self))
        hs = [(r.h["h_sensitivity"], r.h["h_specificity"]) for r in out]
        print(f"\n{count} references of {len(out[0].pick)} studies from a population of "
              f"{len(self.s)} ({time.perf_counter() - t0:.0f} s); operating point "
              f"{self.point:.3f} (population: sensitivity {self.sensitivity:.3f}, specificity "
              f"{1 - self.fpr:.3f}); thresholds h sensitivity "
              f"{statistics.median(h for h, _ in hs)} (median; {min(h for h, _ in hs)}-"
              f"{max(h for h, _ in hs)}), specificity {statistics.median(h for _, h in hs)} "
              f"({min(h for _, h in hs)}-{max(h for _, h in hs)})")
        return out


class Reference:
    """One reference: its fitted monitor and the anchors fitted on the same studies."""

    def __init__(self, monitor: Monitor, h: dict[str, float], pick: np.ndarray,
                 population: Population) -> None:
        self.monitor, self.h, self.pick = monitor, h, pick
        x, y, s = population.x[pick], population.y[pick], population.s[pick]
        self.anchors = _anchors(x, y, s, population.point)


def null_part(args: argparse.Namespace, population: Population,
              references: list[Reference]) -> None:
    """Streams without change from the population, every study labelled at once: every
    episode is a false alarm; the anchors' alerts on the same streams."""
    per_reference = args.null_studies // len(references)
    opened: dict[str, int] = {}
    alerts: dict[str, int] = {}
    t0 = time.perf_counter()
    for k, ref in enumerate(references):
        r = np.random.default_rng(7 + k)
        idx = r.integers(0, len(population.s), per_reference)
        x, y, s = population.x[idx], population.y[idx], population.s[idx]
        monitor = ref.monitor.copy(":memory:")
        for i in range(per_reference):
            sid = f"null-{i}"
            got = monitor.observe(sid, dict(zip(IMAGE_FEATURES, x[i], strict=True)),
                                  score=float(s[i]))
            got += monitor.add_label(sid, int(y[i]))
            for a in got:
                opened[a.detector] = opened.get(a.detector, 0) + 1
        monitor.close()
        for name, count in _anchor_null(ref.anchors, x, y, s, population.point).items():
            alerts[name] = alerts.get(name, 0) + count
    studies = per_reference * len(references)
    took = time.perf_counter() - t0
    total = sum(opened.values())
    print(f"\nno change, {studies} studies ({len(references)} references), all labelled: "
          f"{total} episodes = {total / studies * 10_000:.2f} per 10,000 studies (target <= 1: "
          + (", ".join(f"{k} {v / studies * 10_000:.2f}" for k, v in sorted(opened.items()))
             or "none") + f"); {took / studies * 1000:.2f} ms per study + label with the "
          "anchors (SQLite in memory)")
    for name, count in alerts.items():
        print(f"  {name:<24} {count:>5} alerting chunks = {count / studies * 10_000:7.1f} per "
              f"10,000 studies (chunks of {ANCHOR_CHUNK})")


ONSET = 300  # studies in control before the decay begins
LABEL_DELAY = 50  # mean studies between a study and its label (uniform 0..100)


def _decayed(rng: np.random.Generator, y: np.ndarray, s: np.ndarray, population: Population,
             eps: float, kind: str, shift: float = 0.0) -> np.ndarray:
    """Scores after the onset: "mixture" - a fraction eps of positives scored as negatives
    of the population are; "specificity" - of negatives scored as positives are; "slide" -
    every positive's logit lowered by ``shift``."""
    from scipy import special

    out = s.copy()
    after = np.arange(len(s)) >= ONSET
    if kind == "slide":
        hit = after & (y == 1)
        out[hit] = special.expit(special.logit(np.clip(s[hit], 1e-4, 1 - 1e-4)) - shift)
        return out
    cls, other = (1, 0) if kind == "mixture" else (0, 1)
    hit = after & (y == cls) & (rng.uniform(size=len(s)) < eps)
    pool = population.s[population.y == other]
    out[hit] = pool[rng.integers(0, len(pool), hit.sum())]
    return out


def _arrivals(rng: np.random.Generator, n: int, fraction: float) -> list[tuple[int, int]]:
    """(arrival study index, study index) of the labels that come back, in arrival order."""
    labelled = np.nonzero(rng.uniform(size=n) < fraction)[0]
    due = labelled + rng.integers(0, 2 * LABEL_DELAY + 1, len(labelled))
    order = np.lexsort((labelled, due))
    return [(int(due[k]), int(labelled[k])) for k in order]


def _radguard_run(base: Monitor, x: np.ndarray, y: np.ndarray, s: np.ndarray,
                  arrivals: list[tuple[int, int]], signal: str) -> tuple[int, int] | None:
    """(studies, labelled studies since the onset) when ``signal`` first opens an episode
    (studies <= 0: before the onset, a false alarm); None if never. Labels are applied as
    they arrive."""
    monitor = base.copy(":memory:")
    k, seen = 0, 0
    try:
        for i in range(len(s)):
            monitor.observe(f"s{i}", dict(zip(IMAGE_FEATURES, x[i], strict=True)),
                            score=float(s[i]))
            while k < len(arrivals) and arrivals[k][0] <= i:
                study = arrivals[k][1]
                seen += study >= ONSET
                k += 1
                alarms = monitor.add_label(f"s{study}", int(y[study]))
                if any(a.detector == signal for a in alarms):
                    return i - ONSET + 1, seen  # <= 0: a false alarm before the onset
    finally:
        monitor.close()
    return None


def decay_table(args: argparse.Namespace, population: Population,
                references: list[Reference]) -> None:
    """Delay to the first sensitivity (or specificity) episode after the onset, by drop size
    and labelling fraction, with the anchors on the same streams."""
    length = args.decay_studies
    print(f"\ndecay from study {ONSET} on; labels for a random fraction of studies, each "
          f"{LABEL_DELAY} studies late on average (0-{2 * LABEL_DELAY}); {args.runs} runs of "
          f"up to {length} studies per cell; median labelled studies after the onset when the "
          "episode opens (studies in brackets), runs that found it")
    cells = [(f"sensitivity -{d:.0%}", "mixture", d, "sensitivity") for d in (0.05, 0.10, 0.20)]
    cells += [("sensitivity -10% (scores slide)", "slide", 0.10, "sensitivity"),
              ("specificity -10%", "specificity", 0.10, "specificity")]
    fractions = (1.0, 0.3, 0.1)
    print(f"{'decay':<32}" + "".join(f"{f'{f:.0%} labelled':>25}" for f in fractions))
    anchor_rows: dict[str, list[str]] = {}
    early = 0
    separation = population.sensitivity - population.fpr
    for name, kind, drop, signal in cells:
        eps = drop / separation
        shift = (_slide_for(population.s[population.y == 1], population.point, drop)
                 if kind == "slide" else 0.0)
        row = f"{name:<32}"
        for fraction in fractions:
            labelled, studies = [], []
            anchor_delays: dict[str, list[int | None]] = {}
            for run in range(args.runs):
                ref = references[run % len(references)]
                rng = np.random.default_rng(1000 * run + int(fraction * 100) + int(drop * 1e4))
                pick = rng.integers(0, len(population.s), length)
                x, y = population.x[pick], population.y[pick]
                s = _decayed(rng, y, population.s[pick], population, eps, kind, shift)
                arrivals = _arrivals(rng, length, fraction)
                hit = _radguard_run(ref.monitor, x, y, s, arrivals, signal)
                early += hit is not None and hit[0] <= 0
                if hit is not None and hit[0] > 0:
                    studies.append(hit[0])
                    labelled.append(hit[1])
                for anchor, delay in _anchor_delays(ref.anchors, y, s, arrivals, signal):
                    anchor_delays.setdefault(anchor, []).append(delay)
            row += (f"{statistics.median(labelled):>7.0f} ({statistics.median(studies):>5.0f})"
                    f" {len(labelled):>3}/{args.runs}" if labelled
                    else f"{'not found':>15}   0/{args.runs}") + "  "
            for anchor, delays in anchor_delays.items():
                got = [d for d in delays if d is not None]
                if anchor.endswith("]"):  # a count of runs, not a delay
                    text = f"{len(got)}/{len(delays)} runs"
                else:
                    text = (f"{statistics.median(got):.0f} ({len(got)}/{len(delays)})" if got
                            else f"- (0/{len(delays)})")
                anchor_rows.setdefault(f"{name}: {anchor}", []).append(text)
        print(row)
    print(f"radguard episodes before the onset (false alarms) in these runs: {early} of "
          f"{len(cells) * len(fractions) * args.runs}")
    print(f"\nanchors on the same streams: median studies after the onset to the first alert "
          f"(runs that alerted), at {', '.join(f'{f:.0%}' for f in fractions)} labelled; "
          f"label delays included; chunks of {ANCHOR_CHUNK} (realized metrics: of "
          f"{ANCHOR_CHUNK} labels, in arrival order)")
    for key, values in anchor_rows.items():
        print(f"  {key:<72} " + "   ".join(f"{v:>14}" for v in values))


def _slide_for(positives: np.ndarray, point: float, drop: float) -> float:
    """The logit shift of positives that takes sensitivity at the point down by ``drop``."""
    from scipy import special

    logits = special.logit(np.clip(positives, 1e-4, 1 - 1e-4))
    target = np.mean(positives >= point) - drop
    lo, hi = 0.0, 10.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if np.mean(special.expit(logits - mid) >= point) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _anchor_module() -> Any:  # benchmarks/monitoring_anchors.py
    sys.path.insert(0, str(Path(__file__).parent))
    import monitoring_anchors

    return monitoring_anchors


def _anchors(ref_x: np.ndarray, ref_y: np.ndarray, ref_s: np.ndarray,
             point: float) -> dict[str, Any]:
    """NannyML's and Evidently's monitors fitted on a reference, when installed."""
    ma = _anchor_module()
    try:
        return {
            "module": ma, "reference": (ref_x, ref_y, ref_s), "point": point,
            "nannyml realized": ma.NannyRealized(ref_s, ref_y, threshold=point,
                                                 chunk_size=ANCHOR_CHUNK),
            "nannyml CBPE": ma.NannyCbpe(ref_s, ref_y, threshold=point,
                                         chunk_size=ANCHOR_CHUNK),
            "nannyml univariate": ma.NannyUnivariate(ref_x, list(IMAGE_FEATURES),
                                                     chunk_size=ANCHOR_CHUNK),
        }
    except ImportError as exc:
        print(f"anchors not run: {exc}")
        return {}


def _drift_anchors(ref_x: np.ndarray) -> Any:  # stream -> {name: ends}
    """NannyML's univariate drift and Evidently's dataset drift, fitted on ``ref_x``."""
    ma = _anchor_module()
    try:
        univariate = ma.NannyUnivariate(ref_x, list(IMAGE_FEATURES), chunk_size=ANCHOR_CHUNK)
    except ImportError as exc:
        print(f"anchors not run: {exc}")
        return lambda stream: {}

    def alerts(stream: np.ndarray) -> dict[str, list[int]]:
        return {"nannyml univariate": [a.end for a in univariate.alerts(stream)],
                "evidently dataset drift": [a.end for a in ma.evidently_drift(
                    ref_x, stream, list(IMAGE_FEATURES), chunk_size=ANCHOR_CHUNK)
                    if a.metric == "dataset_drift"]}

    return alerts


def _first_after(ends: list[int], onset: int) -> int | None:
    after = [e for e in ends if e > onset]
    return min(after) - onset if after else None


def _anchor_delays(anchors: dict[str, Any], y: np.ndarray, s: np.ndarray,
                   arrivals: list[tuple[int, int]], signal: str
                   ) -> list[tuple[str, int | None]]:
    """Each anchor's first alert on the matching metric after the onset, in studies (for
    realized metrics: when the label that completed the alerting chunk arrived)."""
    if not anchors:
        return []
    ma, (_, ref_y, ref_s) = anchors["module"], anchors["reference"]
    metric = "recall" if signal == "sensitivity" else "specificity"
    # realized metrics see the labels in the order they arrive, as radguard does
    order = np.array([study for _, study in arrivals], int)
    when = [due + 1 for due, _ in arrivals]
    out: list[tuple[str, int | None]] = []
    realized = anchors["nannyml realized"].alerts(s[order], y[order].astype(float))
    evidently = ma.evidently_classification(ref_s, ref_y, s[order], y[order].astype(float),
                                            threshold=anchors["point"],
                                            chunk_size=ANCHOR_CHUNK)
    cbpe = anchors["nannyml CBPE"].alerts(s)
    for name, ends in (
            (f"nannyml realized {metric}",
             [when[a.end - 1] for a in realized if a.metric.endswith(metric)]),
            (f"evidently {metric}",
             [when[a.end - 1] for a in evidently if a.metric.endswith(metric)]),
            (f"nannyml CBPE {metric} (no labels)",
             [a.end for a in cbpe if a.metric.endswith(metric)])):
        out.append((name, _first_after(ends, ONSET)))
        # an alert before the onset is a false alarm: where there are many, the "delay"
        # after it is partly chance
        out.append((name + " [alerted before the onset]",
                    1 if any(e <= ONSET for e in ends) else None))
    return out


def _anchor_null(anchors: dict[str, Any], x: np.ndarray, y: np.ndarray, s: np.ndarray,
                 point: float) -> dict[str, int]:
    """The anchors' alerting chunks on a stream without change (every study labelled)."""
    if not anchors:
        return {}
    ma, (ref_x, ref_y, ref_s) = anchors["module"], anchors["reference"]
    y = y.astype(float)
    runs = {
        "nannyml realized": anchors["nannyml realized"].alerts(s, y),
        "evidently recall/TNR": ma.evidently_classification(
            ref_s, ref_y, s, y, threshold=point, chunk_size=ANCHOR_CHUNK),
        "nannyml CBPE": anchors["nannyml CBPE"].alerts(s),
        "nannyml univariate": anchors["nannyml univariate"].alerts(x),
        "evidently dataset drift": [a for a in ma.evidently_drift(
            ref_x, x, list(IMAGE_FEATURES), chunk_size=ANCHOR_CHUNK)
            if a.metric == "dataset_drift"],
    }
    return {name: len({a.end for a in alerts}) for name, alerts in runs.items()}


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from radguard.evaluation import delong_auc

    return delong_auc(y, s).auc


if __name__ == "__main__":
    sys.exit(main())
