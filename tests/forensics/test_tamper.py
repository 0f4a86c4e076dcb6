"""The classical tamper layer on real radiographs: copies and fills found, clean images
clean, bad shapes refused."""

from __future__ import annotations

import numpy as np
import pytest

from radguard.dicom import pixel_array, read_dataset
from radguard.forensics import TamperError, detect_tamper
from tests.conftest import MR_NATIVE, NIH_DX, RG1_J2K


def _overlaps(regions, box):
    return any(r[0] < box[2] and box[0] < r[2] and r[1] < box[3] and box[1] < r[3] for r in regions)


@pytest.fixture(scope="module")
def chest():
    return pixel_array(read_dataset(NIH_DX)).astype(np.float64)


@pytest.mark.parametrize("path", [NIH_DX, RG1_J2K, MR_NATIVE])
def test_untouched_images_report_nothing(path):
    result = detect_tamper(pixel_array(read_dataset(path)).astype(np.float64))
    assert result.regions == [] and result.score == 0.0


def test_copy_move_of_a_textured_patch_is_found_at_both_ends(chest):
    t = chest.copy()
    t[512:576, 340:404] = chest[300:364, 500:564]  # a 64 px "lesion" copied within the lung
    result = detect_tamper(t)
    assert _overlaps(result.copy_move, (340, 512, 404, 576))
    assert _overlaps(result.copy_move, (500, 300, 564, 364))  # and its source
    assert result.score > 0.5


def test_flattened_region_is_found(chest):
    t = chest.copy()
    t[512:542, 341:371] = np.median(chest[512:542, 341:371])  # a lesion erased by filling
    result = detect_tamper(t)
    assert _overlaps(result.flattened, (341, 512, 371, 542))


@pytest.mark.parametrize("shape", [(1, 1), (20, 400), (5, 5, 3)])
def test_unusable_shapes_are_refused(shape):
    with pytest.raises(TamperError):
        detect_tamper(np.zeros(shape))


@pytest.mark.parametrize(
    "image",
    [
        np.full((64, 64), np.nan),
        np.where(np.eye(64) > 0, np.inf, 1.0),
        np.array([["a"] * 64] * 64),
    ],
    ids=["nan", "inf", "text"],
)
def test_unusable_pixels_are_refused_not_scored(image):
    with pytest.raises(TamperError):
        detect_tamper(image)
