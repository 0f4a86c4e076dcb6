"""AI triage: calibrated scores, 1-10 suspicion, cost-aware operating points, workload
trade-offs and worklist order.

Models (the plug-in contract, torch / ONNX / patch / region bundles, the registry) are in
:mod:`radguard.triage.model`, the reference recipes behind ``radguard triage train`` in
:mod:`radguard.triage.training`, and DICOM results (TID 1500 SR, fractional SEG, secondary
capture) in :mod:`radguard.triage.results`. See docs/triage.md.
"""

from radguard.triage.operating import (
    OperatingPoint,
    choose_threshold,
    plot_workload,
    workload_table,
)
from radguard.triage.scores import Calibrator, SuspicionScale, TriageError
from radguard.triage.worklist import Discrepancy, Study, discrepancies, order_worklist

__all__ = [
    "Calibrator",
    "Discrepancy",
    "OperatingPoint",
    "Study",
    "SuspicionScale",
    "TriageError",
    "choose_threshold",
    "discrepancies",
    "order_worklist",
    "plot_workload",
    "workload_table",
]
