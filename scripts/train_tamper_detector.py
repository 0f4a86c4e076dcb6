"""Reproduce the shipped learned local-edit detector (radguard/forensics/localnet.py).

    python scripts/train_tamper_detector.py [--crops 60000] [--epochs 7] [--resume]

1. takes the training split of the real radiographs in ../shared/data (by patient / woman /
   image, as every radguard model does), brought to the detector's analysis size
   (radguard.forensics.cues.prepare), sometimes shrunk further so noise levels vary;
2. cuts 128 x 128 crops; about 60% get one or two simulated edits (scripts/tamperdata.py:
   fills of five kinds with or without matched grain, splices from another training image),
   the rest stay untouched; some crops of either kind are JPEG round-tripped;
3. trains the fully convolutional network on per-cell edit fractions (flips and 90-degree
   turns as augmentation, about 30 minutes on 2 cores);
4. mines hard negatives - the places in untouched training images the network still takes
   for edits (electrodes, buttons, tube edges, burned-in text) - and trains on, with crops
   around them added as untouched examples (about 8 more minutes);
5. picks the image-level threshold on whole validation images: 1% of untouched ones reach
   it; reports the detection rate on validation images with fills and splices;
6. writes radguard/forensics/data/local_edit_detector.pt and its ONNX export
   (local_edit_detector.onnx, what radguard runs; ``--export-onnx`` redoes only that).
"""

from __future__ import annotations

import argparse
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import synthdata as sd  # noqa: E402
import tamperdata as td  # noqa: E402

from radguard.forensics.cues import prepare  # noqa: E402
from radguard.forensics.localnet import (  # noqa: E402
    CELL,
    WEIGHTS_PATH,
    LocalEditDetector,
    build_network,
    export_onnx,
    network_input,
)

CROP = 128
TARGET_FPR = 0.01
_IMAGES: list[np.ndarray] = []


def _load(split: str) -> list[np.ndarray]:
    return [prepare(sd.load(r.path)) for r in sd.real_images() if r.split == split]


def _init(images: list[np.ndarray]) -> None:
    global _IMAGES
    _IMAGES = images


def _crop(job: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One training crop (uint8) and its per-cell edit fractions. ``job`` is (seed, image
    index, centre y, centre x); index -1 picks a random image and place, otherwise the crop
    is an untouched one around a hard negative (a place the detector wrongly flagged)."""
    from PIL import Image

    seed, index, cy, cx = job
    rng = np.random.default_rng(seed)
    if index >= 0:
        img = _IMAGES[index]
        y = int(np.clip(cy - CROP // 2 + rng.integers(-24, 25), 0, img.shape[0] - CROP))
        x = int(np.clip(cx - CROP // 2 + rng.integers(-24, 25), 0, img.shape[1] - CROP))
        crop = img[y : y + CROP, x : x + CROP].astype(np.float64)
        cells = np.zeros((CROP // CELL, CROP // CELL), np.float32)
        return crop.astype(np.uint8), cells
    img = _IMAGES[int(rng.integers(len(_IMAGES)))]
    if rng.random() < 0.3:  # a smaller copy: less noise per pixel, as in downsized exports
        k = rng.uniform(0.5, 0.9)
        size = (max(CROP, int(img.shape[1] * k)), max(CROP, int(img.shape[0] * k)))
        img = np.asarray(
            Image.fromarray(img.astype(np.uint8)).resize(size, Image.Resampling.BOX), np.float32
        )
    y = int(rng.integers(0, img.shape[0] - CROP + 1))
    x = int(rng.integers(0, img.shape[1] - CROP + 1))
    crop = img[y : y + CROP, x : x + CROP].astype(np.float64)
    if rng.random() < 0.6:
        donor = _IMAGES[int(rng.integers(len(_IMAGES)))]
        out, mask = td.edit(crop, donor, rng)
    else:
        out, mask = crop, np.zeros(crop.shape, np.float32)
        if rng.random() < 0.2:
            out = td.jpeg(out, int(rng.integers(80, 98)))
    cells = mask.reshape(CROP // CELL, CELL, CROP // CELL, CELL).mean(axis=(1, 3))
    return out.astype(np.uint8), cells.astype(np.float32)


def make_crops(images: list[np.ndarray], n: int, seed: int,
               hard: list[tuple[int, int, int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random crops plus one untouched crop around each hard negative."""
    t0 = time.time()
    jobs = [(seed * 10_000_000 + i, -1, 0, 0) for i in range(n)]
    jobs += [(seed * 10_000_000 + n + i, *h) for i, h in enumerate(hard or [])]
    with Pool(2, initializer=_init, initargs=(images,)) as pool:
        rows = pool.map(_crop, jobs, chunksize=64)
    print(f"  {len(jobs)} crops in {time.time() - t0:.0f} s", flush=True)
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def hard_negatives(det: LocalEditDetector, images: list[np.ndarray], per_image: int = 3,
                   floor: float = 0.3) -> list[tuple[int, int, int]]:
    """(image index, y, x) of the most edit-like places in untouched training images."""
    out = []
    for i, a in enumerate(images):
        p = det.analyse(a).probability
        for k in np.argsort(p.ravel())[::-1][:per_image]:
            if p.ravel()[k] < floor:
                break
            cy, cx = np.unravel_index(k, p.shape)
            out.append((i, int(cy) * CELL + CELL // 2, int(cx) * CELL + CELL // 2))
    return out


def bench_edit(img: np.ndarray, rng: np.random.Generator, kind: str, donor: np.ndarray
               ) -> np.ndarray:
    """A validation edit: a rectangle of 24-40 px filled bilinearly or spliced."""
    h, w = img.shape
    s = int(rng.choice([24, 32, 40]))
    y, x = int(rng.integers(h // 4, 3 * h // 4 - s)), int(rng.integers(w // 4, 3 * w // 4 - s))
    m = np.zeros(img.shape, bool)
    m[y : y + s, x : x + s] = True
    if kind == "fill":
        out = td.fill(img.astype(np.float64), m, (y, x, y + s, x + s), "bilinear", rng, False)
    else:
        out, _ = td.splice(img.astype(np.float64), m, (y, x, y + s, x + s), donor, rng)
    return np.clip(np.round(out), 0, 255).astype(np.float32)


def train(crops: np.ndarray, cells: np.ndarray, epochs: int, seed: int,
          net: object = None, max_lr: float = 3e-3) -> object:
    """Train a new network (or go on training ``net``) with a one-cycle schedule."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    net = net if net is not None else build_network()
    opt = torch.optim.AdamW(net.parameters(), lr=max_lr, weight_decay=1e-4)
    batch = 32
    steps = epochs * (len(crops) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))
    rng = np.random.default_rng(seed)
    x_all = np.empty((len(crops), 2, CROP, CROP), np.float32)
    for i, c in enumerate(crops):
        x_all[i] = network_input(c)
    step = 0
    t0 = time.time()
    net.train()
    for epoch in range(epochs):
        order = rng.permutation(len(crops))
        total = 0.0
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            xb = torch.from_numpy(x_all[idx])
            yb = torch.from_numpy(cells[idx])[:, None]
            k = int(rng.integers(4))
            xb, yb = torch.rot90(xb, k, (2, 3)), torch.rot90(yb, k, (2, 3))
            if rng.random() < 0.5:
                xb, yb = xb.flip(3), yb.flip(3)
            loss = loss_fn(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            step += 1
        n = len(order) // batch
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / n:.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    net.eval()
    return net


def calibrate(state: dict, val: list[np.ndarray], seed: int) -> dict:
    """Pick the threshold on untouched validation images (TARGET_FPR of them reach it) and
    measure detection on validation images with a fill or a splice; returns the rates."""
    det = LocalEditDetector(state)
    clean = np.array([det.analyse(a).score for a in val])
    threshold = float(np.quantile(clean, 1 - TARGET_FPR))
    state["threshold"] = threshold
    det = LocalEditDetector(state)
    rng = np.random.default_rng(seed + 1)
    rates = {"false_alarm": float((clean >= threshold).mean())}
    for kind in ("fill", "splice"):
        hits = 0
        for i, a in enumerate(val):
            edited = bench_edit(a, rng, kind, val[(i + 1) % len(val)])
            hits += det.analyse(edited).score >= threshold
        rates[kind] = hits / len(val)
    print(f"validation ({len(val)} images): threshold {threshold:.3f}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()), flush=True)
    return rates


def _state(net: object, threshold: float = 0.5) -> dict:
    return {"weights": {k: v.detach().half() if v.is_floating_point() else v
                        for k, v in net.state_dict().items()}, "threshold": threshold}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--crops", type=int, default=60000)
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--hard-crops", type=int, default=20000,
                    help="random crops of the second (hard-negative) stage")
    ap.add_argument("--hard-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true",
                    help="start from the shipped weights and run only the second stage")
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="where to write the weights")
    ap.add_argument("--calibrate", action="store_true",
                    help="only re-pick the threshold of the shipped weights")
    ap.add_argument("--export-onnx", action="store_true",
                    help="only write the ONNX export of the weights in --out")
    args = ap.parse_args()
    t0 = time.time()
    if args.export_onnx:
        print(f"wrote {export_onnx(args.out)}")
        return
    if args.calibrate:
        state = torch.load(WEIGHTS_PATH, weights_only=True)
        state["info"]["val_rates"] = calibrate(state, _load("val"), args.seed)
        torch.save(state, WEIGHTS_PATH)
        print(f"wrote {export_onnx(WEIGHTS_PATH)}")
        return
    train_imgs = _load("train")
    val = _load("val")
    print(f"{len(train_imgs)} training and {len(val)} validation images prepared", flush=True)
    if args.resume:
        net = build_network()
        saved = torch.load(WEIGHTS_PATH, weights_only=True)["weights"]
        net.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in saved.items()})
    else:
        crops, cells = make_crops(train_imgs, args.crops, args.seed)
        print(f"edited share of cells: {(cells > 0.5).mean():.4f}", flush=True)
        net = train(crops, cells, args.epochs, args.seed)
        del crops, cells
        calibrate(_state(net), val, args.seed)
    # stage 2: the places the network still mistakes for edits in untouched training
    # images (electrodes, buttons, tube edges, text) become untouched crops
    hard = hard_negatives(LocalEditDetector(_state(net)), train_imgs)
    print(f"{len(hard)} hard negatives mined", flush=True)
    crops, cells = make_crops(train_imgs, args.hard_crops, args.seed + 1, hard)
    net = train(crops, cells, args.hard_epochs, args.seed + 1, net=net, max_lr=1e-3)
    del crops, cells
    state = _state(net)
    rates = calibrate(state, val, args.seed)
    state["info"] = {
        "script": "scripts/train_tamper_detector.py",
        "crops": args.crops,
        "epochs": args.epochs,
        "hard_negatives": len(hard),
        "hard_crops": args.hard_crops,
        "hard_epochs": args.hard_epochs,
        "seed": args.seed,
        "train_images": len(train_imgs),
        "val_images": len(val),
        "val_rates": rates,
        "minutes": round((time.time() - t0) / 60, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB) and "
          f"{export_onnx(args.out)} in {state['info']['minutes']} min")


if __name__ == "__main__":
    main()
