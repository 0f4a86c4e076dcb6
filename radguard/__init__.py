"""radguard: keeps radiology images and the AI that reads them trustworthy.

Sub-packages, one concept each; dependencies point inward to :mod:`radguard.dicom`:

* :mod:`radguard.dicom`       DICOM I/O, pixels, UIDs
* :mod:`radguard.provenance`  keys, certificates, PS3.15 signatures, trust
* :mod:`radguard.watermark`   reversible identity mark, tamper localisation, export marks
"""

from radguard.errors import RadguardError

__version__ = "0.1.0"
__all__ = ["RadguardError", "__version__"]
