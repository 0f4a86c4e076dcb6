"""One verdict per image from every layer that can speak about it.

Layers, strongest first: the PS3.15 signature (DICOM; only valid top-level signatures that
cover every present element that changes what the image shows or means vouch for it, see
``VerificationReport.pixels_covered``), the fragile watermark (when a key is configured),
the declared Synthetic Data attribute, the local tamper detector, the
synthetic-radiograph detector and the header checks. Verdicts:

* ``tampered``     - a signature no longer matches, the watermark shows changed blocks, a
  copy-move was found, or the learned detector found a fill or splice (on an image no
  signature or watermark vouches for);
* ``synthetic``    - declared synthetic, or the detector score reaches the shipped threshold
  (without a valid trusted signature vouching for the pixels);
* ``suspicious``   - weaker evidence: a high-severity header finding, a
  detector score in the upper band below the threshold, a detector alarm (synthetic,
  fill or splice) on an image whose pixels a valid signature covers (a stolen key is
  possible, a forged signature is not), a signer that is not trusted, a signature too weak
  to count (MD5, SHA-1, short key), or a signature inside a sequence item that no longer
  matches its item;
* ``unverifiable`` - nothing could be judged (unreadable file, image too small or not grey);
* ``authentic``    - every layer that ran found nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radguard.errors import RadguardError
from radguard.forensics.cues import Prepared
from radguard.forensics.metadata import Finding, check_metadata
from radguard.forensics.synthetic import SyntheticDetector, SyntheticResult, load_detector
from radguard.forensics.tamper import TamperResult, detect_tamper
from radguard.images import display_frame, is_dicom_path, read_for_analysis

if TYPE_CHECKING:
    from radguard.provenance.policy import AlgorithmPolicy
    from radguard.provenance.profiles import Coverage
    from radguard.provenance.verify import VerificationReport

__all__ = ["VERDICTS", "ScanResult", "scan_file", "write_heatmap"]

VERDICTS = ("authentic", "suspicious", "synthetic", "tampered", "unverifiable")


@dataclass
class ScanResult:
    """Everything radguard could say about one image."""

    path: str
    verdict: str = "unverifiable"
    reasons: list[str] = field(default_factory=list)
    # valid / invalid / weak / untrusted / unsigned / not applicable (VerificationReport.status)
    signature: str = "not applicable"
    watermark: str = "not checked"  # intact / changed / absent / not checked
    synthetic: SyntheticResult | None = None
    tamper: TamperResult | None = None
    findings: list[Finding] = field(default_factory=list)
    pixels: np.ndarray | None = field(default=None, repr=False)  # as displayed, 8-bit
    # with keep_pixels, for DICOM input: the data set (header) and its decoded stored values,
    # so later layers (drift monitoring) need not read and decode the file again
    dataset: object | None = field(default=None, repr=False)
    stored: np.ndarray | None = field(default=None, repr=False)
    modality: str = ""
    weak_evidence: list[str] = field(default_factory=list)  # makes the verdict suspicious
    pixels_vouched: bool = False  # valid trusted signatures vouch for the image (pixels, how
    # they are read and shown, and by default whose they are): VerificationReport.pixels_covered

    @property
    def synthetic_score(self) -> float | None:
        return self.synthetic.synthetic_score if self.synthetic else None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form with the documented keys path, synthetic_score, verdict, reasons."""
        return {
            "path": self.path,
            "verdict": self.verdict,
            "synthetic_score": (
                round(self.synthetic_score, 4) if self.synthetic_score is not None else None
            ),
            "reasons": self.reasons,
            "signature": self.signature,
            "watermark": self.watermark,
            "cues": [c.to_dict() for c in self.synthetic.cues] if self.synthetic else [],
            "tamper": self.tamper.to_dict() if self.tamper else None,
            "findings": [f.to_dict() for f in self.findings],
        }


# projection radiography: what the synthetic-image detector was trained on
RADIOGRAPHIC = {"CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG", "OT", ""}
TAMPER_MODALITIES = RADIOGRAPHIC | {"CT"}  # where the tamper layer was designed and measured


def _signature_layer(report: VerificationReport, result: ScanResult, trust: object) -> None:
    """The signature's verdict, in words, from the top-level signatures; nested ones are
    reported but never vouch for the image."""
    from radguard.provenance.policy import AlgorithmVerdict
    from radguard.provenance.verify import name_list

    result.signature = report.status
    top = report.top_level
    if report.status == "invalid":  # a signature that fails, or too many to check
        why = next((s.reason for s in top if s.status == "invalid"), report.error)
        result.reasons.append(f"signature does not hold: {why}")
    elif report.status == "weak":
        weak = next(s for s in top if s.status == "weak")
        result.reasons.append(f"signature too weak to count: {weak.reason}")
    elif report.status == "untrusted":
        result.reasons.append(
            "signature intact but its signer is not trusted"
            + ("" if trust else " (no --trust given)")
        )
    elif report.status == "valid" and not report.pixels_covered:
        result.reasons.append("signature valid but does not vouch for the image: not covered "
                              + (name_list(report.pixels_uncovered) or "(no pixel data)"))
    result.pixels_vouched = report.pixels_covered
    result.reasons.extend(f"signature {s.mac_id}: {s.reason}" for s in top
                          if s.status == "valid" and s.algorithm is AlgorithmVerdict.WEAK_ALLOWED)
    for nested in report.nested:
        if nested.status == "invalid":
            result.weak_evidence.append(f"signature in {nested.location} does not match its "
                                        f"item: {nested.reason}")
        else:
            result.reasons.append(f"signature in {nested.location} ({nested.status}) vouches "
                                  "for that item only, not for this image")


def _dicom_layers(path: Path, result: ScanResult, trust: object, key: object,
                  keep: bool, policy: AlgorithmPolicy | None,
                  coverage: Coverage | None) -> np.ndarray:
    from radguard.dicom.io import read_dataset
    from radguard.dicom.pixels import pixel_array
    from radguard.provenance.policy import DEFAULT_POLICY
    from radguard.provenance.profiles import Coverage
    from radguard.provenance.verify import verify_dataset

    ds = read_dataset(path, stop_before_pixels=False)
    report = verify_dataset(ds, trust, policy=policy or DEFAULT_POLICY,  # type: ignore[arg-type]
                            coverage=coverage or Coverage.IMAGE)
    _signature_layer(report, result, trust)
    result.modality = str(getattr(ds, "Modality", "") or "").upper()
    try:
        pixels = pixel_array(ds)  # decoded once: watermark, header checks and the display
    except RadguardError:
        result.findings = check_metadata(ds)  # reports the unreadable pixels as a finding
        raise
    if key is not None:
        from radguard.watermark import WatermarkError, check_dataset

        try:
            check = check_dataset(ds, key, pixels)  # type: ignore[arg-type]
            result.watermark = "intact" if check.intact else "changed"
            if check.regions:
                result.reasons.append(
                    f"watermark: {len(check.regions)} changed region(s) {check.regions[:3]}"
                )
        except WatermarkError as exc:
            result.watermark = "absent"
            result.reasons.append(f"watermark: {exc}")
    result.findings = check_metadata(ds, pixels=pixels)
    if keep:
        result.dataset, result.stored = ds, pixels
    return display_frame(ds, pixels)


def scan_file(
    path: str | os.PathLike[str],
    *,
    trust: object = None,
    watermark_key: object = None,
    detector: SyntheticDetector | None = None,
    keep_pixels: bool = False,
    trust_signed_pixels: bool = False,
    policy: AlgorithmPolicy | None = None,
    coverage: Coverage | None = None,
) -> ScanResult:
    """Scan one file; never raises for bad input (the verdict is then ``unverifiable``).

    ``trust_signed_pixels`` skips the content detectors (synthetic image, copy-move, fill /
    splice) when valid top-level signatures that chain to ``trust`` vouch for the image
    (``VerificationReport.pixels_covered``): the pixels are then provably the device's,
    and a statistical detector could only add false alarms (about 5% of real radiographs at
    its threshold). Header checks and the watermark still run. ``policy``: which signature
    algorithms count (default: :data:`~radguard.provenance.policy.DEFAULT_POLICY`);
    ``coverage``: what signatures must cover to vouch for the image (default ``image``).
    """
    p = Path(path)
    result = ScanResult(str(p))
    det = detector or load_detector()
    try:
        if is_dicom_path(p):
            pixels = _dicom_layers(p, result, trust, watermark_key, keep_pixels, policy,
                                   coverage)
        else:
            pixels = read_for_analysis(p)
    except RadguardError as exc:
        result.reasons.append(str(exc))
        return result
    if trust_signed_pixels and result.pixels_vouched:
        result.reasons.append("content detectors skipped: a trusted signature covers the "
                              "image and everything that changes what it shows")
        if keep_pixels:
            result.pixels = pixels
        _decide(result, det.threshold, det.suspicious_threshold)
        return result
    prepared = None  # the analysis form both content detectors read, made once
    try:
        if result.modality in RADIOGRAPHIC:
            prepared = Prepared.of(pixels)
            result.synthetic = det.analyse(pixels, prepared)
        else:
            result.reasons.append(
                f"synthetic-image detector not applied: trained on projection radiographs, "
                f"not {result.modality}"
            )
    except RadguardError as exc:
        result.reasons.append(f"image content cannot be judged: {exc}")
    if result.modality not in TAMPER_MODALITIES:
        result.reasons.append(f"tamper detector not applied to {result.modality}")
    else:
        try:
            # the learned fill / splice layer was trained on projection radiographs only
            result.tamper = detect_tamper(pixels, local=result.modality in RADIOGRAPHIC,
                                          prepared=prepared)
        except RadguardError as exc:
            result.reasons.append(f"tamper detector: {exc}")
    if keep_pixels:
        result.pixels = pixels
    _decide(result, det.threshold, det.suspicious_threshold)
    return result


def _decide(r: ScanResult, threshold: float, band: float) -> None:
    """Combine the layers into one verdict; strongest evidence first."""
    # a signature vouches only when it covers the image and all that changes what it shows:
    # one over a few header elements, or one that misses an added overlay, says nothing
    vouched = r.pixels_vouched or r.watermark == "intact"
    declared = any(f.code == "synthetic-data" for f in r.findings)
    score = r.synthetic_score
    tampered = r.signature == "invalid" or r.watermark == "changed"
    if r.tamper is not None and r.tamper.copy_move:
        tampered = True
        r.reasons.append(
            f"copy-move: {len(r.tamper.copy_move)} region(s) duplicated "
            f"elsewhere in the image {r.tamper.copy_move[:3]}"
        )
    weak = list(r.weak_evidence)
    if r.tamper is not None and r.tamper.local_edits:
        found = (
            f"local edit (fill or splice): {len(r.tamper.local_edits)} region(s) "
            f"{r.tamper.local_edits[:3]}, score {r.tamper.local_edit_score:.2f} >= "
            f"{r.tamper.local_edit_threshold:.2f}"
        )
        if vouched:  # the device's own pixels: a detector alarm is a question, not proof
            weak.append(found)
        else:
            tampered = True
            r.reasons.append(found)
    if score is not None and score >= threshold:
        r.reasons.append(f"synthetic score {score:.2f} >= threshold {threshold:.2f}")
        r.reasons.extend(r.synthetic.reasons() if r.synthetic else [])
    if declared:
        r.reasons.append("declared synthetic: Synthetic Data (0008,001C) = YES")
    weak += [
        f"header: {f.message}"
        for f in r.findings
        if f.severity == "high" and f.code != "synthetic-data"
    ]
    if score is not None and band <= score < threshold:
        weak.append(
            f"synthetic score {score:.2f} in the doubtful band [{band:.2f}, {threshold:.2f})"
        )
    r.reasons.extend(weak)
    if tampered:
        r.verdict = "tampered"
    elif declared or (score is not None and score >= threshold and not vouched):
        r.verdict = "synthetic"
    elif weak or (score is not None and score >= threshold) \
            or r.signature in ("untrusted", "weak"):
        r.verdict = "suspicious"
    elif score is None and not vouched:
        r.verdict = "unverifiable"
    else:
        r.verdict = "authentic"
        if not vouched:
            r.reasons.append("no signature or watermark vouches for it: judged on content only")


def write_heatmap(result: ScanResult, path: str | os.PathLike[str]) -> None:
    """Save the image with the detector's heat map (red = synthetic-looking blocks) and tamper
    regions outlined, as PNG."""
    from PIL import Image, ImageDraw

    from radguard.fileio import atomic_write_bytes
    from radguard.images import blend_heat, window_to_8bit

    if result.pixels is None or result.synthetic is None:
        raise RadguardError(f"{result.path}: nothing to draw")
    grey = window_to_8bit(result.pixels if result.pixels.ndim == 2 else result.pixels.mean(axis=-1))
    h, w = grey.shape
    heat = result.synthetic.heatmap
    full = np.zeros((h, w))
    if heat.size:  # block probabilities spread over the pixels they describe
        cell = result.synthetic.block_size
        ys = np.minimum((np.arange(h) / cell).astype(int), heat.shape[0] - 1)
        xs = np.minimum((np.arange(w) / cell).astype(int), heat.shape[1] - 1)
        full = heat[ys][:, xs]
    im = Image.fromarray(blend_heat(grey, full))
    draw = ImageDraw.Draw(im)
    line = max(2, min(h, w) // 300)
    for x0, y0, x1, y1 in result.tamper.regions if result.tamper else []:
        draw.rectangle(
            [x0 - line, y0 - line, x1 + line - 1, y1 + line - 1], outline=(255, 220, 0), width=line
        )
    import io

    buf = io.BytesIO()
    im.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())
