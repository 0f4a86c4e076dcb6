"""`radguard demo` (the README's main command) on free ports, exiting after the batch: every
layer of the gateway on (signature, watermark, forensics, triage, drift monitoring)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from radguard.cli import main
from radguard.dicom.io import read_dataset


def test_demo_routes_every_image_as_the_policy_says(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "demo"),
                                       "--no-wait", "--dicom-port", "0", "--http-port", "0"])
    assert result.exit_code == 0, result.output
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
