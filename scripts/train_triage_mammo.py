"""Reproduce the reference mammography triage model (normal vs. abnormal).

    python scripts/train_triage_mammo.py [--epochs 12]

mini-MIAS (322 images, 512 px) split by woman (pair_id) 70 / 15 / 15. A whole-image network
does not learn from 220 mammograms (test AUC 0.45 in a first attempt), so the model is a
*patch* classifier: 48 x 48 patches of the image at 256 px, positives centred (with jitter) on
the annotated lesion centres, negatives anywhere in breast tissue away from lesions. Slid
over an image, the mean of its top three patch logits is the image score and the patch
probabilities are the saliency map. Training is the chest recipe (train_network) on the
patches; the epoch with the best validation image AUC is kept;
Platt calibration, suspicion deciles and a 90%-sensitivity operating point are fitted on
validation; the bundle goes to radguard/triage/data/mammo.{pt,json}. Localisation (FROC
against the given centres and radii) is measured by benchmarks/bench_triage.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from synthdata import SHARED, load  # noqa: E402
from train_triage_chest import TARGET_SENSITIVITY, train_network  # noqa: E402

from radguard.evaluation import delong_auc  # noqa: E402
from radguard.evaluation.splits import split_of  # noqa: E402
from radguard.triage import Calibrator, SuspicionScale, choose_threshold  # noqa: E402
from radguard.triage.model import PatchTriageModel  # noqa: E402
from radguard.triage.networks import DEFAULT, to_input  # noqa: E402

BUNDLE = HERE.parent / "radguard" / "triage" / "data" / "mammo"
SIZE, PATCH, STRIDE = 256, 48, 12
CONFIG = {**DEFAULT, "input_size": PATCH, "channels": [16, 32, 64], "strides": [2, 2, 2]}
MIAS = SHARED / "mammo-mias"


def load_mias(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[dict]]:
    """Inputs, labels (1 = any abnormality), splits, file names, and lesions
    (image index, x, y from the top-left, radius; 512-px units) of every MIAS image."""
    rows: dict[str, list[dict]] = {}
    with open(MIAS / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["file"], []).append(row)
    xs, ys, splits, names, lesions = [], [], [], [], []
    for i, (name, entries) in enumerate(sorted(rows.items())):
        xs.append(to_input(load(MIAS / "images" / name).astype(np.float32), size))
        ys.append(int(entries[0]["abnormality"] != "NORM"))
        splits.append(split_of("mammo-mias", entries[0]["pair_id"]))
        names.append(name)
        for e in entries:
            if e["x"] and e["y"] and e["radius"]:
                lesions.append({"image": i, "x": float(e["x"]), "y": 512.0 - float(e["y"]),
                                "radius": float(e["radius"])})
    return np.stack(xs), np.array(ys), np.array(splits), names, lesions


def patches(x: np.ndarray, y: np.ndarray, lesions: list[dict], rows: np.ndarray,
            rng: np.random.Generator, per_image: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Training patches (n, 1, PATCH, PATCH) and labels from the images ``rows``."""
    scale = SIZE / 512.0
    half = PATCH // 2
    out, labels = [], []
    by_image: dict[int, list[dict]] = {}
    for les in lesions:
        by_image.setdefault(les["image"], []).append(les)

    def cut(i: int, cy: float, cx: float) -> np.ndarray:
        cy = int(np.clip(round(cy), half, SIZE - half))
        cx = int(np.clip(round(cx), half, SIZE - half))
        return x[i, :, cy - half : cy + half, cx - half : cx + half]

    for i in rows:
        here = by_image.get(int(i), [])
        for les in here:
            jitter = min(les["radius"] * scale / 2, 8.0)
            for _ in range(per_image):
                dy, dx = rng.uniform(-jitter, jitter, 2)
                out.append(cut(i, les["y"] * scale + dy, les["x"] * scale + dx))
                labels.append(1)
        tissue = np.argwhere(x[i, 0, half:-half, half:-half] > -0.3) + half
        if len(tissue) == 0:
            continue
        taken = 0
        for cy, cx in tissue[rng.permutation(len(tissue))[: per_image * 4]]:
            far = all(np.hypot(cy - les["y"] * scale, cx - les["x"] * scale)
                      > les["radius"] * scale + half for les in here)
            if far and (y[i] == 0 or here):  # abnormal images without centres: no negatives
                out.append(cut(i, cy, cx))
                labels.append(0)
                taken += 1
            if taken == per_image:
                break
    return np.stack(out).astype(np.float32), np.array(labels)


def bundle_meta(cal: Calibrator, scale: SuspicionScale, threshold: float,
                card: dict) -> dict:
    return {"kind": "patch", "patch": PATCH, "stride": STRIDE, "card": card,
            "network": CONFIG, "input_size": SIZE, "calibrator": cal.to_dict(),
            "suspicion": scale.to_dict(), "threshold": threshold}


def image_scores(net: object, x: np.ndarray) -> np.ndarray:
    model = PatchTriageModel(bundle_meta(Calibrator(), SuspicionScale([0.0] * 9), 0.5,
                                         {"name": "mammo", "version": "training",
                                          "intended_use": "", "training_data": ""}), net)
    return model.raw_scores(x)


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args()
    t0 = time.time()
    rng = np.random.default_rng(0)
    x, y, split, _names, lesions = load_mias(SIZE)
    tr, va, te = split == "train", split == "val", split == "test"
    px, py = patches(x, y, lesions, np.flatnonzero(tr), rng)
    print(f"mini-MIAS: {tr.sum()} train, {va.sum()} val, {te.sum()} test images "
          f"({y[tr].sum()}/{y[va].sum()}/{y[te].sum()} abnormal); {len(py)} training patches "
          f"({py.sum()} lesion)", flush=True)
    net = train_network(px, py, x[va], y[va], epochs=args.epochs, config=CONFIG, batch=64,
                        vertical_flip=True, intensity_jitter=False,
                        validate=lambda n: image_scores(n, x[va]))
    sv = image_scores(net, x[va])
    cal = Calibrator().fit(sv, y[va])
    pv = cal.predict(sv)
    point = choose_threshold(y[va], pv, sensitivity=TARGET_SENSITIVITY)
    test = delong_auc(y[te], image_scores(net, x[te]))
    print(f"test AUC {test.auc:.3f} [{test.low:.3f}, {test.high:.3f}]")
    card = {
        "name": "mammo",
        "version": "1.0-mias-patch",
        "intended_use": "Research triage of screening mammograms (MG): normal vs. any "
                        "abnormality (mass, calcification, distortion, asymmetry), to order a "
                        "reading worklist. Trained on 1990s digitised film (mini-MIAS): not "
                        "validated on digital mammography.",
        "training_data": f"mini-MIAS training split ({int(tr.sum())} images, split by woman; "
                         f"{len(py)} patches)",
        "modalities": ["MG"],
        "metrics": {"test_auc": test.to_dict(), "operating_point": point.to_dict(),
                    "measured_by": "scripts/train_triage_mammo.py"},
    }
    meta = bundle_meta(cal, SuspicionScale().fit(pv), point.threshold, card)
    torch.save({k: v.half() for k, v in net.state_dict().items()}, BUNDLE.with_suffix(".pt"))
    BUNDLE.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {BUNDLE}.pt/.json ({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
