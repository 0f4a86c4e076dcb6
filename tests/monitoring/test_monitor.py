"""The monitor service: persistence across restarts, alarms, labels, status, bad input, CLI."""

from __future__ import annotations

import csv
import json
import sqlite3

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
    assert {a["detector"] for a in monitor.alarms(500)} & {"sensitivity", "specificity"}


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
    with pytest.raises(MonitorError, match="0 or 1"):
        monitor.add_label("y", 2)
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
        except Exception as exc:  # collected for the assertion below
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


# -- performance decay, episodes, labels -----------------------------------------------------

def _binormal(labels, rng, missed=0.0):
    """Scores of a model with AUC ~0.95 (binormal on the logit); ``missed``: the fraction of
    positives now scored as negatives are (the model stopped seeing the finding)."""
    y = np.asarray(labels)
    as_positive = (y == 1) & (rng.uniform(size=len(y)) >= missed)
    logit = np.where(as_positive, rng.normal(1.2, 1, len(y)), rng.normal(-1.2, 1, len(y)))
    return 1 / (1 + np.exp(-logit))


@pytest.fixture(scope="module")
def decay_reference(tmp_path_factory):
    """A monitor fitted on 400 labelled studies at operating point 0.5, and its copies."""
    rng = np.random.default_rng(10)
    labels = (rng.uniform(size=400) < 0.4).astype(int)
    monitor = Monitor(tmp_path_factory.mktemp("decay") / "ref.db")
    fitted = monitor.fit_reference(rng.normal(0, 1, (400, 3)), NAMES,
                                   scores=_binormal(labels, rng), labels=labels,
                                   threshold=0.5)
    assert {"h_sensitivity", "h_specificity"} <= set(fitted)
    return monitor


def _study_stream(n, rng, missed=lambda i: 0.0, prevalence=0.4):
    labels = (rng.uniform(size=n) < prevalence).astype(int)
    scores = np.array([_binormal([y], rng, missed(i))[0] for i, y in enumerate(labels)])
    return labels, scores


def _run(monitor, labels, scores, rng, *, start=0, labelled=lambda i, y: True, delay=0):
    """Observe studies in order; each label arrives ``delay`` studies later (if at all).
    Returns (index of the study being observed, alarm) pairs."""
    out, waiting = [], []
    for i, (y, s) in enumerate(zip(labels, scores, strict=True)):
        sid = f"s{start + i}"
        out += [(i, a) for a in monitor.observe(sid, _row(rng.normal(0, 1, 3)), score=float(s))]
        if labelled(i, y):
            waiting.append((i + delay, sid, int(y)))
        while waiting and waiting[0][0] <= i:
            _, due, label = waiting.pop(0)
            out += [(i, a) for a in monitor.add_label(due, label)]
    return out


def test_a_sensitivity_drop_is_one_episode_that_closes_and_rearms(decay_reference, tmp_path):
    """Sensitivity falls (a third of positives scored as negatives: ~15 points) from study
    300 to 900, recovers, falls again from 2,600: two alarms, one per episode, each found
    within 200 labelled studies, none before the first drop; the first episode closes."""
    monitor = decay_reference.copy(tmp_path / "m.db")
    rng = np.random.default_rng(11)

    def missed(i):
        return 0.35 if 300 <= i < 900 or i >= 2600 else 0.0

    labels, scores = _study_stream(3000, rng, missed)
    alarms = _run(monitor, labels, scores, rng)
    assert [a.detector for _, a in alarms] == ["sensitivity", "sensitivity"]
    (first, a1), (second, a2) = alarms
    assert 300 <= first < 300 + 200 and 2600 <= second < 2600 + 200
    episodes = monitor.episodes()
    assert [(e["signal"], e["state"]) for e in episodes] == [("sensitivity", "open"),
                                                             ("sensitivity", "closed")]
    closed = episodes[1]
    assert closed["id"] == a1.episode and 900 <= closed["end_seq"] < 2600
    change = closed["changes"][0]
    assert change["feature"] == "sensitivity" and change["direction"] == "down"
    assert change["rate"] < change["reference"] and change["operating_point"] == 0.5
    assert "back in control" in closed["summary"]
    assert monitor.alarms()[0]["episode"] == a2.episode


def test_partial_delayed_and_class_biased_labels(decay_reference, tmp_path):
    """Labels for 30% of studies, 50 studies late: the drop is still found (later, in
    studies); labels for every positive but only 10% of negatives (only positives are
    confirmed), in control: no alarm - labelling that depends on the class is allowed."""
    rng = np.random.default_rng(12)
    labels, scores = _study_stream(2500, rng, lambda i: 0.35 if i >= 500 else 0.0)
    some = decay_reference.copy(tmp_path / "partial.db")
    alarms = _run(some, labels, scores, rng, labelled=lambda i, y: rng.uniform() < 0.3,
                  delay=50)
    assert [a.detector for _, a in alarms] == ["sensitivity"] and alarms[0][0] >= 500
    biased = decay_reference.copy(tmp_path / "biased.db")
    labels, scores = _study_stream(3000, rng)
    alarms = _run(biased, labels, scores, rng, start=10_000,
                  labelled=lambda i, y: y == 1 or rng.uniform() < 0.1)
    assert alarms == []
    status = biased.status(window=3000)
    assert status["performance"]["labelled"] < 0.5 * 3000
    assert status["operating_point"] == 0.5


def test_labels_before_their_study_duplicates_and_conflicts(decay_reference, tmp_path):
    monitor = decay_reference.copy(tmp_path / "m.db")
    rng = np.random.default_rng(13)
    assert monitor.add_label("early", 1) == []  # the report came first
    assert monitor.add_label("early", 1) == []  # sent twice: still one
    with pytest.raises(MonitorError, match="different label waiting"):
        monitor.add_label("early", 0)
    assert monitor.status()["labels_waiting_for_their_study"] == 1
    monitor.observe("early", _row(rng.normal(0, 1, 3)), score=0.9)
    status = monitor.status()
    assert status["labels_waiting_for_their_study"] == 0
    assert status["performance"]["labelled"] == 1
    before = monitor.db.execute("SELECT upper FROM cusum WHERE detector LIKE 'sens%'").fetchall()
    assert monitor.add_label("early", 1) == []  # a duplicate: the detector does not step
    after = monitor.db.execute("SELECT upper FROM cusum WHERE detector LIKE 'sens%'").fetchall()
    assert before == after
    with pytest.raises(MonitorError, match="already labelled 1"):
        monitor.add_label("early", 0)
    assert monitor.db.execute("SELECT label FROM studies WHERE id='early'").fetchone()[0] == 1


def test_a_drift_is_one_alarm_per_episode(fitted):
    """Three features shift for 150 studies: one alarm, its episode naming all three (it was
    one alarm per feature every few studies), closed once the shift ends; the next shift is
    a new episode."""
    monitor, rng = fitted
    alarms = []
    for i in range(700):
        shift = 2.5 if 100 <= i < 250 or i >= 600 else 0.0
        alarms += monitor.observe(f"d{i}", _row(rng.normal(shift, 1, 3)),
                                  score=float(rng.uniform()))
    assert len(alarms) == 2 and all(a.detector == "drift" for a in alarms)
    assert alarms[0].direction == "up" and 100 <= alarms[0].seq < 115
    assert alarms[1].seq >= 600
    closed = [e for e in monitor.episodes() if e["state"] == "closed"]
    assert len(closed) == 1 and 250 <= closed[0]["end_seq"] < 350
    # the features that crossed later joined the episode, not new alarms
    assert {(c["feature"], c["direction"]) for c in closed[0]["changes"]} == {
        ("a", "up"), ("b", "up"), ("c", "up")}
    assert 90 <= closed[0]["onset_seq"] <= alarms[0].seq  # where the change began


def test_model_versions_keep_their_own_state(fitted):
    """Studies scored by another model version: their own CUSUMs and episodes, judged
    against their own reference once it exists."""
    monitor, rng = fitted
    for i in range(60):
        monitor.observe(f"v{i}", _row(rng.normal(2.5, 1, 3)), score=0.5, model_version="2.0")
    assert {e["version"] for e in monitor.episodes()} == {"2.0"}
    keys = {r[0] for r in monitor.db.execute("SELECT detector FROM cusum").fetchall()}
    assert keys == {"drift|2.0"}
    monitor.fit_reference(rng.normal(2.5, 1, (200, 3)), NAMES, model_version="2.0")
    assert monitor.episodes(open_only=True) == []  # refitting closes that version's episodes
    assert monitor.observe("w", _row(rng.normal(2.5, 1, 3)), model_version="2.0") == []
    with pytest.raises(MonitorError, match="give the study's score"):
        monitor.observe("w2", _row(rng.normal(0, 1, 3)))  # the default version has scores


def test_episodes_reach_the_audit_log_and_a_webhook(tmp_path):
    """An opened and a closed episode: two audit entries and two webhook posts, sent after
    the commit by the dispatcher (a local HTTP receiver)."""
    import http.server
    import threading

    from radguard.governance.auditlog import AuditLog
    from radguard.monitoring.notify import Dispatcher, WebhookNotifier

    received = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # the http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    dispatcher = Dispatcher([WebhookNotifier(f"http://127.0.0.1:{server.server_port}/hook")],
                            backoff=0.01)
    log = AuditLog(tmp_path / "audit.jsonl")
    rng = np.random.default_rng(3)
    monitor = Monitor(tmp_path / "m.db", audit_log=log, notify=dispatcher)
    monitor.fit_reference(rng.normal(0, 1, (200, 3)), NAMES)
    try:
        for i in range(200):
            monitor.observe(f"n{i}", _row(rng.normal(3.0 if 50 <= i < 80 else 0, 1, 3)),
                            site="CR1")
        assert dispatcher.flush(10)
    finally:
        dispatcher.close()
        server.shutdown()
    assert [(e["event"], e["state"]) for e in received] == [
        ("monitoring.alarm", "open"), ("monitoring.episode_closed", "closed")]
    assert received[0]["site"] == "CR1" and "drift at site CR1" in received[0]["summary"]
    logged = [e.action for e in log.entries() if e.action.startswith("monitoring.")]
    assert logged == ["monitoring.alarm", "monitoring.episode_closed"]


def test_cli_labels_arrive_late_with_bad_rows(decay_reference, tmp_path):
    """`monitor labels`: text labels with --positive, a study not observed yet waits, a
    conflicting and an unreadable row are refused with their line, the good rows are taken
    (exit 1 at the end)."""
    monitor = decay_reference.copy(tmp_path / "m.db")
    rng = np.random.default_rng(14)
    for i in range(5):
        monitor.observe(f"s{i}", _row(rng.normal(0, 1, 3)), score=0.8)
    monitor.add_label("s4", 0)
    monitor.close()
    labels = tmp_path / "reports.csv"
    labels.write_text("file,finding\ns0,pneumonia\ns1,normal\nlater,pneumonia\n"
                      "s4,pneumonia\n,normal\n")
    runner = CliRunner()
    result = runner.invoke(main, ["monitor", "labels", str(labels), "--db",
                                  str(tmp_path / "m.db"), "--id-column", "file",
                                  "--label-column", "finding", "--positive", "pneumonia"])
    assert result.exit_code == 1, result.output
    assert "3 labels taken (1 wait for their study), 2 refused" in result.output
    assert "reports.csv:5: study s4 is already labelled 0" in result.stderr
    assert "reports.csv:6: no study id" in result.stderr
    no_positive = runner.invoke(main, ["monitor", "labels", str(labels), "--db",
                                       str(tmp_path / "m.db"), "--id-column", "file",
                                       "--label-column", "finding"])
    assert "is not 0 or 1" in no_positive.stderr and no_positive.exit_code == 1
    wrong = runner.invoke(main, ["monitor", "labels", str(labels), "--db",
                                 str(tmp_path / "m.db")])
    assert wrong.exit_code == 2 and "no column 'id'" in wrong.stderr
    status = runner.invoke(main, ["monitor", "status", "--db", str(tmp_path / "m.db")])
    assert status.exit_code == 0 and "1 label(s) waiting for their study" in status.output


def test_review_findings_versions_status_and_bad_scores(tmp_path):
    """A version whose reference has other features does not break status; a version
    named with "|" keeps its own state when another is refitted; refitting the default
    resets the versions judged against it; bad scores are clear errors."""
    rng = np.random.default_rng(21)
    monitor = Monitor(tmp_path / "m.db")
    monitor.fit_reference(rng.normal(0, 1, (100, 3)), NAMES, scores=rng.uniform(size=100))
    monitor.fit_reference(rng.normal(0, 1, (100, 2)), ["a", "x"], model_version="v1")
    monitor.fit_reference(rng.normal(0, 1, (100, 3)), NAMES, model_version="b")
    for i in range(25):
        monitor.observe(f"v{i}", {"a": 0.0, "x": 0.0}, model_version="v1")
        monitor.observe(f"d{i}", _row(rng.normal(0, 1, 3)), score=0.5)
        monitor.observe(f"p{i}", _row(rng.normal(6, 1, 3)), score=0.5, model_version="a|b")
        monitor.observe(f"f{i}", _row(rng.normal(0, 1, 3)), score=0.5, model_version="fb")
    assert monitor.status()["window"] == 75  # the default's, and "a|b" and "fb" fall back
    assert monitor.status(model_version="v1")["window"] == 25
    keys = {r[0] for r in monitor.db.execute("SELECT detector FROM cusum")}
    assert {"drift|a|b", "drift|fb"} <= keys
    monitor.fit_reference(rng.normal(0, 1, (100, 3)), NAMES, model_version="b")
    keys = {r[0] for r in monitor.db.execute("SELECT detector FROM cusum")}
    assert "drift|a|b" in keys  # not taken for version "b"
    monitor.fit_reference(rng.normal(0, 1, (100, 3)), NAMES, scores=rng.uniform(size=100))
    keys = {r[0] for r in monitor.db.execute("SELECT detector FROM cusum")}
    assert "drift|fb" not in keys and "drift|" not in keys and "drift|v1" in keys
    assert all(e["version"] in ("v1", "b") for e in monitor.episodes(open_only=True))
    with pytest.raises(MonitorError, match="score is not a number"):
        monitor.observe("bad", _row([0, 0, 0]), score="abc")  # type: ignore[arg-type]
    with pytest.raises(MonitorError, match="NaN or infinite"):
        Monitor(tmp_path / "n.db").fit_reference(rng.normal(0, 1, (60, 3)), NAMES,
                                                 scores=np.r_[np.nan, rng.uniform(size=59)])


def test_a_rolled_back_update_leaves_no_audit_entry_and_alarms_carry_their_peak(tmp_path):
    from radguard.governance.auditlog import AuditLog

    rng = np.random.default_rng(22)
    log = AuditLog(tmp_path / "audit.jsonl")
    monitor = Monitor(tmp_path / "m.db", audit_log=log)
    monitor.fit_reference(rng.normal(0, 1, (100, 3)), NAMES,
                          metadata=[{"Manufacturer": "GE"}] * 100)
    real_transaction = monitor.db.transaction

    @__import__("contextlib").contextmanager
    def failing():
        with real_transaction():
            yield
            raise sqlite3.OperationalError("database or disk is full")

    monitor.db.transaction = failing
    with pytest.raises(sqlite3.OperationalError):
        monitor.observe("x", _row([0, 0, 0]), metadata={"Manufacturer": "Acme"})
    monitor.db.transaction = real_transaction
    assert [e for e in log.entries() if e.action.startswith("monitoring.")] == []
    assert monitor.episodes() == []
    for i in range(30):
        monitor.observe(f"s{i}", _row([6.0, 6.0, 6.0]))
    opened = [e for e in log.entries() if e.action == "monitoring.alarm"]
    assert len(opened) == 1 and opened[0].details["peak"] >= 1.0
