"""Rebuild the shipped chest X-ray triage bundle (radguard/triage/data/chest.{pt,json}, and
chest.pt.onnx: the weights' stamped ONNX export that runs the scores).

    python scripts/train_triage_chest.py [--epochs 30] [--train-site cxr-nih] [--export-onnx]

The same as ``radguard triage train chest --data ../shared/data/cxr-nih --external
../shared/data/cxr-kermany -o radguard/triage/data/chest`` (recipe in
radguard/triage/training.py). About 3 minutes on 2 cores. benchmarks/bench_triage.py
re-measures the shipped bundle and trains the reverse direction.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from radguard.triage.model import write_runtime_export
from radguard.triage.training import train_chest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SITES = ("cxr-nih", "cxr-kermany")

if __name__ == "__main__":
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--train-site", choices=SITES, default="cxr-nih")
    ap.add_argument("--export-onnx", action="store_true",
                    help="only write the shipped bundle's stamped ONNX export (chest.pt.onnx), "
                         "which the gateway and the CLI run the scores with")
    args = ap.parse_args()
    torch.set_num_threads(2)
    bundle = REPO / "radguard/triage/data/chest"
    if not args.export_onnx:
        other = next(s for s in SITES if s != args.train_site)
        train_chest(SHARED / args.train_site, SHARED / other, bundle, epochs=args.epochs,
                    log=print)
    print(f"wrote {write_runtime_export(bundle.with_suffix('.json'))}")
