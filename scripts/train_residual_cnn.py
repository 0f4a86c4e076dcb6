"""Experiment: a small noise-residual CNN on 64 x 64 crops, alone and stacked with the shipped
perceptron, measured leave-one-generator-out (LOGO) and leave-one-source-out (LOSO) exactly as
``scripts/train_synthetic_detector.py`` measures the shipped v2 detector.

    python scripts/train_residual_cnn.py prep      # crops + row metadata -> .cache/cnn (once)
    python scripts/train_residual_cnn.py folds     # one refit per fold (resumable), then report
    python scripts/train_residual_cnn.py report    # tables from the cached fold scores
    python scripts/train_residual_cnn.py folds logo:StyleGAN2 logo:grain \
        logo:PGGAN-150k+PGGAN-160k --steps 2000 --out .cache/cnn/folds_cnn_long.npz

Measured 2026-12-07 (one core, ~1.5 min per fold at 700 steps): the CNN alone is below the
shipped perceptron on every LOGO family, stacking leaves LOGO AUC within +-0.02 of it, and
3x longer training does not change that (see the session report).

Data: the cached feature table (``.cache/synthetic/*.npz``, built by
``train_synthetic_detector.py build``) keeps six random 64 x 64 crops of every row's analysis
image (``forensics.cues.prepare``: 8-bit grey, short side capped at 512 px; smaller images are
reflect-padded to 64 px). Rows, splits, populations, families and the matched real rows are
those of the shipped detector's folds; its fold scores (``.cache/synthetic/folds.npz``) are the
perceptron score that is stacked and compared.

Model (:class:`ResidualCNN`, 25k weights): a fixed high-pass first layer (four SRM-like
filters: 5x5 KV, 3x3 second order, horizontal and vertical second differences, in grey levels)
truncated at +-4 grey levels, then a 3x3 conv at stride 2, three 3x3 conv blocks with average
pooling (16-24-32-48 channels, batch norm, ReLU), global average pooling and one linear
output. A row's score is the mean logit over its six crops.

Fit per fold: train-split rows of the fold (the population / families it holds out removed),
drawn with probability proportional to the shipped row weights (every real population and
every generator family counts equally), one random crop per draw with a random flip / 90 degree
rotation, Adam, a fixed number of steps on one core.

Stacking: logistic regression on (logit of the fold's perceptron score, CNN logit), fitted on
the *validation* split of the fold's own populations and families (no fold ever trains on
it, and the held-out source or family is absent), with the same row weights.

Protocol (as the shipped model): LOSO - each real source is scored by the fold that never saw
its population (dicom/ by the first LOSO fold: no fold trains on dicom/), and its false
alarms counted at the worst OTHER source's 99th percentile of held-out scores. LOGO - refit
without the family; AUC (DeLong 95% CI) of its fakes against test-split reals delivered and
processed alike (``family_rows``). To keep each fold at a few minutes on one core the real rows
scored for LOSO are a seeded subsample per source (``LOSO_ROWS_PER_SOURCE``); the shipped
perceptron is evaluated on exactly the same rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import synthdata as sd  # noqa: E402

if TYPE_CHECKING:
    import torch

TABLE = HERE.parent / ".cache" / "synthetic"
OUT = HERE.parent / ".cache" / "cnn"
META = ("variant", "family", "source", "split", "image", "population")
STEPS, BATCH, LR = 700, 64, 3e-3
LOSO_ROWS_PER_SOURCE = 2000
VAL_ROWS = 2000
SUSPICIOUS_Q = 0.99
LOSO_FOLDS = ("loso:covid-chestxray", "loso:nih", "loso:cbis", "loso:kermany", "loso:mias")
LOGO_FOLDS = ("logo:StyleGAN2", "logo:grain", "logo:airbrush", "logo:PGGAN-150k+PGGAN-160k",
              "logo:cGAN", "logo:autoencoder")
FOLD_ORDER = ("logo:StyleGAN2", "logo:grain", "loso:covid-chestxray", "loso:nih", "loso:cbis",
              "logo:airbrush", "logo:PGGAN-150k+PGGAN-160k", "loso:kermany", "loso:mias",
              "logo:cGAN", "logo:autoencoder")


# ------------------------------------------------------------------------------------ data


def table_parts() -> list[Path]:
    """The table's parts in the order train_synthetic_detector.Table concatenates them (the
    order of the rows of folds.npz)."""
    return sorted(p for p in TABLE.glob("*.npz") if not p.name.startswith("folds"))


def prep() -> None:
    """Concatenate every part's crops (uint8, N x 6 x 64 x 64) and metadata into OUT."""
    OUT.mkdir(parents=True, exist_ok=True)
    zs = [np.load(p) for p in table_parts()]
    n = sum(len(z["family"]) for z in zs)
    crops = np.lib.format.open_memmap(OUT / "crops.npy", mode="w+", dtype=np.uint8,
                                      shape=(n, 6, 64, 64))
    i = 0
    for z in zs:
        c = z["crops"]
        crops[i:i + len(c)] = c
        i += len(c)
    crops.flush()
    np.savez(OUT / "meta.npz", **{k: np.concatenate([z[k] for z in zs]) for k in META})
    print(f"wrote {OUT / 'crops.npy'} ({n} rows)")


class Rows:
    """Row metadata (the feature table's), crops (memory-mapped) and the shipped fold scores."""

    def __init__(self) -> None:
        m = np.load(OUT / "meta.npz")
        for k in META:
            setattr(self, k, m[k])
        self.crops = np.load(OUT / "crops.npy", mmap_mode="r")
        self.label = (self.family != "real").astype(int)
        self.shipped = dict(np.load(TABLE / "folds.npz"))
        if len(self.shipped["full"]) != len(self.label):
            raise SystemExit("folds.npz does not match the table: rebuild")

    def __len__(self) -> int:
        return len(self.label)


def train_mask(t: Rows, key: str, split: str = "train") -> np.ndarray:
    """Rows a fold may learn from (``split``), its population or families removed; a LOSO
    fold also drops the generators trained on its population (as the shipped folds do)."""
    m = t.split == split
    if key.startswith("loso:"):
        m &= t.population != key[5:]
    elif key.startswith("logo:"):
        m &= ~np.isin(t.family, key[5:].split("+"))
    return m


def row_weights(t: Rows, rows: np.ndarray) -> np.ndarray:
    """Equal total weight per class; within reals per population, within fakes per family."""
    w = np.zeros(len(t))
    for cls_rows, key in ((rows & (t.label == 0), t.population),
                          (rows & (t.label == 1), t.family)):
        groups = np.unique(key[cls_rows])
        for g in groups:
            sel = cls_rows & (key == g)
            w[sel] = 1.0 / sel.sum() / len(groups)
    return w / w[rows].sum()


def family_rows(t: Rows, fam: str) -> tuple[np.ndarray, np.ndarray]:
    """(fake rows, matched real test rows): train_synthetic_detector.family_rows."""
    real = t.label == 0
    if fam in sd.GENERATOR_SETS:
        src, var = sd.GENERATOR_REALS[fam]
        fr = t.family == fam
        like = [var, "small"] if var != "none" else ["none", "chain1", "chain2"]
        return fr, real & (t.source == src) & (t.split == "test") & np.isin(t.variant, like)
    fr = (t.family == fam) & (t.split == "test")
    rr = real & np.isin(t.image, np.unique(t.image[fr])) & np.isin(
        t.variant, ["none", "chain1", "chain2", "small", "zoom", "patch"])
    return fr, rr


def loso_rows(t: Rows, pop: str) -> np.ndarray:
    """A seeded subsample (per source) of the real rows of population ``pop``."""
    rng = np.random.default_rng(7)
    keep = np.zeros(len(t), bool)
    for src in sd.REAL_SOURCES:
        idx = np.flatnonzero((t.label == 0) & (t.population == pop) & (t.source == src))
        if len(idx):
            keep[rng.choice(idx, min(len(idx), LOSO_ROWS_PER_SOURCE), replace=False)] = True
    return keep


def eval_rows(t: Rows, key: str) -> np.ndarray:
    """The rows a fold's model must score for the tables."""
    if key.startswith("loso:"):
        rows = loso_rows(t, key[5:])
        if key == LOSO_FOLDS[0]:  # dicom/ is never trained on: the first LOSO fold scores it
            rows |= (t.label == 0) & (t.source == "dicom")
        return rows
    rows = np.zeros(len(t), bool)
    for fam in key[5:].split("+"):
        fr, rr = family_rows(t, fam)
        rows |= fr | rr
    return rows


# ----------------------------------------------------------------------------------- model


def srm_kernels() -> np.ndarray:
    """Four fixed high-pass filters (5 x 5), each summing to zero."""
    k = np.zeros((4, 5, 5), np.float32)
    k[0] = np.array([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2],
                     [2, -6, 8, -6, 2], [-1, 2, -2, 2, -1]], np.float32) / 12.0
    k[1, 1:4, 1:4] = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], np.float32) / 4.0
    k[2, 2, 1:4] = np.array([1, -2, 1], np.float32) / 2.0
    k[3, 1:4, 2] = np.array([1, -2, 1], np.float32) / 2.0
    return k


def make_model() -> torch.nn.Module:
    import torch
    from torch import nn

    class ResidualCNN(nn.Module):
        """Fixed high-pass residuals, truncated; four learned conv blocks; global pooling."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("hp", torch.from_numpy(srm_kernels())[:, None])

            def blk(i: int, o: int, s: int = 1) -> list[nn.Module]:
                return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False),
                        nn.BatchNorm2d(o), nn.ReLU()]

            self.body = nn.Sequential(
                *blk(4, 16, 2), *blk(16, 24), nn.AvgPool2d(2), *blk(24, 32), nn.AvgPool2d(2),
                *blk(32, 48), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B x 1 x 64 x 64, grey levels
            r = nn.functional.conv2d(x, self.hp, padding=2).clamp(-4.0, 4.0) / 4.0
            return self.body(r)[:, 0]

    return ResidualCNN()


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        x = x[..., ::-1]
    return np.rot90(x, int(rng.integers(4)), axes=(-2, -1))


def train(t: Rows, key: str, seed: int = 0, steps: int = STEPS) -> torch.nn.Module:
    """Fit a ResidualCNN on the fold's training rows (weighted draws, one crop per draw)."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mask = train_mask(t, key)
    w = row_weights(t, mask)
    idx = np.flatnonzero(mask)
    p = w[idx] / w[idx].sum()
    net = make_model()
    opt = torch.optim.Adam(net.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    lossf = torch.nn.BCEWithLogitsLoss()
    net.train()
    run = 0.0
    for step in range(steps):
        rows = np.sort(rng.choice(idx, BATCH, p=p))
        crop = rng.integers(0, 6, BATCH)
        x = np.stack([_augment(t.crops[r, c], rng) for r, c in zip(rows, crop, strict=True)])
        xb = torch.from_numpy(x.astype(np.float32))[:, None]
        yb = torch.from_numpy(t.label[rows].astype(np.float32))
        loss = lossf(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run = 0.98 * run + 0.02 * loss.item()
        if step % 100 == 99:
            print(f"    step {step + 1}: loss {run / (1 - 0.98 ** (step + 1)):.3f}", flush=True)
    net.eval()
    return net


def score(net: torch.nn.Module, t: Rows, rows: np.ndarray, batch: int = 128) -> np.ndarray:
    """Mean logit over each row's six crops."""
    import torch

    idx = np.flatnonzero(rows)
    out = np.empty(len(idx))
    with torch.no_grad():
        for i in range(0, len(idx), batch):
            r = np.sort(idx[i:i + batch])
            x = torch.from_numpy(t.crops[r].astype(np.float32)).reshape(-1, 1, 64, 64)
            out[np.searchsorted(idx, r)] = net(x).reshape(len(r), 6).mean(1).numpy()
    return out


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def run_fold(t: Rows, key: str, steps: int = STEPS) -> dict[str, np.ndarray]:
    """Fit, score the fold's evaluation rows and its validation subsample, fit the stacker."""
    from sklearn.linear_model import LogisticRegression

    t0 = time.time()
    net = train(t, key, steps=steps)
    t1 = time.time()
    rng = np.random.default_rng(11)
    vmask = train_mask(t, key, split="val")
    wv = row_weights(t, vmask)
    vidx = np.flatnonzero(vmask)
    vsel = np.zeros(len(t), bool)
    vsel[rng.choice(vidx, min(VAL_ROWS, len(vidx)), replace=False, p=wv[vidx] /
                    wv[vidx].sum())] = True
    ev = eval_rows(t, key)
    both = ev | vsel
    s = np.full(len(t), np.nan)
    s[both] = score(net, t, both)
    perc = logit(t.shipped[key])
    xv = np.column_stack([perc[vsel], s[vsel]])
    stk = LogisticRegression(C=1.0).fit(xv, t.label[vsel])  # weighted draw: equal groups
    stacked = np.full(len(t), np.nan)
    stacked[ev] = stk.decision_function(np.column_stack([perc[ev], s[ev]]))
    print(f"  {key}: train {t1 - t0:.0f} s, score {both.sum()} rows {time.time() - t1:.0f} s, "
          f"stacker coef {np.round(stk.coef_[0], 3).tolist()}", flush=True)
    return {f"cnn|{key}": np.where(ev, s, np.nan), f"stk|{key}": stacked}


def run_folds(t: Rows, out: Path, only: list[str] | None, steps: int = STEPS
              ) -> dict[str, np.ndarray]:
    done = dict(np.load(out)) if out.exists() else {}
    for key in only or FOLD_ORDER:
        if f"cnn|{key}" in done:
            continue
        done.update(run_fold(t, key, steps))
        np.savez(out, **done)
    return done


# ---------------------------------------------------------------------------------- report


def auc_str(y: np.ndarray, p: np.ndarray) -> str:
    from radguard.evaluation import delong_auc

    a = delong_auc(y, p)
    return f"{a.auc:.3f} [{a.low:.3f}, {a.high:.3f}]"


def wilson_str(k: int, n: int) -> str:
    from radguard.evaluation import wilson

    if n == 0:
        return "n/a"
    ci = wilson(k, n)
    return f"{k}/{n} {k / n:.2%} [{ci.low:.3f}, {ci.high:.3f}]"


def held_out(t: Rows, scores: dict[str, np.ndarray], model: str) -> np.ndarray | None:
    """Every subsampled real row scored by its LOSO fold (NaN elsewhere); None if a LOSO fold
    is missing."""
    s = np.full(len(t), np.nan)
    for key in LOSO_FOLDS:
        ev = eval_rows(t, key)
        if model == "shipped":
            src = t.shipped["full"] if key == LOSO_FOLDS[0] else None
            v = t.shipped[key].copy()
            if src is not None:  # shipped: dicom/ by the full model, as its own tables do
                d = t.source == "dicom"
                v[d] = src[d]
        else:
            k = f"{model}|{key}"
            if k not in scores:
                return None
            v = scores[k]
        s[ev] = v[ev]
    return s


def thresholds(t: Rows, held: np.ndarray) -> dict[str, float]:
    """Per source: the worst OTHER source's 99th percentile of held-out real scores; 'global':
    the worst of all."""
    real = (t.label == 0) & ~np.isnan(held)
    q = {s: float(np.quantile(held[real & (t.source == s)], SUSPICIOUS_Q))
         for s in sd.REAL_SOURCES if (real & (t.source == s)).any()}
    out = {s: max(v for o, v in q.items() if o != s) for s in q}
    out["global"] = max(q.values())
    return out


def report(t: Rows, scores: dict[str, np.ndarray]) -> None:
    from radguard.evaluation import delong_paired

    models = ("cnn", "stk", "shipped")
    names = {"cnn": "residual CNN", "stk": "stacked", "shipped": "shipped perceptron"}
    print("LOGO AUC (refit without the family; its fakes vs matched test-split reals; "
          "DeLong 95% CI):")
    print(f"  {'family (fold)':<34}{'n fake/real':<13}" +
          "".join(f"{names[m]:<26}" for m in models) + "stacked - shipped (paired DeLong)")
    for key in LOGO_FOLDS:
        if f"cnn|{key}" not in scores:
            continue
        for fam in key[5:].split("+"):
            fr, rr = family_rows(t, fam)
            rows = fr | rr
            label = fam if "+" not in key else f"{fam} (both PGGAN out)"
            line = f"  {label:<34}{f'{fr.sum()}/{rr.sum()}':<13}"
            for m in models:
                s = t.shipped[key] if m == "shipped" else scores[f"{m}|{key}"]
                line += f"{auc_str(t.label[rows], s[rows]):<26}"
            d = delong_paired(t.label[rows], scores[f"stk|{key}"][rows], t.shipped[key][rows])
            print(line + f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                         f"p={d['p_value']:.2f}")
    print(f"LOSO false alarms (real rows, up to {LOSO_ROWS_PER_SOURCE} per source, each scored "
          "by the fold that never saw its population, at the worst OTHER source's 99th "
          "percentile):")
    for m in models:
        held = held_out(t, scores, m)
        if held is None:
            print(f"  {names[m]}: LOSO folds incomplete")
            continue
        thr = thresholds(t, held)
        real = (t.label == 0) & ~np.isnan(held)
        tot_k = tot_n = 0
        print(f"  {names[m]} (global point, worst source's q99: {thr['global']:.3f}):")
        for src in sd.REAL_SOURCES:
            sel = real & (t.source == src)
            k, n = int((held[sel] >= thr[src]).sum()), int(sel.sum())
            tot_k, tot_n = tot_k + k, tot_n + n
            print(f"    {src:<15} thr {thr[src]:9.3f}  {wilson_str(k, n)}")
        print(f"    {'all':<29}{wilson_str(tot_k, tot_n)}")
        print("    LOGO caught at the global point (fakes >= it; LOSO false alarms above):")
        for key in LOGO_FOLDS:
            if f"cnn|{key}" not in scores:
                continue
            s = t.shipped[key] if m == "shipped" else scores[f"{m}|{key}"]
            for fam in key[5:].split("+"):
                fr, _ = family_rows(t, fam)
                k = int((s[fr] >= thr["global"]).sum())
                print(f"      {fam:<14}{wilson_str(k, int(fr.sum()))}")


def speed() -> None:
    """One core: CNN time per 64 x 64 crop, and for the 64 tiles of a 512 x 512 analysis
    image (a 1024 x 1024 image after ``prepare``)."""
    import torch

    torch.set_num_threads(1)
    net = make_model().eval()
    x = torch.randint(0, 256, (64, 1, 64, 64)).float()
    with torch.no_grad():
        net(x)
        t0 = time.perf_counter()
        for _ in range(5):
            net(x)
    dt = (time.perf_counter() - t0) / 5
    n = sum(p.numel() for p in net.parameters())
    print(f"speed: {n} weights; {dt / 64 * 1e3:.2f} ms per crop; {dt * 1e3:.0f} ms for the 64 "
          "tiles of a 512 x 512 analysis image (one 1024 x 1024 radiograph)")


def main() -> None:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("prep", "folds", "report", "speed"))
    ap.add_argument("folds", nargs="*", help="folds: only these (e.g. logo:StyleGAN2)")
    ap.add_argument("--out", default=str(OUT / "folds_cnn.npz"))
    ap.add_argument("--steps", type=int, default=STEPS, help="training steps per fold")
    args = ap.parse_args()
    if args.step == "prep":
        prep()
        return
    if args.step == "speed":
        speed()
        return
    t = Rows()
    out = Path(args.out)
    scores = run_folds(t, out, args.folds or None, args.steps) if args.step == "folds" else dict(
        np.load(out))
    report(t, scores)
    speed()


if __name__ == "__main__":
    main()
