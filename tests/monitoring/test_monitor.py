"""The monitor service: persistence across restarts, alarms, labels, status, bad input, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from radguard.cli import main
from radguard.monitoring import IMAGE_FEATURES, Monitor, MonitorError, image_features
from radguard.monitoring.features import features_of_file
from tests.conftest import NIH_DX, RG1_J2K

NAMES = ["a", "b", "c"]


def _row(values):
    return dict(zip(NAMES, values, strict=True))


@pytest.fixture()
def fitted(tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, (400, 3))
    scores = rng.uniform(0, 1, 400)
    labels = (rng.uniform(0, 1, 400) < scores).astype(int)
    monitor = Monitor(tmp_path / "m.db")
    monitor.fit_reference(ref, NAMES, scores=scores, labels=labels, false_alarms_per=10_000)
    return monitor, rng


def test_shift_alarms_and_state_survives_a_restart(fitted, tmp_path):
    monitor, rng = fitted
    for i in range(100):
        assert monitor.observe(f"s{i}", _row(rng.normal(0, 1, 3)),
                               score=float(rng.uniform())) == []
    monitor.close()
    resumed = Monitor(tmp_path / "m.db")  # a restart in the middle of the stream
    assert resumed.seq == 100
    alarms = []
    for i in range(100, 140):
        alarms += resumed.observe(f"s{i}", _row(rng.normal(3, 1, 3)),
                                  score=float(rng.uniform()))
    assert alarms and alarms[0].seq < 110 and alarms[0].direction == "up"
    assert resumed.alarms()[0]["detector"] == "drift"
    status = resumed.status(window=40)
    assert status["drift_tests"]["a"]["p_value"] < 1e-6


def test_labels_track_performance(fitted):
    monitor, rng = fitted
    for i in range(300):
        p = float(rng.uniform())
        monitor.observe(f"s{i}", _row(rng.normal(0, 1, 3)), score=p)
        truth = int(rng.uniform() < p)
        wrong = 1 - truth if i >= 150 else truth  # labels turn against the model
        monitor.add_label(f"s{i}", wrong)
    perf = monitor.status(window=300)["performance"]
    assert perf["labelled"] == 300 and "auc" in perf
    assert any(a["detector"] == "performance" for a in monitor.alarms(500))


def test_bad_input(fitted, tmp_path):
    monitor, _ = fitted
    with pytest.raises(MonitorError, match="missing feature"):
        monitor.observe("x", {"a": 1.0, "b": 2.0}, score=0.5)
    with pytest.raises(MonitorError, match="NaN"):
        monitor.observe("x", {"a": 1.0, "b": float("nan"), "c": 0.0}, score=0.5)
    with pytest.raises(MonitorError, match="give the study's score"):
        monitor.observe("x", {"a": 1.0, "b": 2.0, "c": 0.0})
    monitor.observe("y", {"a": 1.0, "b": 2.0, "c": 0.0}, score=0.5)
    with pytest.raises(MonitorError, match="already observed"):
        monitor.observe("y", {"a": 1.0, "b": 2.0, "c": 0.0}, score=0.5)
    with pytest.raises(MonitorError, match="never observed"):
        monitor.add_label("nobody", 1)
    with pytest.raises(MonitorError, match="no reference"):
        Monitor(tmp_path / "empty.db").observe("z", {"a": 1.0}, score=0.1)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(MonitorError, match="not a usable"):
        Monitor(junk)


def test_image_features_are_scale_free():
    rng = np.random.default_rng(4)
    img8 = rng.integers(0, 256, (300, 400)).astype(np.uint8)
    a = image_features(img8, 255)
    b = image_features(img8.astype(np.uint16) * 257, 65535)  # same image in 16 bits
    for name in IMAGE_FEATURES:
        assert a[name] == pytest.approx(b[name], abs=1e-6)
    assert set(features_of_file(str(RG1_J2K))) == set(IMAGE_FEATURES)


def test_cli_features_init_ingest_status(tmp_path):
    runner = CliRunner()
    feats = tmp_path / "features.csv"
    result = runner.invoke(main, ["monitor", "features", str(NIH_DX), str(RG1_J2K),
                                  "-o", str(feats)])
    assert result.exit_code == 0 and "2 feature rows" in result.output
    rng = np.random.default_rng(5)
    ref, stream = tmp_path / "ref.csv", tmp_path / "stream.csv"
    for path, shift, n in ((ref, 0.0, 300), (stream, 2.5, 60)):
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", *NAMES])
            for i in range(n):
                w.writerow([f"{path.stem}{i}", *(rng.normal(shift if i >= 20 else 0, 1, 3))])
    db = tmp_path / "cli.db"
    assert runner.invoke(main, ["monitor", "init", str(ref), "--db", str(db)]).exit_code == 0
    log = tmp_path / "audit.jsonl"
    ingest = runner.invoke(main, ["monitor", "ingest", str(stream), "--db", str(db),
                                  "--audit-log", str(log)])
    assert ingest.exit_code == 0 and "ALARM" in ingest.output
    from radguard.governance.auditlog import AuditLog

    logged = [e for e in AuditLog(log).entries() if e.action == "monitoring.alarm"]
    assert len(logged) == ingest.output.count("ALARM") and AuditLog(log).verify().intact
    assert logged[0].details["detector"] == "drift"
    status = runner.invoke(main, ["monitor", "status", "--db", str(db), "--json"])
    assert json.loads(status.output)["studies"] == 60
    bad = runner.invoke(main, ["monitor", "status", "--db", str(tmp_path / "none.db")])
    assert bad.exit_code == 2 and "no monitoring database" in bad.stderr


def test_new_scanner_metadata_raises_one_alarm_per_value(tmp_path):
    rng = np.random.default_rng(6)
    monitor = Monitor(tmp_path / "meta.db")
    meta = [{"Manufacturer": "GE", "ViewPosition": "PA" if i % 2 else "AP"} for i in range(200)]
    monitor.fit_reference(rng.normal(0, 1, (200, 3)), NAMES, metadata=meta)
    assert monitor.observe("a", _row(rng.normal(0, 1, 3)),
                           metadata={"Manufacturer": "GE", "ViewPosition": "PA"}) == []
    first = monitor.observe("b", _row(rng.normal(0, 1, 3)),
                            metadata={"Manufacturer": "Acme", "ViewPosition": "PA"})
    assert [(a.detector, a.feature) for a in first] == [("metadata", "Manufacturer=Acme")]
    again = monitor.observe("c", _row(rng.normal(0, 1, 3)),
                            metadata={"Manufacturer": "Acme", "ViewPosition": "PA"})
    assert again == []
    for i in range(30):
        monitor.observe(f"d{i}", _row(rng.normal(0, 1, 3)),
                        metadata={"Manufacturer": "Acme", "ViewPosition": "LL"})
    tests = monitor.status(window=30)["metadata_tests"]
    assert tests["Manufacturer"]["p_value"] < 1e-6


def test_threads_share_one_monitor(fitted):
    """A gateway's worker threads observe through one Monitor: no study lost or doubled, the
    drift state the same as observing them one after another."""
    import threading

    monitor, rng = fitted
    rows = [(f"t{i}", _row(rng.normal(0.4, 1, 3)), float(rng.uniform())) for i in range(200)]
    errors = []

    def observe(share):
        try:
            for study, row, score in share:
                monitor.observe(study, row, score=score, site="x")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=observe, args=(rows[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    count, seqs = monitor.db.execute("SELECT COUNT(*), COUNT(DISTINCT seq) FROM studies "
                                     "WHERE site='x'").fetchone()
    assert count == seqs == 200
    with pytest.raises(MonitorError, match="already observed"):
        monitor.observe("t0", rows[0][1], score=0.5, site="x")


def test_gateway_features_are_the_reference_features():
    """What the gateway observes (from the pixels its scan decoded) is what `radguard monitor
    features` wrote into the reference for the same file - by stored bit depth, not display."""
    from radguard.dicom.io import read_dataset
    from radguard.dicom.pixels import pixel_array
    from radguard.monitoring.features import dataset_features

    for path in (NIH_DX, RG1_J2K):
        ds = read_dataset(path)
        assert dataset_features(ds, pixel_array(ds)) == features_of_file(str(path))


def test_a_cli_reference_from_dicom_files_knows_their_scanners(tmp_path):
    """`monitor features` on DICOM files writes their acquisition metadata; `monitor init`
    learns it as categories (KVP too, though it looks numeric), so the gateway's observations
    - image features plus metadata - fit the reference and a new scanner alarms once."""
    from radguard.dicom.io import read_dataset, write_dataset
    from radguard.monitoring.features import METADATA_FIELDS, dataset_features, metadata_features

    folder = tmp_path / "archive"
    folder.mkdir()
    rng = np.random.default_rng(2)
    full = read_dataset(NIH_DX)
    pixels = full.pixel_array
    for i in range(50):  # 256 px crops at random places: 50 studies that differ
        y, x = rng.integers(0, pixels.shape[0] - 256, 2)
        ds = read_dataset(NIH_DX)
        ds.PixelData = np.ascontiguousarray(pixels[y:y + 256, x:x + 256]).tobytes()
        ds.Rows = ds.Columns = 256
        ds.KVP, ds.Manufacturer = "120", "Vendor A"
        write_dataset(ds, folder / f"{i}.dcm")
    runner = CliRunner()
    feats = tmp_path / "features.csv"
    result = runner.invoke(main, ["monitor", "features", str(folder), "-o", str(feats)])
    assert result.exit_code == 0, result.output
    header = feats.read_text().splitlines()[0].split(",")
    assert header == ["id", *IMAGE_FEATURES, *METADATA_FIELDS]
    db = tmp_path / "m.db"
    init = runner.invoke(main, ["monitor", "init", str(feats), "--db", str(db)])
    assert init.exit_code == 0, init.output
    assert "metadata Manufacturer" in init.output and "KVP" not in init.output.split(";")[0]
    monitor = Monitor(db)
    ds = read_dataset(folder / "7.dcm")
    ds.Manufacturer = "Vendor B"
    alarms = monitor.observe("new", dataset_features(ds), site="DX1",
                             metadata=metadata_features(ds))
    assert [(a.detector, a.feature) for a in alarms] == [("metadata", "Manufacturer=Vendor B")]
