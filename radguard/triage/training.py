"""Train the reference triage models and write them as bundles (``radguard triage train``).

Three recipes share one training loop (:func:`train_network`: AdamW, class-balanced BCE,
flips, the epoch with the best validation AUC kept):

* **chest** - normal vs. pneumonia on a folder of radiographs with ``labels.csv`` (``file``,
  ``label``, ``patient_id``), split by patient (:func:`radguard.evaluation.splits.split_of`,
  70 / 15 / 15); a second folder is measured as the external site;
* **mammo** - normal vs. any abnormality on mini-MIAS (``file``, ``abnormality``, ``x``, ``y``,
  ``radius``, ``pair_id``), split by woman; a *patch* classifier (a whole-image network does
  not learn from 220 mammograms: test AUC 0.45 in a first attempt) whose patch
  probabilities are also the lesion map;
* **malignancy** - benign vs. malignant on the same images, a second-stage classifier of the
  region around a lesion (at inference, the regions the mammo model finds most suspicious).

Each recipe fits Platt calibration and the 1-10 suspicion deciles on the validation split,
picks the operating point for 90% validation sensitivity, measures its test split (and the
external site), puts those figures into the model card and writes ``<out>.pt`` + ``<out>.json``
atomically. ``scripts/train_triage_*.py`` call these functions to rebuild the shipped bundles.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from radguard.errors import RadguardError
from radguard.evaluation.splits import split_of
from radguard.triage.networks import DEFAULT, build_network, to_input
from radguard.triage.scores import Calibrator, SuspicionScale, TriageError

__all__ = ["LabelledImages", "MiasData", "TARGET_SENSITIVITY", "fit_malignancy",
           "folds_by_group", "lesion_regions", "load_mias", "load_site", "scores_of",
           "train_chest", "train_malignancy", "train_mammo", "train_network", "write_bundle"]

TARGET_SENSITIVITY = 0.90
Log = Callable[[str], None]

# mammography geometry: images at 256 px, 48 px patches every 12 px (mammo); regions of
# 96 px around a lesion at 512 px, seen by the network at 48 px (malignancy)
MAMMO_SIZE, PATCH, STRIDE = 256, 48, 12
PATCH_CONFIG = {**DEFAULT, "input_size": PATCH, "channels": [16, 32, 64], "strides": [2, 2, 2]}
REGION_SIZE, REGION = 512, 96


def _quiet(_message: str) -> None:
    pass


@dataclass
class LabelledImages:
    """Network inputs (n, 1, size, size), 0/1 labels, split names and grouping keys."""

    inputs: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    groups: list[str]

    def part(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        keep = self.splits == split
        return self.inputs[keep], self.labels[keep]


def _rows(folder: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    path = folder / "labels.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise TriageError(f"{path}: missing column(s) {', '.join(missing)}")
            rows = list(reader)
    except FileNotFoundError as exc:
        raise TriageError(f"{folder}: no labels.csv (a training folder holds labels.csv and "
                          "images/)") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TriageError(f"{path}: unreadable ({exc})") from exc
    if not rows:
        raise TriageError(f"{path}: no rows")
    return rows


def _grey(path: Path) -> np.ndarray:
    from radguard.images import read_pixels
    from radguard.triage.model import grey_2d

    try:
        return grey_2d(read_pixels(path).pixels)
    except RadguardError as exc:
        raise TriageError(f"training image {path}: {exc}") from exc


def load_site(folder: str | Path, size: int, *, positive: str = "pneumonia",
              limit: int | None = None) -> LabelledImages:
    """Every image of a labelled folder (``labels.csv`` with file, label, patient_id and an
    ``images/`` folder) as network inputs; ``label == positive`` is the positive class.
    ``limit`` keeps N rows, half of them positive (quick runs)."""
    folder = Path(folder)
    rows = _rows(folder, ("file", "label", "patient_id"))
    if limit is not None:  # half of each class, so a quick run still has both
        pos = [r for r in rows if r["label"] == positive][: limit // 2]
        rows = pos + [r for r in rows if r["label"] != positive][: limit - len(pos)]
    xs = [to_input(_grey(folder / "images" / r["file"]), size) for r in rows]
    labels = np.array([int(r["label"] == positive) for r in rows])
    if labels.min() == labels.max():
        raise TriageError(f"{folder}: every image has the same label (positive = '{positive}')")
    return LabelledImages(np.stack(xs), labels,
                          np.array([split_of(folder.name, r["patient_id"]) for r in rows]),
                          [r["patient_id"] for r in rows])


def scores_of(net: Any, x: np.ndarray) -> np.ndarray:  # torch module
    """Raw network outputs for a stack of inputs, in batches of 64."""
    import torch

    net.eval()
    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(x[i:i + 64])).reshape(-1).numpy()
                               for i in range(0, len(x), 64)]).astype(np.float64)


def _dihedral(xb: np.ndarray, rng: np.random.Generator, *, vertical: bool, rotate: bool
              ) -> np.ndarray:
    n = len(xb)
    flip = rng.random(n) < 0.5
    xb[flip] = xb[flip][..., ::-1]
    if vertical:
        vflip = rng.random(n) < 0.5
        xb[vflip] = xb[vflip][..., ::-1, :]
    if rotate:
        turn = rng.random(n) < 0.5
        xb[turn] = np.swapaxes(xb[turn], -1, -2)
    return xb


def train_network(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, *,
                  epochs: int, seed: int = 0, config: dict | None = None, batch: int = 32,
                  vertical_flip: bool = False, rotate: bool = False,
                  intensity_jitter: bool = True,
                  validate: Callable[[Any], np.ndarray] | None = None,
                  log: Log = _quiet) -> Any:  # torch module
    """AdamW + class-balanced BCE with flips (and intensity jitter); returns the network of
    the epoch with the best validation AUC. ``validate(net)`` scores the validation cases
    (default: the network on ``xv``), for models whose cases are not single inputs."""
    import torch

    from radguard.evaluation import delong_auc

    if len(x) == 0 or y.min() == y.max():
        raise TriageError("training data needs both classes")
    if len(yv) < 10 or yv.min() == yv.max():
        raise TriageError(f"the validation split has {len(yv)} cases ({int(yv.sum())} "
                          "positive): calibration and the suspicion deciles need at least 10 "
                          "with both classes (use more images)")
    torch.manual_seed(seed)
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
            xb = _dihedral(x[idx].copy(), rng, vertical=vertical_flip, rotate=rotate)
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
        log(f"epoch {epoch + 1}/{epochs}: validation AUC {auc:.3f}")
    net.load_state_dict(best)
    net.eval()
    return net


def _fit_outputs(val_scores: np.ndarray, val_labels: np.ndarray
                 ) -> tuple[Calibrator, SuspicionScale, Any]:
    from radguard.triage.operating import choose_threshold

    cal = Calibrator().fit(val_scores, val_labels)
    pv = cal.predict(val_scores)
    return cal, SuspicionScale().fit(pv), choose_threshold(val_labels, pv,
                                                           sensitivity=TARGET_SENSITIVITY)


def write_bundle(out: str | Path, net: Any, meta: dict) -> Path:
    """``<out>.pt`` (half-precision state dict) and ``<out>.json``, each written atomically;
    returns the JSON path (what ``--model`` takes)."""
    import io

    import torch

    from radguard.fileio import atomic_write_bytes
    from radguard.triage.model import bundle_stem, runtime_export_path

    out = bundle_stem(out)
    buf = io.BytesIO()
    torch.save({k: v.half() for k, v in net.state_dict().items()}, buf)
    atomic_write_bytes(out.with_name(out.name + ".pt"), buf.getvalue(), durable=False)
    json_path = out.with_name(out.name + ".json")
    atomic_write_bytes(json_path, json.dumps(meta, indent=1).encode(), durable=False)
    # an ONNX export of the previous weights would be refused at load: the training
    # scripts make a new one (write_runtime_export)
    runtime_export_path(json_path).unlink(missing_ok=True)
    return json_path


def train_chest(train_folder: str | Path, external_folder: str | Path | None, out: str | Path,
                *, epochs: int = 30, limit: int | None = None, seed: int = 0,
                log: Log = _quiet) -> dict:
    """The chest recipe; returns the bundle's metadata (card figures included)."""
    from radguard.evaluation import delong_auc

    t0 = time.time()
    size = int(DEFAULT["input_size"])
    train_folder = Path(train_folder)
    data = load_site(train_folder, size, limit=limit)
    (x, y), (xv, yv), (xt, yt) = data.part("train"), data.part("val"), data.part("test")
    log(f"{train_folder.name}: {len(y)} train, {len(yv)} val, {len(yt)} test images "
        f"({time.time() - t0:.0f} s to load)")
    net = train_network(x, y, xv, yv, epochs=epochs, seed=seed, log=log)
    cal, scale, point = _fit_outputs(scores_of(net, xv), yv)
    metrics: dict[str, object] = {"operating_point": point.to_dict(),
                                  "measured_by": "radguard triage train chest"}
    if len(yt) and yt.min() != yt.max():
        metrics["internal_test_auc"] = delong_auc(yt, scores_of(net, xt)).to_dict()
    if external_folder is not None:
        ext = load_site(external_folder, size, limit=limit)
        metrics[f"external_auc_{Path(external_folder).name}"] = \
            delong_auc(ext.labels, scores_of(net, ext.inputs)).to_dict()
    meta = {
        "card": {
            "name": "chest",
            "version": f"1.0-{train_folder.name}",
            "intended_use": "Triage of adult frontal chest radiographs (CR/DX): normal vs. "
                            "pneumonia, to order the reading worklist. Not a diagnosis; not "
                            "for children (see the external figures), lateral views or CT.",
            "training_data": f"{train_folder.name} training split ({len(y)} images, split by "
                             "patient; NIH labels are NLP-mined from reports, noisy)",
            "modalities": ["CR", "DX"],
            "metrics": metrics,
        },
        "network": dict(DEFAULT),
        "input_size": size,
        "calibrator": cal.to_dict(),
        "suspicion": scale.to_dict(),
        "threshold": point.threshold,
    }
    path = write_bundle(out, net, meta)
    log(f"wrote {path} ({time.time() - t0:.0f} s in all)")
    return meta


# -- mammography ----------------------------------------------------------------------------

@dataclass
class MiasData:
    """mini-MIAS at one size: inputs, abnormal labels, splits, file names, severities
    (``benign``/``malignant``/``normal``) and lesions (image index, x, y from the top-left and
    radius, in 512-px units)."""

    inputs: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    names: list[str]
    severity: list[str]
    lesions: list[dict]
    groups: list[str]

    def lesions_of(self, index: int) -> list[dict]:
        return [les for les in self.lesions if les["image"] == index]


def load_mias(folder: str | Path, size: int, *, limit: int | None = None) -> MiasData:
    """Every image of a mini-MIAS folder (one row per lesion in ``labels.csv``)."""
    folder = Path(folder)
    by_file: dict[str, list[dict[str, str]]] = {}
    for row in _rows(folder, ("file", "abnormality", "severity", "x", "y", "radius",
                              "pair_id")):
        by_file.setdefault(row["file"], []).append(row)
    xs, lesions, data = [], [], []
    for i, (name, entries) in enumerate(sorted(by_file.items())[:limit]):
        xs.append(to_input(_grey(folder / "images" / name), size))
        data.append((int(entries[0]["abnormality"] != "NORM"),
                     split_of(folder.name, entries[0]["pair_id"]), name,
                     entries[0]["severity"], entries[0]["pair_id"]))
        for e in entries:
            if e["x"] and e["y"] and e["radius"]:
                lesions.append({"image": i, "x": float(e["x"]), "y": 512.0 - float(e["y"]),
                                "radius": float(e["radius"]), "severity": e["severity"]})
    labels, splits, names, severity, groups = zip(*data, strict=True)
    return MiasData(np.stack(xs), np.array(labels), np.array(splits), list(names),
                    list(severity), lesions, list(groups))


def _cut(image: np.ndarray, cy: float, cx: float, side: int) -> np.ndarray:
    """A side x side window of a (1, n, n) input centred near (cy, cx), kept inside."""
    n, half = image.shape[-1], side // 2
    cy = int(np.clip(round(cy), half, n - half))
    cx = int(np.clip(round(cx), half, n - half))
    return image[:, cy - half : cy - half + side, cx - half : cx - half + side]


def mammo_patches(data: MiasData, rows: np.ndarray, rng: np.random.Generator,
                  per_image: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Training patches (n, 1, PATCH, PATCH) and labels from the images ``rows``: lesion
    centres with jitter (positive), breast tissue away from lesions (negative)."""
    x, scale, half = data.inputs, data.inputs.shape[-1] / 512.0, PATCH // 2
    out, labels = [], []
    for i in rows:
        here = data.lesions_of(int(i))
        for les in here:
            jitter = min(les["radius"] * scale / 2, 8.0)
            for _ in range(per_image):
                dy, dx = rng.uniform(-jitter, jitter, 2)
                out.append(_cut(x[i], les["y"] * scale + dy, les["x"] * scale + dx, PATCH))
                labels.append(1)
        if data.labels[i] and not here:
            continue  # abnormal but no centre given: nowhere is known to be normal
        tissue = np.argwhere(x[i, 0, half:-half, half:-half] > -0.3) + half
        taken = 0
        for cy, cx in tissue[rng.permutation(len(tissue))[: per_image * 4]]:
            if all(np.hypot(cy - les["y"] * scale, cx - les["x"] * scale)
                   > les["radius"] * scale + half for les in here):
                out.append(_cut(x[i], cy, cx, PATCH))
                labels.append(0)
                taken += 1
            if taken == per_image:
                break
    if not out:
        raise TriageError("no training patches (no lesion centres in the training split)")
    return np.stack(out).astype(np.float32), np.array(labels)


def mammo_meta(cal: Calibrator, scale: SuspicionScale, threshold: float, card: dict) -> dict:
    return {"kind": "patch", "patch": PATCH, "stride": STRIDE, "card": card,
            "network": PATCH_CONFIG, "input_size": MAMMO_SIZE, "calibrator": cal.to_dict(),
            "suspicion": scale.to_dict(), "threshold": threshold}


def _untrained_card(name: str) -> dict:
    return {"name": name, "version": "training", "intended_use": "", "training_data": ""}


def patch_image_scores(net: Any, x: np.ndarray) -> np.ndarray:
    """Image scores of a patch network (mean of the top three patch logits)."""
    from radguard.triage.model import PatchTriageModel

    meta = mammo_meta(Calibrator(), SuspicionScale([0.0] * 9), 0.5, _untrained_card("mammo"))
    return PatchTriageModel(meta, net).raw_scores(x)


def _mammo_card(name: str, version: str, intended: str, training: str, metrics: dict) -> dict:
    return {"name": name, "version": version,
            "intended_use": intended + " Trained on 1990s digitised film (mini-MIAS): not "
                                       "validated on digital mammography.",
            "training_data": training, "modalities": ["MG"], "metrics": metrics}


def train_mammo(folder: str | Path, out: str | Path, *, epochs: int = 12,
                limit: int | None = None, seed: int = 0, log: Log = _quiet) -> dict:
    """The mammography (normal vs. abnormal) recipe; returns the bundle's metadata."""
    from radguard.evaluation import delong_auc

    t0 = time.time()
    data = load_mias(folder, MAMMO_SIZE, limit=limit)
    x, y, split = data.inputs, data.labels, data.splits
    tr, va, te = split == "train", split == "val", split == "test"
    px, py = mammo_patches(data, np.flatnonzero(tr), np.random.default_rng(seed))
    log(f"{Path(folder).name}: {tr.sum()} train, {va.sum()} val, {te.sum()} test images "
        f"({y[tr].sum()}/{y[va].sum()}/{y[te].sum()} abnormal); {len(py)} training patches "
        f"({py.sum()} lesion)")
    net = train_network(px, py, x[va], y[va], epochs=epochs, seed=seed, config=PATCH_CONFIG,
                        batch=64, vertical_flip=True, intensity_jitter=False,
                        validate=lambda n: patch_image_scores(n, x[va]), log=log)
    cal, scale, point = _fit_outputs(patch_image_scores(net, x[va]), y[va])
    metrics: dict[str, object] = {"operating_point": point.to_dict(),
                                  "measured_by": "radguard triage train mammo"}
    if y[te].size and y[te].min() != y[te].max():
        metrics["test_auc"] = delong_auc(y[te], patch_image_scores(net, x[te])).to_dict()
    card = _mammo_card("mammo", "1.0-mias-patch",
                       "Research triage of screening mammograms (MG): normal vs. any "
                       "abnormality (mass, calcification, distortion, asymmetry), to order a "
                       "reading worklist.",
                       f"mini-MIAS training split ({int(tr.sum())} images, split by woman; "
                       f"{len(py)} patches)", metrics)
    meta = mammo_meta(cal, scale, point.threshold, card)
    path = write_bundle(out, net, meta)
    log(f"wrote {path} ({time.time() - t0:.0f} s in all)")
    return meta


def lesion_regions(data: MiasData, rows: np.ndarray, rng: np.random.Generator | None = None,
                   per_lesion: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regions around the annotated lesions of the abnormal images ``rows`` (inputs at
    REGION_SIZE), as network inputs, with 1 = malignant and the image index of each.
    With ``rng``, ``per_lesion`` jittered copies per lesion (training)."""
    from radguard.triage.networks import region_input

    scale = data.inputs.shape[-1] / 512.0
    out, labels, owners = [], [], []
    for i in rows:
        for les in data.lesions_of(int(i)):
            if les["severity"] not in ("benign", "malignant"):
                continue
            for _ in range(per_lesion):
                dy, dx = rng.uniform(-8, 8, 2) if rng is not None else (0.0, 0.0)
                out.append(region_input(_cut(data.inputs[i], les["y"] * scale + dy,
                                             les["x"] * scale + dx, REGION), PATCH))
                labels.append(int(les["severity"] == "malignant"))
                owners.append(int(i))
    if not out:
        return np.zeros((0, 1, PATCH, PATCH), np.float32), np.zeros(0, int), np.zeros(0, int)
    return np.stack(out), np.array(labels), np.array(owners)


def fit_malignancy(data: MiasData, train_rows: np.ndarray, val_rows: np.ndarray, *,
                   epochs: int, seed: int = 0, log: Log = _quiet) -> Any:
    """The benign-vs-malignant region network from the lesions of two sets of images."""
    rng = np.random.default_rng(seed)
    x, y, _ = lesion_regions(data, train_rows, rng, per_lesion=8)
    xv, yv, _ = lesion_regions(data, val_rows)
    log(f"{len(y) // 8} training lesions ({y.sum() // 8} malignant), {len(yv)} validation "
        f"lesions ({yv.sum()} malignant)")
    return train_network(x, y, xv, yv, epochs=epochs, seed=seed, config=PATCH_CONFIG,
                         batch=32, vertical_flip=True, rotate=True, log=log)


def train_malignancy(folder: str | Path, out: str | Path, *, locator: str = "mammo",
                     epochs: int = 20, limit: int | None = None, seed: int = 0,
                     log: Log = _quiet) -> dict:
    """The benign-vs-malignant recipe (abnormal images only, split by woman): trained on the
    annotated lesion regions; at inference the regions come from ``locator`` (a registered
    patch model). Calibration and the operating point are fitted on validation lesions."""
    from radguard.evaluation import delong_auc

    t0 = time.time()
    data = load_mias(folder, REGION_SIZE, limit=limit)
    abnormal = data.labels == 1
    tr = np.flatnonzero(abnormal & (data.splits == "train"))
    va = np.flatnonzero(abnormal & (data.splits == "val"))
    te = np.flatnonzero(abnormal & (data.splits == "test"))
    net = fit_malignancy(data, tr, va, epochs=epochs, seed=seed, log=log)
    xv, yv, _ = lesion_regions(data, va)
    cal, scale, point = _fit_outputs(scores_of(net, xv), yv)
    metrics: dict[str, object] = {"operating_point": point.to_dict(),
                                  "measured_by": "radguard triage train malignancy"}
    xt, yt, _ = lesion_regions(data, te)
    if yt.size and yt.min() != yt.max():
        metrics["test_auc_at_annotated_lesions"] = delong_auc(yt, scores_of(net, xt)).to_dict()
    card = _mammo_card("mammo-malignancy", "1.0-mias-region",
                       "Research second stage for mammograms (MG) already judged abnormal: "
                       "benign vs. malignant for the most suspicious regions found by the "
                       f"'{locator}' model. Not for normal screening images.",
                       f"mini-MIAS abnormal images of the training split ({len(tr)} images, "
                       "split by woman), 96 px regions around the annotated lesions",
                       metrics)
    meta = {"kind": "region", "locator": locator, "region": REGION, "regions": 3,
            "card": card, "network": PATCH_CONFIG, "input_size": REGION_SIZE,
            "calibrator": cal.to_dict(), "suspicion": scale.to_dict(),
            "threshold": point.threshold}
    path = write_bundle(out, net, meta)
    log(f"wrote {path} ({time.time() - t0:.0f} s in all)")
    return meta


def folds_by_group(groups: list[str], rows: np.ndarray, k: int) -> Iterator[np.ndarray]:
    """k disjoint subsets of ``rows`` such that no group straddles two (cross-validation)."""
    import zlib

    fold = np.array([zlib.crc32(groups[i].encode()) % k for i in rows])
    for f in range(k):
        yield rows[fold == f]
