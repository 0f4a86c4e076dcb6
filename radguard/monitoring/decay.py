"""Performance decay at the operating point, from late and partial labels.

What a department gets back is a radiologist's label, late, for some studies. Sensitivity
and specificity at the model's operating point are what it cares about, so each has its own
one-sided CUSUM, stepped by the labels of its class only: a labelled positive steps the
sensitivity detector, a labelled negative the specificity detector.

The alternative each detector looks for is "a fraction ``eps`` of this class is now scored
as the other class is" (the model stopped seeing the finding in a subgroup, or a new
population makes normals look abnormal). ``eps`` is what takes the rate at the operating
point down by ``drop`` (default 10 points). The step is the log-likelihood ratio of that
mixture against the reference:

    positive with score s:  log(1 - eps + eps * f_neg(s) / f_pos(s))
    negative with score s:  log(1 - eps + eps * f_pos(s) / f_neg(s))

where f_pos(s) / f_neg(s) is the likelihood ratio the model's calibrated probability already
states: posterior odds = prior odds x likelihood ratio, so f_pos(s) / f_neg(s) = odds(s) /
odds(prior), the prior being the mean score on the reference. Nothing else is estimated from
the reference but that prior and the rates at the operating point: class densities fitted
to a few hundred labelled studies (binormal, kernels: tried) moved the in-control steps so
much that the false-alarm budget needed thresholds two to four times higher. Using the whole
score, not only "above or below the threshold", makes each label count; a drop of another
shape (the scores of positives sliding down) moves the same ratio.

Assumptions (docs/monitoring.md): whether a study gets labelled may depend on its true class
(only positives confirmed, a 10% audit of negatives) but not on its score within the class;
then each class's labelled scores are an unbiased sample and the detectors keep their
false-alarm rate. Labels that depend on the score (only flagged studies followed up) bias
them: sensitivity cannot be seen from such labels at all.

The threshold ``h`` is calibrated by a bootstrap: the reference is to the site's population
what a resample of the reference is to the reference, so each simulated stream fits the
detector on a resample and steps it on the reference's own labelled scores. The false-alarm
budget then holds averaged over how the reference could have come out, not only for a
reference that happens to equal the population.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import special

from radguard.errors import RadguardError

__all__ = ["SIGNALS", "DecayError", "DecayModel", "calibrate_decay"]

#: which detector a label of each class steps
SIGNALS = {1: "sensitivity", 0: "specificity"}

#: the bounds of a likelihood ratio: one surprising label moves a detector by at most ~3 nats
_MAX_LOG_RATIO = 3.0


class DecayError(RadguardError):
    """The reference cannot support decay detection (too few labels of a class...)."""


def _logit(p: np.ndarray | float) -> np.ndarray:
    return special.logit(np.clip(np.asarray(p, float), 1e-4, 1 - 1e-4))


@dataclass(frozen=True)
class DecayModel:
    """The two decay detectors' step functions, fitted on reference scores and labels."""

    threshold: float  # the operating point
    drop: float  # the smallest drop worth an alarm (0.10 = 10 points)
    eps: float  # the fraction of a class scored as the other class that makes that drop
    sensitivity: float  # at the operating point, in the reference
    specificity: float
    prior_log_odds: float  # logit of the mean reference score

    @classmethod
    def fit(cls, scores: np.ndarray, labels: np.ndarray, *, threshold: float,
            drop: float = 0.10) -> DecayModel:
        """The rates at the operating point, the prior, and the mixture fraction of a
        ``drop``."""
        s, y = np.asarray(scores, float), np.asarray(labels, int)
        if not 0 < drop < 1:
            raise DecayError("the drop to detect must be between 0 and 1 (0.10 = 10 points)")
        if s.min() < 0 or s.max() > 1:
            raise DecayError("decay detection needs scores that are probabilities (0..1)")
        pos, neg = s[y == 1], s[y == 0]
        if min(len(pos), len(neg)) < 20:
            raise DecayError("decay detection needs at least 20 labelled studies of each "
                             f"class in the reference (have {len(pos)} positive, "
                             f"{len(neg)} negative)")
        sensitivity = float(np.mean(pos >= threshold))
        specificity = float(np.mean(neg < threshold))
        separation = sensitivity + specificity - 1  # Youden's J at the operating point
        if separation <= 0.02:
            raise DecayError(f"at threshold {threshold:g} the reference scores do not separate "
                             f"the classes (sensitivity {sensitivity:.2f}, specificity "
                             f"{specificity:.2f}): no decay to detect")
        return cls(float(threshold), float(drop), float(min(0.9, drop / separation)),
                   sensitivity, specificity, float(_logit(float(s.mean()))))

    def steps(self, scores: np.ndarray | float, label: int) -> np.ndarray:
        """The CUSUM steps of labelled studies of one class (label 1: sensitivity, 0:
        specificity)."""
        log_ratio = np.clip(self.prior_log_odds - _logit(scores), -_MAX_LOG_RATIO,
                            _MAX_LOG_RATIO)  # log f_neg(s) / f_pos(s)
        ratio = np.exp(log_ratio if label == 1 else -log_ratio)
        return np.log1p(self.eps * (ratio - 1.0))

    def step(self, score: float, label: int) -> float:
        """One labelled study's step."""
        return float(self.steps(np.array([score]), label)[0])

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form (stored with the reference)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> DecayModel:
        """The model stored by :meth:`to_dict`."""
        return cls(**{k: float(v) for k, v in data.items()})  # type: ignore[arg-type]


def calibrate_decay(scores: np.ndarray, labels: np.ndarray, *, threshold: float,
                    drop: float = 0.10, false_alarms_per: float = 40_000,
                    streams: int = 200, length: int = 2_000, seed: int = 0
                    ) -> dict[str, float]:
    """Per detector ("sensitivity", "specificity"), the smallest ``h`` at which it raises at
    most half of one false alarm per ``false_alarms_per`` labelled studies of its class, on
    ``streams`` simulated streams: each fits the detector on a bootstrap resample of the
    reference and steps it on studies drawn from the reference (the factor of two is a
    margin for the simulation's noise)."""
    s, y = np.asarray(scores, float), np.asarray(labels, int)
    rng = np.random.default_rng(seed)
    candidates = np.round(np.arange(1.0, 60.01, 0.25), 2)
    draws = {label: np.empty((length, streams)) for label in SIGNALS}
    for j in range(streams):
        model = _resampled_fit(rng, s, y, threshold, drop)
        for label in SIGNALS:
            steps = model.steps(s[y == label], label)
            draws[label][:, j] = steps[rng.integers(0, len(steps), length)]
    out = {}
    for label, name in SIGNALS.items():
        counts = _count_alarms(draws[label], candidates)
        ok = candidates[counts <= 0.5 * length * streams / false_alarms_per]
        out[name] = float(ok.min()) if len(ok) else float(candidates[-1])
    return out


def _resampled_fit(rng: np.random.Generator, s: np.ndarray, y: np.ndarray, threshold: float,
                   drop: float) -> DecayModel:
    """The detector fitted on a bootstrap resample (drawn again when a resample lacks a
    class's 20 labels or separation)."""
    for _ in range(50):
        pick = rng.integers(0, len(s), len(s))
        try:
            return DecayModel.fit(s[pick], y[pick], threshold=threshold, drop=drop)
        except DecayError:
            continue
    raise DecayError("the reference is too small or too unbalanced to calibrate decay "
                     "detection")


def _count_alarms(draws: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Alarms of a one-sided CUSUM (reset at each alarm) on parallel streams (the columns of
    ``draws``), for every candidate threshold at once."""
    h = candidates[None, :]
    stat = np.zeros((draws.shape[1], len(candidates)))
    counts = np.zeros(len(candidates), dtype=np.int64)
    for row in draws:
        stat = np.maximum(0.0, stat + row[:, None])
        hit = stat > h
        counts += hit.sum(axis=0)
        stat[hit] = 0.0
    return counts
