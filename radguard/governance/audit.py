"""Poisoning and quality audit of a training dataset.

What a hospital AI team checks before (re)training, each with examples in the report:

* exact duplicates (same decoded pixels) and near duplicates (perceptual hash close *and*
  thumbnails almost identical: resized, re-encoded or lightly edited copies);
* the same image carrying conflicting labels;
* label-flip suspects: cases whose label disagrees with a cross-validated model (folds split
  by patient) and with their nearest neighbours in the model's feature space;
* patient leakage across splits (a patient in both training and test) and the same image in
  two splits;
* synthetic images: Synthetic Data = YES in the header, or a high synthetic score;
* DICOM files that are unsigned or whose signature does not hold;
* distribution shift against a previous version (KS per image statistic, MMD on features);
* unreadable files (listed, never fatal).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image
from scipy.fft import dctn
from scipy.optimize import minimize

from radguard.errors import RadguardError
from radguard.fileio import atomic_write_bytes

__all__ = ["AuditReport", "ImageFacts", "audit_dataset", "examine_image", "flip_suspects",
           "perceptual_hash", "plant_label_flips"]

THUMB = 64
NEAR_BITS = 10  # perceptual-hash bits that may differ between near duplicates
NEAR_CORRELATION = 0.97  # and their thumbnails must still correlate this well
PATIENT_COLUMNS = ("patient_id", "PatientID", "patient", "subject_id")
SPLIT_COLUMNS = ("split", "set", "subset", "fold")
LABEL_COLUMNS = ("label", "class", "target", "y")


# -- per image ---------------------------------------------------------------------------------

@dataclass
class ImageFacts:
    """What the audit needs to know about one image (picklable, so Dask can ship it)."""

    path: str
    error: str | None = None
    pixels: str = ""
    phash: int = 0
    thumb: np.ndarray | None = None
    stats: dict[str, float] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    patient: str | None = None
    synthetic_flag: bool = False
    synthetic_score: float | None = None
    signature: str | None = None  # DICOM only: unsigned / valid / untrusted / invalid ...


def perceptual_hash(grey: np.ndarray) -> int:
    """64-bit DCT hash: survives resizing, re-encoding and small edits."""
    small = np.asarray(Image.fromarray(_unit8(grey)).resize((32, 32), Image.Resampling.BOX),
                       np.float64)
    low = dctn(small, norm="ortho")[:8, :8].ravel()[1:]
    bits = low > np.median(low)
    return int("".join("1" if b else "0" for b in bits), 2)


def _unit8(grey: np.ndarray) -> np.ndarray:
    a = np.asarray(grey, np.float64)
    lo, hi = np.percentile(a, [0.5, 99.5])
    return (np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)


def examine_image(path: str | os.PathLike[str], *, model: Any = None,
                  detector: Any = None, trust: Any = None) -> ImageFacts:
    """Read one image and gather its facts; bad input becomes ``error``, never an exception."""
    from radguard.governance.datasets import load_image, pixel_digest
    from radguard.monitoring.features import image_features
    from radguard.triage.model import grey_2d

    facts = ImageFacts(str(path))
    try:
        pixels, ds = load_image(path)
        grey = grey_2d(pixels if pixels.ndim == 2 or pixels.shape[-1] == 3 else pixels[0])
        facts.pixels = pixel_digest(pixels)
        facts.phash = perceptual_hash(grey)
        facts.thumb = np.asarray(Image.fromarray(_unit8(grey)).resize(
            (THUMB, THUMB), Image.Resampling.BOX))
        facts.stats = image_features(grey.astype(np.float64) - grey.min(),
                                     float(grey.max() - grey.min()) or 1.0)
        if model is not None:  # its features and its own opinion (the logit)
            x = model.preprocess(grey)[None]
            facts.embedding = np.append(model.embed(x)[0], model.raw_scores(x)[0])
        else:
            t = np.asarray(Image.fromarray(facts.thumb).resize((16, 16), Image.Resampling.BOX),
                           np.float64).ravel()
            facts.embedding = (t - t.mean()) / (t.std() + 1e-9)
        if ds is not None:
            facts.patient = str(ds.get("PatientID", "") or "") or None
            facts.synthetic_flag = str(ds.get("SyntheticData", "")).upper() == "YES"
            facts.signature = _signature_status(ds, trust)
        if detector is not None:
            facts.synthetic_score = float(detector.analyse(grey).synthetic_score)
    except RadguardError as exc:
        facts.error = str(exc)
    except (OSError, ValueError, MemoryError) as exc:
        facts.error = f"{type(exc).__name__}: {exc}"
    return facts


def _signature_status(ds: Any, trust: Any) -> str:
    from radguard.provenance.verify import verify_dataset

    if 0xFFFAFFFA not in ds:
        return "unsigned"
    return str(verify_dataset(ds, trust).status)


# -- label flips ---------------------------------------------------------------------------------

def _softmax_fit(x: np.ndarray, y: np.ndarray, classes: int, l2: float) -> np.ndarray:
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(classes)[y]

    def loss(w_flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = w_flat.reshape(d + 1, classes)
        z = xb @ w
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        value = -np.sum(onehot * np.log(p + 1e-12)) / n + l2 * np.sum(w[:-1] ** 2)
        grad = xb.T @ (p - onehot) / n
        grad[:-1] += 2 * l2 * w[:-1]
        return value, grad.ravel()

    w0 = np.zeros((d + 1) * classes)
    return minimize(loss, w0, jac=True, method="L-BFGS-B",
                    options={"maxiter": 500}).x.reshape(d + 1, classes)


def _softmax_predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    z = np.hstack([x, np.ones((len(x), 1))]) @ w
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def flip_suspects(embeddings: np.ndarray, labels: Sequence[str],
                  groups: Sequence[str] | None = None, *, folds: int = 5, neighbours: int = 10,
                  l2: float = 1e-2, seed: int = 0) -> dict[str, np.ndarray]:
    """Per case: the out-of-fold probability of its own label, the share of its nearest
    neighbours (other patients) that share it, and a suspicion in [0, 1] (1 - their mean).
    Folds keep each patient's images together, so a case is never judged by a model that saw
    its patient."""
    x = np.asarray(embeddings, np.float64)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
    names = sorted(set(labels))
    y = np.array([names.index(v) for v in labels])
    n = len(y)
    g = np.asarray(groups if groups is not None else [str(i) for i in range(n)])
    unique = np.unique(g)
    fold_of_group = dict(zip(unique, np.random.default_rng(seed).permutation(len(unique))
                             % folds, strict=True))
    fold = np.array([fold_of_group[v] for v in g])
    p_own = np.zeros(n)
    predicted = np.zeros(n, int)
    for f in range(folds):
        test, train = fold == f, fold != f
        if not test.any() or len(np.unique(y[train])) < len(names):
            continue
        w = _softmax_fit(x[train], y[train], len(names), l2)
        p = _softmax_predict(w, x[test])
        p_own[test] = p[np.arange(len(p)), y[test]]
        predicted[test] = p.argmax(axis=1)
    unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)
    sim = unit @ unit.T
    sim[g[:, None] == g[None, :]] = -np.inf  # not itself, not the same patient
    k = min(neighbours, n - 1)
    nearest = np.argpartition(-sim, k, axis=1)[:, :k]
    agree = (y[nearest] == y[:, None]).mean(axis=1)
    suspicion = 1 - (p_own + agree) / 2
    return {"p_own": p_own, "agree": agree, "suspicion": suspicion,
            "suggested": np.array(names)[predicted]}


def plant_label_flips(rows: Sequence[dict[str, str]], column: str, fraction: float, *,
                      seed: int = 0) -> tuple[list[dict[str, str]], set[int]]:
    """Copies of ``rows`` with ``fraction`` of their ``column`` values changed to another
    class seen in that column, and the indices changed: to measure what the label-flip
    check finds on your own data before trusting its silence."""
    classes = sorted({r[column] for r in rows})
    if len(classes) < 2:
        raise RadguardError(f"column {column!r} has fewer than two classes")
    rng = np.random.default_rng(seed)
    flipped = set(rng.choice(len(rows), int(round(len(rows) * fraction)),
                             replace=False).tolist())
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        if i in flipped:
            others = [c for c in classes if c != row[column]]
            row[column] = others[int(rng.integers(len(others)))]
        out.append(row)
    return out, flipped


# -- the audit -------------------------------------------------------------------------------------

@dataclass
class AuditReport:
    """Findings of one audit; ``summary`` counts, the lists give examples."""

    root: str
    images: int = 0
    findings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    not_checked: list[str] = field(default_factory=list)
    created: str = ""
    thumbs: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def summary(self) -> dict[str, int]:
        """Number of findings per check."""
        return {k: len(v) for k, v in self.findings.items()}

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary."""
        return {"root": self.root, "created": self.created, "images": self.images,
                "summary": self.summary, "not_checked": self.not_checked,
                "findings": self.findings}

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON summary atomically."""
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1, default=_jsonable)
                           .encode() + b"\n", durable=False)

    def write_html(self, path: str | os.PathLike[str], examples: int = 12) -> None:
        """A self-contained HTML report: counts, then examples of each finding with
        thumbnails of the images involved."""
        atomic_write_bytes(path, self.render_html(examples).encode(), durable=False)

    def render_html(self, examples: int = 12) -> str:
        """The report as one HTML string (thumbnails embedded)."""
        h = html.escape
        parts = ["<!doctype html><html><head><meta charset='utf-8'><title>radguard dataset "
                 "audit</title><style>body{font-family:sans-serif;margin:2em;max-width:80em}"
                 "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
                 "padding:.25em .5em;text-align:left;vertical-align:top}img{width:64px;"
                 "height:64px;image-rendering:pixelated;margin-right:2px}.zero{color:#777}"
                 "</style></head><body>",
                 f"<h1>Dataset audit</h1><p>{h(self.root)}: {self.images} images, "
                 f"{h(self.created)}</p><h2>Summary</h2><table><tr><th>check</th>"
                 "<th>findings</th></tr>"]
        for key, count in self.summary.items():
            css = " class='zero'" if count == 0 else ""
            parts.append(f"<tr{css}><td>{h(_TITLES.get(key, key))}</td><td>{count}</td></tr>")
        parts.append("</table>")
        if self.not_checked:
            parts.append("<p>Not checked: " + "; ".join(h(x) for x in self.not_checked) + "</p>")
        for key, items in self.findings.items():
            if not items:
                continue
            parts.append(f"<h2 id='{h(key)}'>{h(_TITLES.get(key, key))} ({len(items)})</h2>"
                         "<table><tr><th>images</th><th>details</th></tr>")
            for item in items[:examples]:
                imgs = "".join(self._img(p) for p in _images_of(item))
                details = ", ".join(f"{h(str(k))}: {h(_short(v))}" for k, v in item.items()
                                    if k not in ("images", "image"))
                names = "<br>".join(h(p) for p in _images_of(item))
                parts.append(f"<tr><td>{imgs}<br><small>{names}</small></td>"
                             f"<td>{details}</td></tr>")
            if len(items) > examples:
                parts.append(f"<tr><td colspan=2>... {len(items) - examples} more in the "
                             "JSON summary</td></tr>")
            parts.append("</table>")
        parts.append("</body></html>")
        return "".join(parts)

    def _img(self, rel: str) -> str:
        thumb = self.thumbs.get(rel)
        if thumb is None:
            return ""
        buf = io.BytesIO()
        Image.fromarray(thumb).save(buf, format="PNG")
        return (f"<img alt='{html.escape(rel)}' src='data:image/png;base64,"
                f"{base64.b64encode(buf.getvalue()).decode()}'>")


_TITLES = {
    "unreadable": "Unreadable files",
    "exact_duplicates": "Exact duplicates (same pixels)",
    "near_duplicates": "Near duplicates",
    "conflicting_labels": "Same image, conflicting labels",
    "label_flip_suspects": "Label-flip suspects",
    "patient_leakage": "Patients in more than one split",
    "image_leakage": "The same image in more than one split",
    "synthetic": "Synthetic images (declared or detected)",
    "signatures": "Unsigned or invalidly signed DICOM",
    "distribution_shift": "Distribution shift against the previous version",
}


def _images_of(item: dict[str, Any]) -> list[str]:
    if "images" in item:
        return list(item["images"])
    return [item["image"]] if "image" in item else []


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) < 200 else text[:200] + "..."


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str]) -> str | None:
    if wanted:
        if wanted not in columns:
            raise RadguardError(f"labels have no column {wanted!r} (columns: "
                                f"{', '.join(columns)})")
        return wanted
    return next((c for c in candidates if c in columns), None)


def audit_dataset(
    root: str | os.PathLike[str],
    labels: str | os.PathLike[str] | None = None,
    *,
    label_col: str | None = None,
    patient_col: str | None = None,
    split_col: str | None = None,
    label_key: str | None = None,
    model: Any = None,  # a triage model with ``embed``
    synthetic: bool = True,
    synthetic_threshold: float | None = None,
    trust: Any = None,
    against: str | os.PathLike[str] | None = None,
    flip_threshold: float = 0.5,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> AuditReport:
    """Audit the images under ``root`` (and their labels); see the module docstring."""
    from radguard.concurrency import map_ordered
    from radguard.governance.datasets import _match_labels, image_files, load_labels

    base = Path(root)
    files = image_files(base)
    if not files:
        raise RadguardError(f"{base}: no image files found")
    detector = None
    if synthetic:
        from radguard.forensics.synthetic import load_detector

        detector = load_detector()
    threshold = synthetic_threshold if synthetic_threshold is not None else (
        detector.threshold if detector is not None else 1.0)

    def one(path: Path) -> ImageFacts:
        facts = examine_image(path, model=model, detector=detector, trust=trust)
        if progress:
            progress(1)
        return facts

    facts = {p.relative_to(base).as_posix(): f
             for p, f in zip(files, map_ordered(one, files, workers), strict=True)}
    report = AuditReport(str(base.resolve()), len(facts),
                         created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    ok = {k: f for k, f in facts.items() if f.error is None}
    report.thumbs = {k: f.thumb for k, f in ok.items() if f.thumb is not None}
    report.findings["unreadable"] = [{"image": k, "error": f.error}
                                     for k, f in facts.items() if f.error]

    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    if labels is not None:
        _, columns, by_key = load_labels(labels, label_key)
        rows = {img: by_key[key] for img, key in _match_labels(ok, by_key).items()}
    label_c = _pick(columns, label_col, LABEL_COLUMNS) if rows else None
    patient_c = _pick(columns, patient_col, PATIENT_COLUMNS) if rows else None
    split_c = _pick(columns, split_col, SPLIT_COLUMNS) if rows else None

    def label_of(k: str) -> str | None:
        return rows.get(k, {}).get(label_c) if label_c else None

    def patient_of(k: str) -> str | None:
        value = rows.get(k, {}).get(patient_c) if patient_c else None
        return value or ok[k].patient

    # duplicates ---------------------------------------------------------------------------
    by_pixels: dict[str, list[str]] = defaultdict(list)
    for k, f in ok.items():
        by_pixels[f.pixels].append(k)
    groups = [sorted(v) for v in by_pixels.values() if len(v) > 1]
    report.findings["exact_duplicates"] = [{"images": g} for g in sorted(groups)]
    near = _near_pairs(ok, by_pixels)
    report.findings["near_duplicates"] = near
    conflicts = []
    for group in groups + [item["images"] for item in near]:
        values = {label_of(k) for k in group} - {None}
        if len(values) > 1:
            conflicts.append({"images": group, "labels": [label_of(k) for k in group]})
    report.findings["conflicting_labels"] = conflicts

    # label flips -----------------------------------------------------------------------------
    labelled = [k for k in ok if label_of(k) not in (None, "")]
    counts: defaultdict[str | None, int] = defaultdict(int)
    for k in labelled:
        counts[label_of(k)] += 1
    if label_c is None:
        report.not_checked.append("label flips: no label column")
    elif len(counts) < 2 or min(counts.values()) < 5 or len(labelled) < 20:
        report.not_checked.append("label flips: need at least 20 labelled images and 5 per "
                                  "class")
    else:
        # images read without error all have an embedding (and a thumbnail)
        emb = np.stack([cast(np.ndarray, ok[k].embedding) for k in labelled])
        groups_of = [patient_of(k) or k for k in labelled]
        result = flip_suspects(emb, cast(list[str], [label_of(k) for k in labelled]), groups_of)
        order = np.argsort(-result["suspicion"])
        report.findings["label_flip_suspects"] = [
            {"image": labelled[i], "label": label_of(labelled[i]),
             "model_suggests": str(result["suggested"][i]),
             "suspicion": round(float(result["suspicion"][i]), 4),
             "p_label": round(float(result["p_own"][i]), 4),
             "neighbours_agreeing": round(float(result["agree"][i]), 3)}
            for i in order if result["suspicion"][i] > flip_threshold]

    # leakage -----------------------------------------------------------------------------------
    if split_c is None:
        report.not_checked.append("split leakage: no split column in the labels")
        report.findings["patient_leakage"], report.findings["image_leakage"] = [], []
    else:
        split_of = {k: rows[k].get(split_c, "") for k in ok if k in rows}
        by_patient: dict[str, set[str]] = defaultdict(set)
        images_of: dict[str, list[str]] = defaultdict(list)
        for k, s in split_of.items():
            pid = patient_of(k)
            if pid:
                by_patient[pid].add(s)
                images_of[pid].append(k)
        report.findings["patient_leakage"] = [
            {"patient": pid, "splits": sorted(s), "images": sorted(images_of[pid])}
            for pid, s in sorted(by_patient.items()) if len(s) > 1]
        if patient_c is None and not any(f.patient for f in ok.values()):
            report.not_checked.append("patient leakage: no patient column or PatientID")
        report.findings["image_leakage"] = [
            {"images": g, "splits": sorted({split_of.get(k, "") for k in g})}
            for g in groups + [item["images"] for item in near]
            if len({split_of.get(k, "") for k in g} - {""}) > 1]

    # provenance ------------------------------------------------------------------------------
    report.findings["synthetic"] = [
        {"image": k, "reason": "Synthetic Data = YES" if f.synthetic_flag else
         f"synthetic score {f.synthetic_score:.2f} >= {threshold:.2f}"}
        for k, f in ok.items()
        if f.synthetic_flag or (f.synthetic_score is not None and f.synthetic_score >= threshold)]
    if not synthetic:
        report.not_checked.append("synthetic score: detector switched off")
    report.findings["signatures"] = [{"image": k, "status": f.signature}
                                     for k, f in ok.items()
                                     if f.signature is not None and f.signature != "valid"]

    # shift ---------------------------------------------------------------------------------------
    if against is not None:
        report.findings["distribution_shift"] = _shift(list(ok.values()), against, model,
                                                       workers)
    return report


def _near_pairs(ok: dict[str, ImageFacts], by_pixels: dict[str, list[str]]
                ) -> list[dict[str, Any]]:
    keys = list(ok)
    if len(keys) < 2:
        return []
    hashes = np.array([ok[k].phash for k in keys], dtype=np.uint64)
    thumbs = np.stack([cast(np.ndarray, ok[k].thumb).astype(np.float64).ravel() for k in keys])
    thumbs = (thumbs - thumbs.mean(1, keepdims=True)) / (thumbs.std(1, keepdims=True) + 1e-9)
    out = []
    for i in range(len(keys) - 1):
        x = np.bitwise_xor(hashes[i], hashes[i + 1:])
        dist = np.array([int(v).bit_count() for v in x])
        for j in np.nonzero(dist <= NEAR_BITS)[0] + i + 1:
            a, b = keys[i], keys[j]
            if ok[a].pixels == ok[b].pixels:
                continue  # an exact duplicate, reported as such
            corr = float(thumbs[i] @ thumbs[j] / thumbs.shape[1])
            if corr >= NEAR_CORRELATION:
                out.append({"images": [a, b], "hash_distance": int(dist[j - i - 1]),
                            "thumbnail_correlation": round(corr, 4)})
    return out


def _shift(current: list[ImageFacts], against: str | os.PathLike[str], model: Any,
           workers: int) -> list[dict[str, Any]]:
    from radguard.concurrency import map_ordered
    from radguard.governance.datasets import image_files
    from radguard.monitoring.drift import ks_test, mmd_test

    old_files = image_files(against)
    old = [f for f in map_ordered(lambda p: examine_image(p, model=model), old_files, workers)
           if f.error is None]
    if len(old) < 10 or len(current) < 10:
        return [{"test": "not run", "reason": "need at least 10 readable images per version"}]
    found = []
    names = list(current[0].stats)
    alpha = 0.01 / len(names)  # Bonferroni over the statistics
    for name in names:
        test = ks_test(np.array([f.stats[name] for f in old]),
                       np.array([f.stats[name] for f in current]))
        if test["p_value"] < alpha:
            found.append({"test": "KS", "feature": name, "statistic": test["statistic"],
                          "p_value": test["p_value"]})
    rng = np.random.default_rng(0)
    a = np.stack([cast(np.ndarray, f.embedding) for f in old])
    b = np.stack([cast(np.ndarray, f.embedding) for f in current])
    a = a[rng.permutation(len(a))[:300]]
    b = b[rng.permutation(len(b))[:300]]
    mmd = mmd_test(a, b, permutations=200)
    if mmd["p_value"] < 0.01:
        found.append({"test": "MMD", "feature": "embedding", "statistic": mmd["mmd2"],
                      "p_value": mmd["p_value"]})
    return found
