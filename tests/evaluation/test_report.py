"""`radguard evaluate`: CSV in, JSON and a self-contained HTML report out; clear errors."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from radguard.cli import main


def _write(path, rows, fields):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture()
def predictions(tmp_path):
    rng = np.random.default_rng(0)
    internal, external = tmp_path / "internal.csv", tmp_path / "external.csv"
    for path, shift, n in ((internal, 1.6, 400), (external, 0.9, 300)):
        rows = []
        for i in range(n):
            y = int(rng.integers(0, 2))
            score = 1 / (1 + np.exp(-(rng.normal(0, 1) + shift * (2 * y - 1))))
            rows.append({"id": f"{path.stem}{i}", "score": f"{score:.6f}", "label": y,
                         "sex": "F" if i % 2 else "M", "view": "PA" if i % 3 else "AP"})
        _write(path, rows, ["id", "score", "label", "sex", "view"])
    return internal, external


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "table":
            self.tables.append(attrs.get("id") or attrs.get("class"))


def test_html_report_has_its_plots_and_tables(predictions, tmp_path):
    internal, external = predictions
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["evaluate", str(internal), "--by", "sex,view",
                                       "--compare", str(external), "--bootstrap",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output + (result.stderr or "")
    parser = _Collect()
    parser.feed(out.read_text())
    plots = {img["id"] for img in parser.images}
    assert {"plot-roc", "plot-pr", "plot-calibration", "plot-decision",
            "plot-workload"} <= plots
    assert all(img["src"].startswith("data:image/png;base64,") and len(img["src"]) > 2000
               for img in parser.images)
    assert {"summary", "workload", "external", "subgroups"} <= set(parser.tables)
    assert "AUC" in result.output and "external AUC change" in result.output


def test_json_summary(predictions):
    internal, _ = predictions
    result = CliRunner().invoke(main, ["evaluate", str(internal), "--json", "--threshold",
                                       "0.5"])
    data = json.loads(result.output)
    assert data["threshold"] == 0.5 and 0.8 < data["auc"]["auc"] < 1
    assert data["at_threshold"]["sensitivity"]["low"] < data["at_threshold"]["sensitivity"][
        "value"]


def test_labels_from_a_second_file(predictions, tmp_path):
    internal, _ = predictions
    rows = list(csv.DictReader(open(internal)))
    _write(tmp_path / "scores.csv", [{"id": r["id"], "score": r["score"]} for r in rows],
           ["id", "score"])
    _write(tmp_path / "labels.csv", [{"id": r["id"], "label": r["label"]} for r in rows],
           ["id", "label"])
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "scores.csv"), "--labels",
                                       str(tmp_path / "labels.csv"), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["cases"] == len(rows)


@pytest.mark.parametrize(("content", "message"), [
    ("", "empty file"),
    ("id,score,label\n", "no cases"),
    ("id,value,label\na,0.1,1\nb,0.2,0\n", "no 'score' column"),
    ("id,score,label\na,0.1,2\nb,0.2,0\n", "0 or 1"),
    ("id,score,label\na,0.1,1\nb,0.2,1\n", "only positive"),
    ("id,score,label\na,nan,1\nb,0.2,0\n", "NaN"),
    ("id,score,label\na,high,1\nb,0.2,0\n", "not a number"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    result = CliRunner().invoke(main, ["evaluate", str(path)])
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_report_on_the_triage_models_own_predictions(tmp_path):
    """The chest model scores NIH test-split patients (`triage predict --csv`); `evaluate`
    turns its predictions and the radiology labels into the full report."""
    from radguard.evaluation.splits import split_of
    from tests.conftest import SHARED

    nih = SHARED / "cxr-nih"
    with (nih / "labels.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if split_of("cxr-nih", r["patient_id"]) == "test"]
    assert len(rows) > 100
    preds, labels, out = tmp_path / "preds.csv", tmp_path / "labels.csv", tmp_path / "r.html"
    result = CliRunner().invoke(main, ["triage", "predict", "--model", "chest", "--csv",
                                       str(preds), *(str(nih / "images" / r["file"])
                                                     for r in rows)])
    assert result.exit_code == 0, result.output
    _write(labels, [{"id": r["file"], "label": int(r["label"] == "pneumonia"), "sex": r["sex"],
                     "view": r["view"]} for r in rows], ["id", "label", "sex", "view"])
    result = CliRunner().invoke(main, ["evaluate", str(preds), "--labels", str(labels),
                                       "--by", "sex,view", "--out", str(out)])
    assert result.exit_code == 0, result.output
    parser = _Collect()
    parser.feed(out.read_text())
    assert {"plot-roc", "plot-pr", "plot-calibration", "plot-decision",
            "plot-workload"} <= {img["id"] for img in parser.images}
    assert {"summary", "workload", "subgroups"} <= set(parser.tables)
    summary = json.loads(CliRunner().invoke(main, ["evaluate", str(preds), "--labels",
                                                   str(labels), "--json"]).output)
    assert 0.7 < summary["auc"]["auc"] < 1.0  # the model card says 0.85 [0.79, 0.91]


# -- issue 27: text labels, a `file` id column, --compare with labels, p-values ----------------

def _scores_for(labels_csv, n, shift, seed):
    """Predictions keyed by file name (as `triage predict --csv` writes them) for the first
    n normal and n pneumonia rows of a shared labels file; no label column."""
    rng = np.random.default_rng(seed)
    with open(labels_csv) as fh:
        rows = list(csv.DictReader(fh))
    picked = [r for r in rows if r["label"] == "normal"][:n] + \
        [r for r in rows if r["label"] == "pneumonia"][:n]
    out = []
    for r in picked:
        sign = 1 if r["label"] == "pneumonia" else -1
        out.append({"id": r["file"],
                    "score": f"{1 / (1 + np.exp(-(rng.normal() + shift * sign))):.6f}"})
    return out


def test_shared_labels_files_with_text_labels_and_compare(tmp_path):
    from tests.conftest import SHARED

    nih, kermany = SHARED / "cxr-nih" / "labels.csv", SHARED / "cxr-kermany" / "labels.csv"
    internal, external = tmp_path / "preds.csv", tmp_path / "ext.csv"
    _write(internal, _scores_for(nih, 150, 2.5, 0), ["id", "score"])
    _write(external, _scores_for(kermany, 150, 0.3, 1), ["id", "score"])
    runner = CliRunner()
    # text labels without --positive: a one-line error naming the values
    bare = runner.invoke(main, ["evaluate", str(internal), "--labels", str(nih)])
    assert bare.exit_code == 2
    assert "'normal', 'pneumonia'" in bare.stderr and "--positive" in bare.stderr
    wrong = runner.invoke(main, ["evaluate", str(internal), "--labels", str(nih),
                                 "--positive", "covid"])
    assert wrong.exit_code == 2 and "'covid' is not among" in wrong.stderr
    # ids joined on the labels' `file` column (no `id` there); the predictions keep `id`
    args = ["evaluate", str(internal), "--labels", str(nih), "--positive", "Pneumonia",
            "--by", "sex,view", "--compare", str(external), "--compare-labels", str(kermany)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert "300 cases, 150 positive" in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("external AUC change"))
    assert "p<0.001" in line and "p=0" not in result.output
    data = json.loads(runner.invoke(main, [*args, "--json"]).output)
    assert data["external"]["auc_difference"]["p_value"] < 0.001
    assert set(data["subgroups"]) == {"sex", "view"}
    # --compare without its labels, and --compare-labels alone, are clear errors
    alone = runner.invoke(main, args[:-2])
    assert alone.exit_code == 2 and "no 'label' column and no --labels" in alone.stderr
    stray = runner.invoke(main, [*args[:6], "--compare-labels", str(kermany)])
    assert stray.exit_code == 2 and "--compare-labels goes with --compare" in stray.stderr


def test_id_column_option_and_zero_one_labels_still_work(tmp_path):
    rows = [{"case": f"c{i}", "score": f"{(i % 10) / 10 + 0.05 * (i % 2):.3f}",
             "label": i % 2} for i in range(40)]
    _write(tmp_path / "scores.csv", [{k: r[k] for k in ("case", "score")} for r in rows],
           ["case", "score"])
    _write(tmp_path / "labels.csv", [{k: r[k] for k in ("case", "label")} for r in rows],
           ["case", "label"])
    runner = CliRunner()
    base = ["evaluate", str(tmp_path / "scores.csv"), "--labels", str(tmp_path / "labels.csv")]
    none = runner.invoke(main, base)
    assert none.exit_code == 2 and "no 'id' or 'file' column" in none.stderr
    assert "--id-column" in none.stderr
    ok = runner.invoke(main, [*base, "--id-column", "case", "--json"])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.output)["positives"] == 20
    flipped = runner.invoke(main, [*base, "--id-column", "case", "--positive", "0", "--json"])
    assert json.loads(flipped.output)["auc"]["auc"] < 0.5  # 0 named positive: reversed
    missing = runner.invoke(main, [*base, "--id-column", "nope"])
    assert missing.exit_code == 2 and "no 'nope' column" in missing.stderr


@pytest.mark.parametrize(("p", "text"), [(0.0, "p<0.001"), (1e-12, "p<0.001"),
                                         (0.00099, "p<0.001"), (0.001, "p=0.001"),
                                         (0.01234, "p=0.012"), (0.5, "p=0.5"),
                                         (1.0, "p=1"), (float("nan"), "p=n/a")])
def test_p_values_never_print_as_zero(p, text):
    from radguard.evaluation.report import format_p

    assert format_p(p) == text
