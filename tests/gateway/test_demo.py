"""`radguard demo` (the README's main command) on free ports, exiting after the batch: every
layer of the gateway on (signature, watermark, forensics, triage, drift monitoring)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from radguard.cli import main
from radguard.dicom.io import read_dataset


def _earlier_run(workdir) -> None:
    """What an earlier demo run leaves: its marker, and a store with an instance in it."""
    from radguard.gateway import Store
    from radguard.gateway.demo import MARKER
    from radguard.gateway.dimse import header_of
    from tests.gateway.conftest import small_images

    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("")
    store = Store(workdir / "data")
    try:
        path = next(iter(small_images(workdir / "images", 1)))
        store.ingest(path, header_of(path, "test"), source="dimse", calling_ae="EARLIER")
    finally:
        store.close()


def test_demo_routes_every_image_as_the_policy_says(tmp_path):
    _earlier_run(tmp_path / "demo")  # issue 27: each run starts from a fresh store
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "demo"),
                                       "--no-wait", "--dicom-port", "0", "--http-port", "0"])
    assert result.exit_code == 0, result.output
    assert "started afresh: removed the earlier demo run's data, images" in result.output
    # the "why" column is cut at a word, with an ellipsis (issue 27)
    assert "content detectors do not judge an image its signature..." in result.output
    assert "vouche\n" not in result.output
    assert "every image landed where the policy says" in result.output
    assert "worklist: http://127.0.0.1:" in result.output
    assert result.output.count(" done ") == 13 and "rejected" in result.output
    from radguard.governance.auditlog import AuditLog

    log = AuditLog(tmp_path / "demo" / "data" / "audit.jsonl")
    assert log.verify().intact

    from radguard.gateway import Store

    images = tmp_path / "demo" / "images"
    rows = {r.sop_uid: r for r in Store(tmp_path / "demo" / "data").instances()}
    by_file = {p.name: rows[str(read_dataset(p, stop_before_pixels=True).SOPInstanceUID)]
               for p in sorted(images.glob("*.dcm"))}
    assert len(by_file) == 17
    assert len(Store(tmp_path / "demo" / "data").instances()) == 17  # nothing of earlier runs
    done = [r for r in by_file.values() if r.state == "done"]
    # the watermark layer checked every image: intact where nothing was edited
    assert all(r.detail["scan"]["watermark"] == "intact" for r in done)
    edited = next(r for r in by_file.values() if r.trust == "watermark changed")
    assert edited.state == "quarantined"
    assert edited.detail["reasons"][0] == "watermark no longer matches the pixels"
    # the demo pasted a 48 x 48 patch at x = 320, y = 232 of the 512 px image: the watermark
    # reports a changed region there
    boxes = [r for r in edited.detail["scan"]["reasons"] if r.startswith("watermark:")]
    box = json.loads(boxes[0].split("region(s) ")[1])[0]
    assert box[0] < 368 and box[2] > 320 and box[1] < 280 and box[3] > 232
    # the drift monitor saw every checked study; the adult site raised nothing, the
    # paediatric site a new-manufacturer alarm at once and drift alarms later
    assert all(isinstance(r.detail["monitoring"], list) for r in done)
    adult = [r for r in done if r.calling_ae == "MODALITY"]
    assert adult and not any(r.detail["monitoring"] for r in adult)
    paediatric = [r for r in done if r.calling_ae == "PAED_DX"]
    assert len(paediatric) == 8
    raised = [(a["detector"], a["feature"].split("=")[0])
              for r in paediatric for a in r.detail["monitoring"]]
    assert raised.count(("metadata", "Manufacturer")) == 1  # a new value alarms once
    assert any(detector == "drift" for detector, _ in raised)
    alarms = log.recent(50, actions=("monitoring.alarm",))
    assert alarms and all(e.target.startswith("PAED_DX/") for e in alarms)
    assert "drift monitor: " in result.output and "alarm(s) in the audit log" in result.output


def test_a_reset_wipes_only_what_the_demo_made(tmp_path):
    from radguard.errors import RadguardError
    from radguard.gateway.demo import MARKER, fresh_workdir

    said: list[str] = []
    # the demo's own folder: its store, images, keys and monitor go; anything else stays
    own = tmp_path / "own"
    for name in ("data", "images", "pki"):
        (own / name).mkdir(parents=True)
        (own / name / "f").write_text("x")
    (own / "monitor.db").write_text("x")
    (own / MARKER).write_text("")
    (own / "notes.txt").write_text("mine")
    fresh_workdir(own, said.append)
    assert sorted(p.name for p in own.iterdir()) == [MARKER, "notes.txt"]
    # a folder from before the marker with nothing but the demo's files is the demo's too
    old = tmp_path / "old"
    (old / "pki").mkdir(parents=True)
    (old / "pki" / "ca.cert.pem").write_text("x")
    (old / "data").mkdir()
    fresh_workdir(old, said.append)
    assert sorted(p.name for p in old.iterdir()) == [MARKER]
    # someone else's folder (a real store's parent, say): refused without a yes
    theirs = tmp_path / "theirs"
    (theirs / "data").mkdir(parents=True)
    (theirs / "data" / "radguard.db").write_text("patients")
    (theirs / "config.toml").write_text("x")
    with pytest.raises(RadguardError, match="not made by the demo"):
        fresh_workdir(theirs, said.append)
    with pytest.raises(RadguardError, match="not made by the demo"):
        fresh_workdir(theirs, said.append, confirm=lambda question: False)
    assert (theirs / "data" / "radguard.db").read_text() == "patients"
    asked: list[str] = []
    fresh_workdir(theirs, said.append, confirm=lambda q: asked.append(q) or True)
    assert "delete data in it" in asked[0] and not (theirs / "data").exists()
    assert (theirs / "config.toml").exists()
    # a link in the demo's folder is removed, never followed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.dcm").write_text("x")
    (own / "images").symlink_to(elsewhere)
    fresh_workdir(own, said.append)
    assert not (own / "images").exists() and (elsewhere / "keep.dcm").exists()
    # nothing there yet: made and marked
    fresh_workdir(tmp_path / "new", said.append)
    assert (tmp_path / "new" / MARKER).is_file()


def test_demo_command_resets_by_default_and_keeps_on_request(tmp_path, monkeypatch):
    import radguard.gateway.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_gateway_demo",
                        lambda workdir, say, **kw: calls.append(kw) or True)
    base = ["demo", "--workdir", str(tmp_path / "d"), "--no-wait"]
    assert CliRunner().invoke(main, base).exit_code == 0
    assert CliRunner().invoke(main, [*base, "--keep"]).exit_code == 0
    assert [c["reset"] for c in calls] == [True, False]
    assert calls[0]["confirm"] is None  # no terminal, nobody to ask: a foreign folder stays
    monkeypatch.undo()
    theirs = tmp_path / "theirs"
    (theirs / "data").mkdir(parents=True)
    result = CliRunner().invoke(main, ["demo", "--workdir", str(theirs), "--no-wait"])
    assert result.exit_code != 0 and "not made by the demo" in result.output
    assert "--keep" in result.output and (theirs / "data").is_dir()
