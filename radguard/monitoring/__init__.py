"""Monitoring: input and output drift, performance decay at the operating point from late
and partial labels, alarm episodes with notices, persisted state."""

from radguard.monitoring.decay import DecayError, DecayModel, calibrate_decay
from radguard.monitoring.drift import (
    Cusum,
    NormalScorer,
    calibrate_threshold,
    chi2_test,
    ks_test,
    mmd_test,
    psi,
)
from radguard.monitoring.episodes import Episode, EpisodeState, Signal
from radguard.monitoring.features import (
    IMAGE_FEATURES,
    METADATA_FIELDS,
    image_features,
    metadata_features,
)
from radguard.monitoring.monitor import Alarm, Monitor, MonitorError, estimate_performance
from radguard.monitoring.notify import (
    Dispatcher,
    EmailNotifier,
    Notifier,
    NotifyError,
    WebhookNotifier,
    notifiers_from_config,
)
from radguard.monitoring.tables import (
    apply_labels,
    fit_reference_table,
    ingest_table,
    read_labels,
    read_reference,
)

__all__ = [
    "IMAGE_FEATURES",
    "METADATA_FIELDS",
    "Alarm",
    "Cusum",
    "DecayError",
    "DecayModel",
    "Dispatcher",
    "EmailNotifier",
    "Episode",
    "EpisodeState",
    "Monitor",
    "MonitorError",
    "NormalScorer",
    "Notifier",
    "NotifyError",
    "Signal",
    "WebhookNotifier",
    "apply_labels",
    "calibrate_decay",
    "calibrate_threshold",
    "chi2_test",
    "estimate_performance",
    "fit_reference_table",
    "image_features",
    "ingest_table",
    "ks_test",
    "metadata_features",
    "mmd_test",
    "notifiers_from_config",
    "psi",
    "read_labels",
    "read_reference",
]
