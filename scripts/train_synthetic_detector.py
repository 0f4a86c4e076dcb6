"""Reproduce the shipped synthetic-radiograph detector weights.

    python scripts/train_synthetic_detector.py [--retrain-generators] [--refresh-features]

1. trains the four learned generator families (autoencoder, nearest-neighbour decoder,
   super-resolution, DCGAN) on the training split of ../shared/data if their weights are not
   in scripts/generators/ (a few minutes each on 2 cores);
2. per real radiograph, the whole image and a zoomed crop of it (another field of view and
   magnification) each appear once as real and three laundered fakes are made from them by
   three different families (see scripts/synthdata.py); the detector's cues are computed
   for each (cached in .cache/synthetic_features.npz);
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
PERCEPTRONS = 5  # fitted from different seeds and averaged
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


def _zoomed(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 45-80% crop: another field of view and magnification of the same real
    radiograph (ribs, spine, shoulder, breast tissue close up), so that 'real' does not mean
    'a whole chest or breast' to the detector."""
    h, w = img.shape
    k = float(rng.uniform(0.45, 0.8))
    ch, cw = max(64, int(h * k)), max(64, int(w * k))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return img[y : y + ch, x : x + cw]


def _rows_for(real: sd.RealImage) -> list[dict]:
    """Per real radiograph: the whole image and a zoomed crop, each once real and once
    through a generator family (three families in all, none twice)."""
    rng = np.random.default_rng(zlib.crc32(str(real.path.name).encode()) + 17)
    img = sd.load(real.path)
    fams = rng.choice(sd.FAMILIES, 3, replace=False)
    crop = _zoomed(img, rng)
    items = [("real", img), ("real", crop)]
    items += [(str(f), sd.make_fake(str(f), img, rng, _FAMS)) for f in fams[:2]]
    items += [(str(fams[2]), sd.make_fake(str(fams[2]), crop, rng, _FAMS))]
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
    from sklearn.ensemble import HistGradientBoostingClassifier
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
    # balance: the two real rows of an image count as much as its three fakes
    reps = np.where(yt == 0, 3, 2)
    xt, yt = np.repeat(xt, reps, axis=0), np.repeat(yt, reps)
    i_mean, i_scale = xt.mean(axis=0), xt.std(axis=0) + 1e-9
    mlps = [
        MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-2, max_iter=800,
                      random_state=seed * 100 + k).fit((xt - i_mean) / i_scale, yt)
        for k in range(PERCEPTRONS)
    ]
    trees = HistGradientBoostingClassifier(
        max_iter=250, learning_rate=0.06, max_leaf_nodes=15, l2_regularization=1.0,
        random_state=seed,
    ).fit(xt, yt)
    weights["image"] = {
        "mean": i_mean.tolist(),
        "scale": i_scale.tolist(),
        "nets": [
            [
                {"W": np.round(w, 6).tolist(), "b": np.round(b, 6).tolist()}
                for w, b in zip(mlp.coefs_, mlp.intercepts_, strict=True)
            ]
            for mlp in mlps
        ],
        "trees": export_trees(trees),
    }
    from radguard.forensics.synthetic import _Trees

    gap = np.abs(_Trees(weights["image"]["trees"]).raw(xt) - trees.decision_function(xt)).max()
    if gap > 1e-4:
        raise RuntimeError(f"exported trees disagree with scikit-learn by {gap:.2g}")
    det = SyntheticDetector(weights)
    p_real = det.image_probability(x[val & (y == 0)])
    # 'synthetic' is a strong verdict: at most 5% of real validation images reach it;
    # 'suspicious' starts at the top 20% of real validation images
    weights["threshold"] = float(np.quantile(p_real, 1 - TARGET_FPR))
    weights["suspicious_threshold"] = float(np.quantile(p_real, 1 - SUSPICIOUS_FPR))
    return weights


def export_trees(model: object) -> dict:
    """A fitted binary HistGradientBoostingClassifier as flat node arrays (global indices)
    for radguard.forensics.synthetic._Trees; checked against scikit-learn's own output."""
    feature, threshold, left, right, value, leaf, roots = [], [], [], [], [], [], []
    depth = 0
    for (predictor,) in model._predictors:  # one tree per iteration for two classes
        nodes = predictor.nodes
        if nodes["is_categorical"].any():
            raise ValueError("categorical splits are not exported")
        base = len(feature)
        roots.append(base)
        feature += nodes["feature_idx"].astype(int).tolist()
        threshold += [float(t) if np.isfinite(t) else 0.0 for t in nodes["num_threshold"]]
        left += (nodes["left"].astype(int) + base).tolist()
        right += (nodes["right"].astype(int) + base).tolist()
        value += [round(float(v), 7) for v in nodes["value"]]
        leaf += nodes["is_leaf"].astype(bool).tolist()
        depth = max(depth, int(nodes["depth"].max()))
    out = {"feature": feature, "threshold": threshold, "left": left, "right": right,
           "value": value, "leaf": leaf, "roots": roots,
           "baseline": float(np.ravel(model._baseline_prediction)[0]), "depth": depth + 1}
    return out


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
    ap.add_argument("--generator-steps", type=int, default=None,
                    help="training steps of every generator (default: as shipped)")
    ap.add_argument("--retrain-generators", action="store_true")
    ap.add_argument("--refresh-features", action="store_true")
    args = ap.parse_args()
    def steps(default: int) -> int:
        return args.generator_steps or default

    # the step counts the shipped generator weights were trained with
    trainers = {
        "autoencoder.pt": lambda imgs: sd.train_autoencoder(imgs, steps(1500)),
        "nn_decoder.pt": lambda imgs: sd.train_autoencoder(imgs, steps(600), kind="nn_decoder"),
        "super_resolution.pt": lambda imgs: sd.train_super_resolution(imgs, steps(800)),
        "dcgan_g.pt": lambda imgs: sd.train_dcgan(imgs, steps(1500)),
    }
    missing = [n for n in trainers if args.retrain_generators
               or not (sd.GENERATOR_DIR / n).exists()]
    if missing:
        train_imgs = [sd.load(r.path) for r in sd.real_images() if r.split == "train"]
        print(f"training generators {missing} on {len(train_imgs)} real images", flush=True)
        for name in missing:
            trainers[name](train_imgs)
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
