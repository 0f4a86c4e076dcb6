"""Forensics: evidence that an image was fabricated or altered.

So far: DICOM header consistency checks (:mod:`radguard.forensics.metadata`). The
synthetic-image detector, the local tamper detector and the combined ``radguard scan``
verdict are still to come (issue 4).
"""

from radguard.forensics.metadata import Finding, check_collection, check_metadata

__all__ = ["Finding", "check_collection", "check_metadata"]
