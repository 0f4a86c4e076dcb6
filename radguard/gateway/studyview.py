"""What the study page says about each image, in a radiologist's words (issue 27).

The page shows the triage result as it is read: probability, suspicion (1-10), the model's
operating point (its name and threshold) and whether the image is above it, the model and
its version; or "not scored" with the reason - never ``None`` or a JSON blob. The triage
model's saliency map is offered beside the image when the model that scored it is the one
loaded now and can draw one; the forensic evidence map only where it matters (a verdict
other than authentic). :func:`brief` shortens a long reason at a word boundary for a table
cell or a console column (the full text goes in a tooltip).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["AiResult", "ai_result", "brief", "checks", "forensic_map_matters"]

_POINT_NAMES = {"sensitivity": "high-sensitivity operating point",
                "specificity": "high-specificity operating point",
                "cost": "minimum-cost operating point"}


def brief(text: object, width: int = 60, ellipsis: str = "\u2026") -> str:
    """``text`` in at most ``width`` characters: whole words, ``ellipsis`` where cut (a word
    longer than ``width`` on its own is cut inside)."""
    text = " ".join(str(text or "").split())
    if len(text) <= width:
        return text
    room = max(width - len(ellipsis), 1)
    cut = text[:room + 1].rsplit(" ", 1)[0] if " " in text[:room + 1] else text[:room]
    return cut[:room].rstrip(" ,;:-(") + ellipsis


@dataclass
class AiResult:
    """The triage result of one image as the study page shows it."""

    scored: bool
    reason: str = ""  # why not scored
    probability: str = ""
    suspicion: str = ""  # "9/10"
    above: bool = False  # at or above the operating point
    point: str = ""  # the operating point used, in words
    model: str = ""
    version: str = ""
    saliency: bool = False  # the saliency route can draw the scoring model's map
    notes: list[str] = field(default_factory=list)


def _percent(value: object) -> str:
    try:
        return f"{float(value):.0%}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "?"


def _operating_point(model: Any) -> str:  # noqa: ANN401 (radguard.triage.model.TriageModel)
    """The operating point of a loaded triage model: its name and threshold, and what it
    did where it was chosen."""
    metrics = getattr(getattr(model, "card", None), "metrics", None) or {}
    point = metrics.get("operating_point") if isinstance(metrics, dict) else None
    threshold = getattr(model, "threshold", None)  # what ``positive`` was decided by
    if threshold is None and isinstance(point, dict):
        threshold = point.get("threshold")
    if isinstance(point, dict) and point.get("threshold") is not None and \
            abs(float(point["threshold"]) - float(threshold)) < 1e-9:  # the card's point
        name = _POINT_NAMES.get(str(point.get("method")), "operating point")
        measured = ""
        if point.get("sensitivity") is not None and point.get("specificity") is not None:
            measured = (f" (sensitivity {_percent(point['sensitivity'])}, specificity "
                        f"{_percent(point['specificity'])} on the set it was chosen on)")
        return f"{name}: probability \u2265 {float(threshold):.2f}{measured}"
    if threshold is None:
        return "not stated by the model"
    return f"operating point: probability \u2265 {float(threshold):.2f}"


def ai_result(row: Any, models: dict[str, Any]) -> AiResult:  # noqa: ANN401
    """The triage result recorded for ``row`` (a store Instance); ``models``: the
    gateway's triage models by modality (upper case)."""
    triage = (row.detail or {}).get("triage")
    model = models.get(str(row.modality or "").upper())
    if not isinstance(triage, dict) or row.ai_probability is None:
        if isinstance(triage, str) and triage.startswith("not scored"):
            reason = triage.removeprefix("not scored").lstrip(": ") or "no reason recorded"
        elif isinstance(triage, str) and triage:
            reason = triage  # "not configured for this modality"
            if "not configured" in triage:
                reason = f"no triage model is configured for {row.modality or 'this modality'}"
        elif row.state == "rejected":
            reason = "the image was rejected before the AI read it"
        elif row.state in ("queued", "processing", "forwarding"):
            reason = "still being checked"
        elif model is None:
            reason = f"no triage model is configured for {row.modality or 'this modality'}"
        else:
            reason = "no AI result was recorded for this image"
        return AiResult(False, reason=reason)
    name, version = str(triage.get("model") or "?"), str(triage.get("version") or "?")
    suspicion = triage.get("suspicion", row.ai_suspicion)
    result = AiResult(True, probability=f"{float(row.ai_probability):.2f}",
                      suspicion=f"{suspicion}/10" if suspicion is not None else "-",
                      above=bool(triage.get("positive")), model=name, version=version)
    same = model is not None and (model.card.name, model.card.version) == (name, version)
    if same:
        result.point = _operating_point(model)
        from radguard.triage.model import TriageModel

        # the base class's saliency() only says the model draws none
        result.saliency = callable(getattr(model, "saliency", None)) and \
            getattr(type(model), "saliency", None) is not TriageModel.saliency
        if not result.saliency:
            result.notes.append(f"model {name} draws no saliency map")
    else:
        result.point = "the operating point of this model version (not loaded now)"
        result.notes.append(f"scored by {name} {version}, which this gateway no longer runs: "
                            "no saliency map")
    return result


def forensic_map_matters(row: Any) -> bool:  # noqa: ANN401
    """The forensic evidence map is shown only for an image not judged authentic (and
    judged at all: unverifiable means no detector could judge it)."""
    return row.verdict not in (None, "", "authentic", "unverifiable")


_SIGNATURE = {"valid": "valid", "unsigned": "none", "invalid": "invalid (changed after signing)",
              "untrusted": "not from a trusted signer", "weak": "too weak to count"}
_WATERMARK = {"intact": "intact", "changed": "changed (pixels edited after acquisition)",
              "absent": "none", "none": "none"}


def checks(row: Any) -> list[tuple[str, str]]:  # noqa: ANN401
    """(label, text) rows for the provenance and forensics checks of ``row``; no value is
    shown as None."""
    detail = row.detail or {}
    scan = detail.get("scan") if isinstance(detail.get("scan"), dict) else {}
    if not scan:
        waiting = row.state in ("queued", "processing", "forwarding")
        why = "still being checked" if waiting else "no check result recorded"
        return [("checks", why)]
    signature, watermark = scan.get("signature"), scan.get("watermark")
    rows = [("signature", _SIGNATURE.get(str(signature), str(signature)) if signature
             else "not checked"),
            ("watermark", _WATERMARK.get(str(watermark), str(watermark)) if watermark
             else "not checked")]
    verdict = row.verdict or scan.get("verdict")
    score = scan.get("synthetic_score")
    if score is None:
        why = next((r for r in scan.get("reasons", []) if "detector" in str(r)),
                   "the synthetic-image detector did not run on this image")
        rows.append(("forensics", f"{verdict or 'not judged'}; synthetic-image score: not "
                                  f"scored ({why})"))
    else:
        rows.append(("forensics", f"{verdict or 'not judged'}; synthetic-image score "
                                  f"{float(score):.3f}"))
    return rows
