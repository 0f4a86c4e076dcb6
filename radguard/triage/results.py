"""Write one triage result where people and the PACS can see it: a PNG saliency overlay
for humans and, for DICOM sources, a TID 1500 SR, a secondary-capture overlay and the map
as a fractional DICOM Segmentation.

One piece of code builds a result set (:func:`build_results`), for the CLI
(:func:`write_results`, files) and the gateway (stored and forwarded as new instances of
the image's study). A set is all or nothing: every object is built and encoded in memory
first, and nothing is written or stored unless all of them were.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from radguard.errors import RadguardError
from radguard.triage.model import Prediction, TriageModel

__all__ = ["FINDINGS", "SCORE_COLUMNS", "ResultSet", "build_results", "score_file", "score_row",
           "unscored_record", "write_results"]

# what each reference model's positive class means, as an SR finding (SNOMED CT)
FINDINGS = {"chest": ("Pneumonia", ("233604007", "SCT")),
            "mammo": ("Mammogram abnormal", ("168750009", "SCT"))}

#: the DICOM objects of a set, in the order they are written, and their file suffixes
_SUFFIX = {"sr": ".sr.dcm", "overlay_dicom": ".overlay.dcm", "seg": ".seg.dcm"}


@dataclass
class ResultSet:
    """One image's results, built and encoded but not yet written anywhere."""

    png: bytes  # the saliency overlay for humans
    datasets: dict[str, Dataset] = field(default_factory=dict)  # kind (_SUFFIX) -> object
    encoded: dict[str, bytes] = field(default_factory=dict)  # kind -> Part 10 bytes
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def _uids(seed: str | None, kind: str) -> dict[str, str | None]:
    """The SOP Instance and Series UIDs of one object of a set: new ones, or - with a
    ``seed`` (the gateway's: the image and the model) - derived from it, so a set built
    again after a failed store or a crash has the same UIDs and the store recognises it."""
    if seed is None:
        return {"sop_instance_uid": None, "series_instance_uid": None}
    from pydicom.uid import generate_uid

    from radguard.dicom.uids import uid_root

    return {"sop_instance_uid": str(generate_uid(uid_root(), [seed, kind, "instance"])),
            "series_instance_uid": str(generate_uid(uid_root(), [seed, kind, "series"]))}


def build_results(model: TriageModel, prediction: Prediction, pixels: np.ndarray,
                  source: Dataset | None, *, uid_seed: str | None = None) -> ResultSet:
    """The overlay (and, for DICOM, SR + SC + SEG) of one prediction, in memory; a
    RadguardError if any of them cannot be built or encoded. The SEG is left out (with a
    note) when the map does not cover the stored image: a multi-frame source (the map is of
    the displayed frame only), or a displayed image of another size."""
    from PIL import Image

    from radguard.dicom.io import encode_dataset
    from radguard.dicom.results import (
        TriageFinding,
        frame_count,
        overlay_capture,
        saliency_segmentation,
        triage_report,
    )
    from radguard.images import blend_heat, window_to_8bit
    from radguard.triage.model import grey_2d

    try:
        grey = window_to_8bit(grey_2d(pixels))
        heat = model.saliency(pixels)
        rgb = blend_heat(grey, heat, start=0.5)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "PNG")
    except (ValueError, TypeError, OSError) as exc:
        raise RadguardError(f"cannot draw the saliency overlay ({exc})") from exc
    results = ResultSet(buf.getvalue())
    if source is None:
        return results
    name, code = FINDINGS.get(model.card.name, (f"{model.card.name} positive",
                                                (model.card.name.upper(), "99RADGUARD")))
    finding = TriageFinding(name, code, prediction.positive, prediction.probability,
                            prediction.suspicion, model.threshold, model.card.name,
                            model.card.version)
    results.datasets["sr"] = triage_report(source, finding, **_uids(uid_seed, "sr"))
    results.datasets["overlay_dicom"] = overlay_capture(
        source, rgb, description=f"{model.card.name} saliency", **_uids(uid_seed, "sc"))
    if frame_count(source) > 1:
        results.notes.append("no SEG: the saliency map is of one frame of a multi-frame image")
    elif heat.shape != (int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)):
        results.notes.append("no SEG: the displayed image is not the stored one's size")
    else:
        results.datasets["seg"] = saliency_segmentation(
            source, heat, model=model.card.name, version=model.card.version,
            **_uids(uid_seed, "seg"))
    for kind, ds in results.datasets.items():
        try:
            results.encoded[kind] = encode_dataset(ds)
        except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:
            raise RadguardError(f"cannot encode the {kind} ({exc})") from exc
    return results


def write_results(model: TriageModel, prediction: Prediction, pixels: np.ndarray,
                  source: Dataset | None, stem: Path) -> dict[str, str]:
    """Write the overlay (and SR + SC + SEG for DICOM); the paths written, by kind. All or
    nothing: the set is built first (:func:`build_results`), and a write that fails removes
    what this call had written."""
    from radguard.fileio import atomic_write_bytes

    results = build_results(model, prediction, pixels, source)
    files = {"overlay_png": (stem.with_name(stem.name + ".saliency.png"), results.png)}
    files.update({kind: (stem.with_name(stem.name + _SUFFIX[kind]), data)
                  for kind, data in results.encoded.items()})
    written: dict[str, str] = {}
    try:
        for kind, (path, data) in files.items():
            atomic_write_bytes(path, data)
            written[kind] = str(path)
    except OSError as exc:
        for done in written.values():
            Path(done).unlink(missing_ok=True)
        raise RadguardError(f"cannot write the results ({exc.strerror or exc})") from exc
    return written


#: The columns of a scores CSV (``radguard triage predict --csv``), ready for ``evaluate``.
SCORE_COLUMNS = ["id", "path", "score", "suspicion", "positive", "model", "version"]


def score_file(model: TriageModel, path: str | os.PathLike[str],
               out_prefix: str | os.PathLike[str] | None = None, *,
               on_scored: Callable[[Prediction], None] | None = None) -> dict[str, object]:
    """Score one image file (DICOM, PNG, JPEG) with ``model``: its JSON record
    (:meth:`Prediction.to_dict`), with the results written under ``out_prefix`` when given
    (:func:`write_results`: overlay, and for DICOM the SR, SEG and SC). ``on_scored`` gets
    the prediction before anything is written. Raises RadguardError for an image outside
    the model's scope or one that cannot be read."""
    from radguard.images import read_pixels

    image = read_pixels(path)
    prediction = model.predict(image.pixels, modality=image.modality, path=str(path))
    record = prediction.to_dict()
    if on_scored is not None:
        on_scored(prediction)
    if out_prefix is not None:
        record.update(write_results(model, prediction, image.pixels, image.dataset,
                                    Path(out_prefix)))
    return record


def score_row(model: TriageModel, path: str | os.PathLike[str],
              prediction: Prediction) -> dict[str, object]:
    """One row of a scores CSV (:data:`SCORE_COLUMNS`): id = the file name, score = the
    calibrated probability."""
    return {"id": Path(path).name, "path": str(path), "score": prediction.probability,
            "suspicion": prediction.suspicion, "positive": int(prediction.positive),
            "model": model.card.name, "version": model.card.version}


def unscored_record(model: TriageModel, path: str | os.PathLike[str],
                    error: Exception) -> dict[str, object]:
    """The JSON record of an image the model gave no score, with the reason."""
    return {"path": str(path), "probability": None, "suspicion": None,
            "model": model.card.name, "version": model.card.version, "error": str(error)}
