"""Reproduce the reference chest X-ray triage model (normal vs. pneumonia).

    python scripts/train_triage_chest.py [--epochs 30] [--train-site cxr-nih]

Trains a small MONAI residual classifier on CPU on the training split of one site (split by
patient, 70 / 15 / 15, the same hashing rule as scripts/synthdata.py), keeps the epoch with
the best validation AUC, fits Platt calibration and the 1-10 suspicion deciles on the
validation split, picks the operating point for 90% validation sensitivity, measures the
internal test split and the other site (external), and writes the bundle
radguard/triage/data/chest.{pt,json}. About 3-5 minutes on 2 cores.

benchmarks/bench_triage.py re-measures the shipped bundle and trains the reverse direction.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from synthdata import SHARED, RealImage, load  # noqa: E402

from radguard.evaluation import delong_auc  # noqa: E402
from radguard.triage import Calibrator, SuspicionScale, choose_threshold  # noqa: E402
from radguard.triage.networks import DEFAULT, build_network, to_input  # noqa: E402

BUNDLE = HERE.parent / "radguard" / "triage" / "data" / "chest"
TARGET_SENSITIVITY = 0.90
SITES = ("cxr-nih", "cxr-kermany")


def load_site(source: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Network inputs, labels (1 = pneumonia) and split names of every image of a site."""
    xs, ys, splits = [], [], []
    with open(SHARED / source / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            path = SHARED / source / "images" / row["file"]
            xs.append(to_input(load(path).astype(np.float32), size))
            ys.append(1 if row["label"] == "pneumonia" else 0)
            splits.append(RealImage(path, row["patient_id"], source).split)
    return np.stack(xs), np.array(ys), np.array(splits)


def scores_of(net: object, x: np.ndarray) -> np.ndarray:
    import torch

    net.eval()
    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(x[i:i + 64])).reshape(-1).numpy()
                               for i in range(0, len(x), 64)]).astype(np.float64)


def train_network(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, *,
                  epochs: int, seed: int = 0, log: bool = True, config: dict | None = None,
                  batch: int = 32, vertical_flip: bool = False, intensity_jitter: bool = True,
                  validate: Callable[[object], np.ndarray] | None = None) -> object:
    """AdamW + class-balanced BCE with flips (and intensity jitter); the epoch with the best
    validation AUC. ``validate(net)`` scores the validation cases (default: the network on
    ``xv``), for models whose cases are not single network inputs."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(seed)
    net = build_network(config or {})
    pos_weight = torch.tensor([(len(y) - y.sum()) / max(y.sum(), 1)], dtype=torch.float32)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)  # balanced classes
    best, best_auc = None, -1.0
    for epoch in range(epochs):
        net.train()
        order = rng.permutation(len(x))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            xb = x[idx].copy()
            flip = rng.random(len(idx)) < 0.5
            xb[flip] = xb[flip][..., ::-1]
            if vertical_flip:
                vflip = rng.random(len(idx)) < 0.5
                xb[vflip] = xb[vflip][..., ::-1, :]
            if intensity_jitter:
                xb *= rng.uniform(0.8, 1.2, (len(idx), 1, 1, 1)).astype(np.float32)
            loss = loss_fn(net(torch.from_numpy(np.ascontiguousarray(xb))).reshape(-1),
                           torch.from_numpy(y[idx].astype(np.float32)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        auc = delong_auc(yv, validate(net) if validate else scores_of(net, xv)).auc
        if auc > best_auc:
            best_auc = auc
            best = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if log:
            print(f"  epoch {epoch + 1}/{epochs}: validation AUC {auc:.3f}", flush=True)
    net.load_state_dict(best)
    net.eval()
    return net


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--train-site", choices=SITES, default="cxr-nih")
    args = ap.parse_args()
    size = DEFAULT["input_size"]
    t0 = time.time()
    data = {site: load_site(site, size) for site in SITES}
    x, y, split = data[args.train_site]
    other = next(s for s in SITES if s != args.train_site)
    tr, va, te = split == "train", split == "val", split == "test"
    print(f"{args.train_site}: {tr.sum()} train, {va.sum()} val, {te.sum()} test; external "
          f"{other}: {len(data[other][1])} ({time.time() - t0:.0f} s to load)", flush=True)
    net = train_network(x[tr], y[tr], x[va], y[va], epochs=args.epochs)
    sv = scores_of(net, x[va])
    cal = Calibrator().fit(sv, y[va])
    pv = cal.predict(sv)
    scale = SuspicionScale().fit(pv)
    point = choose_threshold(y[va], pv, sensitivity=TARGET_SENSITIVITY)
    internal = delong_auc(y[te], scores_of(net, x[te]))
    external = delong_auc(data[other][1], scores_of(net, data[other][0]))
    print(f"internal test AUC {internal.auc:.3f} [{internal.low:.3f}, {internal.high:.3f}]; "
          f"external ({other}) AUC {external.auc:.3f} [{external.low:.3f}, {external.high:.3f}]")
    meta = {
        "card": {
            "name": "chest",
            "version": f"1.0-{args.train_site}",
            "intended_use": "Triage of adult frontal chest radiographs (CR/DX): normal vs. "
                            "pneumonia, to order the reading worklist. Not a diagnosis; not "
                            "for children (see the external figures), lateral views or CT.",
            "training_data": f"{args.train_site} training split ({int(tr.sum())} images, "
                             "split by patient; NIH labels are NLP-mined from reports, noisy)",
            "modalities": ["CR", "DX"],
            "metrics": {
                "internal_test_auc": internal.to_dict(),
                f"external_auc_{other}": external.to_dict(),
                "operating_point": point.to_dict(),
                "measured_by": "scripts/train_triage_chest.py",
            },
        },
        "network": dict(DEFAULT),
        "input_size": size,
        "calibrator": cal.to_dict(),
        "suspicion": scale.to_dict(),
        "threshold": point.threshold,
    }
    BUNDLE.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() for k, v in net.state_dict().items()}, BUNDLE.with_suffix(".pt"))
    BUNDLE.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {BUNDLE}.pt/.json ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
