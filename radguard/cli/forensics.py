"""``radguard forensics``: per-source calibration of the content detectors from folders of
known-real images (:mod:`radguard.forensics.calibration`), and the store ``radguard scan
--source`` judges against. Registered on the main group by :mod:`radguard.cli`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from radguard.cli.common import _progress
from radguard.errors import RadguardError

__all__ = ["DEFAULT_STORE_ENV", "calibration_options", "default_store", "note_unknown_source",
           "open_scores"]

DEFAULT_STORE_ENV = "RADGUARD_CALIBRATION"


def default_store() -> Path:
    """``$RADGUARD_CALIBRATION``, else ``calibration.db`` in radguard's user data folder."""
    if os.environ.get(DEFAULT_STORE_ENV):
        return Path(os.environ[DEFAULT_STORE_ENV])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "radguard" / "calibration.db"


def open_scores(store: str | None, target: float, provisional: float, *,
                create: bool = True) -> Any:
    """The known-real scores of ``store``: a calibration file (created when missing and
    ``create``), or a gateway's data folder (its SQLite database, so an offline calibration
    seeds a gateway); the default store when None."""
    from radguard.forensics.calibration import (
        CalibrationError,
        CalibrationFile,
        CalibrationPolicy,
        SourceScores,
    )

    try:
        policy = CalibrationPolicy(target, provisional)
    except CalibrationError as exc:
        raise click.BadParameter(str(exc)) from exc
    path = Path(store) if store else default_store()
    if path.is_dir():
        if not (path / "radguard.db").is_file():
            raise CalibrationError(f"{path}: a folder without a gateway database "
                                   "(radguard.db); give a calibration file or a gateway's "
                                   "data folder")
        from radguard.gateway.store import Store

        return SourceScores(Store(path), policy)
    if not create and not path.exists():
        raise CalibrationError(f"{path}: no calibration store there (radguard forensics "
                               "calibrate FOLDER --source NAME creates one)")
    return SourceScores(CalibrationFile(path), policy)


def calibration_options(func: Any) -> Any:
    """--store, --target and --provisional, shared by the commands that read a calibration."""
    func = click.option(
        "--provisional", "provisional_rate", type=float, default=0.01, show_default=True,
        help="Loosest false-alarm rate a source is judged at (alarms then suspicious only); "
             "below it, not judged.")(func)
    func = click.option(
        "--target", "target_rate", type=float, default=0.001, show_default=True,
        help="False-alarm rate per source once calibrated (needs 2/rate - 1 known-real "
             "images).")(func)
    return click.option(
        "--store", "store", type=click.Path(),
        help=f"Calibration file, or a gateway's data folder (default: ${DEFAULT_STORE_ENV} "
             "or ~/.local/share/radguard/calibration.db).")(func)


@click.group()
def forensics() -> None:
    """Per-source calibration of the content detectors on known-real images."""


@forensics.command("calibrate")
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--source", required=True,
              help="Name of the source the images come from; for a gateway, its source key "
                   "(the calling AE title, with /station and /modality if configured so).")
@click.option("--watermark-key", "key_path", type=click.Path(dir_okay=False),
              help="Watermark key: radguard-watermarked images are scored on their restored "
                   "original.")
@click.option("--json", "as_json", is_flag=True, help="Print the source's calibration as JSON.")
@calibration_options
def calibrate(folders: tuple[str, ...], source: str, key_path: str | None, as_json: bool,
              store: str | None, target_rate: float, provisional_rate: float) -> None:
    """Record the detector scores of FOLDERS' images (DICOM, PNG, JPEG; recursively) as
    known-real images of SOURCE: you vouch that every one is a real image from it, as it
    normally arrives (same processing). Each image counts once, however often it is given.
    Prints the source's thresholds and whether it is calibrated."""
    from radguard.dicom.io import iter_dicom_paths
    from radguard.forensics.calibration import DETECTORS, record_known_real
    from radguard.forensics.synthetic import load_detector

    source = source.strip()
    if not source:
        raise click.BadParameter("a source name is required", param_hint="--source")
    scores = open_scores(store, target_rate, provisional_rate)
    key = None
    if key_path:
        from radguard.watermark import load_key

        key = load_key(key_path)
    detector = load_detector()
    files = list(iter_dicom_paths(folders))
    if not files:
        raise RadguardError("no input files found")
    with _progress(len(files), "calibrating") as progress:
        task = progress.add_task("calibrate", total=len(files))
        run = record_known_real(scores, source, files, watermark_key=key, detector=detector,
                                on_file=lambda _f: progress.advance(task))
    added, known, skipped = run.added, run.known, run.skipped
    point = scores.point(source)
    if as_json:
        click.echo(json.dumps({"added": added, "already_known": known, "skipped": skipped,
                               "calibration": point.to_dict()}))
        if not added + known:
            sys.exit(1)
        return
    click.echo(f"{source}: {added} image(s) added, {known} already known, "
               f"{len(skipped)} skipped")
    for line in skipped[:20]:
        click.echo(f"    skipped {line}")
    if len(skipped) > 20:
        click.echo(f"    ... and {len(skipped) - 20} more (--json lists them all)")
    _print_point(point, DETECTORS, scores)
    if not added + known:
        click.echo("radguard: no image could be recorded", err=True)
        sys.exit(1)


def _print_point(point: Any, detectors: tuple[str, ...], scores: Any) -> None:
    colour = {"calibrated": "green", "provisional": "yellow"}.get(point.status, "red")
    click.echo(f"{click.style(point.status.upper(), fg=colour, bold=True)} {point.source}")
    known = scores.scores(point.source)
    for name in detectors:
        limit = getattr(point, name)
        n = point.counts.get(name, 0)
        top = ", ".join(f"{v:.3f}" for v in sorted(known.get(name, ()))[::-1][:3])
        top = f"; highest {top}" if top else ""
        if limit is None:
            click.echo(f"    {name}: {n} known-real score(s), not judged yet{top}")
        else:
            click.echo(f"    {name}: alarm above {limit.value:.4f} ({n} known-real, at most "
                       f"1 in {1 / limit.rate:,.0f} real images; "
                       f"{'accuses' if limit.strong else 'suspicious only'}{top})")
    if point.note:
        click.echo(f"    {point.note}")
    waiting = scores.held(point.source)
    if waiting:
        click.echo(f"    {len(waiting)} known-real image(s) held for review: radguard "
                   "forensics held")


@forensics.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per source.")
@calibration_options
def status(as_json: bool, store: str | None, target_rate: float, provisional_rate: float
           ) -> None:
    """Every source in the store, with its known-real images and calibration."""
    from radguard.forensics.calibration import DETECTORS

    scores = open_scores(store, target_rate, provisional_rate)
    sources = sorted(scores.counts())
    if not sources and not as_json:
        click.echo("no source has known-real images yet", err=True)
    for source in sources:
        point = scores.point(source)
        if as_json:
            click.echo(json.dumps({**point.to_dict(), "held": len(scores.held(source))}))
        else:
            _print_point(point, DETECTORS, scores)


@forensics.command("held")
@click.option("--source", help="Only this source.")
@click.option("--accept", "accept", multiple=True, metavar="ITEM",
              help="Count this held image after all (you checked it is real and typical).")
@click.option("--discard", "discard", multiple=True, metavar="ITEM",
              help="Drop this held image for good.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per held image.")
@calibration_options
def held(source: str | None, accept: tuple[str, ...], discard: tuple[str, ...],
         as_json: bool, store: str | None, target_rate: float, provisional_rate: float
         ) -> None:
    """Known-real images held for review: vouched images whose scores raised an alarm at
    their calibrated source's thresholds (a phantom, a QC image, a stolen signing key).
    They do not count until accepted; ITEM is the image's content hash as listed."""
    scores = open_scores(store, target_rate, provisional_rate, create=False)
    waiting = scores.held(source)
    by_item = {h["item"]: h for h in waiting}
    unknown = [i for i in (*accept, *discard) if i not in by_item]
    if unknown:
        raise click.BadParameter(f"not held: {', '.join(unknown)}", param_hint="ITEM")
    for item in accept:
        scores.accept(by_item[item]["source"], item)
        click.echo(f"accepted {item} ({by_item[item]['source']})")
    for item in discard:
        scores.discard(by_item[item]["source"], item)
        click.echo(f"discarded {item} ({by_item[item]['source']})")
    if accept or discard:
        return
    for h in waiting:
        if as_json:
            click.echo(json.dumps(h))
        else:
            values = ", ".join(f"{k} {v:.3f}" for k, v in h["scores"].items())
            click.echo(f"{h['recorded_at']}  {h['source']}  {h['item']}  ({h['origin']}; "
                       f"{values})")
    if not waiting and not as_json:
        click.echo("nothing held for review", err=True)


def note_unknown_source(scores: Any, source: str) -> None:
    """Warn (stderr) when ``radguard scan --source`` names a source the store does not
    know: a typo would otherwise make every unsigned image unverifiable in silence."""
    if source not in scores.counts():
        click.echo(f"radguard: note: source {source!r} has no known-real images in this "
                   "store: unsigned images are not judged (radguard forensics calibrate)",
                   err=True)
        sys.stderr.flush()
