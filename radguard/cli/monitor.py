"""``radguard monitor ...``: thin wrappers over :mod:`radguard.monitoring`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from radguard.cli.common import _err, _progress
from radguard.errors import RadguardError
from radguard.postgres import is_postgres_url

__all__ = ["monitor"]


@click.group()
def monitor() -> None:
    """Drift and performance monitoring with sequential alarms (state in SQLite)."""


_db_option = click.option("--db", "db_path", default="radguard-monitor.db", show_default=True,
                          type=click.Path(dir_okay=False), help="Monitoring database.")


def _existing_db(path: str) -> None:
    if is_postgres_url(path):
        return  # a database the monitor opens (and says so if it cannot)
    if not Path(path).is_file():
        raise RadguardError(f"{path}: no monitoring database (run 'radguard monitor init')")


@monitor.command("features")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
def monitor_features(paths: tuple[str, ...], out: str) -> None:
    """Compute image features of DICOM/PNG/JPEG files into a CSV (id = file path); DICOM files
    add their acquisition metadata (manufacturer, model, protocol...), which `monitor init`
    learns as categories: a new scanner then raises an alarm."""
    from radguard.dicom.io import iter_dicom_paths, read_dataset
    from radguard.fileio import write_csv
    from radguard.images import is_dicom_path
    from radguard.monitoring.features import (
        IMAGE_FEATURES,
        METADATA_FIELDS,
        dataset_features,
        features_of_file,
        metadata_features,
    )

    rows = []
    files = list(iter_dicom_paths(paths))
    failures, dicom = 0, False
    with _progress(len(files), "features") as progress:
        task = progress.add_task("features", total=len(files))
        for f in files:
            try:
                if is_dicom_path(f):
                    ds = read_dataset(f)
                    rows.append({"id": str(f), **dataset_features(ds), **metadata_features(ds)})
                    dicom = True
                else:
                    rows.append({"id": str(f), **features_of_file(str(f))})
            except (RadguardError, ValueError) as exc:
                failures += 1
                _err(str(exc))
            progress.advance(task)
    columns = ["id", *IMAGE_FEATURES, *(METADATA_FIELDS if dicom else ())]
    write_csv(out, rows, columns, durable=True)
    click.echo(f"{len(files) - failures} feature rows -> {out}")


@monitor.command("init")
@click.argument("reference", type=click.Path(dir_okay=False))
@_db_option
@click.option("--budget", type=float, default=10_000, show_default=True,
              help="At most one false alarm per this many studies.")
@click.option("--threshold", type=float, default=None,
              help="The model's operating point (default 0.5): sensitivity and specificity "
                   "are watched there.")
@click.option("--drop", type=float, default=0.10, show_default=True,
              help="The smallest fall of sensitivity or specificity worth an alarm.")
@click.option("--model-version", default="", help="The model version these scores are of "
              "(default: the reference every version falls back on).")
def monitor_init(reference: str, db_path: str, budget: float, threshold: float | None,
                 drop: float, model_version: str) -> None:
    """Learn the reference (feature columns, optional score and label) and calibrate alarms."""
    from radguard.monitoring import Monitor
    from radguard.monitoring.tables import fit_reference_table, read_reference

    table = read_reference(reference)
    mon = Monitor(db_path)
    _, thresholds = fit_reference_table(mon, table, false_alarms_per=budget,
                                        threshold=threshold, drop=drop,
                                        model_version=model_version)
    names, categorical, scores = table.names, table.categorical, table.scores
    click.echo(f"reference: {len(table)} studies, features {', '.join(names)}"
               f"{' + score' if scores is not None else ''}"
               f"{'; metadata ' + ', '.join(categorical) if categorical else ''}; "
               f"CUSUM h = {thresholds['h']}")
    meta = mon.references[model_version].meta
    if "h_sensitivity" in thresholds:
        click.echo(f"decay at operating point {meta['threshold']:g}: a {drop:.0%} drop of "
                   f"sensitivity (h = {thresholds['h_sensitivity']}) or specificity "
                   f"(h = {thresholds['h_specificity']})")
    elif "decay_off" in meta:
        click.echo(f"decay detection off: {meta['decay_off']}")


@monitor.command("ingest")
@click.argument("stream", type=click.Path(dir_okay=False))
@_db_option
@click.option("--audit-log", "audit_path", type=click.Path(dir_okay=False),
              help="Audit log that receives every alarm (default $RADGUARD_AUDIT_LOG or "
                   "~/.radguard/audit.jsonl).")
def monitor_ingest(stream: str, db_path: str, audit_path: str | None) -> None:
    """Feed studies (id, features, optional score, site, label) in order; prints alarms and
    writes them to the audit log."""
    from radguard.governance.auditlog import AuditLog
    from radguard.monitoring import Monitor
    from radguard.monitoring.tables import ingest_table

    _existing_db(db_path)
    mon = Monitor(db_path, audit_log=AuditLog(audit_path))
    count = ingest_table(mon, stream, on_alarm=_print_alarm)
    click.echo(f"{count} studies ingested; {mon.seq} in total")


def _print_alarm(alarm: Any) -> None:
    """One line per alarm: an episode opened."""
    click.echo(f"ALARM study {alarm.seq} ({alarm.study_id}) site {alarm.site}: "
               f"{alarm.detector} of {alarm.feature} ({alarm.direction}), episode "
               f"{alarm.episode}")


@monitor.command("labels")
@click.argument("labels", type=click.Path(dir_okay=False))
@_db_option
@click.option("--id-column", default="id", show_default=True,
              help="The column naming the study (as the gateway or `monitor ingest` did).")
@click.option("--label-column", default="label", show_default=True)
@click.option("--positive", default=None,
              help="The label value that means positive (e.g. pneumonia); default: 0/1.")
@click.option("--audit-log", "audit_path", type=click.Path(dir_okay=False),
              help="Audit log that receives every episode (default $RADGUARD_AUDIT_LOG or "
                   "~/.radguard/audit.jsonl).")
def monitor_labels(labels: str, db_path: str, id_column: str, label_column: str,
                   positive: str | None, audit_path: str | None) -> None:
    """Feed radiologists' labels as they arrive, late and for some studies only: each
    steps the sensitivity or specificity detector of its study's site and model version; a
    label for a study not observed yet waits for it. Bad rows are reported and skipped."""
    from radguard.governance.auditlog import AuditLog
    from radguard.monitoring import Monitor
    from radguard.monitoring.tables import apply_labels, read_labels

    _existing_db(db_path)
    rows = read_labels(labels, id_column=id_column, label_column=label_column)
    mon = Monitor(db_path, audit_log=AuditLog(audit_path))
    result = apply_labels(mon, rows, positive=positive, on_alarm=_print_alarm,
                          on_refused=_err)
    click.echo(f"{result.applied} labels taken ({result.waiting} wait for their "
               f"study), {len(result.refused)} refused")
    if result.refused:
        sys.exit(1)


@monitor.command("status")
@_db_option
@click.option("--json", "as_json", is_flag=True)
def monitor_status(db_path: str, as_json: bool) -> None:
    """Alarms, window drift tests, rolling and estimated performance."""
    from radguard.evaluation.report import to_json
    from radguard.monitoring import Monitor

    _existing_db(db_path)
    status = Monitor(db_path).status()
    if as_json:
        click.echo(to_json(status))
        return
    episodes = status["episodes"]
    open_ = [e for e in episodes if e["state"] == "open"]
    click.echo(f"{status['studies']} studies; {len(open_)} open episode(s), "
               f"{len(episodes) - len(open_)} recent closed; "
               f"{status['labels_waiting_for_their_study']} label(s) waiting for their study")
    for episode in episodes[:10]:
        click.echo(f"  [{episode['state']}] #{episode['id']} {episode['summary']}")
    if status.get("decay_detection"):
        click.echo(f"  decay detection {status['decay_detection']}")
    for name, test in (status.get("drift_tests") or {}).items():
        click.echo(f"  {name:<10} KS {test['statistic']:.3f} (p={test['p_value']:.2g}) "
                   f"PSI {test['psi']:.3f}")


