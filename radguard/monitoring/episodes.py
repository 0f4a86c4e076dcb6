"""Alarm episodes: one alarm a person can act on, not one line per study.

A shift of scanner or population keeps every CUSUM it moved above its threshold for as long
as it lasts; alarming at each crossing (and resetting) gave hundreds of alarm lines for one
change. Here a signal (drift, sensitivity, specificity, new metadata) of one site and model
version has at most one *open* episode: it opens when a statistic first crosses its
threshold ``h`` (the alarm), gathers what else changes while it is open, and closes when
every statistic that crossed is back at zero (the CUSUM found the stream in control again).
Only then is the signal re-armed: the next crossing is a new episode and a new alarm.

While an episode is open its statistics are capped at ``2 h``: the evidence that there was a
change is already complete, and the cap bounds how long recovery takes to show once the
change is undone (about ``2 h`` over the statistic's in-control drift).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

__all__ = ["CAP", "Episode", "EpisodeState", "Signal"]

#: an open episode's statistics stop growing at CAP * h
CAP = 2.0


class Signal(enum.StrEnum):
    """What an episode is about."""

    DRIFT = "drift"  # image features or model scores moved away from the reference
    SENSITIVITY = "sensitivity"  # labelled positives: the model misses more of them
    SPECIFICITY = "specificity"  # labelled negatives: the model flags more of them
    METADATA = "metadata"  # a scanner, protocol or view the reference never had


class EpisodeState(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class Episode:
    """One episode of one signal at one site for one model version."""

    site: str
    version: str
    signal: Signal
    start_seq: int  # the study count when it opened (the alarm)
    start_ts: str
    start_study: str
    onset_seq: int  # where the change most likely began: the statistic last left zero
    state: EpisodeState = EpisodeState.OPEN
    peak: float = 0.0  # the largest statistic, in units of h
    peak_seq: int = 0
    end_seq: int | None = None
    end_ts: str | None = None
    #: what changed: one entry per statistic that crossed ({"feature", "direction", ...})
    changes: list[dict[str, object]] = field(default_factory=list)
    #: the statistics that crossed and are not back at zero yet ("feature direction")
    active: list[str] = field(default_factory=list)
    id: int | None = None

    def summary(self) -> str:
        """One line a person reads: what, where, since when, how strong."""
        what = ", ".join(_describe(c) for c in self.changes) or str(self.signal)
        version = f" (model {self.version})" if self.version else ""
        if self.state is EpisodeState.OPEN:
            when = f"since study {self.start_seq} (change began about study {self.onset_seq})"
        else:
            when = f"studies {self.start_seq}-{self.end_seq}, now back in control"
        peak = f"; peak {self.peak:.1f}x threshold" if self.signal is not Signal.METADATA \
            else ""
        return f"{self.signal} at site {self.site}{version}: {what}; {when}{peak}"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form: what the audit log, the notifications and the web page get."""
        out = asdict(self)
        out["signal"], out["state"] = str(self.signal), str(self.state)
        out["summary"] = self.summary()
        return out


def _describe(change: dict[str, object]) -> str:
    feature, direction = change.get("feature", "?"), change.get("direction", "")
    if "value" in change:
        return f"new {feature} {change['value']}"
    text = f"{feature} {direction}".strip()
    rate, reference = change.get("rate"), change.get("reference")
    if isinstance(rate, float) and isinstance(reference, float):
        text += (f" ({rate:.2f} over {change.get('labelled')} labelled studies since the "
                 f"change began, {reference:.2f} in the reference)")
    return text
