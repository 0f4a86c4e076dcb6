"""Triage results written back as DICOM: a TID 1500 SR, a secondary-capture overlay and a
fractional Segmentation of the saliency map that dciodvfy accepts and highdicom reads back,
with the right content and references."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import highdicom as hd
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image

from radguard.cli import main
from radguard.dicom import read_dataset
from tests.conftest import NIH_DX, SHARED


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    png = SHARED / "cxr-wild" / "images" / "wild0001.png"
    result = CliRunner().invoke(main, ["triage", "predict", "--json", "--sr-dir", str(out),
                                       str(NIH_DX), str(png)])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def _items(seq):
    """Every content item of an SR tree, depth first."""
    for item in seq:
        yield item
        yield from _items(getattr(item, "ContentSequence", []))


def _dciodvfy_errors(path):
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy not found: run scripts/install.sh (apt-get install dicom3tools)")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_sr_content(written):
    record = written[0]
    sr = pydicom.dcmread(record["sr"])
    assert sr.SOPClassUID == hd.sr.ComprehensiveSR.from_dataset(sr).SOPClassUID
    source = read_dataset(NIH_DX)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    values = {}
    versions, references = set(), set()
    for item in _items(sr.ContentSequence):
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            values[name] = float(item.MeasuredValueSequence[0].NumericValue)
        if item.ValueType == "TEXT" and name == "Algorithm Version":
            versions.add(item.TextValue)
        if item.ValueType == "IMAGE":
            references.add(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    assert values["Pneumonia probability"] == pytest.approx(record["probability"], abs=1e-3)
    assert values["Suspicion score (1-10)"] == record["suspicion"]
    assert record["version"] in versions
    assert source.SOPInstanceUID in references
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_overlay_capture_references_the_source(written):
    sc = pydicom.dcmread(written[0]["overlay_dicom"])
    source = read_dataset(NIH_DX)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[-1] == 3
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]


def test_saliency_segmentation_holds_the_map_and_references_the_source(written):
    import numpy as np

    from radguard.images import read_pixels
    from radguard.triage.model import load_model

    seg = hd.seg.segread(written[0]["seg"])
    source = read_dataset(NIH_DX)
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.Modality == "SEG" and seg.number_of_segments == 1
    described = seg.get_segment_description(1)
    assert described.algorithm_identification[0].AlgorithmName == "chest"
    refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for r in s.ReferencedInstanceSequence}
    assert refs == {source.SOPInstanceUID}
    # the stored fractions are the saliency map the model gives for this image
    stored = seg.get_pixels_by_source_instance([source.SOPInstanceUID],
                                               rescale_fractional=True)
    stored = np.asarray(stored).reshape(source.Rows, source.Columns)
    heat = load_model("chest").saliency(read_pixels(NIH_DX).pixels)
    assert np.abs(stored - heat).max() <= 1 / 255 + 1e-6


def test_dciodvfy_accepts_all_three(written):
    assert _dciodvfy_errors(written[0]["sr"]) == []
    assert _dciodvfy_errors(written[0]["overlay_dicom"]) == []
    assert _dciodvfy_errors(written[0]["seg"]) == []


def test_png_input_gets_a_human_overlay_only(written):
    record = written[1]
    assert "sr" not in record
    with Image.open(record["overlay_png"]) as im:
        assert im.mode == "RGB"


@pytest.mark.parametrize("heat, message", [
    ("wrong shape", "does not match the source image"),
    ("above one", "must lie in [0, 1]"),
    ("nan", "must lie in [0, 1]"),
])
def test_saliency_segmentation_refuses_maps_that_do_not_fit(heat, message):
    import numpy as np

    from radguard.dicom.results import saliency_segmentation
    from radguard.errors import RadguardError

    source = read_dataset(NIH_DX)
    maps = {"wrong shape": np.zeros((10, 10)),
            "above one": np.full((source.Rows, source.Columns), 1.5),
            "nan": np.full((source.Rows, source.Columns), np.nan)}
    with pytest.raises(RadguardError, match=re.escape(message)):
        saliency_segmentation(source, maps[heat], model="chest", version="1")
