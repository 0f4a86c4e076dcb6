"""Reproduce the shipped synthetic-radiograph detector weights.

    python scripts/train_synthetic_detector.py [--generator-steps 1500] [--retrain-generators]

1. trains the two learned generator families (autoencoder, DCGAN) on the training split of
   ../shared/data if their weights are not in scripts/generators/ (a few minutes on 2 cores);
2. makes one laundered real and two laundered fakes (two different families) per real
   radiograph (see scripts/synthdata.py), and computes the detector's cues for each
   (cached in .cache/synthetic_features.npz);
3. fits the block model and the image model on the training split, picks the decision
   threshold on the validation split (5% of real images above it; the 'suspicious' band
   starts at 20%) and writes
   radguard/forensics/data/synthetic_detector.json.

Held-out and leave-one-generator-out results: benchmarks/bench_forensics.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from multiprocessing import Pool
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import synthdata as sd  # noqa: E402

from radguard.forensics.cues import CUE_NAMES, block_cues, image_cues, prepare  # noqa: E402
from radguard.forensics.synthetic import (  # noqa: E402
    WEIGHTS_PATH,
    SyntheticDetector,
    feature_vector,
)

CACHE = HERE.parent / ".cache" / "synthetic_features.npz"
BLOCKS_PER_IMAGE = 16
TARGET_FPR = 0.05  # real validation images called synthetic
SUSPICIOUS_FPR = 0.20  # real validation images called at least suspicious

_FAMS: sd.TorchFamilies | None = None


def _init_worker() -> None:
    global _FAMS
    import torch

    torch.set_num_threads(1)
    _FAMS = sd.TorchFamilies()


def describe(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(scalar cues, co-occurrences, block cues, analysed short side) of one image."""
    a = prepare(img)
    cues, cooc = image_cues(a)
    blocks, _ = block_cues(a)
    return (np.array([cues[n] for n in CUE_NAMES]), cooc, blocks.astype(np.float32), min(a.shape))


def _rows_for(real: sd.RealImage) -> list[dict]:
    rng = np.random.default_rng(zlib.crc32(str(real.path.name).encode()) + 17)
    img = sd.load(real.path)
    fams = rng.choice(sd.FAMILIES, 2, replace=False)
    items = [("real", img)] + [(str(f), sd.make_fake(str(f), img, rng, _FAMS)) for f in fams]
    rows = []
    for family, im in items:
        cues, cooc, blocks, short = describe(sd.launder(im, rng))
        rows.append(
            {
                "family": family,
                "split": real.split,
                "source": real.source,
                "cues": cues,
                "cooc": cooc,
                "blocks": blocks,
                "short": short,
            }
        )
    return rows


class Dataset:
    """Cue matrices of every laundered real and fake, with family, split and source."""

    def __init__(self, rows: list[dict]) -> None:
        self.family = np.array([r["family"] for r in rows])
        self.split = np.array([r["split"] for r in rows])
        self.source = np.array([r["source"] for r in rows])
        self.cues = np.stack([r["cues"] for r in rows])
        self.cooc = np.stack([r["cooc"] for r in rows])
        self.short = np.array([r["short"] for r in rows])
        counts = np.array([len(r["blocks"]) for r in rows])
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.blocks = np.concatenate([r["blocks"] for r in rows])

    @property
    def label(self) -> np.ndarray:
        return (self.family != "real").astype(int)

    def block_rows(self, i: int) -> np.ndarray:
        return self.blocks[self.offsets[i] : self.offsets[i + 1]]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            family=self.family,
            split=self.split,
            source=self.source,
            cues=self.cues,
            cooc=self.cooc,
            short=self.short,
            offsets=self.offsets,
            blocks=self.blocks,
        )

    @classmethod
    def load(cls, path: Path) -> Dataset:
        z = np.load(path)
        self = cls.__new__(cls)
        for key in ("family", "split", "source", "cues", "cooc", "short", "offsets", "blocks"):
            setattr(self, key, z[key])
        return self


def build_dataset(*, refresh: bool = False, workers: int = 2) -> Dataset:
    if CACHE.exists() and not refresh:
        return Dataset.load(CACHE)
    reals = sd.real_images()
    rows: list[dict] = []
    t0 = time.time()
    with Pool(workers, initializer=_init_worker) as pool:
        for i, part in enumerate(pool.imap(_rows_for, reals, chunksize=8)):
            rows.extend(part)
            if i % 200 == 0:
                print(
                    f"  {i}/{len(reals)} real images described ({time.time() - t0:.0f} s)",
                    flush=True,
                )
    ds = Dataset(rows)
    ds.save(CACHE)
    return ds


def fit(ds: Dataset, train: np.ndarray, val: np.ndarray, seed: int = 0) -> dict:
    """Fit block and image models on rows ``train``; threshold on rows ``val``. Weights dict."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(seed)
    y = ds.label
    bx, by = [], []
    for i in np.flatnonzero(train):
        b = ds.block_rows(i)
        pick = rng.choice(len(b), min(BLOCKS_PER_IMAGE, len(b)), replace=False)
        bx.append(b[pick])
        by.append(np.full(len(pick), y[i]))
    bx, by = np.concatenate(bx).astype(np.float64), np.concatenate(by)
    b_mean, b_scale = bx.mean(axis=0), bx.std(axis=0) + 1e-9
    blk = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
    blk.fit((bx - b_mean) / b_scale, by)
    weights = {
        "block": {
            "mean": b_mean.tolist(),
            "scale": b_scale.tolist(),
            "coef": blk.coef_[0].tolist(),
            "intercept": float(blk.intercept_[0]),
        }
    }
    real_train = train & (y == 0)
    weights["real_quantiles"] = {
        name: np.percentile(ds.cues[real_train, k], np.linspace(0, 100, 101)).tolist()
        for k, name in enumerate(CUE_NAMES)
    }
    # placeholders so image features can be computed with the block model in place
    weights["image"] = {"mean": [0.0], "scale": [1.0], "layers": []}
    weights["threshold"] = 0.5
    det = SyntheticDetector(weights)
    x = image_features(ds, det)
    xt, yt = x[train], y[train]
    # balance: each real row counts as much as all fakes made from it
    reps = np.where(yt == 0, 2, 1)
    xt, yt = np.repeat(xt, reps, axis=0), np.repeat(yt, reps)
    i_mean, i_scale = xt.mean(axis=0), xt.std(axis=0) + 1e-9
    mlp = MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-2, max_iter=800, random_state=seed)
    mlp.fit((xt - i_mean) / i_scale, yt)
    weights["image"] = {
        "mean": i_mean.tolist(),
        "scale": i_scale.tolist(),
        "layers": [
            {"W": w.tolist(), "b": b.tolist()}
            for w, b in zip(mlp.coefs_, mlp.intercepts_, strict=True)
        ],
    }
    det = SyntheticDetector(weights)
    p_real = det.image_probability(x[val & (y == 0)])
    # 'synthetic' is a strong verdict: at most 5% of real validation images reach it;
    # 'suspicious' starts at the top 20% of real validation images
    weights["threshold"] = float(np.quantile(p_real, 1 - TARGET_FPR))
    weights["suspicious_threshold"] = float(np.quantile(p_real, 1 - SUSPICIOUS_FPR))
    return weights


def image_features(ds: Dataset, det: SyntheticDetector) -> np.ndarray:
    names = list(CUE_NAMES)
    out = []
    for i in range(len(ds.family)):
        logits = det.block_logits(ds.block_rows(i).astype(np.float64))
        cues = dict(zip(names, ds.cues[i], strict=True))
        out.append(feature_vector(cues, ds.cooc[i], logits, int(ds.short[i])))
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator-steps", type=int, default=1500)
    ap.add_argument("--retrain-generators", action="store_true")
    ap.add_argument("--refresh-features", action="store_true")
    args = ap.parse_args()
    have = all((sd.GENERATOR_DIR / n).exists() for n in ("autoencoder.pt", "dcgan_g.pt"))
    if args.retrain_generators or not have:
        train_imgs = [sd.load(r.path) for r in sd.real_images() if r.split == "train"]
        print(f"training generators on {len(train_imgs)} real images", flush=True)
        sd.train_autoencoder(train_imgs, args.generator_steps)
        sd.train_dcgan(train_imgs, args.generator_steps)
        args.refresh_features = True
    ds = build_dataset(refresh=args.refresh_features)
    train, val = ds.split == "train", ds.split == "val"
    weights = fit(ds, train, val)
    det = SyntheticDetector(weights)
    x = image_features(ds, det)
    p = det.image_probability(x)
    y = ds.label
    for name, rows in (("train", train), ("val", val)):
        acc = ((p[rows] >= weights["threshold"]) == y[rows]).mean()
        print(f"{name}: {rows.sum()} images, accuracy {acc:.3f} at {weights['threshold']:.3f}")
    weights["info"] = {
        "families": list(sd.FAMILIES),
        "train_images": int(train.sum()),
        "val_images": int(val.sum()),
        "val_false_positive_rate": float((p[val & (y == 0)] >= weights["threshold"]).mean()),
        "val_true_positive_rate": float((p[val & (y == 1)] >= weights["threshold"]).mean()),
        "suspicious_threshold": weights["suspicious_threshold"],
        "script": "scripts/train_synthetic_detector.py",
    }
    WEIGHTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    WEIGHTS_PATH.write_text(json.dumps(weights, indent=None, separators=(",", ":")))
    print(
        f"wrote {WEIGHTS_PATH} ({WEIGHTS_PATH.stat().st_size // 1024} KiB); "
        f"val FPR {weights['info']['val_false_positive_rate']:.3f}, "
        f"TPR {weights['info']['val_true_positive_rate']:.3f}"
    )


if __name__ == "__main__":
    main()
