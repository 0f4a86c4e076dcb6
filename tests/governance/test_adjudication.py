"""Label adjudication: case selection by rule, ties, resolution, agreement, new versions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import cohen_kappa_score

from radguard.cli import main
from radguard.governance.adjudication import (
    AdjudicationError,
    adjudicated_snapshot,
    majority,
    plan,
    read_study,
    resolve,
    select_cases,
)
from radguard.governance.auditlog import AuditLog
from radguard.governance.datasets import diff_manifests, load_manifest, snapshot

P, N = "pneumonia", "normal"
# case -> labels of readers A, B, C (None: that reader did not label the case)
READS = {
    "img1.png": (P, P, P),
    "img2.png": (N, N, N),
    "img3.png": (P, P, N),   # disagreement, majority P
    "img4.png": (N, N, P),   # disagreement, majority N, a positive read
    "img5.png": (P, N, None),  # tie between the two who read it
    "img6.png": (N, N, N),
    "img7.png": (P, N, N),   # disagreement, majority N
    "img8.png": (P, P, P),
}
# what the adjudicator decides on the disagreement worklist
ADJUDICATED = {"img3.png": N, "img4.png": N, "img5.png": P, "img7.png": P}
FINAL = {"img1.png": P, "img2.png": N, "img3.png": N, "img4.png": N, "img5.png": P,
         "img6.png": N, "img7.png": P, "img8.png": P}
# the unadjudicated version's labels: the majority, the tie written down as normal
ORIGINAL = {"img1.png": P, "img2.png": N, "img3.png": P, "img4.png": N, "img5.png": N,
            "img6.png": N, "img7.png": N, "img8.png": P}


def _write_csv(path, fields, rows):
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read_csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def readers_csv(tmp_path):
    rows = [{"case": case, "reader": reader, "label": label}
            for case, labels in READS.items()
            for reader, label in zip("ABC", labels, strict=True) if label is not None]
    return _write_csv(tmp_path / "readers.csv", ["case", "reader", "label"], rows)


@pytest.fixture
def adjudicated_csv(tmp_path):
    return _write_csv(tmp_path / "adjudicated.csv", ["case", "label"],
                      [{"case": c, "label": v} for c, v in ADJUDICATED.items()])


@pytest.fixture
def dataset(tmp_path):
    """Eight tiny PNGs, their unadjudicated labels (with a patient column), and its manifest."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(26)
    for case in READS:
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / case)
    labels = _write_csv(tmp_path / "labels-v1.csv", ["file", "label", "patient_id"],
                        [{"file": c, "label": v, "patient_id": f"p{i}"}
                         for i, (c, v) in enumerate(ORIGINAL.items())])
    manifest = snapshot(root, labels)
    path = manifest.save(tmp_path / "v1.manifest.json")
    return root, path


def test_read_study_keeps_order_and_counts_missing_reads(readers_csv):
    s = read_study(readers_csv)
    assert s.readers == ["A", "B", "C"]
    assert s.cases == list(READS)
    assert s.missing == 1 and "C" not in s.reads["img5.png"]
    assert s.labels == [N, P]


def test_majority_and_ties():
    assert majority({"A": P, "B": P, "C": N}) == P
    assert majority({"A": P, "B": N}) is None
    assert majority({"A": "a", "B": "b", "C": "c"}) is None
    assert majority({"A": "a", "B": "a", "C": "b", "D": "c"}) == "a"


def test_rules_select_the_right_cases(readers_csv):
    s = read_study(readers_csv)
    assert select_cases(s, "disagreement") == {
        "img3.png": "disagreement", "img4.png": "disagreement", "img5.png": "tie",
        "img7.png": "disagreement"}
    assert select_cases(s, "all-positive", P) == {
        "img1.png": "positive", "img3.png": "positive", "img4.png": "positive",
        "img5.png": "tie", "img7.png": "positive", "img8.png": "positive"}
    assert list(select_cases(s, "all")) == list(READS)
    with pytest.raises(AdjudicationError, match="needs the positive label"):
        select_cases(s, "all-positive")
    with pytest.raises(AdjudicationError, match="no reader used it"):
        select_cases(s, "all-positive", "Pneumonia")
    with pytest.raises(AdjudicationError, match="only used by rule all-positive"):
        select_cases(s, "disagreement", P)


def test_a_tie_goes_to_the_adjudicator_under_every_rule(tmp_path):
    # three categories, the tie is between two labels that are not the positive one
    rows = [{"case": "x", "reader": r, "label": v}
            for r, v in zip("ABCD", ["a", "a", "b", "b"], strict=True)]
    rows += [{"case": "y", "reader": r, "label": "a"} for r in "ABCD"]
    s = read_study(_write_csv(tmp_path / "r.csv", ["case", "reader", "label"], rows))
    for rule, positive in (("disagreement", None), ("all-positive", "a"), ("all", None)):
        assert select_cases(s, rule, positive)["x"] == "tie"
    with pytest.raises(AdjudicationError, match="no adjudicated label: x"):
        resolve(s, {}, "disagreement")


def test_plan_worklist_and_blinding(readers_csv, tmp_path):
    work = plan(readers_csv)
    assert [r["case"] for r in work.rows] == ["img3.png", "img4.png", "img5.png", "img7.png"]
    row = work.rows[2]
    assert row == {"case": "img5.png", "label": "", "reason": "tie", "readers": "2",
                   "votes": f"{N}=1; {P}=1", "reader:A": P, "reader:B": N, "reader:C": ""}
    blind = plan(readers_csv, "all-positive", P, blind=True)
    path = blind.write(tmp_path / "worklist.csv")
    text = path.read_text()
    assert "reader:" not in text and len(_read_csv(path)) == 6
    assert _read_csv(path)[0] == {"case": "img1.png", "label": "", "reason": "positive",
                                  "readers": "3", "votes": f"{P}=3"}


def test_resolve_labels_report_and_kappas(readers_csv, adjudicated_csv):
    res = resolve(readers_csv, adjudicated_csv)
    assert res.final == FINAL
    assert res.changed == [{"case": "img3.png", "majority": P, "adjudicated": N},
                           {"case": "img7.png", "majority": N, "adjudicated": P}]
    assert res.ties == [{"case": "img5.png", "adjudicated": P}]
    assert res.label_counts() == {"majority": {"(tie)": 1, N: 4, P: 3},
                                  "final": {N: 4, P: 4}}
    s = res.study
    for pair in res.pair_kappas():
        a, b = pair["readers"]
        both = [c for c in s.cases if a in s.reads[c] and b in s.reads[c]]
        assert pair["cases"] == len(both) == (8 if (a, b) == ("A", "B") else 7)
        expected = cohen_kappa_score([s.reads[c][a] for c in both],
                                    [s.reads[c][b] for c in both])
        assert pair["kappa"] == pytest.approx(expected)
    # Fleiss by hand, on the 7 cases all three read
    full = [c for c in READS if None not in READS[c]]
    counts = np.array([[READS[c].count(lbl) for lbl in (N, P)] for c in full], float)
    p_i = ((counts ** 2).sum(1) - 3) / 6
    p_j = counts.sum(0) / counts.sum()
    expected = (p_i.mean() - (p_j ** 2).sum()) / (1 - (p_j ** 2).sum())
    assert res.fleiss() == {"cases": 7, "kappa": pytest.approx(expected)}
    agree = {a["reader"]: a for a in res.reader_agreement()}
    assert agree["C"]["cases"] == 7
    assert agree["A"]["agreement"] == pytest.approx(np.mean(
        [READS[c][0] == FINAL[c] for c in READS]))
    assert agree["B"]["kappa"] == pytest.approx(cohen_kappa_score(
        [READS[c][1] for c in READS], [FINAL[c] for c in READS]))
    report = res.to_dict()
    assert report["sent_to_adjudicator"] == 4 and report["missing_reads"] == 1
    json.dumps(report)


def test_resolve_errors_name_the_cases(readers_csv, tmp_path):
    partial = _write_csv(tmp_path / "partial.csv", ["case", "label"],
                         [{"case": "img3.png", "label": N}, {"case": "img4.png", "label": ""}])
    with pytest.raises(AdjudicationError, match=r"3 case\(s\).*img4.png, img5.png, img7.png"):
        resolve(readers_csv, partial)
    stranger = dict(ADJUDICATED, **{"img99.png": N})
    with pytest.raises(AdjudicationError, match="not in the study: img99.png"):
        resolve(readers_csv, stranger)
    typo = dict(ADJUDICATED, **{"img7.png": "pnuemonia"})
    with pytest.raises(AdjudicationError, match="no reader used: pnuemonia"):
        resolve(readers_csv, typo)
    assert resolve(readers_csv, typo, allow_new_labels=True).final["img7.png"] == "pnuemonia"
    # the adjudicator's label wins also where the rule did not send the case
    extra = dict(ADJUDICATED, **{"img1.png": N})
    assert resolve(readers_csv, extra).final["img1.png"] == N


def test_bad_readers_files(tmp_path):
    no_label = _write_csv(tmp_path / "a.csv", ["case", "reader"], [{"case": "x", "reader": "A"}])
    with pytest.raises(AdjudicationError, match="no column 'label'"):
        read_study(no_label)
    one = _write_csv(tmp_path / "b.csv", ["case", "reader", "label"],
                     [{"case": c, "reader": "A", "label": P} for c in "xy"])
    with pytest.raises(AdjudicationError, match="at least 2 readers, found 1"):
        read_study(one)
    thin = _write_csv(tmp_path / "c.csv", ["case", "reader", "label"],
                      [{"case": "x", "reader": "A", "label": P},
                       {"case": "x", "reader": "B", "label": P},
                       {"case": "y", "reader": "A", "label": N}])
    with pytest.raises(AdjudicationError, match="fewer than 2 readers: y"):
        read_study(thin)
    twice = _write_csv(tmp_path / "d.csv", ["case", "reader", "label"],
                       [{"case": "x", "reader": "A", "label": P},
                        {"case": "x", "reader": "A", "label": N}])
    with pytest.raises(AdjudicationError, match="labelled case 'x' twice"):
        read_study(twice)


def test_labels_csv_feeds_snapshot_and_new_version_diffs_to_the_relabels(
        readers_csv, adjudicated_csv, dataset, tmp_path):
    root, parent_path = dataset
    parent = load_manifest(parent_path)
    res = resolve(readers_csv, adjudicated_csv)
    # without a parent: file,label, which dataset snapshot reads as is
    plain = res.write_labels(tmp_path / "plain.csv")
    assert _read_csv(plain)[0] == {"file": "img1.png", "label": P}
    assert snapshot(root, plain).unlabelled == []
    # with the parent: its layout, so the diff shows the relabels and nothing else
    new = adjudicated_snapshot(res, root, parent, tmp_path / "labels-v2.csv")
    assert new.parent == parent.dataset_hash
    d = diff_manifests(parent, new)
    assert sorted(r["key"] for r in d.relabelled) == ["img3.png", "img5.png", "img7.png"]
    assert all(list(r["changes"]) == ["label"] for r in d.relabelled)
    assert not (d.added or d.removed or d.moved or d.pixels_changed or d.labels_added
                or d.labels_removed)
    assert {r["file"]: r["patient_id"] for r in _read_csv(tmp_path / "labels-v2.csv")}[
        "img5.png"] == "p4"
    with pytest.raises(AdjudicationError, match="no column 'grade'"):
        res.write_labels(tmp_path / "x.csv", parent, "grade")


def test_cli_plan_resolve_snapshot_and_audit(readers_csv, dataset, tmp_path):
    root, parent_path = dataset
    runner = CliRunner()
    log = tmp_path / "audit.jsonl"
    work = tmp_path / "worklist.csv"
    r = runner.invoke(main, ["dataset", "adjudicate", "plan", str(readers_csv), "--out",
                             str(work), "--blind"])
    assert r.exit_code == 0 and "4 case(s)" in r.output, r.output
    rows = _read_csv(work)
    for row in rows:  # the adjudicator fills the label column
        row["label"] = ADJUDICATED[row["case"]]
    _write_csv(work, list(rows[0]), rows)
    labels, manifest = tmp_path / "labels-v2.csv", tmp_path / "v2.manifest.json"
    r = runner.invoke(main, ["dataset", "adjudicate", "resolve", str(readers_csv), str(work),
                             "--out", str(labels), "--snapshot", str(root), "--parent",
                             str(parent_path), "--manifest", str(manifest), "--json",
                             "--audit-log", str(log)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    new = load_manifest(manifest)
    assert report["version"] == new.version and new.parent == load_manifest(
        parent_path).dataset_hash
    assert [c["case"] for c in report["changed_from_majority"]] == ["img3.png", "img7.png"]
    d = runner.invoke(main, ["dataset", "diff", str(parent_path), str(manifest),
                             "--audit-log", str(log)])
    assert d.exit_code == 1 and "relabelled: 3" in d.output, d.output
    entries = list(AuditLog(log).entries())
    assert [e.action for e in entries] == ["dataset.adjudicate", "dataset.diff"]
    assert entries[0].details["version"] == new.dataset_hash
    assert entries[0].details["changed"] == ["img3.png", "img7.png"]
    text = runner.invoke(main, ["dataset", "adjudicate", "resolve", str(readers_csv),
                                str(work), "--out", str(tmp_path / "l.csv"),
                                "--audit-log", str(log)])
    assert text.exit_code == 0 and "img3.png: pneumonia -> normal" in text.output


@pytest.mark.parametrize("case", ["missing-column", "one-reader", "open-case", "no-parent",
                                  "not-csv"])
def test_cli_errors_are_one_line_exit_2(case, readers_csv, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "out.csv")
    empty = _write_csv(tmp_path / "empty-adj.csv", ["case", "label"], [{"case": "img3.png",
                                                                         "label": N}])
    if case == "missing-column":
        bad = _write_csv(tmp_path / "bad.csv", ["case", "rater", "label"],
                         [{"case": "x", "rater": "A", "label": P}])
        args = ["plan", str(bad), "--out", out]
        expect = "no column 'reader'"
    elif case == "one-reader":
        bad = _write_csv(tmp_path / "bad.csv", ["case", "reader", "label"],
                         [{"case": "x", "reader": "A", "label": P}])
        args = ["plan", str(bad), "--out", out]
        expect = "at least 2 readers"
    elif case == "open-case":
        args = ["resolve", str(readers_csv), str(empty), "--out", out]
        expect = "img4.png, img5.png, img7.png"
    elif case == "no-parent":
        args = ["resolve", str(readers_csv), str(empty), "--out", out, "--snapshot",
                str(tmp_path)]
        expect = "--snapshot needs --parent"
    else:
        bad = tmp_path / "bin.csv"
        bad.write_bytes(b"\xff\xfe\x00binary")
        args = ["plan", str(bad), "--out", out]
        expect = "cannot read as UTF-8 CSV"
    r = runner.invoke(main, ["dataset", "adjudicate", *args,
                             "--audit-log", str(tmp_path / "a.jsonl")]
                      if args[0] == "resolve" else ["dataset", "adjudicate", *args])
    assert r.exit_code == 2, r.output
    assert expect in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "out.csv").exists()
