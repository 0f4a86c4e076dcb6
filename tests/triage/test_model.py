"""The shipped chest model through the plug-in contract and the CLI: scores in range,
pneumonia ranked above normal on the held-out sites, out-of-scope inputs refused."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from radguard.cli import main
from radguard.demo import synthetic_radiograph
from radguard.dicom import write_dataset
from radguard.evaluation import delong_auc
from radguard.evaluation.splits import split_of
from radguard.triage.model import OutOfScope, TriageError, load_model
from tests.conftest import MR_NATIVE, NIH_DX, SHARED


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def chest():
    return load_model("chest")


def _site(source, n, split=None):
    with open(SHARED / source / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if split is None or split_of(source, r["patient_id"]) == split]
    rows = [r for r in rows if r["label"] == "normal"][:n] + \
        [r for r in rows if r["label"] == "pneumonia"][:n]
    return [(SHARED / source / "images" / r["file"], int(r["label"] == "pneumonia"))
            for r in rows]


def test_held_out_patients_pneumonia_ranks_above_normal(chest):
    """NIH test-split patients were never seen in training or model selection."""
    cases = _site("cxr-nih", 40, split="test")
    probs = [chest.predict(np.asarray(Image.open(p).convert("L"))).probability for p, _ in cases]
    labels = np.array([y for _, y in cases])
    assert delong_auc(labels, np.array(probs)).auc > 0.7


def test_prediction_fields(chest):
    pred = chest.predict(np.asarray(Image.open(_site("cxr-nih", 1)[0][0]).convert("L")),
                         modality="DX", path="x.png")
    assert 0 <= pred.probability <= 1 and 1 <= pred.suspicion <= 10
    assert pred.positive == (pred.probability >= chest.threshold)
    assert chest.card.metrics["internal_test_auc"]["auc"] > 0.5
    record = pred.to_dict()
    assert {"path", "probability", "suspicion", "model", "version"} <= record.keys()


@pytest.mark.parametrize(
    "pixels, modality, message",
    [
        (np.zeros((5, 5)), None, "too small"),
        (np.dstack([np.full((200, 200), 200), np.zeros((200, 200)), np.zeros((200, 200))]),
         None, "colour"),
        (np.zeros((256, 256)), "CT", "not CT"),
        (np.full((256, 256), np.nan), None, "NaN"),
    ],
)
def test_out_of_scope_is_refused(chest, pixels, modality, message):
    with pytest.raises(OutOfScope, match=message):
        chest.predict(pixels, modality=modality)


def test_cli_predict_json_and_refusals(tmp_path):
    no_pixels = tmp_path / "nopixels.dcm"
    ds = synthetic_radiograph(64, 64)
    del ds.PixelData
    write_dataset(ds, no_pixels)
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(photo)
    result = run("triage", "predict", "--json", NIH_DX, MR_NATIVE, no_pixels, photo)
    records = [json.loads(line) for line in result.output.splitlines()]
    assert result.exit_code == 1
    assert records[0]["probability"] is not None and records[0]["model"] == "chest"
    for bad in records[1:]:
        assert bad["probability"] is None and bad["error"]
    assert "not MR" in records[1]["error"]


def test_unknown_model_is_a_clear_error():
    with pytest.raises(TriageError, match="unknown model"):
        load_model("brain")
    result = run("triage", "predict", "--model", "brain", NIH_DX)
    assert result.exit_code != 0 and "unknown model" in result.output


def test_mammography_model_scores_mammograms_and_refuses_chest_dicom():
    mammo = load_model("mammo")
    img = np.asarray(Image.open(SHARED / "mammo-mias" / "images" / "mdb001.png").convert("L"))
    pred = mammo.predict(img, modality="MG")
    assert 0 <= pred.probability <= 1 and pred.model == "mammo"
    assert mammo.saliency(img).shape == img.shape
    with pytest.raises(OutOfScope, match="not DX"):
        mammo.predict(img, modality="DX")


def test_malformed_bundles_are_clear_errors(tmp_path):
    import shutil

    from radguard.triage.model import _DATA

    meta = json.loads((_DATA / "chest.json").read_text())
    shutil.copy(_DATA / "chest.pt", tmp_path / "odd.pt")
    (tmp_path / "odd.json").write_text(json.dumps({**meta, "kind": "video"}))
    with pytest.raises(TriageError, match="unknown model kind"):
        load_model(str(tmp_path / "odd.json"))
    (tmp_path / "lost.json").write_text(json.dumps(meta))
    with pytest.raises(TriageError, match="not found"):
        load_model(str(tmp_path / "lost.json"))
    (tmp_path / "odd.json").write_text(json.dumps({**meta, "network": {"channels": [8, 8]}}))
    with pytest.raises(TriageError, match="do not fit"):
        load_model(str(tmp_path / "odd.json"))
