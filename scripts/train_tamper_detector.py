"""Reproduce the shipped learned local-edit detector (radguard/forensics/localnet.py).

    python scripts/train_tamper_detector.py [--jobs 7500] [--epochs 7] [--hold-out SOURCE]

The shipped weights (2026-12-07) are a fine-tune of the previous ones (commit 14a6a7c, trained
from scratch by this script's earlier version), 38 minutes on one core of a busy machine:

    git show 14a6a7c:radguard/forensics/data/local_edit_detector.pt > /tmp/prev.pt
    python scripts/train_tamper_detector.py --init /tmp/prev.pt --lr 1e-3 --jobs 5000 \
        --epochs 3 --hard-jobs 2000 --hard-epochs 2

1. takes the training split of the real radiographs the detector learns from (cxr-nih,
   cxr-kermany, mammo-mias, cxr-wild; by patient / woman / image, as every radguard model
   does); the other real sources of ../shared/data (the real crops of
   synthetic-stylegan2-cxr, the real CBIS-DDSM patches, the DICOM radiographs) are never
   trained on, so they measure false alarms on sources the detector has not seen;
2. puts every image through what real radiographs go through (scripts/realproc.py: lines,
   tubes, electrodes, markers, burned-in text, collimation, sharpening, histogram
   equalisation, window/level, noise reduction, resizing, JPEG) - ordinary processing is
   not an edit, so untouched images carry it as often as edited ones;
3. edits about 60% of the images once to three times (scripts/tamperdata.py: fills of five
   kinds with or without matched grain, splices from another training image) and then,
   often, processes them again (JPEG, resizing, display processing), as a re-saved forgery
   would be;
4. brings each image to the detector's analysis size (radguard.forensics.cues.prepare) and
   cuts 128 x 128 crops (half of an edited image's crops around its edits), labelled with
   per-cell edit fractions;
5. trains the fully convolutional network (flips and 90-degree turns as augmentation, on
   one core), then mines hard negatives - the places in processed untouched training images
   the network still takes for edits - and trains on with crops around them;
6. picks the image-level threshold leave-one-source-out on whole validation images, each
   untouched and under every single processing and random chains: for every training source,
   the score that ``--target`` of the other sources' images reach; the highest of those (the
   worst fold) ships. Reports the detection rate on validation images with fills and splices;
7. writes radguard/forensics/data/local_edit_detector.pt and its ONNX export
   (local_edit_detector.onnx, what radguard runs; ``--export-onnx`` redoes only that).

One core throughout (torch and OpenMP threads 1, no worker pool), so the machine stays usable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import realproc as rp  # noqa: E402
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
PER_JOB = 8  # crops cut from one processed (and perhaps edited) image
TARGET_FPR = 0.005  # share of untouched images of a held-out source that may reach the threshold
TRAIN_SOURCES = ("cxr-nih", "cxr-kermany", "mammo-mias", "cxr-wild")
CONTENT = ("collimation", "lines_tubes", "electrodes", "markers", "text")
DISPLAY = ("unsharp", "edge_enhance", "histeq", "window_level", "denoise")


def load_images(split: str, sources: tuple[str, ...]) -> list[np.ndarray]:
    """The real radiographs of ``sources`` in ``split``, 8-bit, as stored."""
    return [it.load() for it in td.real_sources() if it.split == split and it.source in sources]


def history(rng: np.random.Generator, content: bool = True) -> list[str]:
    """A random processing history in realproc's order: content (collimation, lines and
    tubes, electrodes, markers, text), one display step, resizing, JPEG."""
    if rng.random() < 0.2:
        return []
    names = [n for n in CONTENT if content and rng.random() < 0.2]
    if rng.random() < 0.5:
        names.append(DISPLAY[int(rng.integers(len(DISPLAY)))])
    if rng.random() < 0.3:
        names.append("resize")
    if rng.random() < 0.4:
        names.append("jpeg")
    return names


def _run(names: list[str], img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for name in names:
        img = rp.apply(name, img, rng)
    return img


def processed(img: np.ndarray, seed: int) -> np.ndarray:
    """``img`` after a random processing history drawn from ``seed``, in analysis form."""
    rng = np.random.default_rng(seed)
    return prepare(_run(history(rng), img, rng))


def _resize_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    if mask.shape == shape:
        return mask
    im = Image.fromarray(mask.astype(np.float32), mode="F")
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def image_job(images: list[np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PER_JOB crops (uint8) and their per-cell edit fractions from one training image:
    processed, perhaps edited, perhaps processed again, prepared for analysis."""
    rng = np.random.default_rng(seed)
    img = images[int(rng.integers(len(images)))]
    a = prepare(_run(history(rng), img, rng)).astype(np.float64)
    mask = np.zeros(a.shape, np.float32)
    edited = rng.random() < 0.6 and min(a.shape) >= 64
    if edited:
        donor = prepare(images[int(rng.integers(len(images)))]).astype(np.float64)
        a, mask = td.edit(a, donor, rng, jpeg_p=0.0, max_edits=3)
    post_p = 0.5 if edited else 0.3  # never a tell: untouched images are re-saved too
    out = np.clip(np.round(a), 0, 255).astype(np.uint8)
    if rng.random() < post_p:
        out = _run(history(rng, content=False), out, rng)
    final = prepare(out)
    mask = _resize_mask(mask, final.shape)
    h, w = final.shape
    if min(h, w) < CROP:  # shrunk below a crop: pad with the edge, as the network's border
        ph, pw = max(0, CROP - h), max(0, CROP - w)
        final = np.pad(final, ((0, ph), (0, pw)), mode="edge")
        mask = np.pad(mask, ((0, ph), (0, pw)))
        h, w = final.shape
    crops = np.empty((PER_JOB, CROP, CROP), np.uint8)
    cells = np.empty((PER_JOB, CROP // CELL, CROP // CELL), np.float32)
    ys, xs = np.nonzero(mask > 0.5)
    for k in range(PER_JOB):
        if len(ys) and k < PER_JOB // 2:  # around an edit, anywhere in the crop
            i = int(rng.integers(len(ys)))
            y = int(np.clip(ys[i] - rng.integers(8, CROP - 8), 0, h - CROP))
            x = int(np.clip(xs[i] - rng.integers(8, CROP - 8), 0, w - CROP))
        else:
            y, x = int(rng.integers(0, h - CROP + 1)), int(rng.integers(0, w - CROP + 1))
        crops[k] = final[y : y + CROP, x : x + CROP]
        m = mask[y : y + CROP, x : x + CROP]
        cells[k] = m.reshape(CROP // CELL, CELL, CROP // CELL, CELL).mean(axis=(1, 3))
    return crops, cells


def make_crops(images: list[np.ndarray], jobs: int, seed: int,
               hard: list[tuple[int, int, int, int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``jobs`` x PER_JOB random crops plus one untouched crop around each hard negative
    (image index, processing seed, y, x)."""
    t0 = time.time()
    n = jobs * PER_JOB + len(hard or [])
    crops = np.empty((n, CROP, CROP), np.uint8)
    cells = np.zeros((n, CROP // CELL, CROP // CELL), np.float32)
    for j in range(jobs):
        c, m = image_job(images, seed * 10_000_000 + j)
        crops[j * PER_JOB : (j + 1) * PER_JOB], cells[j * PER_JOB : (j + 1) * PER_JOB] = c, m
        if (j + 1) % 1000 == 0:
            print(f"  {j + 1}/{jobs} images ({time.time() - t0:.0f} s)", flush=True)
    cache: dict[tuple[int, int], np.ndarray] = {}
    rng = np.random.default_rng(seed)
    for k, (index, pseed, cy, cx) in enumerate(hard or []):
        if (index, pseed) not in cache:
            cache.clear()
            cache[index, pseed] = processed(images[index], pseed)
        a = cache[index, pseed]
        if min(a.shape) < CROP:
            a = np.pad(a, ((0, max(0, CROP - a.shape[0])), (0, max(0, CROP - a.shape[1]))),
                       mode="edge")
        y = int(np.clip(cy - CROP // 2 + rng.integers(-24, 25), 0, a.shape[0] - CROP))
        x = int(np.clip(cx - CROP // 2 + rng.integers(-24, 25), 0, a.shape[1] - CROP))
        crops[jobs * PER_JOB + k] = a[y : y + CROP, x : x + CROP].astype(np.uint8)
    print(f"  {n} crops in {time.time() - t0:.0f} s; edited share of cells "
          f"{(cells > 0.5).mean():.4f}", flush=True)
    return crops, cells


def hard_negatives(det: LocalEditDetector, images: list[np.ndarray], seed: int,
                   per_image: int = 3, floor: float = 0.3) -> list[tuple[int, int, int, int]]:
    """(image index, processing seed, y, x) of the most edit-like places in processed
    untouched training images (two processing histories per image)."""
    out = []
    for i, img in enumerate(images):
        for r in range(2):
            pseed = seed * 1_000_003 + 2 * i + r
            p = det.analyse(processed(img, pseed)).probability
            for k in np.argsort(p.ravel())[::-1][:per_image]:
                if p.ravel()[k] < floor:
                    break
                cy, cx = np.unravel_index(k, p.shape)
                out.append((i, pseed, int(cy) * CELL + CELL // 2, int(cx) * CELL + CELL // 2))
    return out


def train(crops: np.ndarray, cells: np.ndarray, epochs: int, seed: int,
          net: object = None, max_lr: float = 3e-3) -> object:
    """Train a new network (or go on training ``net``) with a one-cycle schedule; network
    inputs are made batch by batch (the crops stay uint8)."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    net = net if net is not None else build_network()
    opt = torch.optim.AdamW(net.parameters(), lr=max_lr, weight_decay=1e-4)
    batch = 32
    steps = epochs * (len(crops) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))
    rng = np.random.default_rng(seed)
    t0 = time.time()
    net.train()
    for epoch in range(epochs):
        order = rng.permutation(len(crops))
        total = 0.0
        for i in range(0, len(order) - batch + 1, batch):
            idx = np.sort(order[i : i + batch])
            xb = torch.from_numpy(np.stack([network_input(c) for c in crops[idx]]))
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
        n = len(order) // batch
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / n:.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    net.eval()
    return net


# ----------------------------------------------------------------- threshold and validation


def variants(img: np.ndarray, name: str, chains: int = 3) -> list[tuple[str, np.ndarray]]:
    """An untouched image as stored, under every single processing, and under ``chains``
    random chains (seeded by the file name, so every run sees the same ones)."""
    out = [("none", img)]
    for op in rp.PROCESSINGS:
        rng = np.random.default_rng(zlib.crc32(f"{name}:{op}".encode()))
        out.append((op, rp.apply(op, img, rng)))
    for c in range(chains):
        rng = np.random.default_rng(zlib.crc32(f"{name}:chain{c}".encode()))
        out.append(("chain", rp.random_chain(img, rng, p_none=0.0)[0]))
    return out


def split_items(split: str, sources: tuple[str, ...], per_source: int | None = None
                ) -> list[td.RealItem]:
    """The real images of ``sources`` in ``split`` (at most ``per_source`` of each, a fixed
    pseudo-random choice)."""
    out = []
    for source in sources:
        items = [it for it in td.real_sources() if it.split == split and it.source == source]
        items.sort(key=lambda it: zlib.crc32(it.path.name.encode()))
        out += items[:per_source]
    return out


def clean_scores(det: LocalEditDetector, items: list[td.RealItem]) -> dict[str, np.ndarray]:
    """Image scores of every untouched image variant (:func:`variants`) per source."""
    out: dict[str, list[float]] = {}
    for it in items:
        for _, v in variants(it.load(), it.path.name):
            out.setdefault(it.source, []).append(det.analyse(prepare(v)).score)
    return {k: np.array(v) for k, v in out.items()}


def worst_fold_threshold(scores: dict[str, np.ndarray], target: float) -> tuple[float, dict]:
    """For every source, the score ``target`` of the other sources' images reach; the highest
    (the worst fold) and the per-fold values."""
    folds = {}
    for held in scores:
        rest = np.concatenate([v for k, v in scores.items() if k != held])
        folds[held] = float(np.quantile(rest, 1 - target))
    return max(folds.values()), folds


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


def calibrate(state: dict, seed: int, target: float = TARGET_FPR,
              sources: tuple[str, ...] = TRAIN_SOURCES, per_source: int | None = None) -> dict:
    """Pick the threshold leave-one-source-out on untouched validation variants and measure
    detection on validation images with a fill or a splice (as stored and JPEG q85 after the
    edit); returns the rates."""
    det = LocalEditDetector(state)
    t0 = time.time()
    items = split_items("val", sources, per_source)
    scores = clean_scores(det, items)
    threshold, folds = worst_fold_threshold(scores, target)
    state["threshold"] = threshold
    det = LocalEditDetector(state)
    rates: dict[str, object] = {
        "false_alarm": {k: float((v >= threshold).mean()) for k, v in scores.items()},
        "fold_thresholds": folds,
    }
    val = [prepare(it.load()) for it in items]
    rng = np.random.default_rng(seed + 1)
    for kind in ("fill", "splice"):
        for post in ("none", "jpeg85"):
            hits = 0
            for i, a in enumerate(val):
                edited = bench_edit(a, rng, kind, val[(i + 1) % len(val)])
                if post == "jpeg85":
                    edited = td.jpeg(edited, 85).astype(np.float32)
                hits += det.analyse(edited).score >= threshold
            rates[f"{kind}_{post}"] = hits / len(val)
    print(f"validation ({len(val)} images, {sum(len(v) for v in scores.values())} untouched "
          f"variants, {time.time() - t0:.0f} s): threshold {threshold:.3f} (folds "
          + ", ".join(f"{k} {v:.3f}" for k, v in folds.items()) + "); "
          + ", ".join(f"{k} {v:.3f}" for k, v in rates.items() if isinstance(v, float))
          + "; untouched reaching it: "
          + ", ".join(f"{k} {v:.4f}" for k, v in rates["false_alarm"].items()), flush=True)
    return rates


def _state(net: object, threshold: float = 0.5) -> dict:
    return {"weights": {k: v.detach().half() if v.is_floating_point() else v
                        for k, v in net.state_dict().items()}, "threshold": threshold}


def main() -> None:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=7500, help="training images drawn (x8 crops)")
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--hard-jobs", type=int, default=2500,
                    help="fresh images of the second (hard-negative) stage")
    ap.add_argument("--hard-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=TARGET_FPR,
                    help="false-alarm rate the worst held-out source may reach")
    ap.add_argument("--val-per-source", type=int, help="validation images per source (all)")
    ap.add_argument("--hold-out", choices=TRAIN_SOURCES,
                    help="leave this source out of training and threshold (a LOSO run)")
    ap.add_argument("--init", type=Path,
                    help="start the first stage from these weights (a fine-tune) instead of "
                         "from scratch")
    ap.add_argument("--lr", type=float, default=3e-3, help="first stage's peak learning rate")
    ap.add_argument("--hard-images", type=int,
                    help="mine hard negatives in at most this many training images (all)")
    ap.add_argument("--resume", action="store_true",
                    help="start from the weights in --out and run only the second stage")
    ap.add_argument("--out", type=Path, default=WEIGHTS_PATH, help="where to write the weights")
    ap.add_argument("--calibrate", action="store_true",
                    help="only re-pick the threshold of the weights in --out")
    ap.add_argument("--export-onnx", action="store_true",
                    help="only write the ONNX export of the weights in --out")
    args = ap.parse_args()
    t0 = time.time()
    sources = tuple(s for s in TRAIN_SOURCES if s != args.hold_out)
    if args.export_onnx:
        print(f"wrote {export_onnx(args.out)}")
        return
    if args.calibrate:
        state = torch.load(args.out, weights_only=True)
        state.setdefault("info", {})["val_rates"] = calibrate(
            state, args.seed, args.target, sources, args.val_per_source)
        torch.save(state, args.out)
        print(f"wrote {export_onnx(args.out)}")
        return
    train_imgs = load_images("train", sources)
    print(f"{len(train_imgs)} training images ({', '.join(sources)})", flush=True)
    if args.resume:
        net = build_network()
        saved = torch.load(args.out, weights_only=True)["weights"]
        net.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in saved.items()})
    else:
        net = None
        if args.init:
            net = build_network()
            saved = torch.load(args.init, weights_only=True)["weights"]
            net.load_state_dict({k: v.float() if v.is_floating_point() else v
                                 for k, v in saved.items()})
        crops, cells = make_crops(train_imgs, args.jobs, args.seed)
        net = train(crops, cells, args.epochs, args.seed, net=net, max_lr=args.lr)
        del crops, cells
        torch.save(_state(net), args.out.with_suffix(".stage1.pt"))
    # stage 2: the places the network still mistakes for edits in processed untouched
    # training images (electrodes, markers, tube edges, text, collimator edges) become
    # untouched crops
    hard = hard_negatives(LocalEditDetector(_state(net)), train_imgs[: args.hard_images],
                          args.seed + 7)
    print(f"{len(hard)} hard negatives mined ({time.time() - t0:.0f} s)", flush=True)
    crops, cells = make_crops(train_imgs, args.hard_jobs, args.seed + 1, hard)
    net = train(crops, cells, args.hard_epochs, args.seed + 1, net=net, max_lr=1e-3)
    del crops, cells
    state = _state(net)
    rates = calibrate(state, args.seed, args.target, sources, args.val_per_source)
    state["info"] = {
        "script": "scripts/train_tamper_detector.py",
        "sources": list(sources),
        "init": str(args.init) if args.init else None,
        "lr": args.lr,
        "jobs": args.jobs,
        "crops_per_job": PER_JOB,
        "epochs": args.epochs,
        "hard_negatives": len(hard),
        "hard_jobs": args.hard_jobs,
        "hard_epochs": args.hard_epochs,
        "seed": args.seed,
        "target": args.target,
        "train_images": len(train_imgs),
        "val_rates": rates,
        "minutes": round((time.time() - t0) / 60, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB) and "
          f"{export_onnx(args.out)} in {state['info']['minutes']} min")


if __name__ == "__main__":
    main()
