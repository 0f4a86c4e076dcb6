"""Forensics: evidence that an image was fabricated or altered.

So far: DICOM header consistency checks (:mod:`radguard.forensics.metadata`) and a first,
classical local tamper layer (:mod:`radguard.forensics.tamper`: copy-move and flattened
regions). The synthetic-image detector and the combined ``radguard scan`` verdict are still to
come (issue 4).
"""

from radguard.forensics.metadata import Finding, check_collection, check_metadata
from radguard.forensics.tamper import TamperError, TamperResult, detect_tamper

__all__ = ["Finding", "TamperError", "TamperResult", "check_collection", "check_metadata",
           "detect_tamper"]
