"""``radguard triage ...``: thin wrappers over :mod:`radguard.triage` (the 'ai' extra)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from radguard.cli.common import _progress
from radguard.errors import RadguardError

__all__ = ["triage"]


@click.group()
def triage() -> None:
    """AI triage: score studies, choose operating points, see workload trade-offs."""


@triage.command("predict")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_name", default="chest", show_default=True,
              help="Registered model name, or the .json file of a model bundle.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@click.option("--sr-dir", type=click.Path(file_okay=False),
              help="Write results here: a PNG saliency overlay per image and, for DICOM "
                   "inputs, a TID 1500 Comprehensive SR, the saliency map as a fractional "
                   "Segmentation and a secondary-capture overlay.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False),
              help="Also write the scores as CSV (id = file name, score = probability), "
                   "ready for `radguard evaluate`.")
def triage_predict(paths: tuple[str, ...], model_name: str, as_json: bool,
                   sr_dir: str | None, csv_path: str | None) -> None:
    """Score images (DICOM, PNG, JPEG; folders recursively): calibrated probability, 1-10
    suspicion, and whether the model's operating point calls it positive. Images outside the
    model's scope get a reason, never a score. Exit 1 if any image could not be scored."""
    from radguard.dicom.io import iter_dicom_paths
    from radguard.triage.model import load_model
    from radguard.triage.results import SCORE_COLUMNS, score_file, score_row, unscored_record

    model = load_model(model_name)
    files = list(iter_dicom_paths(paths))
    if not files:
        raise RadguardError("no input files found")
    out_dir = Path(sr_dir) if sr_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    all_ok = True
    scored: list[dict[str, object]] = []
    with _progress(len(files), "scoring") as progress:
        task = progress.add_task("predict", total=len(files))
        for i, f in enumerate(files):
            try:
                record = score_file(model, f, out_dir / f"{i:05d}-{f.stem}" if out_dir else None,
                                    on_scored=lambda p, f=f: scored.append(score_row(model, f, p)))
            except RadguardError as exc:
                all_ok = False
                record = unscored_record(model, f, exc)
            if as_json:
                click.echo(json.dumps(record))
            elif record.get("error"):
                click.echo(f"{click.style('NOT SCORED', fg='yellow', bold=True)}  {f}: "
                           f"{record['error']}")
            else:
                flag = click.style("POSITIVE", fg="red", bold=True) if record["positive"] \
                    else click.style("negative", fg="green")
                click.echo(f"{flag:<20} suspicion {record['suspicion']:>2}/10  probability "
                           f"{record['probability']:.3f}  {f}")
            progress.advance(task)
    if csv_path:
        from radguard.fileio import write_csv

        write_csv(csv_path, scored, SCORE_COLUMNS)
    sys.exit(0 if all_ok else 1)


@triage.command("train")
@click.argument("recipe", type=click.Choice(["chest", "mammo", "malignancy"]))
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Training folder: labels.csv + images/ (chest: file, label, patient_id; "
                   "mammo/malignancy: the mini-MIAS columns).")
@click.option("--external", type=click.Path(file_okay=False),
              help="chest: a second site, measured as external validation.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Bundle path without suffix: writes OUT.pt and OUT.json.")
@click.option("--epochs", type=click.IntRange(1, 1000),
              help="Training epochs (default: chest 30, mammo 12, malignancy 20).")
@click.option("--limit", type=click.IntRange(10, None),
              help="Use only N images for a quick trial run (chest: half of them positive; "
                   "mammography: the first N).")
@click.option("--locator", default="mammo", show_default=True,
              help="malignancy: the patch model whose suspicious regions it judges.")
@click.option("--seed", type=int, default=0, show_default=True)
def triage_train(recipe: str, data_dir: str, external: str | None, out: str,
                 epochs: int | None, limit: int | None, locator: str, seed: int) -> None:
    """Train a reference model on CPU and write it as a bundle (split by patient / woman;
    calibration, suspicion deciles and a 90%-sensitivity operating point fitted on the
    validation split; test figures in the model card). Use it with --model OUT.json."""
    import torch

    from radguard.triage import training

    torch.set_num_threads(min(4, os.cpu_count() or 1))

    def log(message: str) -> None:
        click.echo(f"  {message}", err=True)

    common = {"limit": limit, "seed": seed, "log": log}
    if epochs:
        common["epochs"] = epochs
    if recipe == "chest":
        meta = training.train_chest(data_dir, external, out, **common)
    elif recipe == "mammo":
        meta = training.train_mammo(data_dir, out, **common)
    else:
        meta = training.train_malignancy(data_dir, out, locator=locator, **common)
    for key, value in meta["card"]["metrics"].items():
        if isinstance(value, dict) and "auc" in value:
            click.echo(f"{key}: {value['auc']:.3f} [{value['low']:.3f}, {value['high']:.3f}]")
    from radguard.triage.model import bundle_stem

    stem = bundle_stem(out)
    click.echo(f"model bundle: {stem.with_name(stem.name + '.json')}")


@triage.command("export-onnx")
@click.option("--model", "model_name", default="chest", show_default=True,
              help="Registered name or bundle .json of a whole-image PyTorch model.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Bundle path without suffix: writes OUT.onnx and OUT.json.")
def triage_export_onnx(model_name: str, out: str) -> None:
    """Export a PyTorch bundle to ONNX (same card, calibration and operating point), to run
    with onnxruntime where torch is not installed; scores agree to about 1e-5."""
    from radguard.triage.model import TorchTriageModel, load_model

    model = load_model(model_name)
    if not isinstance(model, TorchTriageModel):
        raise RadguardError(f"{model_name}: not a PyTorch bundle")
    click.echo(f"model bundle: {model.export_onnx(out)}")


@triage.command("card")
@click.option("--model", "model_name", default="chest", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON.")
def triage_card(model_name: str, as_json: bool) -> None:
    """Print a model's card: intended use, training data, version, measured figures,
    operating point, limitations."""
    from radguard.triage.model import card_text, load_model

    model = load_model(model_name)
    card = {**model.card.to_dict(), "operating_threshold": model.threshold}
    click.echo(json.dumps(card, indent=1) if as_json else card_text(card))


@triage.command("threshold")
@click.argument("predictions", type=click.Path(dir_okay=False))
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
              help="Separate labels CSV joined on 'id' (else a 'label' column).")
@click.option("--id-column", help="Column naming each case [default: id, or file where there "
                                  "is no id column].")
@click.option("--positive", help="The label value that is positive when labels are text.")
@click.option("--score-column", default="score", show_default=True)
@click.option("--sensitivity", type=float, help="Target sensitivity, e.g. 0.95.")
@click.option("--specificity", type=float, help="Target specificity, e.g. 0.90.")
@click.option("--cost-ratio", type=float,
              help="Cost of a missed positive / cost of a false positive, e.g. 20.")
@click.option("--prevalence", type=float,
              help="Prevalence for --cost-ratio (default: that of the predictions).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write the workload-reduction plot (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def triage_threshold(predictions: str, labels_path: str | None, id_column: str | None,
                     positive: str | None, score_column: str,
                     sensitivity: float | None, specificity: float | None,
                     cost_ratio: float | None, prevalence: float | None,
                     plot_path: str | None, as_json: bool) -> None:
    """Choose an operating threshold on validation predictions and print the workload table
    (suspicion deciles of these predictions: share of studies no longer read first, share
    of positives deprioritised)."""
    from radguard.evaluation.report import read_predictions
    from radguard.triage import SuspicionScale, choose_threshold, plot_workload, workload_table

    preds = read_predictions(predictions, labels_path, score_column=score_column,
                             id_column=id_column, positive=positive)
    point = choose_threshold(preds.labels, preds.scores, sensitivity=sensitivity,
                             specificity=specificity, cost_ratio=cost_ratio,
                             prevalence=prevalence)
    rows = workload_table(preds.labels, preds.scores, SuspicionScale().fit(preds.scores))
    if plot_path:
        plot_workload(rows, plot_path)
    if as_json:
        click.echo(json.dumps({"operating_point": point.to_dict(), "workload": rows}))
        return
    cost = f", expected cost {point.expected_cost:.4f} per study" \
        if point.expected_cost is not None else ""
    click.echo(f"threshold {point.threshold:.4g} ({point.method}): sensitivity "
               f"{point.sensitivity:.3f}, specificity {point.specificity:.3f}{cost}")
    click.echo(f"{'read first if suspicion >=':<28}{'not read first':>16}"
               f"{'positives deprioritised':>26}")
    for r in rows:
        click.echo(f"{r['suspicion_cutoff']:<28}{r['workload_reduction']:>16.1%}"
                   f"{r['positives_deprioritised']:>26.1%}")
    if plot_path:
        click.echo(f"plot: {plot_path}")


