"""AI triage: calibrated scores, 1-10 suspicion, cost-aware operating points, workload
trade-offs and worklist order. (Reference models, saliency and DICOM SR output: issue 5,
still to come.)"""

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
