"""The tamper layers on real radiographs: copies, fills and splices found where they are,
clean images clean, bad shapes and bad weights refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from radguard.dicom import pixel_array, read_dataset
from radguard.forensics import TamperError, TamperResult, detect_tamper
from radguard.forensics.localnet import load_local_detector
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


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).save(buf, "JPEG",
                                                                         quality=quality)
    return np.asarray(Image.open(buf), dtype=np.float64)


@pytest.mark.parametrize("process", ["jpeg60", "smoothed"])
def test_ordinary_processing_makes_no_copies(chest, process):
    """A low-quality JPEG's flat blocks and a noise-reduced image's smooth gradients match
    along whole families of shifts: no copy (the hash-and-shift count alone called both)."""
    from scipy import ndimage

    if process == "jpeg60":
        img = _jpeg(chest, 60)
    else:
        img = np.rint(ndimage.gaussian_filter(chest, 8))
    assert detect_tamper(img, local=False).copy_move == []


def test_constant_fill_is_found(chest):
    t = chest.copy()
    t[512:542, 341:371] = np.median(chest[512:542, 341:371])  # a lesion erased by filling
    result = detect_tamper(t)
    assert _overlaps(result.local_edits, (341, 512, 371, 542))


def test_a_flat_marker_drawn_on_the_tissue_is_not_a_fill(chest):
    """A lead marker is as flat as a constant fill, but brighter than the tissue around it;
    a fill takes the surroundings' grey."""
    from PIL import ImageDraw

    im = Image.fromarray(chest.astype(np.uint8))
    ImageDraw.Draw(im).ellipse([341, 512, 381, 552], fill=245)
    result = detect_tamper(np.asarray(im, dtype=np.float64))
    assert not _overlaps(result.local_edits, (341, 512, 381, 552))


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


# ---------------------------------------------------------------- learned fills and splices


def _bilinear_fill(img, y, x, s):
    """A lesion erased by interpolating the rows and columns around it (the training
    script's simulated edit, rounded to whole grey values as a saved file would be)."""
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    import tamperdata

    mask = np.zeros(img.shape, bool)
    out = tamperdata.fill(img, mask, (y, x, y + s, x + s), "bilinear",
                          np.random.default_rng(0), grain=False)
    return np.round(out)


@pytest.fixture(scope="module")
def donor():
    """Another patient's chest radiograph, enlarged to the DX's scale."""
    from PIL import Image

    from tests.conftest import SHARED

    path = SHARED / "cxr-nih" / "images" / "00000165_001.jpg"
    with Image.open(path) as im:
        return np.asarray(im.convert("L").resize((1024, 1024), Image.Resampling.BICUBIC),
                          dtype=np.float64)


def test_interpolated_fill_is_found_where_it_is(chest):
    t = _bilinear_fill(chest, 560, 300, 48)  # 48 px in the 1024 px DX: 24 px analysed
    result = detect_tamper(t)
    assert _overlaps(result.local_edits, (300, 560, 348, 608))
    assert result.local_edit_score >= result.local_edit_threshold
    assert result.score > 0.5
    # the alarm is local: every reported region touches the edit
    assert all(_overlaps([box], (300, 560, 348, 608)) for box in result.local_edits)
    assert result.local_edit_map.shape == (1024 // result.local_edit_cell,) * 2


def test_tissue_spliced_from_another_image_is_found(chest, donor):
    t = chest.copy()
    patch = donor[300:396, 300:396]  # 96 px of lung from another patient, mean-matched
    t[600:696, 400:496] = np.clip(patch - patch.mean() + t[600:696, 400:496].mean(), 0, 255)
    result = detect_tamper(t)
    assert _overlaps(result.local_edits, (400, 600, 496, 696))
    assert result.local_edit_score > detect_tamper(chest).local_edit_score


@pytest.mark.parametrize("process", ["jpeg60", "upsampled2x"])
def test_ordinary_processing_of_a_real_chest_is_not_an_edit(chest, process):
    """A low-quality JPEG and a PACS's 2x bicubic enlargement change the fine residual the
    learned layer reads everywhere; neither is a local edit (the detector trained without
    processed untouched images reported a region in both)."""
    if process == "jpeg60":
        img = _jpeg(chest, 60)
    else:
        img = np.asarray(Image.fromarray(chest.astype(np.uint8)).resize(
            (2048, 2048), Image.Resampling.BICUBIC), dtype=np.float64)
    result = detect_tamper(img)
    assert result.regions == []
    assert result.local_edit_score < result.local_edit_threshold


def test_classical_layers_alone_do_not_see_the_fill(chest):
    t = _bilinear_fill(chest, 560, 300, 48)
    result = detect_tamper(t, local=False)
    assert result.local_edits == [] and result.local_edit_score is None


def test_small_images_skip_the_learned_layer_without_error():
    rng = np.random.default_rng(0)
    result = detect_tamper(rng.normal(128, 10, (33, 40)))
    assert result.local_edits == []


def test_malformed_local_weights_give_a_clear_error(tmp_path):
    import torch

    from radguard.errors import RadguardError
    from radguard.forensics.localnet import load_local_detector

    with pytest.raises(RadguardError, match="not found"):
        load_local_detector(str(tmp_path / "none.pt"))
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(RadguardError, match="unreadable"):
        load_local_detector(str(bad))
    torch.save({"weights": {"0.weight": torch.zeros(3)}, "threshold": 0.5}, tmp_path / "w.pt")
    with pytest.raises(RadguardError, match="malformed"):
        load_local_detector(str(tmp_path / "w.pt"))


def test_onnxruntime_computes_the_torch_network_s_maps(chest):
    """The shipped ONNX export is the shipped weights: same map, same boxes, on real images."""
    from radguard.forensics.cues import prepare
    from radguard.forensics.localnet import WEIGHTS_PATH, LocalEditDetector, _read_state
    from radguard.forensics.tamper import _local_edits
    from tests.conftest import SHARED

    shipped = load_local_detector()
    assert shipped.runtime == "onnxruntime"
    in_torch = LocalEditDetector(_read_state(WEIGHTS_PATH))
    assert in_torch.runtime == "torch"
    edited = _bilinear_fill(chest, 560, 300, 48)
    wild = np.asarray(Image.open(sorted((SHARED / "cxr-wild" / "images").glob("*.png"))[3])
                      .convert("L"))
    for img in (chest, edited, wild, wild[:301, :457]):
        a = prepare(img)
        fast, slow = shipped.analyse(a), in_torch.analyse(a)
        assert np.abs(fast.probability - slow.probability).max() < 1e-4
        assert abs(fast.score - slow.score) < 1e-5
        found = [TamperResult(), TamperResult()]
        _local_edits(img, found[0], shipped)
        _local_edits(img, found[1], in_torch)
        assert found[0].local_edits == found[1].local_edits
    assert _overlaps(detect_tamper(edited).local_edits, (300, 560, 348, 608))


def test_an_export_of_other_weights_is_refused(tmp_path):
    import shutil

    import torch

    from radguard.errors import RadguardError
    from radguard.forensics.localnet import WEIGHTS_PATH, export_onnx

    weights = tmp_path / "w.pt"
    shutil.copy(WEIGHTS_PATH, weights)
    assert load_local_detector(str(weights)).runtime == "torch"  # no export beside it
    export_onnx(weights)
    load_local_detector.cache_clear()  # loaded once per process and path
    assert load_local_detector(str(weights)).runtime == "onnxruntime"
    state = torch.load(weights, weights_only=True)
    state["threshold"] = 0.5  # retrained or recalibrated, export forgotten
    torch.save(state, weights)
    load_local_detector.cache_clear()
    with pytest.raises(RadguardError, match="re-export"):
        load_local_detector(str(weights))
    (tmp_path / "w.onnx").write_bytes(b"not onnx")
    load_local_detector.cache_clear()
    with pytest.raises(RadguardError, match="not a loadable ONNX model"):
        load_local_detector(str(weights))
