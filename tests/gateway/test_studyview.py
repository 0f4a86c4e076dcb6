"""The study page's words (issue 27): reasons cut at a word, the AI result as a radiologist
reads it, "not scored" with the reason, never None."""

from __future__ import annotations

from types import SimpleNamespace

from radguard.gateway.studyview import ai_result, brief, checks, forensic_map_matters


def test_brief_cuts_at_a_word_with_an_ellipsis():
    text = "content detectors do not judge an image its signature vouches for (scores kept)"
    assert brief(text, 60) == "content detectors do not judge an image its signature\u2026"
    assert brief(text, 60, "...") == "content detectors do not judge an image its signature..."
    assert brief("short", 60) == "short" and brief(None) == "" and brief("a  b\nc") == "a b c"
    assert brief("x" * 80, 10) == "x" * 9 + "\u2026"  # one long word: cut inside it
    assert brief("signature invalid (changed after signing)", 20) == "signature invalid\u2026"


def _row(detail, state="done", modality="DX", probability=None, suspicion=None,
         verdict="authentic"):
    return SimpleNamespace(detail=detail, state=state, modality=modality, verdict=verdict,
                           ai_probability=probability, ai_suspicion=suspicion)


class _Model:
    def __init__(self, version="1.0", saliency=True):
        self.card = SimpleNamespace(name="chest", version=version, metrics={
            "operating_point": {"threshold": 0.3, "method": "specificity",
                                "sensitivity": 0.8, "specificity": 0.9}})
        self.threshold = 0.3
        if saliency:
            self.saliency = lambda pixels: pixels


def test_not_scored_always_says_why():
    cases = [(_row({"triage": "not configured for this modality"}, modality="CT"),
              "no triage model is configured for CT"),
             (_row({"triage": "not scored: a colour image, not a radiograph"}),
              "a colour image, not a radiograph"),
             (_row({}, state="rejected"), "the image was rejected before the AI read it"),
             (_row({}, state="queued"), "still being checked"),
             (_row({}, modality="OT"), "no triage model is configured for OT")]
    for row, reason in cases:
        result = ai_result(row, {"DX": _Model()})
        assert not result.scored and result.reason == reason and not result.saliency


def test_a_scored_image_in_words():
    triage = {"probability": 0.8123, "suspicion": 8, "positive": True, "model": "chest",
              "version": "1.0"}
    row = _row({"triage": triage}, probability=0.8123, suspicion=8)
    result = ai_result(row, {"DX": _Model()})
    assert (result.probability, result.suspicion, result.above) == ("0.81", "8/10", True)
    assert result.point == ("high-specificity operating point: probability \u2265 0.30 "
                            "(sensitivity 80%, specificity 90% on the set it was chosen on)")
    assert (result.model, result.version, result.saliency) == ("chest", "1.0", True)
    # a threshold in use other than the card's point: that threshold, without the card's name
    model = _Model()
    model.threshold = 0.5
    assert ai_result(row, {"DX": model}).point == "operating point: probability \u2265 0.50"
    # scored by a model version no longer loaded: no saliency map from another model
    result = ai_result(row, {"DX": _Model(version="2.0")})
    assert result.scored and not result.saliency and "no longer runs" in result.notes[0]


def test_checks_and_the_forensic_map_show_no_none():
    row = _row({"scan": {"signature": None, "watermark": "not checked", "verdict": None,
                         "synthetic_score": None,
                         "reasons": ["no content detector applies to CT"]}}, verdict=None)
    text = " ".join(t for _, t in checks(row))
    assert "None" not in text and "not scored (no content detector applies to CT)" in text
    assert checks(_row({}, state="queued")) == [("checks", "still being checked")]
    assert [forensic_map_matters(_row({}, verdict=v)) for v in
            ("authentic", "unverifiable", None, "tampered", "synthetic", "suspicious")] == \
        [False, False, False, True, True, True]
