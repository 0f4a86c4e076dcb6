"""Synthetic-radiograph detector: a probability that an image is AI-generated, and why.

Two small models, both shipped as plain numbers in ``forensics/data/synthetic_detector.json``
and reproduced by ``scripts/train_synthetic_detector.py``:

1. a **block model** (logistic regression on :data:`cues.BLOCK_CUES` of every 32 x 32 block)
   whose probabilities form the heat map of where the evidence lies;
2. an **image model** on the named cues of :mod:`cues` (with the physics cues - noise that
   follows brightness, detail consistent across scales, decoder-grid peaks - when the
   weights were trained with them), the residual co-occurrences, the block model's mean and
   90th-percentile logit, and the analysed size (a conditioning input: real images are
   delivered at the generators' sizes too, so size alone separates nothing): perceptrons
   averaged with gradient-boosted trees' probability.

The shipped operating point (``threshold`` for 'synthetic', ``suspicious_threshold`` for
'suspicious') is chosen leave-one-source-out: the worst held-out real source's upper
quantiles, never a source's own scores. Per-source conformal calibration
(:mod:`radguard.forensics.calibration`) replaces it where known-real images exist.

Each named cue is reported with its value and its percentile among real training
radiographs, so a reader sees e.g. "noise does not follow brightness: 1st percentile of real".
Inference is numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from radguard.errors import RadguardError
from radguard.fileio import read_json_object
from radguard.forensics.cues import (
    BLOCK,
    CUE_NAMES,
    PHYSICS_CUE_NAMES,
    Prepared,
    block_cues,
    image_cues,
    physics_cues,
)

__all__ = [
    "Cue",
    "SyntheticDetector",
    "SyntheticResult",
    "WEIGHTS_PATH",
    "feature_vector",
    "load_detector",
]

WEIGHTS_PATH = Path(__file__).with_name("data") / "synthetic_detector.json"


@dataclass
class Cue:
    """One named piece of evidence."""

    name: str
    description: str
    value: float
    real_percentile: float  # where the value falls among real training radiographs (0-100)

    @property
    def unusual(self) -> bool:
        """Outside the central 95% of real radiographs."""
        return self.real_percentile < 2.5 or self.real_percentile > 97.5

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "description": self.description,
            "value": round(self.value, 4),
            "real_percentile": round(self.real_percentile, 1),
            "unusual": self.unusual,
        }


@dataclass
class SyntheticResult:
    """Score, evidence and heat map for one image."""

    synthetic_score: float
    cues: list[Cue]
    heatmap: np.ndarray  # block probabilities, one per BLOCK x BLOCK block of the analysed image
    block_size: float  # heat-map block edge in pixels of the input image

    def reasons(self, limit: int = 3) -> list[str]:
        """The most unusual cues, in words."""
        ranked = sorted(
            (c for c in self.cues if c.unusual), key=lambda c: -abs(c.real_percentile - 50)
        )
        return [
            f"{c.description}: {c.value:.3g} ({c.real_percentile:.1f}th percentile "
            f"of real radiographs)"
            for c in ranked[:limit]
        ]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (heat map left out: it goes to a PNG)."""
        return {
            "synthetic_score": round(self.synthetic_score, 4),
            "cues": [c.to_dict() for c in self.cues],
        }


def feature_vector(
    cues: dict[str, float], cooc: np.ndarray, block_logits: np.ndarray, short_side: int,
    physics: np.ndarray | None = None,
) -> np.ndarray:
    """The image model's input, in a fixed order shared with the training script
    (``physics``: :func:`cues.physics_cues`, appended when the weights were trained with it)."""
    bl = block_logits if block_logits.size else np.zeros(1)
    vector = np.concatenate(
        [
            [cues[name] for name in CUE_NAMES],
            cooc,
            [float(bl.mean()), float(np.percentile(bl, 90)), float(np.log2(short_side))],
            physics if physics is not None else [],
        ]
    )
    return np.nan_to_num(vector, nan=0.0, posinf=50.0, neginf=-50.0)


class SyntheticDetector:
    """Inference with one set of trained weights (see module docstring)."""

    def __init__(self, weights: dict[str, Any]) -> None:
        try:
            blk = weights["block"]
            self._b_mean = np.asarray(blk["mean"])
            self._b_scale = np.asarray(blk["scale"])
            self._b_coef = np.asarray(blk["coef"])
            self._b_icpt = float(blk["intercept"])
            img = weights["image"]
            self._i_mean = np.asarray(img["mean"])
            self._i_scale = np.asarray(img["scale"])
            # one perceptron ("layers") or several fitted from different seeds ("nets"),
            # averaged: the fit's seed-to-seed spread is large on unseen generators
            nets = img["nets"] if "nets" in img else [img["layers"]]
            self._nets = [
                [(np.asarray(layer["W"]), np.asarray(layer["b"])) for layer in net]
                for net in nets
            ]
            self._trees = _Trees(img["trees"]) if img.get("trees") else None
            # weights trained with the physics cues take them as extra inputs
            self.physics = bool(img.get("physics", False))
            self._quantiles = {k: np.asarray(v) for k, v in weights["real_quantiles"].items()}
            self.threshold = float(weights["threshold"])
            # scores from here up to the threshold make a 'suspicious' verdict
            self.suspicious_threshold = float(weights.get("suspicious_threshold", self.threshold))
            self.info = weights.get("info", {})
        except (KeyError, TypeError, ValueError) as exc:
            raise RadguardError(f"synthetic-detector weights are malformed ({exc})") from exc

    def block_logits(self, feats: np.ndarray) -> np.ndarray:
        """Block model logits for (n, len(BLOCK_CUES)) block cues."""
        return ((feats - self._b_mean) / self._b_scale) @ self._b_coef + self._b_icpt

    def image_probability(self, x: np.ndarray) -> np.ndarray:
        """Image model probability for (n, d) feature vectors: the perceptron's, averaged
        with the boosted trees' when the weights have them."""
        x = np.atleast_2d(x)
        z = (x - self._i_mean) / self._i_scale
        p = np.zeros(len(x))
        for layers in self._nets:
            h = z
            for i, (w, b) in enumerate(layers):
                h = h @ w + b
                if i < len(layers) - 1:
                    h = np.maximum(h, 0.0)
            p += 1.0 / (1.0 + np.exp(-h[:, 0])) / len(self._nets)
        if self._trees is not None:
            p = (p + 1.0 / (1.0 + np.exp(-self._trees.raw(x)))) / 2
        return p

    def _percentile(self, name: str, value: float) -> float:
        q = self._quantiles[name]  # 101 quantiles of real training images
        return float(np.interp(value, q, np.linspace(0, 100, q.size), left=0.0, right=100.0))

    def analyse(self, img: np.ndarray, prepared: Prepared | None = None) -> SyntheticResult:
        """Score one grey image (any numeric dtype, any size >= 32 x 32); ``prepared``: its
        analysis form, when the caller has it already."""
        prepared = prepared or Prepared.of(img)
        a, r = prepared.image, prepared.residual
        cues, cooc = image_cues(a, r)
        bfeat, grid = block_cues(a, r)
        logits = self.block_logits(bfeat) if bfeat.size else np.zeros(0)
        physics = physics_cues(a, r) if self.physics else None
        x = feature_vector(cues, cooc, logits, min(a.shape), physics)
        score = float(self.image_probability(x)[0])
        heat = (1.0 / (1.0 + np.exp(-logits))).reshape(grid) if logits.size else np.zeros((0, 0))
        named = [
            Cue(n, CUE_NAMES[n], float(cues[n]), self._percentile(n, cues[n])) for n in CUE_NAMES
        ]
        if physics is not None:
            named += [Cue(n, PHYSICS_CUE_NAMES[n], float(v), self._percentile(n, float(v)))
                      for n, v in zip(PHYSICS_CUE_NAMES, physics, strict=True)
                      if n in self._quantiles]
        scale = max(np.asarray(img).shape[:2]) / max(a.shape)
        return SyntheticResult(score, named, heat, BLOCK * scale)


class _Trees:
    """Gradient-boosted decision trees (exported from scikit-learn's
    HistGradientBoostingClassifier by the training script) evaluated with numpy: every tree
    of every row walked at once, one level per step."""

    def __init__(self, t: dict[str, Any]) -> None:
        self.feature = np.asarray(t["feature"], dtype=np.intp)
        self.threshold = np.asarray(t["threshold"], dtype=np.float64)
        self.left = np.asarray(t["left"], dtype=np.intp)
        self.right = np.asarray(t["right"], dtype=np.intp)
        self.value = np.asarray(t["value"], dtype=np.float64)
        self.leaf = np.asarray(t["leaf"], dtype=bool)
        self.roots = np.asarray(t["roots"], dtype=np.intp)
        self.baseline = float(t["baseline"])
        self.depth = int(t["depth"])
        n = len(self.feature)
        if not all(len(a) == n for a in (self.threshold, self.left, self.right, self.value,
                                         self.leaf)):
            raise ValueError("tree arrays differ in length")
        if n and (max(self.left.max(), self.right.max(), self.roots.max()) >= n):
            raise ValueError("tree node index out of range")

    def raw(self, x: np.ndarray) -> np.ndarray:
        """Summed leaf values plus the baseline (log-odds) for (n, d) rows."""
        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()
        rows = np.arange(len(x))[:, None]
        for _ in range(self.depth):
            leaf = self.leaf[node]
            if leaf.all():
                break
            go_left = x[rows, self.feature[node]] <= self.threshold[node]
            node = np.where(leaf, node, np.where(go_left, self.left[node], self.right[node]))
        return self.baseline + self.value[node].sum(axis=1)


@lru_cache(maxsize=4)
def load_detector(path: str | None = None) -> SyntheticDetector:
    """The shipped detector (or weights from ``path``), loaded once."""
    p = Path(path) if path else WEIGHTS_PATH
    weights = read_json_object(p, "synthetic-detector weights", RadguardError)
    return SyntheticDetector(weights)
