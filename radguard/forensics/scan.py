"""One verdict per image from every layer that can speak about it.

Layers, strongest first: the PS3.15 signature (DICOM; only valid top-level signatures that
cover every present element that changes what the image shows or means vouch for it, see
``VerificationReport.pixels_covered``), the fragile watermark (when a key is configured),
the declared Synthetic Data attribute, the local tamper detectors (copy-move; the learned
fill / splice detector), the synthetic-radiograph detector and the header checks.

The content detectors' scores are judged against an :class:`~radguard.forensics.calibration.
OperatingPoint`: the shipped global thresholds (``radguard scan`` without ``--source``), or
the image's source's own, set conformally on that source's known-real images
(:mod:`~radguard.forensics.calibration`). With the watermark key, an image whose radguard
watermark is intact is restored first and the detectors read the original - exactly the
device's pixels - so the two layers never fight. Verdicts:

* ``tampered``     - a signature no longer matches, the watermark shows changed blocks, or
  (on an image no signature or watermark vouches for) a copy-move or a fill / splice found
  at a strong operating point, always with its region;
* ``synthetic``    - declared synthetic, or (on an image nothing vouches for) a synthetic
  score above a strong operating point's threshold;
* ``suspicious``   - weaker evidence: a high-severity header finding, a detector alarm at a
  provisional calibration (or without a region), a score in the global point's doubtful
  band, a signer that is not trusted, a signature too weak to count (MD5, SHA-1, short
  key), or a signature inside a sequence item that no longer matches its item;
* ``unverifiable`` - no layer could speak: the file or its pixel data cannot be read, or
  nothing vouches for a readable image and no content detector can judge it - its modality
  is one they do not cover (CT, MR, US...), it is too small, or its source is not calibrated
  yet ("no provenance and no calibration for this source"). :attr:`ScanResult.readable`
  tells an unreadable file from a readable one nobody could judge;
* ``authentic``    - a signature or the watermark vouches for it, or the content detectors
  judged it and found nothing.

A detector never judges an image a signature or intact watermark vouches for: its pixels are
provably the device's, and a statistical alarm there could only be a false one. Its scores
still run when asked (``trust_signed_pixels`` off, or ``run_on_vouched``) and feed its
source's calibration.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from radguard.errors import RadguardError
from radguard.forensics.calibration import OperatingPoint, Threshold
from radguard.forensics.cues import Prepared
from radguard.forensics.metadata import Finding, check_metadata
from radguard.forensics.synthetic import SyntheticDetector, SyntheticResult, load_detector
from radguard.forensics.tamper import TamperResult, detect_tamper
from radguard.images import display_frame, is_dicom_path, read_for_analysis

if TYPE_CHECKING:
    from radguard.provenance.policy import AlgorithmPolicy
    from radguard.provenance.profiles import Coverage
    from radguard.provenance.verify import VerificationReport

__all__ = ["NO_CALIBRATION", "VERDICTS", "ScanResult", "judge", "scan_file", "write_heatmap"]

VERDICTS = ("authentic", "suspicious", "synthetic", "tampered", "unverifiable")
NO_CALIBRATION = "no provenance and no calibration for this source"


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
    # as displayed, 8-bit (the restored original when radguard's intact watermark was
    # removed for the detectors)
    pixels: np.ndarray | None = field(default=None, repr=False)
    # with keep_pixels, for DICOM input: the data set (header) and its decoded stored values,
    # so later layers (drift monitoring) need not read and decode the file again
    dataset: object | None = field(default=None, repr=False)
    stored: np.ndarray | None = field(default=None, repr=False)
    modality: str = ""
    station: str = ""  # StationName (DICOM), for sources keyed by station
    weak_evidence: list[str] = field(default_factory=list)  # makes the verdict suspicious
    pixels_vouched: bool = False  # valid trusted signatures vouch for the image (pixels, how
    # they are read and shown, and by default whose they are): VerificationReport.pixels_covered
    readable: bool = False  # the pixels were decoded: an unreadable file is the only
    # unverifiable image the gateway quarantines for being unverifiable
    image: bool = True  # False: an object without pixel data (SR, KO, PR, ...): only its
    # signature and header can be checked, and there are no pixels to be unreadable
    restored: bool = False  # the detectors read the watermark-restored original
    marked: bool = False  # carries radguard's watermark block (key or not): unless restored,
    # its pixels are not exactly the device's and its scores are no known-real evidence
    point: OperatingPoint | None = field(default=None, repr=False)  # what it was judged by
    # what the layers said before any verdict (judge() can be run again with another point)
    layer_reasons: list[str] | None = field(default=None, repr=False)
    layer_weak: list[str] | None = field(default=None, repr=False)
    # the fill / splice boxes at the point it was judged by (None: the detector's own)
    edit_regions: list[list[int]] | None = None

    @property
    def regions(self) -> list[list[int]]:
        """The tamper boxes the verdict rests on: copy-moves and the fill / splice boxes
        at the operating point it was judged by."""
        if self.tamper is None:
            return []
        edits = self.tamper.local_edits if self.edit_regions is None else self.edit_regions
        return self.tamper.copy_move + edits

    @property
    def synthetic_score(self) -> float | None:
        return self.synthetic.synthetic_score if self.synthetic else None

    @property
    def vouched(self) -> bool:
        """A trusted signature or radguard's intact watermark vouches for the pixels."""
        return self.pixels_vouched or self.watermark == "intact"

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
            "tamper": ({**self.tamper.to_dict(), "local_edits": self.regions[
                len(self.tamper.copy_move):]} if self.tamper else None),
            "findings": [f.to_dict() for f in self.findings],
            "operating_point": self.point.to_dict() if self.point else None,
        }

    def portable(self) -> ScanResult:
        """A copy without the pixels and the data set (small enough to send between
        processes; :func:`judge` still works on it)."""
        return replace(self, pixels=None, dataset=None, stored=None)


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
    result.station = str(getattr(ds, "StationName", "") or "").strip()
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        result.image = False
        result.findings = check_metadata(ds)
        kind = result.modality or "no modality"
        raise NotAnImage(f"no pixel data: a non-image object ({kind}); its signature and "
                         "header were checked, no content detector applies")
    try:
        pixels = pixel_array(ds)  # decoded once: watermark, header checks and the display
    except RadguardError:
        result.findings = check_metadata(ds)  # reports the unreadable pixels as a finding
        raise
    result.readable = True
    analysed = pixels
    result.marked = _has_watermark_block(ds)
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
        if result.watermark == "intact":
            analysed = _restored(ds, key, pixels, result)
    result.findings = check_metadata(ds, pixels=pixels)
    if keep:
        result.dataset, result.stored = ds, pixels
    return display_frame(ds, analysed)


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class NotAnImage(RadguardError):
    """The object has no pixel data (an SR, KO, PR, ...): nothing for the content layers."""


def _trust_store(trust: object) -> object:
    """``trust`` as a TrustStore: one as given, or certificate paths (a path or a list of
    them) loaded; anything else is a programming error, said at once (not a signature
    verdict)."""
    from radguard.provenance.trust import TrustStore

    if trust is None or isinstance(trust, TrustStore):
        return trust
    if isinstance(trust, (str, os.PathLike)):
        return TrustStore.from_paths([trust])
    if isinstance(trust, (list, tuple)) and all(isinstance(t, (str, os.PathLike))
                                                for t in trust):
        return TrustStore.from_paths(trust)
    raise TypeError(f"trust: a TrustStore or certificate paths, not {type(trust).__name__}")


def _has_watermark_block(ds: object) -> bool:
    """Whether the data set carries radguard's watermark private block."""
    from radguard.watermark.dicom import PRIVATE_CREATOR, PRIVATE_GROUP

    try:
        ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)  # type: ignore[attr-defined]
    except (KeyError, ValueError, AttributeError):
        return False
    return True


def _restored(ds: object, key: object, pixels: np.ndarray, result: ScanResult) -> np.ndarray:
    """The first frame's original stored values under radguard's intact watermark (the
    display and the detectors read only the first frame), bit for bit; ``pixels`` when it
    cannot be restored (said in the reasons)."""
    from radguard.dicom.pixels import pixel_info
    from radguard.watermark import WatermarkError, restore_frame

    info = pixel_info(ds)  # type: ignore[arg-type]
    try:
        if info.frames > 1:
            original = pixels.copy()
            original[0], _ = restore_frame(pixels[0], key, lo=info.min_value,  # type: ignore[arg-type]
                                           hi=info.max_value)
        else:
            original, _ = restore_frame(pixels, key, lo=info.min_value,  # type: ignore[arg-type]
                                        hi=info.max_value)
    except WatermarkError as exc:
        result.reasons.append(f"watermark intact but not restorable ({exc}): the detectors "
                              "read the watermarked pixels")
        return pixels
    result.restored = True
    return np.asarray(original).astype(pixels.dtype, copy=False)


def scan_file(
    path: str | os.PathLike[str],
    *,
    trust: object = None,  # a TrustStore, or certificate path(s)
    watermark_key: object = None,
    detector: SyntheticDetector | None = None,
    keep_pixels: bool = False,
    trust_signed_pixels: bool = False,
    policy: AlgorithmPolicy | None = None,
    coverage: Coverage | None = None,
    point: OperatingPoint | None = None,
    run_on_vouched: Callable[[ScanResult], bool] | None = None,
) -> ScanResult:
    """Scan one file; never raises for bad input (the verdict is then ``unverifiable``).

    ``trust_signed_pixels`` skips the content detectors (synthetic image, copy-move, fill /
    splice) when valid top-level signatures that chain to ``trust`` vouch for the image
    (``VerificationReport.pixels_covered``): the pixels are then provably the device's, and
    the detectors could not change the verdict. ``run_on_vouched(result)`` (called after the
    provenance layers) can ask for them anyway - the gateway does, to calibrate the image's
    source. Header checks and the watermark always run. ``point``: the thresholds the
    detectors' scores are judged by (default: the shipped global point of ``detector``);
    ``policy``: which signature algorithms count (default:
    :data:`~radguard.provenance.policy.DEFAULT_POLICY`); ``coverage``: what signatures must
    cover to vouch for the image (default ``image``).
    """
    p = Path(path)
    result = ScanResult(str(p))
    det = detector or load_detector()
    point = point or OperatingPoint.shipped(det)
    trust = _trust_store(trust)
    try:
        if is_dicom_path(p):
            pixels = _dicom_layers(p, result, trust, watermark_key, keep_pixels, policy,
                                   coverage)
        else:
            pixels = read_for_analysis(p)
            result.readable = True
    except RadguardError as exc:
        result.reasons.append(str(exc))
        judge(result, point)
        return result
    if trust_signed_pixels and result.pixels_vouched and not (
            run_on_vouched is not None and run_on_vouched(result)):
        result.reasons.append("content detectors skipped: a trusted signature covers the "
                              "image and everything that changes what it shows")
    else:
        _content_layers(result, pixels, det)
    if keep_pixels:
        result.pixels = pixels
    judge(result, point)
    return result


def _content_layers(result: ScanResult, pixels: np.ndarray, det: SyntheticDetector) -> None:
    """The synthetic-image detector and the tamper detectors, where they apply."""
    try:  # the analysis form both content detectors read, made once; what it refuses (a
        # flat or near-flat image, a strip, too small) no content detector can judge
        prepared = Prepared.of(pixels)
    except RadguardError as exc:
        result.reasons.append(f"image content cannot be judged: {exc}")
        return
    try:
        if result.modality in RADIOGRAPHIC:
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
        return
    try:
        # the learned fill / splice layer was trained on projection radiographs only
        result.tamper = detect_tamper(pixels, local=result.modality in RADIOGRAPHIC,
                                      prepared=prepared)
    except RadguardError as exc:
        result.reasons.append(f"tamper detector: {exc}")


def _edit_boxes(tamper: TamperResult, limit: Threshold) -> list[list[int]]:
    """The fill / splice regions at ``limit``: the cells of the windows that reach it (the
    local-edit detector's own rule), from its cell map; its own boxes when there is no map."""
    if tamper.local_edit_map is None or tamper.local_edit_score is None:
        return tamper.local_edits
    try:
        from radguard.forensics.localnet import CELL, LocalEditMap
        from radguard.regions import mask_boxes

        value = float(np.nextafter(limit.value, np.inf)) if limit.strict else limit.value
        edited = LocalEditMap(tamper.local_edit_map, tamper.local_edit_score, value).edited
        cell = tamper.local_edit_cell
        return [[int(round(v * cell / CELL)) for v in box] for box in mask_boxes(edited, CELL)]
    except (ImportError, AttributeError, TypeError, ValueError):  # another detector's map
        return tamper.local_edits


def judge(r: ScanResult, point: OperatingPoint) -> None:
    """Combine the layers into one verdict against ``point``, strongest evidence first (see
    the module docstring). Can be run again with another point: it starts from what the
    layers said."""
    if r.layer_reasons is None:
        r.layer_reasons, r.layer_weak = list(r.reasons), list(r.weak_evidence)
    r.point, r.edit_regions = point, None
    reasons, weak = list(r.layer_reasons), list(r.layer_weak or [])
    declared = any(f.code == "synthetic-data" for f in r.findings)
    tampered = r.signature == "invalid" or r.watermark == "changed"
    synthetic = declared
    judged, silent = _content_evidence(r, point, reasons, weak)
    if declared:
        reasons.append("declared synthetic: Synthetic Data (0008,001C) = YES")
        synthetic = True
    # (pixels that cannot be decoded are said once, and make the image unverifiable)
    weak += [f"header: {f.message}" for f in r.findings
             if f.severity == "high" and f.code not in ("synthetic-data", "pixels-unreadable")]
    tampered |= judged == "tampered"
    synthetic |= judged == "synthetic"
    reasons.extend(weak)
    if tampered:
        r.verdict = "tampered"
    elif synthetic:
        r.verdict = "synthetic"
    elif weak or r.signature in ("untrusted", "weak"):
        r.verdict = "suspicious"
    elif r.vouched:
        r.verdict = "authentic"
    elif judged == "clear":
        r.verdict = "authentic"
        how = ("the shipped operating point, set for few false alarms on any hospital's "
               "images: it misses most fakes from generators it never saw (calibrate the "
               "source: radguard forensics calibrate)"
               if point.is_global and point.source is None
               else f"source {point.source}'s calibration")
        reasons.append(f"no signature or watermark vouches for it: judged on content only, "
                       f"against {how}")
    else:
        r.verdict = "unverifiable"
        if r.readable:
            reasons.append(silent)
    r.reasons = reasons


def _content_evidence(r: ScanResult, point: OperatingPoint, reasons: list[str],
                      weak: list[str]) -> tuple[str, str]:
    """What the content detectors' findings amount to at ``point``: ``tampered`` /
    ``synthetic`` (strong), ``clear`` (judged, nothing found, or only weak evidence, which
    goes to ``weak``), or ``none`` (nothing judged) with why nothing could be."""
    syn, tam = r.synthetic_score, r.tamper
    edit = tam.local_edit_score if tam is not None else None
    if r.vouched:
        if syn is not None or edit is not None:
            what = "signature" if r.pixels_vouched else "watermark"
            reasons.append(f"content detectors do not judge an image its {what} vouches for "
                           f"(scores kept for its source's calibration)")
        return "none", ""
    if syn is None and edit is None and not (tam is not None and tam.copy_move):
        if not r.readable:
            return "none", ""
        if r.modality not in RADIOGRAPHIC:
            return "none", (f"no signature or watermark vouches for it, and no content "
                            f"detector covers {r.modality}: nothing could judge it")
        return "none", "no signature or watermark vouches for it, and its content cannot be judged"
    qualifier = f" ({point.note})" if point.note else ""
    found, judged = "clear", False
    if tam is not None and tam.copy_move:
        text = (f"copy-move: {len(tam.copy_move)} region(s) duplicated elsewhere in the "
                f"image {tam.copy_move[:3]}")
        if point.strong:
            found = "tampered"
            reasons.append(text)
        else:
            weak.append(text + qualifier)
        judged = True
    limit = point.local_edit
    if limit is None and point.is_global and tam is not None and \
            tam.local_edit_threshold is not None:
        limit = Threshold(tam.local_edit_threshold, strong=True)
    if edit is not None and limit is not None:
        judged = True
        r.edit_regions = []  # none at this point unless it fires
        if limit.fires(edit):
            boxes = _edit_boxes(tam, limit)  # type: ignore[arg-type]
            r.edit_regions = boxes
            text = (f"local edit (fill or splice): {len(boxes)} region(s) {boxes[:3]}, "
                    f"score {edit:.2f} {limit.describe()}")
            if limit.strong and boxes:
                found = "tampered"
                reasons.append(text)
            else:
                weak.append(text + (qualifier if not limit.strong else
                                    " (no region reaches it: not an accusation)"))
    if syn is not None and point.synthetic is not None:
        judged = True
        if point.synthetic.fires(syn):
            texts = [f"synthetic score {syn:.2f} {point.synthetic.describe()}"]
            texts += r.synthetic.reasons() if r.synthetic else []
            if point.synthetic.strong:
                found = "synthetic" if found == "clear" else found
                reasons.extend(texts)
            else:
                weak.append(texts[0] + qualifier)
                weak.extend(texts[1:])
        elif point.synthetic_band is not None and syn >= point.synthetic_band:
            weak.append(f"synthetic score {syn:.2f} in the doubtful band "
                        f"[{point.synthetic_band:.2f}, {point.synthetic.value:.2f})")
    if judged:
        return found, ""
    scores = ", ".join(f"{name} score {v:.2f}" for name, v in
                       (("synthetic", syn), ("local-edit", edit)) if v is not None)
    return "none", f"{NO_CALIBRATION} ({point.note}; {scores} not judged)"


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
    for x0, y0, x1, y1 in result.regions:
        draw.rectangle(
            [x0 - line, y0 - line, x1 + line - 1, y1 + line - 1], outline=(255, 220, 0), width=line
        )
    import io

    buf = io.BytesIO()
    im.save(buf, "PNG")
    atomic_write_bytes(path, buf.getvalue())
