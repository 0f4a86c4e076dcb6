"""Images for the watermark tests: the shared DICOM radiographs and samples of the PNG sets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from radguard.dicom import pixel_array, pixel_info, read_dataset
from radguard.watermark import WatermarkKey
from tests.conftest import DICOM_DIR, SHARED

#: every monochrome radiograph / slice in shared/dicom (the RGB file is tested as a refusal)
DICOM_IMAGES = sorted(p for p in DICOM_DIR.rglob("*.dcm")
                      if p.name not in ("RG2_JPLY.dcm", "pydicom-data-SC_rgb_16bit.dcm"))
PNG_SAMPLE = (sorted((SHARED / "mammo-mias").rglob("*.png"))[:4]
              + sorted((SHARED / "cxr-wild").rglob("*.png"))[:4]
              + sorted((SHARED / "synthetic-dcgan64").rglob("*.png"))[:2])


@pytest.fixture(scope="session")
def wm_key() -> WatermarkKey:
    return WatermarkKey.from_secret(b"radguard test watermark key 0001")


def load(path):
    """(frame, lo, hi, bits) for a DICOM file or an 8-bit PNG."""
    if path.suffix == ".png":
        return np.array(Image.open(path).convert("L")).astype(np.int64), 0, 255, 8
    ds = read_dataset(path)
    info = pixel_info(ds)
    arr = pixel_array(ds).astype(np.int64)
    return arr.reshape(info.frames, info.rows, info.columns)[0], info.min_value, \
        info.max_value, info.bits_stored
