"""Monitoring: input and output drift, performance decay, sequential alarms, persisted state."""

from radguard.monitoring.drift import (
    Cusum,
    NormalScorer,
    calibrate_threshold,
    chi2_test,
    ks_test,
    mmd_test,
    psi,
)
from radguard.monitoring.features import (
    IMAGE_FEATURES,
    METADATA_FIELDS,
    image_features,
    metadata_features,
)
from radguard.monitoring.monitor import Alarm, Monitor, MonitorError

__all__ = [
    "IMAGE_FEATURES",
    "METADATA_FIELDS",
    "Alarm",
    "Cusum",
    "Monitor",
    "MonitorError",
    "NormalScorer",
    "calibrate_threshold",
    "chi2_test",
    "image_features",
    "ks_test",
    "metadata_features",
    "mmd_test",
    "psi",
]
