"""Triage benchmark (issue 5): the reference chest X-ray model, internal vs. external.

* the shipped bundle (trained on cxr-nih): internal test AUC (DeLong 95% CI), external AUC on
  cxr-kermany, the drop, sensitivity / specificity at the shipped operating point on both
  sites, and the workload-reduction table (suspicion cut-offs) on both;
* the reverse direction: the same recipe trained on cxr-kermany, tested on its own test split
  and on all of cxr-nih;
* CPU inference ms per image on one core, against the named anchor "DenseNet-121 at 224 px"
  (the CheXNet architecture, MONAI implementation, untrained) in the same run.

* the shipped mammography bundle on the mini-MIAS test split (women never seen): AUC,
  sensitivity / specificity at its operating point, workload table, and lesion localisation:
  peaks of the patch-probability map (up to 4 per image, scored by image probability x peak
  height) against the given centres and radii, as FROC sensitivity at 0.5, 1, 2 and 4 false
  positives per image.

Workload plots go to benchmarks/plots/. SR output is checked in tests/triage.

    python benchmarks/bench_triage.py [--epochs 25]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from train_triage_chest import load_site, scores_of, train_network  # noqa: E402

from radguard.evaluation import delong_auc, wilson  # noqa: E402
from radguard.triage import workload_table  # noqa: E402
from radguard.triage.model import load_model  # noqa: E402


def _auc(y, s) -> str:
    a = delong_auc(y, s)
    return f"{a.auc:.3f} [{a.low:.3f}, {a.high:.3f}]"


def _at_point(y, p, t) -> str:
    pred = p >= t
    sens = wilson(int((pred & (y == 1)).sum()), int((y == 1).sum()))
    spec = wilson(int((~pred & (y == 0)).sum()), int((y == 0).sum()))
    return (f"sensitivity {sens.value:.3f} [{sens.low:.3f}, {sens.high:.3f}], specificity "
            f"{spec.value:.3f} [{spec.low:.3f}, {spec.high:.3f}]")


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=25)
    args = ap.parse_args()
    model = load_model("chest")
    size = model.size
    nih, kermany = load_site("cxr-nih", size), load_site("cxr-kermany", size)
    print(f"shipped chest model {model.card.version} (operating point {model.threshold:.3f}, "
          f"chosen for 90% validation sensitivity)")
    sites = {"internal (cxr-nih test split)": (nih[0][nih[2] == "test"], nih[1][nih[2] == "test"]),
             "external (cxr-kermany, all)": (kermany[0], kermany[1])}
    aucs = {}
    for name, (x, y) in sites.items():
        p = model.calibrator.predict(scores_of(model.network, x))
        aucs[name] = delong_auc(y, p).auc
        print(f"  {name}: n={len(y)}, AUC {_auc(y, p)}; at the operating point "
              f"{_at_point(y, p, model.threshold)}")
        print(f"    {'read first if suspicion >=':<28}{'not read first':>16}"
              f"{'positives deprioritised':>26}")
        for r in workload_table(y, p, model.scale):
            print(f"    {r['suspicion_cutoff']:<28}{r['workload_reduction']:>16.1%}"
                  f"{r['positives_deprioritised']:>26.1%}")
    internal, external = aucs.values()
    plots = REPO / "benchmarks" / "plots"
    plots.mkdir(exist_ok=True)
    from radguard.triage import plot_workload

    for name, (xs, ys) in sites.items():
        label = "internal" if name.startswith("internal") else "external"
        plot_workload(workload_table(ys, model.calibrator.predict(scores_of(model.network, xs)),
                                     model.scale),
                      plots / f"triage_workload_chest_{label}.png", title=f"chest model, {name}")
    print(f"  drop internal -> external: {internal - external:+.3f} AUC")
    x, y, split = kermany
    tr, va, te = split == "train", split == "val", split == "test"
    net = train_network(x[tr], y[tr], x[va], y[va], epochs=args.epochs, log=False)
    print(f"reverse direction (same recipe trained on cxr-kermany, {tr.sum()} images): internal "
          f"test AUC {_auc(y[te], scores_of(net, x[te]))}; external (cxr-nih, all) AUC "
          f"{_auc(nih[1], scores_of(net, nih[0]))}")
    from monai.networks.nets import DenseNet121

    torch.set_num_threads(1)
    anchor = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1).eval()
    one = torch.from_numpy(nih[0][:1])
    big = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        model.network(one)
        anchor(big)
        t0 = time.perf_counter()
        for _ in range(20):
            model.network(one)
        ours = (time.perf_counter() - t0) / 20
        t0 = time.perf_counter()
        for _ in range(5):
            anchor(big)
        theirs = (time.perf_counter() - t0) / 5
    print(f"inference on one core: {ours * 1000:.1f} ms per image ({size} px; target 100 ms); "
          f"anchor DenseNet-121 at 224 px {theirs * 1000:.1f} ms; ratio {ours / theirs:.3f}")
    bench_mammo(model_plots=plots)
    return 0


def _peaks(heat: np.ndarray, k: int = 4) -> list[tuple[int, int, float]]:
    """Up to k local maxima (x, y, height) of a saliency map, highest first."""
    from scipy import ndimage

    local = (heat == ndimage.maximum_filter(heat, size=max(3, heat.shape[0] // 8)))
    ys, xs = np.nonzero(local & (heat > 0.2))
    order = np.argsort(-heat[ys, xs])[:k]
    return [(int(xs[i]), int(ys[i]), float(heat[ys[i], xs[i]])) for i in order]


def bench_mammo(model_plots: Path) -> None:
    from train_triage_mammo import MIAS, load_mias

    from radguard.evaluation import froc
    from radguard.triage import plot_workload

    model = load_model("mammo")
    x, y, split, names, lesions = load_mias(model.size)
    te = np.flatnonzero(split == "test")
    p = model.calibrator.predict(model.raw_scores(x[te]))
    print(f"\nshipped mammography model {model.card.version} on the mini-MIAS test split "
          f"(n={len(te)}, {int(y[te].sum())} abnormal): AUC {_auc(y[te], p)}; at the operating "
          f"point {_at_point(y[te], p, model.threshold)}")
    rows = workload_table(y[te], p, model.scale)
    print(f"    {'read first if suspicion >=':<28}{'not read first':>16}"
          f"{'positives deprioritised':>26}")
    for r in rows:
        print(f"    {r['suspicion_cutoff']:<28}{r['workload_reduction']:>16.1%}"
              f"{r['positives_deprioritised']:>26.1%}")
    plot_workload(rows, model_plots / "triage_workload_mammo.png",
                  title="mammo model, mini-MIAS test split")
    from PIL import Image

    detections = []
    for j, i in enumerate(te):
        img = np.asarray(Image.open(MIAS / "images" / names[i]).convert("L"))
        for px, py, height in _peaks(model.saliency(img)):
            detections.append({"image": int(i), "x": px, "y": py, "score": p[j] * height})
    test_lesions = [les for les in lesions if les["image"] in set(te.tolist())]
    t0 = time.perf_counter()
    for i in te[:10]:
        model.raw_scores(x[i : i + 1])
    print(f"  inference on one core: {(time.perf_counter() - t0) / 10 * 1000:.1f} ms per image "
          f"({model.size} px, {model.patch} px patches every {model.stride} px)")
    result = froc(detections, test_lesions, n_images=len(te))
    points = ", ".join(f"{fp} FP/image: {sens:.2f}"
                       for fp, sens in result["sensitivity_at"].items())
    print(f"  lesion localisation (saliency peaks, {len(test_lesions)} lesions with centres): "
          f"FROC sensitivity {points}")


if __name__ == "__main__":
    sys.exit(main())
