"""Versioned datasets: snapshot, diff, signed manifests, and bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from radguard.cli import main
from radguard.governance.auditlog import AuditLog
from radguard.governance.datasets import (
    DatasetError,
    diff_manifests,
    load_manifest,
    snapshot,
)
from tests.conftest import NIH_DX, SHARED

NIH = SHARED / "cxr-nih"


@pytest.fixture
def folder(tmp_path):
    """Six NIH images (PNG, so a pixel edit is exact), one DICOM, labels, and a junk file."""
    root = tmp_path / "v1"
    root.mkdir()
    with (NIH / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))[:6]
    for row in rows:
        grey = np.array(Image.open(NIH / "images" / row["file"]).convert("L"))[::4, ::4]
        row["file"] = row["file"].replace(".jpg", ".png")
        Image.fromarray(grey).save(root / row["file"])
    shutil.copy(NIH_DX, root / "dx.dcm")
    rows.append({**rows[0], "file": "dx.dcm", "patient_id": "dx"})
    (root / "broken.dcm").write_bytes(b"DICM but not really")
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _relabel(path, key, column, value):
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        if row["file"] == key:
            row[column] = value
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_snapshot_lists_unreadable_files_and_is_content_addressed(folder):
    m = snapshot(folder, folder / "labels.csv")
    assert len(m.images) == 8 and list(m.unreadable) == ["broken.dcm"]
    assert "dx.dcm" not in m.unreadable and m.images["dx.dcm"]["pixels"]
    again = snapshot(folder, folder / "labels.csv")
    assert again.dataset_hash == m.dataset_hash  # same content, same version
    assert m.unlabelled == ["broken.dcm"] and m.labels_without_image == []


def test_diff_finds_pixel_change_relabel_addition_removal(folder, tmp_path):
    v1 = snapshot(folder, folder / "labels.csv")
    v2_dir = tmp_path / "v2"
    shutil.copytree(folder, v2_dir)
    names = sorted(p.name for p in v2_dir.glob("*.png"))
    changed, removed = names[0], names[1]
    img = np.array(Image.open(v2_dir / changed))
    img[7, 7] ^= 1  # a single pixel, by one grey level
    Image.fromarray(img).save(v2_dir / changed)
    (v2_dir / removed).unlink()
    shutil.copy(v2_dir / names[2], v2_dir / "extra.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(v2_dir / "new.png")
    _relabel(v2_dir / "labels.csv", names[3], "label", "flipped")
    v2 = snapshot(v2_dir, v2_dir / "labels.csv", parent=v1)
    d = diff_manifests(v1, v2)
    assert d.pixels_changed == [changed]
    assert d.removed == [removed]
    assert set(d.added) == {"extra.png", "new.png"}
    assert [r["key"] for r in d.relabelled] == [names[3]]
    assert d.relabelled[0]["changes"]["label"][1] == "flipped"
    assert v2.parent == v1.dataset_hash and not d.identical


def test_re_encoding_with_the_same_pixels_is_told_apart(folder):
    v1 = snapshot(folder)
    name = sorted(folder.glob("*.png"))[0]
    Image.open(name).save(name, compress_level=1)  # other bytes, same pixels
    d = diff_manifests(v1, snapshot(folder))
    assert d.file_changed == [name.name] and d.pixels_changed == []


def test_moved_file_is_a_move(folder):
    v1 = snapshot(folder)
    first = sorted(folder.glob("*.png"))[0]
    (folder / "sub").mkdir()
    first.rename(folder / "sub" / first.name)
    d = diff_manifests(v1, snapshot(folder))
    assert d.moved == [(first.name, f"sub/{first.name}")] and not d.added and not d.removed


def test_signed_manifest_round_trip_and_tampering(folder, tmp_path, pki):
    from radguard.provenance.trust import TrustStore

    m = snapshot(folder, folder / "labels.csv")
    m.sign(pki.signer)
    path = m.save(tmp_path / "m.json")
    loaded = load_manifest(path)
    assert "DX Room 3" in loaded.check_signature(TrustStore.from_paths([pki.ca_cert_path]))
    raw = json.loads(path.read_text())
    key = next(iter(raw["labels"]))
    raw["labels"][key]["row"]["label"] = "flipped"
    path.write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="does not match its dataset hash"):
        load_manifest(path)
    # a forger who also recomputes the dataset hash is caught by the signature
    from radguard.governance.datasets import Manifest

    forged = Manifest(**{k: v for k, v in loaded.__dict__.items()})
    forged.labels = raw["labels"]
    body = forged.to_dict()
    path.write_text(json.dumps(body))
    with pytest.raises(DatasetError, match="changed after signing"):
        load_manifest(path)


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "other"}),
                                     json.dumps({"format": "radguard-dataset/1"})])
def test_bad_manifests_are_clear_errors(tmp_path, content):
    path = tmp_path / "m.json"
    path.write_text(content)
    with pytest.raises(DatasetError):
        load_manifest(path)


def test_missing_folder_and_bad_labels(tmp_path, folder):
    with pytest.raises(DatasetError, match="no such folder"):
        snapshot(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        snapshot(tmp_path / "empty")
    bad = tmp_path / "labels.csv"
    bad.write_text("file,label\na.png,1\na.png,0\n")
    with pytest.raises(DatasetError, match="twice"):
        snapshot(folder, bad)
    with pytest.raises(DatasetError, match="no column"):
        snapshot(folder, folder / "labels.csv", label_key="nope")


def test_cli_snapshot_diff_verify_and_audit_trail(folder, tmp_path):
    runner = CliRunner()
    log = tmp_path / "audit.jsonl"
    m1 = tmp_path / "m1.json"
    r = runner.invoke(main, ["dataset", "snapshot", str(folder), "--labels",
                             str(folder / "labels.csv"), "-o", str(m1), "--audit-log", str(log)])
    assert r.exit_code == 0, r.output
    assert "unreadable: broken.dcm" in r.output
    same = runner.invoke(main, ["dataset", "verify", str(m1), "--audit-log", str(log)])
    assert same.exit_code == 0 and "data matches" in same.output, same.output
    _relabel(folder / "labels.csv", "dx.dcm", "label", "flipped")
    m2 = tmp_path / "m2.json"
    runner.invoke(main, ["dataset", "snapshot", str(folder), "--labels",
                         str(folder / "labels.csv"), "-o", str(m2), "--parent", str(m1),
                         "--audit-log", str(log)])
    d = runner.invoke(main, ["dataset", "diff", str(m1), str(m2), "--audit-log", str(log)])
    assert d.exit_code == 1 and "relabelled: 1" in d.output
    missing = runner.invoke(main, ["dataset", "snapshot", str(tmp_path / "gone")])
    assert missing.exit_code == 2 and "no such folder" in missing.output
    actions = [e.action for e in AuditLog(log).entries()]
    assert actions == ["dataset.snapshot", "dataset.verify", "dataset.snapshot", "dataset.diff"]
    assert AuditLog(log).verify().intact


def test_cli_verify_rereads_the_labels(folder, tmp_path):
    """Issue 27: a label flipped in the CSV after the snapshot is found, row by row, exit 1;
    a manifest from before the label file was recorded says what it did not check."""
    runner = CliRunner()
    log = ["--audit-log", str(tmp_path / "audit.jsonl")]
    m1 = tmp_path / "m1.json"
    labels = folder / "labels.csv"
    r = runner.invoke(main, ["dataset", "snapshot", str(folder), "--labels", str(labels),
                             "-o", str(m1), *log])
    assert r.exit_code == 0, r.output
    assert load_manifest(m1).labels_file == str(labels.resolve())
    key = next(k for k in load_manifest(m1).labels if k != "dx.dcm")
    _relabel(labels, key, "label", "flipped")
    bad = runner.invoke(main, ["dataset", "verify", str(m1), *log])
    assert bad.exit_code == 1, bad.output
    assert "DATA DIFFERS" in bad.output and "relabelled: 1" in bad.output
    assert f"{key}: label: " in bad.output and "-> 'flipped'" in bad.output
    # the images alone still match
    assert "pixels changed" not in bad.output and "added" not in bad.output
    # --labels checks another copy
    other = tmp_path / "copy.csv"
    shutil.copy(labels, other)
    _relabel(other, key, "label", load_manifest(m1).labels[key]["row"]["label"])
    good = runner.invoke(main, ["dataset", "verify", str(m1), "--labels", str(other), *log])
    assert good.exit_code == 0 and "data matches" in good.output, good.output
    # the recorded file is gone: a clear error, not "matches"
    labels.unlink()
    gone = runner.invoke(main, ["dataset", "verify", str(m1), *log])
    assert gone.exit_code == 2 and "label file the manifest was made from is gone" in gone.output
    # an older manifest (no labels_file): images checked, and it says labels were not
    raw = json.loads(m1.read_text())
    del raw["labels_file"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(raw))
    note = runner.invoke(main, ["dataset", "verify", str(old), *log])
    assert note.exit_code == 0 and "label rows not re-read" in note.output, note.output
    assert "data matches" not in note.output
    flipped = runner.invoke(main, ["dataset", "verify", str(old), "--labels", str(other),
                                   *log])
    assert flipped.exit_code == 0, flipped.output
