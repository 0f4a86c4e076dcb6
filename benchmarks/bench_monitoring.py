"""Monitoring benchmark: delay to alarm after a real population/scanner shift, false alarms
on a stream without shift, and delay to a performance-decay alarm when labels drift.

Data (../shared/data): NIH adult chest X-rays (reference and in-distribution stream) and
Kermany paediatric chest X-rays (the shifted site). Features per study: the ten image
statistics of radguard.monitoring.features plus a model score: by default the shipped chest
triage model's calibrated probability, with reference and stream drawn from the NIH patients
it was not trained on (its validation and test splits); ``--score standin`` uses a logistic
regression on image statistics instead (scikit-learn, benchmark only), as before the model
existed.

Targets (issue 6): shift detected within 30 studies; at most 1 false alarm per 10,000 studies.

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
        what = f"stand-in logistic regression (trained on {(split == 0).sum()} NIH studies)"
    hold_x, hold_y, hold_s = nih_x[hold], nih_y[hold], nih_s[hold]
    print(f"reference: {is_ref.sum()} NIH studies, stream pool {hold.sum()} (patient-disjoint); "
          f"score: {what}, AUC on the stream pool {_auc(hold_y, hold_s):.3f}")

    work = Path(tempfile.mkdtemp(prefix="bench_monitor_"))
    base = Monitor(work / "reference.db")
    thresholds = base.fit_reference(nih_x[is_ref], list(IMAGE_FEATURES), scores=nih_s[is_ref],
                                    labels=nih_y[is_ref], false_alarms_per=10_000)
    print(f"calibrated CUSUM thresholds: drift h={thresholds['h']}, performance "
          f"h={thresholds['h_performance']}")

    def fresh(name: str) -> Monitor:
        return base.copy(work / f"{name}.db")

    # 1. shift: NIH held-out studies, then Kermany from study 300 on
    delays, early = [], 0
    for run in range(args.runs):
        r = np.random.default_rng(100 + run)
        # the NIH part is resampled: the pool of studies the model never saw is smaller than
        # 300, and a shorter NIH part would put Kermany studies before "the switch"
        a = r.integers(0, len(hold_x), 300)
        b = r.permutation(len(ker_x))[:200]
        stream = np.vstack([hold_x[a], ker_x[b]])
        scores = np.r_[hold_s[a], ker_s[b]]
        hits = _first_alarm(fresh(f"shift{run}"), stream, scores, f"shift{run}")
        early += sum(h < 300 for h in hits)
        after = [h - 300 + 1 for h in hits if h >= 300]
        delays.append(after[0] if after else None)
    found = [d for d in delays if d is not None]
    print(f"\nshift NIH -> Kermany, {args.runs} runs: detected {len(found)}/{args.runs}, delay "
          f"median {statistics.median(found) if found else 'n/a'} studies, max "
          f"{max(found) if found else 'n/a'} (target <= 30); alarms before the switch: "
          f"{early} in {300 * args.runs} studies")

    # 2. no shift: long streams resampled from held-out NIH studies (not the reference)
    r = np.random.default_rng(7)
    idx = r.integers(0, len(hold_x), args.null_studies)
    t0 = time.perf_counter()
    hits = _first_alarm(fresh("null"), hold_x[idx], hold_s[idx], "null", hold_y[idx],
                        kind="drift")
    null_time = time.perf_counter() - t0
    rate = len(hits) / args.null_studies * 10_000
    print(f"no shift, {args.null_studies} studies: {len(hits)} drift alarms = {rate:.2f} per "
          f"10,000 studies (target <= 1); {null_time / args.null_studies * 1000:.2f} ms per "
          "study with SQLite persistence")
    perf_null = _first_alarm(fresh("nullperf"), hold_x[idx[:10_000]], hold_s[idx[:10_000]],
                             "nullperf", hold_y[idx[:10_000]], kind="performance")
    print(f"no shift, 10000 labelled studies: {len(perf_null)} performance alarms")

    # 3. label decay: labels flip with probability rising from 0 (study 200) to 0.5 (1200)
    decay_delays = []
    for run in range(args.runs):
        r = np.random.default_rng(300 + run)
        idx = r.integers(0, len(hold_x), 1400)
        flip_p = np.clip((np.arange(1400) - 200) / 1000 * 0.5, 0, 0.5)
        labels = np.where(r.uniform(size=1400) < flip_p, 1 - hold_y[idx], hold_y[idx])
        hits = _first_alarm(fresh(f"decay{run}"), hold_x[idx], hold_s[idx], f"decay{run}",
                            labels, kind="performance")
        after = [h for h in hits if h >= 200]
        decay_delays.append(after[0] - 200 if after else None)
    found = [d for d in decay_delays if d is not None]
    if found:
        med = statistics.median(found)
        print(f"label decay, {args.runs} runs: detected {len(found)}/{args.runs}, median "
              f"{med:.0f} studies after decay began (flip rate then {med / 1000 * 0.5:.1%})")
    else:
        print(f"label decay: not detected in {args.runs} runs")
    return 0


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from radguard.evaluation import delong_auc

    return delong_auc(y, s).auc


if __name__ == "__main__":
    sys.exit(main())
