"""Governance benchmark: archive-audit throughput on Dask with 1 and 2 workers (and the
scaling ratio), next to the same scans in one plain process (the anchor: what Dask costs);
plus the label-flip audit on cxr-nih (recall of planted flips, false-positive rate).

Archive: cxr-nih JPEGs (512x512) plus the shared DICOM files, so the mix has CR/DX, CT, MR,
US and corrupt files. Every run starts from an empty results table.

    python benchmarks/bench_audit.py [--images 240] [--flip-runs 3]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from radguard.governance.archive import audit_archive, audit_files  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def build_archive(folder: Path, images: int) -> list[Path]:
    jpgs = sorted((SHARED / "cxr-nih" / "images").glob("*.jpg"))
    dicoms = sorted((SHARED / "dicom").rglob("*.dcm"))
    files = []
    for i in range(images):
        src = dicoms[i % len(dicoms)] if i % 10 == 0 else jpgs[i % len(jpgs)]
        dst = folder / f"{i // 50:03d}" / f"{i:05d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        files.append(dst)
    return files


def plain_single_thread(files: list[Path]) -> float:
    """The same scans in one fresh process limited to one thread (as a Dask worker is)."""
    import json
    import os
    import subprocess

    code = ("import json,sys,time;from radguard.governance.archive import audit_files;"
            "paths=json.load(sys.stdin);audit_files(paths[:2]);t=time.perf_counter();"
            "audit_files(paths);print(len(paths)/(time.perf_counter()-t))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps([str(p) for p in files]),
                         capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def archive_bench(images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "archive"
        files = build_archive(root, images)
        start = time.perf_counter()
        rows = audit_files([str(p) for p in files])
        plain_threads = len(rows) / (time.perf_counter() - start)
        plain = plain_single_thread(files)
        rates = {}
        for workers in (1, 2):
            summary = audit_archive(root, Path(tmp) / f"r{workers}.sqlite", workers=workers)
            assert summary.audited == len(files)
            rates[workers] = summary.images_per_second
            verdicts = summary.verdicts
        print(f"archive: {len(files)} files ({sum(1 for p in files if p.suffix == '.dcm')} "
              f"DICOM), verdicts {verdicts}")
        print(f"{'run':<34}{'images/s':>10}{'vs plain':>10}")
        print(f"{'plain loop, 1 process, 1 thread':<34}{plain:>10.2f}{1.0:>10.2f}   (anchor)")
        print(f"{'plain loop, 1 process, BLAS threads':<34}{plain_threads:>10.2f}"
              f"{plain_threads / plain:>10.2f}")
        for workers, rate in rates.items():
            print(f"{f'Dask LocalCluster, {workers} worker(s)':<34}{rate:>10.2f}"
                  f"{rate / plain:>10.2f}")
        print(f"scaling 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (2 cores)")


def flip_bench(runs: int) -> None:
    from radguard.evaluation.splits import split_of
    from radguard.fileio import write_csv
    from radguard.governance.audit import audit_dataset, plant_label_flips
    from radguard.triage.model import load_model

    rows = list(csv.DictReader(open(SHARED / "cxr-nih" / "labels.csv")))
    model = load_model("chest")
    seen = np.array([split_of("cxr-nih", r["patient_id"]) == "train" for r in rows])
    print(f"\nlabel-flip audit, cxr-nih ({len(rows)} images, 5% flipped, features and logit of "
          "the chest triage model, 5-fold cross-validation by patient)")
    print("note: the chest model was trained on the 'train' split of these images (with the "
          "original labels); recall is shown separately for images it never saw")
    print(f"{'run':<6}{'recall':>8}{'recall unseen':>15}{'FPR':>8}{'flagged':>9}")
    out = []
    for run in range(runs):
        noisy, flipped = plant_label_flips(rows, "label", 0.05, seed=100 + run)
        with tempfile.TemporaryDirectory() as tmp:
            labels = Path(tmp) / "labels.csv"
            write_csv(labels, noisy, list(rows[0]))
            report = audit_dataset(SHARED / "cxr-nih" / "images", labels, model=model,
                                   synthetic=False, workers=2)
        flagged = {f["image"] for f in report.findings["label_flip_suspects"]}
        is_flip = np.array([i in flipped for i in range(len(rows))])
        hit = np.array([r["file"] in flagged for r in rows])
        recall = hit[is_flip].mean()
        unseen = hit[is_flip & ~seen].mean()
        fpr = hit[~is_flip].mean()
        out.append((recall, unseen, fpr))
        print(f"{run:<6}{recall:>8.3f}{unseen:>15.3f}{fpr:>8.3f}{hit.sum():>9}")
    mean = np.mean(out, axis=0)
    print(f"{'mean':<6}{mean[0]:>8.3f}{mean[1]:>15.3f}{mean[2]:>8.3f}   (target: recall >= 0.80)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--flip-runs", type=int, default=3)
    args = parser.parse_args()
    archive_bench(args.images)
    if args.flip_runs:
        flip_bench(args.flip_runs)


if __name__ == "__main__":
    main()
