"""Reproduce the shipped synthetic-radiograph detector weights, and measure them honestly.

    python scripts/train_synthetic_detector.py build      # feature table (.cache/synthetic)
    python scripts/train_synthetic_detector.py baseline   # shipped detector on the table
    python scripts/train_synthetic_detector.py folds      # LOSO refits, ship, LOGO refits
    python scripts/train_synthetic_detector.py ship       # LOSO refits and ship only
    python scripts/train_synthetic_detector.py report     # tables from the cached refits

1. **Table.** Every real radiograph of ../shared/data (:func:`synthdata.real_sources`: cxr-nih,
   cxr-kermany, mammo-mias, cxr-wild, the real crops of synthetic-stylegan2-cxr, the real rows
   of mammo-cbis-patches, the projection radiographs of dicom/) appears untouched, through two
   random chains of real-world processing (``scripts/realproc.py``), small, zoomed, as two
   native-resolution patches (:func:`build_patches`), and (200 per source) through each
   single processing; cxr-kermany also brought to 128 and 64 px squares the way the outside
   generators' training images were. Radguard's own families make fakes from every real
   image but DICOM (whole, zoomed and as a patch); every outside generator's output
   (synthetic-gan-cxr, synthetic-stylegan2-cxr, mammo-cbis-patches, synthetic-dcgan64) appears
   as delivered and through two processing chains. Processing never separates the classes.
2. **Folds.** Leave-one-source-out: refit without a real population (and the generators
   trained on it) and score its reals. Leave-one-generator-out: refit without a family and
   score it against test-split reals delivered the same way.
3. **Operating point.** 'suspicious' (which counts as a false alarm) starts at the worst
   held-out source's 99th percentile of held-out real scores; 'synthetic' at the worst
   held-out source's 99.8th. No threshold sees the source it is judged on.

Rows are weighted so every real population and every generator family counts equally.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import realproc as rp  # noqa: E402
import synthdata as sd  # noqa: E402

from radguard.forensics.cues import (  # noqa: E402
    CUE_NAMES,
    PHYSICS_CUE_NAMES,
    block_cues,
    fine_residual,
    image_cues,
    physics_cues,
    prepare,
)
from radguard.forensics.synthetic import (  # noqa: E402
    WEIGHTS_PATH,
    SyntheticDetector,
    feature_vector,
)

TABLE = HERE.parent / ".cache" / "synthetic"
OPS = tuple(rp.PROCESSINGS)
SINGLE_OPS_PER_SOURCE = 200
CROPS, CROP = 6, 64  # random analysis-image crops kept per row (for crop-level models)
BLOCKS_PER_IMAGE = 16
MAX_TRAIN_ROWS = 28_000
PERCEPTRONS = 1  # more were steadier, but 21 refits must fit in an hour on one core
OWN = sd.FAMILIES
META = ("variant", "family", "source", "split", "image", "population", "short")
FULL_WEIGHTS = TABLE / "full_weights.json"  # the 'full' fold's fit, threshold-less
SUSPICIOUS_Q = 0.99  # 'suspicious' from the worst held-out source's 99th percentile
SYNTHETIC_Q = 0.998  # 'synthetic' from its 99.8th


# ------------------------------------------------------------------------------ the table


def describe(img: np.ndarray, rng: np.random.Generator) -> dict:
    """Every input of the detector for one image, plus a few raw crops."""
    a = prepare(img)
    r = fine_residual(a)
    cues, cooc = image_cues(a, r)
    blocks, _ = block_cues(a, r)
    h, w = a.shape
    pad = np.pad(a, ((0, max(0, CROP - h)), (0, max(0, CROP - w))), mode="reflect")
    h2, w2 = pad.shape
    crops = np.stack([pad[y:y + CROP, x:x + CROP] for y, x in zip(
        rng.integers(0, h2 - CROP + 1, CROPS), rng.integers(0, w2 - CROP + 1, CROPS),
        strict=True)]).astype(np.uint8)
    return {"cues": np.array([cues[n] for n in CUE_NAMES]), "cooc": cooc,
            "extra": physics_cues(a, r), "blocks": blocks.astype(np.float16),
            "short": min(a.shape), "crops": crops}


def _zoomed(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 45-80% crop: another field of view and magnification of the same image."""
    h, w = img.shape
    k = float(rng.uniform(0.45, 0.8))
    ch, cw = min(h, max(64, int(h * k))), min(w, max(64, int(w * k)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return img[y:y + ch, x:x + cw]


def _small(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sizes = [s for s in (64, 128, 256) if s < min(img.shape)] or [64]
    return rp.random_chain(sd.deliver(img, int(rng.choice(sizes))), rng, p_none=0.5)[0]


def _chain(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rp.random_chain(img, rng, p_none=0.0)[0]


def variants(item: sd.SourceImage, img: np.ndarray, rng: np.random.Generator,
             fams: sd.TorchFamilies | None, single_ops: bool) -> list[tuple[str, str, np.ndarray]]:
    """(variant, family, image) rows made from one source image (module docstring)."""
    out = [("none", item.family, img), ("chain1", item.family, _chain(img, rng))]
    if item.family != "real":
        out.append(("chain2", item.family, _chain(img, rng)))
        return out
    out.append(("chain2", "real", _chain(img, rng)))
    if min(img.shape) > 64:
        out.append(("small", "real", _small(img, rng)))
    zoom = _zoomed(img, rng)
    out.append(("zoom", "real", rp.random_chain(zoom, rng, p_none=0.5)[0]))
    if item.source == "cxr-kermany":
        out += [("deliver128", "real", sd.deliver(img, 128)),
                ("deliver64", "real", sd.deliver(img, 64))]
    if single_ops:
        out += [(op, "real", rp.apply(op, img, rng)) for op in OPS]
    if item.source != "dicom":  # fakes from this real image, two families
        f1, f2 = (str(f) for f in rng.choice(sd.FAMILIES, 2, replace=False))
        fake1 = sd.make_fake(f1, img, rng, fams)
        fake2 = sd.make_fake(f2, zoom, rng, fams)
        if f1 == "dcgan":  # a 64 px sample: delivered at a size real images have too
            fake1 = sd.deliver(fake1, int(rng.choice([64, 128, 256])))
        if f2 == "dcgan":
            fake2 = sd.deliver(fake2, int(rng.choice([64, 128, 256])))
        out += [("none", f1, fake1), ("chain1", f1, _chain(fake1, rng)),
                ("small", f1, _small(fake1, rng)) if min(fake1.shape) > 64 else
                ("chain2", f1, _chain(fake1, rng)),
                ("zoom", f2, fake2), ("chain1", f2, _chain(fake2, rng))]
    return out


def build_part(name: str, items: list[sd.SourceImage], fams: sd.TorchFamilies | None) -> None:
    """Describe every variant of ``items`` into TABLE/<name>.npz (kept if present)."""
    path = TABLE / f"{name}.npz"
    if path.exists():
        return
    order = sorted(range(len(items)), key=lambda i: zlib.crc32(items[i].path.name.encode()))
    ops_for = set(order[:SINGLE_OPS_PER_SOURCE])
    rows: list[dict] = []
    t0 = time.time()
    for i, item in enumerate(items):
        rng = np.random.default_rng(zlib.crc32(f"{item.source}:{item.path.name}".encode()))
        img = item.load()
        rows += [_row(im, rng, variant, family, item)
                 for variant, family, im in variants(item, img, rng, fams, i in ops_for)]
        if i % 100 == 0:
            print(f"  {name}: {i}/{len(items)} images, {len(rows)} rows "
                  f"({time.time() - t0:.0f} s)", flush=True)
    _save_rows(path, rows)
    print(f"wrote {path} ({len(rows)} rows, {time.time() - t0:.0f} s)", flush=True)


def _row(im: np.ndarray, rng: np.random.Generator, variant: str, family: str,
         item: sd.SourceImage) -> dict:
    """One table row: the image's description and where it came from."""
    d = describe(im, rng)
    d.update(variant=variant, family=family, source=item.source, split=item.split,
             image=f"{item.source}:{item.path.name}", population=item.population)
    return d


def _native_patch(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    h, w = img.shape
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return img[y:y + size, x:x + size]


def build_patches(reals: list[sd.SourceImage], fams: sd.TorchFamilies | None) -> None:
    """TABLE/patches.npz: native-resolution square patches (64-256 px, at most half the short
    side, maybe processed) of every real image and of one fake per real image (made from a
    patch twice the size, so a fake patch is as native as a real one). Real patch sets exist
    (CBIS mass patches, StyleGAN2 training crops); without this a small native crop reads as
    generated to a model that saw small images only as fakes."""
    path = TABLE / "patches.npz"
    if path.exists():
        return
    rows: list[dict] = []
    t0 = time.time()
    for i, item in enumerate(reals):
        rng = np.random.default_rng(zlib.crc32(f"patch:{item.source}:{item.path.name}".encode()))
        img = item.load()
        sizes = [z for z in (64, 128, 256) if 2 * z <= min(img.shape)] or [min(img.shape)]
        made = []
        for _ in range(2):
            size = int(rng.choice(sizes))
            made.append(("patch", "real", rp.random_chain(_native_patch(img, rng, size), rng,
                                                          p_none=0.5)[0]))
        if item.source != "dicom":
            size = int(rng.choice(sizes))
            fam = str(rng.choice(sd.FAMILIES))
            region = _native_patch(img, rng, min(2 * size, min(img.shape)))
            fake = sd.make_fake(fam, region, rng, fams)
            if fam == "dcgan":
                fake = sd.deliver(fake, 2 * size)
            made.append(("patch", fam, rp.random_chain(_native_patch(fake, rng, min(
                size, min(fake.shape))), rng, p_none=0.5)[0]))
        rows += [_row(im, rng, variant, family, item) for variant, family, im in made
                 if min(im.shape) >= 32]
        if i % 500 == 0:
            print(f"  patches: {i}/{len(reals)} images, {len(rows)} rows "
                  f"({time.time() - t0:.0f} s)", flush=True)
    _save_rows(path, rows)
    print(f"wrote {path} ({len(rows)} rows, {time.time() - t0:.0f} s)", flush=True)


def _save_rows(path: Path, rows: list[dict]) -> None:
    TABLE.mkdir(parents=True, exist_ok=True)
    counts = np.array([len(r["blocks"]) for r in rows])
    np.savez_compressed(
        path,
        **{k: np.array([r[k] for r in rows]) for k in META},
        cues=np.stack([r["cues"] for r in rows]), cooc=np.stack([r["cooc"] for r in rows]),
        extra=np.stack([r["extra"] for r in rows]), crops=np.stack([r["crops"] for r in rows]),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        blocks=np.concatenate([r["blocks"] for r in rows]))


def build_table(only: list[str] | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    fams = sd.TorchFamilies()
    reals = sd.real_sources()
    parts = {s: [r for r in reals if r.source == s] for s in sd.REAL_SOURCES}
    parts["generated"] = sd.generated_images()
    for name in sorted(parts, key=lambda n: len(parts[n])):
        if not only or name in only:
            build_part(name, parts[name], fams)
    if not only or "patches" in only:
        build_patches(reals, fams)


class Table:
    """The concatenated parts of the feature table."""

    def __init__(self, parts: list[Path]) -> None:
        zs = [np.load(p) for p in parts]
        for k in META:
            setattr(self, k, np.concatenate([z[k] for z in zs]))
        self.cues = np.concatenate([z["cues"] for z in zs])
        self.cooc = np.concatenate([z["cooc"] for z in zs])
        self.extra = np.concatenate([z["extra"] for z in zs])
        offs, blocks, base = [np.zeros(1, int)], [], 0
        for z in zs:
            offs.append(z["offsets"][1:] + base)
            base += int(z["offsets"][-1])
            blocks.append(z["blocks"])
        self.offsets = np.concatenate(offs)
        self.blocks = np.concatenate(blocks)
        self.label = (self.family != "real").astype(int)

    def block_rows(self, i: int) -> np.ndarray:
        return self.blocks[self.offsets[i]:self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.family)


def load_table() -> Table:
    parts = sorted(p for p in TABLE.glob("*.npz") if not p.name.startswith("folds"))
    if not parts:
        raise SystemExit(f"no feature table in {TABLE}: run `{__file__} build` first")
    return Table(parts)


def image_features(t: Table, det: SyntheticDetector, physics: bool) -> np.ndarray:
    """The image model's input for every row, with ``det``'s block model."""
    names = list(CUE_NAMES)
    bl = det.block_logits(t.blocks.astype(np.float64))
    out = []
    for i in range(len(t)):
        cues = dict(zip(names, t.cues[i], strict=True))
        out.append(feature_vector(cues, t.cooc[i], bl[t.offsets[i]:t.offsets[i + 1]],
                                  int(t.short[i]), t.extra[i] if physics else None))
    return np.stack(out)


# ---------------------------------------------------------------------------------- fitting


def row_weights(t: Table, rows: np.ndarray) -> np.ndarray:
    """Equal total weight per class; within reals per population, within fakes per family."""
    w = np.zeros(len(t))
    for cls_rows, key in ((rows & (t.label == 0), t.population), (rows & (t.label == 1),
                                                                   t.family)):
        groups = np.unique(key[cls_rows])
        for g in groups:
            sel = cls_rows & (key == g)
            w[sel] = 1.0 / sel.sum() / len(groups)
    return w[rows] / w[rows].mean()


def fit(t: Table, train: np.ndarray, seed: int = 0, nets: int = PERCEPTRONS) -> dict:
    """Block model, then the image model (perceptrons averaged with boosted trees) on rows
    ``train``. Returns the fitted parts and the (threshold-less) weights."""
    import warnings

    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # a capped, averaged fit
    rng = np.random.default_rng(seed)
    y = t.label
    if train.sum() > MAX_TRAIN_ROWS:  # a seeded subsample: 21 refits on one core in an hour
        keep = np.zeros(len(t), bool)
        keep[rng.choice(np.flatnonzero(train), MAX_TRAIN_ROWS, replace=False)] = True
        train = keep
    idx = np.flatnonzero(train)
    wrow = dict(zip(idx, row_weights(t, train), strict=True))
    bx, by, bw = [], [], []
    for i in idx[rng.random(len(idx)) < 0.3]:
        b = t.block_rows(i)
        pick = rng.choice(len(b), min(BLOCKS_PER_IMAGE, len(b)), replace=False)
        bx.append(b[pick])
        by.append(np.full(len(pick), y[i]))
        bw.append(np.full(len(pick), wrow[i] / len(pick)))
    bxa = np.concatenate(bx).astype(np.float64)
    bya, bwa = np.concatenate(by), np.concatenate(bw)
    b_mean, b_scale = bxa.mean(axis=0), bxa.std(axis=0) + 1e-9
    blk = LogisticRegression(C=1.0, max_iter=2000).fit((bxa - b_mean) / b_scale, bya,
                                                       sample_weight=bwa / bwa.mean())
    weights: dict[str, Any] = {"block": {
        "mean": b_mean.tolist(), "scale": b_scale.tolist(), "coef": blk.coef_[0].tolist(),
        "intercept": float(blk.intercept_[0])}}
    real_train = train & (y == 0)
    allcues = np.hstack([t.cues, t.extra])
    weights["real_quantiles"] = {
        name: np.percentile(allcues[real_train, k], np.linspace(0, 100, 101)).tolist()
        for k, name in enumerate([*CUE_NAMES, *PHYSICS_CUE_NAMES])}
    weights["image"] = {"mean": [0.0], "scale": [1.0], "layers": []}
    weights["threshold"] = 0.5
    x = image_features(t, SyntheticDetector(weights), physics=True)
    xt, yt, wt = x[train], y[train], row_weights(t, train)
    i_mean, i_scale = xt.mean(axis=0), xt.std(axis=0) + 1e-9
    mlps = [MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-2, max_iter=120,
                          random_state=seed * 100 + k).fit((xt - i_mean) / i_scale, yt,
                                                           sample_weight=wt)
            for k in range(nets)]
    trees = HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.08, max_leaf_nodes=15, l2_regularization=1.0,
        random_state=seed).fit(xt, yt, sample_weight=wt)
    weights["image"] = {
        "physics": True, "mean": i_mean.tolist(), "scale": i_scale.tolist(),
        "nets": [[{"W": np.round(w, 6).tolist(), "b": np.round(b, 6).tolist()}
                  for w, b in zip(m.coefs_, m.intercepts_, strict=True)] for m in mlps],
        "trees": export_trees(trees)}
    return {"weights": weights, "x": x, "mlps": mlps, "trees": trees, "i_mean": i_mean,
            "i_scale": i_scale}


def predict(model: dict) -> np.ndarray:
    """The fitted model's score for every table row (as SyntheticDetector computes it)."""
    x = model["x"]
    p = model["trees"].predict_proba(x)[:, 1]
    if model["mlps"]:
        z = (x - model["i_mean"]) / model["i_scale"]
        p = (p + np.mean([m.predict_proba(z)[:, 1] for m in model["mlps"]], axis=0)) / 2
    return p


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
    return {"feature": feature, "threshold": threshold, "left": left, "right": right,
            "value": value, "leaf": leaf, "roots": roots,
            "baseline": float(np.ravel(model._baseline_prediction)[0]), "depth": depth + 1}


# ------------------------------------------------------------------------------ LOSO / LOGO

LOSO_POPULATIONS = tuple(sorted(set(sd.POPULATION.values()) - {"dicom"}))
LOGO_GROUPS = (*((f,) for f in sd.GENERATOR_SETS), ("PGGAN-150k", "PGGAN-160k"),
               *((f,) for f in OWN))


def train_mask(t: Table, *, drop_pop: str | None = None, drop_fams: tuple[str, ...] = ()
               ) -> np.ndarray:
    m = t.split == "train"
    if drop_pop is not None:
        m &= t.population != drop_pop
    if drop_fams:
        m &= ~np.isin(t.family, drop_fams)
    return m


def run_folds(t: Table, out: Path, kinds: tuple[str, ...] = ("loso", "logo")) -> dict:
    """Refit per fold; every fold's scores for every row, cached in ``out`` (resumable)."""
    done = dict(np.load(out)) if out.exists() else {}
    keys = ["full"]
    keys += [f"loso:{p}" for p in LOSO_POPULATIONS] if "loso" in kinds else []
    keys += ["logo:" + "+".join(g) for g in LOGO_GROUPS] if "logo" in kinds else []
    t0 = time.time()
    for key in keys:
        if key in done:
            continue
        if key == "full":
            mask = train_mask(t)
        elif key.startswith("loso:"):
            mask = train_mask(t, drop_pop=key[5:])
        else:
            mask = train_mask(t, drop_fams=tuple(key[5:].split("+")))
        model = fit(t, mask)
        done[key] = predict(model)
        if key == "full":  # the model that ships: kept, so shipping needs no second fit
            FULL_WEIGHTS.write_text(json.dumps(model["weights"], separators=(",", ":")))
        np.savez(out, **done)
        print(f"  {key} ({time.time() - t0:.0f} s)", flush=True)
    return done


def held_out_real_scores(t: Table, folds: dict) -> np.ndarray:
    """Every real row scored by the fold that never saw its population (dicom: by the full
    model, which never saw dicom/ either); NaN for fakes."""
    s = np.full(len(t), np.nan)
    real = t.label == 0
    for pop in np.unique(t.population[real]):
        key = f"loso:{pop}" if f"loso:{pop}" in folds else "full"
        sel = real & (t.population == pop)
        s[sel] = folds[key][sel]
    return s


def operating_point(t: Table, held: np.ndarray, exclude: str | None = None
                    ) -> tuple[float, float]:
    """(suspicious, synthetic) thresholds: the worst real source's held-out quantiles, the
    source ``exclude`` left out (so a source is never judged by a threshold it set)."""
    real = t.label == 0
    srcs = [s for s in sd.REAL_SOURCES if s != exclude and (real & (t.source == s)).any()]
    sus = max(float(np.quantile(held[real & (t.source == s)], SUSPICIOUS_Q)) for s in srcs)
    syn = max(float(np.quantile(held[real & (t.source == s)], SYNTHETIC_Q)) for s in srcs)
    return sus, max(syn, sus)


def family_rows(t: Table, fam: str) -> tuple[np.ndarray, np.ndarray]:
    """(fake rows, matched real test-split rows) for a family: an outside generator's output
    as delivered and processed, against its real counterpart delivered the same way and
    processed alike; one of radguard's own families on test-split images against the same
    test images' real rows."""
    real = t.label == 0
    if fam in sd.GENERATOR_SETS:
        src, var = sd.GENERATOR_REALS[fam]
        fr = t.family == fam
        # delivered like the fakes: small squares (and those processed) for the 64 / 128 px
        # generators, the same crops for StyleGAN2 and CBIS
        like = [var, "small"] if var != "none" else ["none", "chain1", "chain2"]
        rr = real & (t.source == src) & (t.split == "test") & np.isin(t.variant, like)
        return fr, rr
    fr = (t.family == fam) & (t.split == "test")
    rr = real & np.isin(t.image, np.unique(t.image[fr])) & np.isin(
        t.variant, ["none", "chain1", "chain2", "small", "zoom", "patch"])
    return fr, rr


# ---------------------------------------------------------------------------------- report


def wilson_str(k: int, n: int) -> str:
    from radguard.evaluation import wilson

    if n == 0:
        return "n/a"
    ci = wilson(k, n)
    return f"{k:>4}/{n:<5} {k / n:6.1%} [{ci.low:.3f}, {ci.high:.3f}]"


def auc_str(y: np.ndarray, p: np.ndarray) -> str:
    from radguard.evaluation import delong_auc

    if len(set(y.tolist())) < 2:
        return "n/a"
    a = delong_auc(y, p)
    return f"{a.auc:.3f} [{a.low:.3f}, {a.high:.3f}]"


def false_alarm_tables(t: Table, scores: np.ndarray, rows: np.ndarray,
                       thresholds: dict[str, float] | float) -> None:
    """False alarms (score >= the 'suspicious' threshold) per real source and per processing.
    ``thresholds``: one number, or one per source (chosen without that source)."""
    real = (t.label == 0) & rows
    per = thresholds if isinstance(thresholds, dict) else dict.fromkeys(sd.REAL_SOURCES,
                                                                         thresholds)
    flag = np.zeros(len(t), bool)
    for src, thr in per.items():
        sel = real & (t.source == src)
        flag[sel] = scores[sel] >= thr
    print("  per real source (every variant | untouched only):")
    for src in sd.REAL_SOURCES:
        sel = real & (t.source == src)
        plain = sel & (t.variant == "none")
        print(f"    {src:<15} >= {per[src]:.3f}  {wilson_str(int(flag[sel].sum()), int(sel.sum()))}"
              f" | {wilson_str(int(flag[plain].sum()), int(plain.sum()))}")
    print(f"    {'all':<24} {wilson_str(int(flag[real].sum()), int(real.sum()))}")
    print("  per processing (all sources pooled):")
    for v in ("none", "chain1", "chain2", "small", "zoom", "patch", "deliver128", "deliver64",
              *OPS):
        sel = real & (t.variant == v)
        if sel.any():
            print(f"    {v:<13} {wilson_str(int(flag[sel].sum()), int(sel.sum()))}")


def detection_table(t: Table, per_family: dict[str, np.ndarray], sus: float, syn: float,
                    real_fa: float, only: np.ndarray | None = None) -> None:
    """Per family: AUC against matched reals, share caught (>= suspicious), share called
    synthetic, and verdict accuracy (fakes not authentic, matched reals authentic);
    ``only``: rows the scoring model never trained on."""
    print(f"    {'family':<17}{'AUC [95% CI]':<24}{'caught (>= susp.)':<34}"
          f"{'synthetic':>9}  {'verdict accuracy':<30}")
    for fam, s in per_family.items():
        fr, rr = family_rows(t, fam)
        if only is not None:
            fr, rr = fr & only, rr & only
        if not fr.any() or not rr.any():
            continue
        rows = fr | rr
        caught = int((s[fr] >= sus).sum())
        right = caught + int((s[rr] < sus).sum())
        print(f"    {fam:<17}{auc_str(t.label[rows], s[rows]):<24}"
              f"{wilson_str(caught, int(fr.sum())):<34}{(s[fr] >= syn).mean():>9.3f}  "
              f"{wilson_str(right, int(rows.sum()))}")
    print(f"    (matched reals: test split, delivered and processed as the fakes; false-alarm "
          f"rate of the LOSO table at this point: {real_fa:.1%})")


def report_folds(t: Table, folds: dict) -> tuple[float, float]:
    """LOSO false alarms, the global operating point, LOGO detection. Returns the point."""
    held = held_out_real_scores(t, folds)
    sus, syn = operating_point(t, held)
    per_src = {s: operating_point(t, held, exclude=s)[0] for s in sd.REAL_SOURCES}
    print(f"global operating point (from held-out sources only): suspicious >= {sus:.3f}, "
          f"synthetic >= {syn:.3f}")
    print("LOSO false alarms (score >= suspicious; each source scored by the fold that never "
          "saw it, at the worst OTHER source's 99th percentile):")
    false_alarm_tables(t, held, np.ones(len(t), bool), per_src)
    real = t.label == 0
    fa = float((held[real] >= sus).mean())
    print("LOGO detection (refit without the family; its fakes vs matched test-split reals):")
    per_family = {}
    for g in LOGO_GROUPS:
        key = "logo:" + "+".join(g)
        if key in folds and len(g) == 1:
            per_family[g[0]] = folds[key]
    detection_table(t, per_family, sus, syn, fa)
    if "logo:PGGAN-150k+PGGAN-160k" in folds:
        print("  both PGGAN checkpoints left out together:")
        s = folds["logo:PGGAN-150k+PGGAN-160k"]
        detection_table(t, {"PGGAN-150k": s, "PGGAN-160k": s}, sus, syn, fa)
    print("detection by the full model (every family in its training; test split only):")
    detection_table(t, {f: folds["full"] for f in (*sd.GENERATOR_SETS, *OWN)}, sus, syn, fa,
                    only=t.split == "test")
    return sus, syn


def report_shipped(t: Table, det: SyntheticDetector | None = None) -> None:
    """The shipped (or given) detector on the table: it was trained on the train split of
    cxr-nih, cxr-kermany, mammo-mias and cxr-wild, so those count on their test split only;
    none of the outside generators was in its training."""
    from radguard.forensics.synthetic import load_detector

    det = det or load_detector()
    p = det.image_probability(image_features(t, det, physics=det.physics))
    trained = ("cxr-nih", "cxr-kermany", "mammo-mias", "cxr-wild")
    if not det.physics:
        unseen = ~np.isin(t.source, trained) | (t.split == "test")
    else:
        unseen = t.split == "test"
    print(f"detector {det.info.get('version', 'v1')}: suspicious >= "
          f"{det.suspicious_threshold:.3f}, synthetic >= {det.threshold:.3f}")
    print("false alarms on real images it never trained on:")
    false_alarm_tables(t, p, unseen, det.suspicious_threshold)
    real = (t.label == 0) & unseen
    fa = float((p[real] >= det.suspicious_threshold).mean())
    print("detection per family (rows it never trained on: v1 never saw an outside generator; "
          "v2 saw every family's training split, so test split only):")
    detection_table(t, {f: p for f in (*sd.GENERATOR_SETS, *OWN)}, det.suspicious_threshold,
                    det.threshold, fa, only=unseen if det.physics else None)


# ------------------------------------------------------------------------------------- ship


def ship(t: Table, folds: dict) -> None:
    """The 'full' fold's model (every training row) with the global point from the LOSO
    folds, checked against the fold's own scores, written as the shipped weights."""
    held = held_out_real_scores(t, folds)
    sus, syn = operating_point(t, held)
    weights = json.loads(FULL_WEIGHTS.read_text())
    weights["threshold"] = syn
    weights["suspicious_threshold"] = sus
    det = SyntheticDetector(weights)
    p = det.image_probability(image_features(t, det, physics=True))
    gap = float(np.abs(p - folds["full"]).max())
    if gap > 1e-4:
        raise RuntimeError(f"exported model disagrees with scikit-learn by {gap:.2g}")
    weights["info"] = {
        "version": "v2 (LOSO / LOGO)",
        "families": list(OWN), "outside_generators": list(sd.GENERATOR_SETS),
        "real_sources": list(sd.REAL_SOURCES),
        "train_rows": min(int(train_mask(t).sum()), MAX_TRAIN_ROWS),
        "operating_point": f"suspicious: worst held-out source's {SUSPICIOUS_Q:.1%} quantile "
                           f"of held-out real scores; synthetic: its {SYNTHETIC_Q:.1%}",
        "script": "scripts/train_synthetic_detector.py",
    }
    WEIGHTS_PATH.write_text(json.dumps(weights, separators=(",", ":")))
    print(f"wrote {WEIGHTS_PATH} ({WEIGHTS_PATH.stat().st_size // 1024} KiB): suspicious >= "
          f"{sus:.3f}, synthetic >= {syn:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("build", "baseline", "folds", "ship", "report"))
    ap.add_argument("parts", nargs="*", help="build: only these table parts")
    ap.add_argument("--folds-file", default=str(TABLE / "folds.npz"))
    args = ap.parse_args()
    if args.step == "build":
        build_table(args.parts or None)
        return
    t = load_table()
    print(f"table: {len(t)} rows ({int((t.label == 0).sum())} real)")
    if args.step == "baseline":
        report_shipped(t)
        return
    out = Path(args.folds_file)
    if args.step == "report":
        report_folds(t, dict(np.load(out)))
        return
    # the LOSO folds set the operating point: ship as soon as they are in, then LOGO
    folds = run_folds(t, out, kinds=("loso",))
    if args.step in ("ship", "folds"):
        ship(t, folds)
    if args.step == "folds":
        folds = run_folds(t, out)
    report_folds(t, folds)

if __name__ == "__main__":
    main()
