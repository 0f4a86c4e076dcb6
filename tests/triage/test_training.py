"""`radguard triage train`: each recipe on a small slice of the shared data writes a bundle
that loads and scores through the plug-in contract; bad training folders get clear errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from radguard.cli import main
from radguard.triage.model import (
    PatchTriageModel,
    RegionTriageModel,
    TriageError,
    bundle_stem,
    load_model,
)
from radguard.triage.training import load_site
from tests.conftest import MR_NATIVE, SHARED

NIH, KERMANY, MIAS = SHARED / "cxr-nih", SHARED / "cxr-kermany", SHARED / "mammo-mias"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def _first(folder, label_column, value):
    with open(folder / "labels.csv", newline="") as f:
        return next(folder / "images" / r["file"] for r in csv.DictReader(f)
                    if r[label_column] == value)


@pytest.fixture(scope="module")
def mammo_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("mammo") / "mammo-trial"
    result = run("triage", "train", "mammo", "--data", MIAS, "--limit", 120, "--epochs", 1,
                 "-o", out)
    assert result.exit_code == 0, result.output
    return out.with_name(out.name + ".json")


def test_train_chest_writes_a_bundle_that_scores(tmp_path):
    out = tmp_path / "chest.v2"  # a dot in the name is kept, not taken for a suffix
    result = run("triage", "train", "chest", "--data", NIH, "--external", KERMANY,
                 "--limit", 140, "--epochs", 2, "-o", out)
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "chest.v2.json"
    assert f"model bundle: {bundle}" in result.output
    assert (tmp_path / "chest.v2.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.v2.json", "chest.v2.pt"]
    meta = json.loads(bundle.read_text())
    metrics = meta["card"]["metrics"]
    assert metrics["measured_by"] == "radguard triage train chest"
    for key in ("internal_test_auc", "external_auc_cxr-kermany"):
        assert 0.0 <= metrics[key]["auc"] <= 1.0
        assert f"{key}: " in result.output
    assert meta["card"]["training_data"].startswith("cxr-nih training split")
    model = load_model(str(bundle))
    image = np.asarray(Image.open(_first(NIH, "label", "pneumonia")).convert("L"))
    prediction = model.predict(image, modality="DX")
    assert 0.0 <= prediction.probability <= 1.0 and 1 <= prediction.suspicion <= 10
    assert prediction.model == "chest" and prediction.version == "1.0-cxr-nih"
    listed = run("triage", "predict", "--model", bundle, "--json",
                 _first(NIH, "label", "normal"))
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)["version"] == "1.0-cxr-nih"


def test_quick_runs_keep_both_classes_and_patient_splits():
    data = load_site(NIH, 32, limit=40)
    assert len(data.labels) == 40 and data.labels.sum() == 20
    by_patient: dict[str, set[str]] = {}
    for group, split in zip(data.groups, data.splits, strict=True):
        by_patient.setdefault(group, set()).add(str(split))
    assert all(len(s) == 1 for s in by_patient.values())


def test_train_mammo_patch_model(mammo_bundle):
    model = load_model(str(mammo_bundle))
    assert isinstance(model, PatchTriageModel)
    image = np.asarray(Image.open(_first(MIAS, "severity", "malignant")).convert("L"))
    heat = model.saliency(image)
    assert heat.shape == image.shape and 0.0 <= heat.min() and heat.max() <= 1.0
    assert 0.0 <= model.predict(image, modality="MG").probability <= 1.0


def test_train_malignancy_region_model_judges_the_locators_regions(tmp_path, mammo_bundle):
    out = tmp_path / "malignancy"
    result = run("triage", "train", "malignancy", "--data", MIAS, "--epochs", 1,
                 "--locator", mammo_bundle, "-o", out)
    assert result.exit_code == 0, result.output
    model = load_model(str(bundle_stem(out)) + ".json")
    assert isinstance(model, RegionTriageModel)
    assert model.card.name == "mammo-malignancy" and model.card.modalities == ["MG"]
    image = np.asarray(Image.open(_first(MIAS, "severity", "malignant")).convert("L"))
    x = model.preprocess(image)
    centres = model.centres(x)
    assert len(centres) == 3
    assert all(0 <= cy < 512 and 0 <= cx < 512 for cy, cx in centres)
    # regions at least a patch apart, so three looks are three different places
    for i, a in enumerate(centres):
        for b in centres[i + 1:]:
            assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 48 * 2 - 1e-6
    assert 0.0 <= model.predict(image, modality="MG").probability <= 1.0
    assert np.array_equal(model.saliency(image), model.locator.saliency(image))
    refused = run("triage", "predict", "--model", str(bundle_stem(out)) + ".json",
                  MR_NATIVE)
    assert refused.exit_code == 1 and "reads MG, not MR" in refused.output


def test_region_model_needs_a_patch_locator(tmp_path, mammo_bundle):
    meta = json.loads(mammo_bundle.read_text())
    bad = {**meta, "kind": "region", "region": 96, "locator": "chest"}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    (tmp_path / "bad.pt").write_bytes(mammo_bundle.with_suffix(".pt").read_bytes())
    with pytest.raises(TriageError, match="not a patch model"):
        load_model(str(path))


@pytest.mark.parametrize("problem, message", [
    ("no labels", "no labels.csv"),
    ("no column", "missing column(s) patient_id"),
    ("one class", "every image has the same label"),
    ("bad image", "training image"),
    ("truncated image", "training image"),
])
def test_bad_training_folders_get_clear_errors(tmp_path, problem, message):
    folder = tmp_path / "site"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.full((80, 80), 100, np.uint8)).save(folder / "images" / "a.png")
    Image.fromarray(np.full((80, 80), 120, np.uint8)).save(folder / "images" / "b.png")
    rows = {"no labels": None,
            "no column": "file,label\na.png,normal\n",
            "one class": "file,label,patient_id\na.png,normal,1\nb.png,normal,2\n",
            "bad image": "file,label,patient_id\na.png,normal,1\nmissing.png,pneumonia,2\n",
            "truncated image": "file,label,patient_id\na.png,normal,1\nb.png,pneumonia,2\n"}
    if problem == "truncated image":
        whole = (folder / "images" / "b.png").read_bytes()
        (folder / "images" / "b.png").write_bytes(whole[: len(whole) // 2])
    if rows[problem] is not None:
        (folder / "labels.csv").write_text(rows[problem])
    out = tmp_path / "model"
    result = run("triage", "train", "chest", "--data", folder, "-o", out)
    assert result.exit_code == 2 and message in result.output
    assert not list(tmp_path.glob("model*"))  # nothing half-written


def test_a_site_too_small_to_validate_is_refused(tmp_path):
    folder = tmp_path / "tiny"
    (folder / "images").mkdir(parents=True)
    lines = ["file,label,patient_id"]
    for i in range(4):
        Image.fromarray(np.full((80, 80), 60 * i, np.uint8)).save(folder / "images" / f"{i}.png")
        lines.append(f"{i}.png,{'pneumonia' if i % 2 else 'normal'},{i}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    result = run("triage", "train", "chest", "--data", folder, "--epochs", 1,
                 "-o", tmp_path / "m")
    assert result.exit_code == 2
    assert "need at least 10 with both classes" in result.output
