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
  positives per image;
* benign vs. malignant on mini-MIAS: the region recipe, 5-fold cross-validated by woman;
* the chest bundle exported to ONNX and run by onnxruntime: agreement and speed vs. torch.

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
SHARED = REPO.parent / "shared" / "data"

from radguard.evaluation import delong_auc, wilson  # noqa: E402
from radguard.triage import workload_table  # noqa: E402
from radguard.triage.model import load_model  # noqa: E402
from radguard.triage.training import (  # noqa: E402
    REGION_SIZE,
    fit_malignancy,
    folds_by_group,
    lesion_regions,
    load_mias,
    load_site,
    scores_of,
    train_network,
)


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
    nih, kermany = load_site(SHARED / "cxr-nih", size), load_site(SHARED / "cxr-kermany", size)
    print(f"shipped chest model {model.card.version} (operating point {model.threshold:.3f}, "
          f"chosen for 90% validation sensitivity)")
    sites = {"internal (cxr-nih test split)": nih.part("test"),
             "external (cxr-kermany, all)": (kermany.inputs, kermany.labels)}
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
    (x, y), (xv, yv), (xt, yt) = (kermany.part(s) for s in ("train", "val", "test"))
    net = train_network(x, y, xv, yv, epochs=args.epochs)
    print(f"reverse direction (same recipe trained on cxr-kermany, {len(y)} images): internal "
          f"test AUC {_auc(yt, scores_of(net, xt))}; external (cxr-nih, all) AUC "
          f"{_auc(nih.labels, scores_of(net, nih.inputs))}")
    from monai.networks.nets import DenseNet121

    torch.set_num_threads(1)
    anchor = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1).eval()
    one = torch.from_numpy(nih.inputs[:1])
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
    bench_onnx(model, nih.inputs[:64], ours)
    bench_mammo(model_plots=plots)
    bench_malignancy(epochs=15)
    return 0


def bench_onnx(model, x, torch_seconds: float) -> None:
    """The chest bundle exported to ONNX and run by onnxruntime (the plug-in path for models
    from other frameworks): agreement with torch and one-core speed against torch."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx_model = load_model(str(model.export_onnx(Path(tmp) / "chest")))
        diff = np.abs(onnx_model.raw_scores(x) - model.raw_scores(x)).max()
        one = x[:1]
        onnx_model.raw_scores(one)
        t0 = time.perf_counter()
        for _ in range(20):
            onnx_model.raw_scores(one)
        ms = (time.perf_counter() - t0) / 20
    print(f"ONNX export run by onnxruntime: max |logit difference| vs torch {diff:.2e} over "
          f"{len(x)} images; {ms * 1000:.1f} ms per image on one core, ratio to torch "
          f"{ms / torch_seconds:.2f}")


def bench_malignancy(epochs: int) -> None:
    """Benign vs. malignant on mini-MIAS: the region recipe cross-validated over every
    abnormal image with an annotated lesion (5 folds by woman, validation = the next fold),
    scored at the annotated centres; pooled AUC with its DeLong CI."""
    data = load_mias(SHARED / "mammo-mias", REGION_SIZE)
    abnormal = np.flatnonzero(data.labels == 1)
    folds = list(folds_by_group(data.groups, abnormal, 5))
    ys, ss = [], []
    for k, test in enumerate(folds):
        val = folds[(k + 1) % 5]
        train = np.setdiff1d(np.concatenate([f for j, f in enumerate(folds) if j != k]), val)
        net = fit_malignancy(data, train, val, epochs=epochs, seed=k)
        xt, yt, _ = lesion_regions(data, test)
        ys.append(yt)
        ss.append(scores_of(net, xt))
    y, s = np.concatenate(ys), np.concatenate(ss)
    print(f"\nbenign vs. malignant (mini-MIAS, {len(y)} annotated lesions, {int(y.sum())} "
          f"malignant; 5-fold cross-validation by woman, region network at the annotated "
          f"centre): AUC {_auc(y, s)}")


def _peaks(heat: np.ndarray, k: int = 4) -> list[tuple[int, int, float]]:
    """Up to k local maxima (x, y, height) of a saliency map, highest first."""
    from scipy import ndimage

    local = (heat == ndimage.maximum_filter(heat, size=max(3, heat.shape[0] // 8)))
    ys, xs = np.nonzero(local & (heat > 0.2))
    order = np.argsort(-heat[ys, xs])[:k]
    return [(int(xs[i]), int(ys[i]), float(heat[ys[i], xs[i]])) for i in order]


def bench_mammo(model_plots: Path) -> None:
    from radguard.evaluation import froc
    from radguard.triage import plot_workload

    model = load_model("mammo")
    data = load_mias(SHARED / "mammo-mias", model.size)
    x, y, split, names, lesions = data.inputs, data.labels, data.splits, data.names, data.lesions
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
        img = np.asarray(Image.open(SHARED / "mammo-mias" / "images" / names[i]).convert("L"))
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
