"""Governance: versioned datasets, poisoning audits, de-identification, the audit log.

::

    m = snapshot("data/v2", "data/v2/labels.csv", parent=load_manifest("v1.manifest.json"))
    diff_manifests(load_manifest("v1.manifest.json"), m).summary()
    AuditLog().append("dataset.snapshot", "data/v2", {"version": m.dataset_hash})
"""

from radguard.governance.adjudication import (
    AdjudicationError,
    Resolution,
    Study,
    plan,
    read_study,
    resolve,
)
from radguard.governance.auditlog import AuditEntry, AuditLog, AuditLogError, ChainReport
from radguard.governance.datasets import (
    DatasetDiff,
    DatasetError,
    Manifest,
    diff_manifests,
    load_manifest,
    snapshot,
)

__all__ = [
    "AdjudicationError",
    "AuditEntry",
    "AuditLog",
    "AuditLogError",
    "ChainReport",
    "DatasetDiff",
    "DatasetError",
    "Manifest",
    "Resolution",
    "Study",
    "diff_manifests",
    "load_manifest",
    "plan",
    "read_study",
    "resolve",
    "snapshot",
]
