"""Write one triage result where people and the PACS can see it: a PNG saliency overlay
for humans and, for DICOM sources, a TID 1500 SR, a secondary-capture overlay and the map
as a fractional DICOM Segmentation."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from radguard.triage.model import Prediction, TriageModel

__all__ = ["FINDINGS", "write_results"]

# what each reference model's positive class means, as an SR finding (SNOMED CT)
FINDINGS = {"chest": ("Pneumonia", ("233604007", "SCT")),
            "mammo": ("Mammogram abnormal", ("168750009", "SCT"))}


def write_results(model: TriageModel, prediction: Prediction, pixels: np.ndarray,
                  source: Dataset | None, stem: Path) -> dict[str, str]:
    """Write the overlay (and SR + SC + SEG for DICOM); the paths written, by kind. The SEG
    is skipped when the displayed frame is not the stored one (multi-frame sources)."""
    from PIL import Image

    from radguard.dicom.io import write_dataset
    from radguard.dicom.results import (
        TriageFinding,
        overlay_capture,
        saliency_segmentation,
        triage_report,
    )
    from radguard.fileio import atomic_write_bytes
    from radguard.images import blend_heat, window_to_8bit
    from radguard.triage.model import grey_2d

    written: dict[str, str] = {}
    grey = window_to_8bit(grey_2d(pixels))
    heat = model.saliency(pixels)
    rgb = blend_heat(grey, heat, start=0.5)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    png = stem.with_name(stem.name + ".saliency.png")
    atomic_write_bytes(png, buf.getvalue())
    written["overlay_png"] = str(png)
    if source is None:
        return written
    name, code = FINDINGS.get(model.card.name, (f"{model.card.name} positive",
                                                (model.card.name.upper(), "99RADGUARD")))
    finding = TriageFinding(name, code, prediction.positive, prediction.probability,
                            prediction.suspicion, model.threshold, model.card.name,
                            model.card.version)
    sr_path = stem.with_name(stem.name + ".sr.dcm")
    write_dataset(triage_report(source, finding), sr_path)
    sc_path = stem.with_name(stem.name + ".overlay.dcm")
    write_dataset(overlay_capture(source, rgb, description=f"{model.card.name} saliency"),
                  sc_path)
    seg_path = stem.with_name(stem.name + ".seg.dcm")
    if heat.shape == (int(source.get("Rows", 0)), int(source.get("Columns", 0))):
        write_dataset(saliency_segmentation(source, heat, model=model.card.name,
                                            version=model.card.version), seg_path)
        written["seg"] = str(seg_path)
    written.update({"sr": str(sr_path), "overlay_dicom": str(sc_path)})
    return written
