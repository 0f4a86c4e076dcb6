"""Rebuild the shipped mammography triage bundle (radguard/triage/data/mammo.{pt,json}).

    python scripts/train_triage_mammo.py [--epochs 12]

The same as ``radguard triage train mammo --data ../shared/data/mammo-mias -o
radguard/triage/data/mammo`` (recipe in radguard/triage/training.py: a 48 px patch classifier
on mini-MIAS split by woman). About 1.5 minutes on 2 cores. Localisation (FROC) and the
benign-vs-malignant cross-validation are measured by benchmarks/bench_triage.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from radguard.triage.training import train_mammo

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

if __name__ == "__main__":
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(2)
    train_mammo(SHARED / "mammo-mias", REPO / "radguard/triage/data/mammo", epochs=args.epochs,
                log=print)
