"""Forensics: evidence that an image was fabricated or altered, and one verdict per image.

* :mod:`~radguard.forensics.metadata` - DICOM header consistency checks;
* :mod:`~radguard.forensics.tamper` - local tamper detection without a watermark
  (copy-move, and fills and splices by the learned :mod:`~radguard.forensics.localnet`);
* :mod:`~radguard.forensics.cues` and :mod:`~radguard.forensics.synthetic` - the
  synthetic-radiograph detector (named cues, block heat map, shipped weights);
* :mod:`~radguard.forensics.scan` - every layer (signature, watermark, the above) combined
  into ``authentic`` / ``suspicious`` / ``synthetic`` / ``tampered`` / ``unverifiable``.
"""

from radguard.forensics.cues import CueError
from radguard.forensics.metadata import Finding, audit_files, check_collection, check_metadata
from radguard.forensics.scan import VERDICTS, ScanResult, scan_file, write_heatmap
from radguard.forensics.synthetic import Cue, SyntheticDetector, SyntheticResult, load_detector
from radguard.forensics.tamper import TamperError, TamperResult, detect_tamper

__all__ = [
    "VERDICTS",
    "Cue",
    "CueError",
    "Finding",
    "ScanResult",
    "SyntheticDetector",
    "SyntheticResult",
    "TamperError",
    "TamperResult",
    "audit_files",
    "check_collection",
    "check_metadata",
    "detect_tamper",
    "load_detector",
    "scan_file",
    "write_heatmap",
]
