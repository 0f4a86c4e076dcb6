"""``radguard dicom info|audit`` and ``radguard scan``: thin wrappers over
:mod:`radguard.dicom` and :mod:`radguard.forensics`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from radguard.cli.common import _err, _policy, _policy_options, _progress
from radguard.cli.forensics import calibration_options
from radguard.errors import RadguardError
from radguard.provenance.profiles import Coverage

__all__ = ["dicom", "scan"]


# -- dicom --------------------------------------------------------------------------------

@click.group()
def dicom() -> None:
    """Inspect DICOM files."""


@dicom.command("info")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--no-pixels", is_flag=True, help="Do not decode the pixel data.")
def dicom_info(paths: tuple[str, ...], no_pixels: bool) -> None:
    """Summarise files and check that they parse and their pixels decode."""
    from radguard.dicom.io import iter_dicom_paths, read_dataset
    from radguard.dicom.pixels import pixel_array, pixel_info

    failures = 0
    files = list(iter_dicom_paths(paths))
    if not files:
        raise RadguardError("no input files found")
    for f in files:
        try:
            ds = read_dataset(f)
            meta = ds.file_meta
            ts = getattr(meta.get("TransferSyntaxUID"), "name", "?")
            line = (f"{f}: {ds.get('Modality', '?')} {getattr(ds.get('SOPClassUID'), 'name', '?')}"
                    f"; {ts}")
            if "PixelData" in ds:
                info = pixel_info(ds)
                line += (f"; {info.rows}x{info.columns}x{info.frames}, {info.bits_stored} of "
                         f"{info.bits_allocated} bits {'signed' if info.signed else 'unsigned'}")
                if not no_pixels:
                    arr = pixel_array(ds)
                    line += f"; values {arr.min()}..{arr.max()}"
            click.echo(line)
        except RadguardError as exc:
            failures += 1
            _err(str(exc))
    sys.exit(0 if not failures else (2 if failures == len(files) else 1))



@dicom.command("audit")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def dicom_audit(paths: tuple[str, ...], as_json: bool) -> None:
    """Header consistency checks (UIDs, dates, pixels vs header, provenance flags), per file
    and across the files given. Exit 1 if any medium or high finding."""
    from radguard.dicom.io import iter_dicom_paths
    from radguard.forensics import audit_files

    files = list(iter_dicom_paths(paths))
    if not files:
        raise RadguardError("no input files found")
    with _progress(len(files), "auditing") as progress:
        task = progress.add_task("audit", total=len(files))
        per_file = audit_files(files, on_file=lambda _f: progress.advance(task))
    worst = False
    for name, findings in per_file.items():
        worst |= any(x["severity"] in ("medium", "high") for x in findings)
        if as_json:
            click.echo(json.dumps({"path": name, "findings": findings}))
            continue
        click.echo(f"{name}: {len(findings) or 'no'} finding(s)")
        for x in findings:
            click.echo(f"    [{x['severity']}] {x['code']}: {x['message']}")
    sys.exit(1 if worst else 0)


# -- scan ---------------------------------------------------------------------------------

_VERDICT_COLOUR = {"authentic": "green", "suspicious": "yellow", "unverifiable": "yellow"}


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--trust", "trust_paths", multiple=True, type=click.Path(),
              help="Trusted CA or signer certificate(s) for DICOM signatures; repeatable.")
@click.option("--watermark-key", "key_path", type=click.Path(dir_okay=False),
              help="Watermark key: also check the fragile watermark of DICOM files.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@click.option("--heatmap-dir", type=click.Path(file_okay=False),
              help="Write <name>.heatmap.png per image: detector evidence and tamper regions.")
@click.option("--source",
              help="Judge the content detectors' scores against this source's calibration "
                   "(radguard forensics calibrate) instead of the shipped thresholds.")
@calibration_options
@_policy_options
def scan(paths: tuple[str, ...], trust_paths: tuple[str, ...], key_path: str | None,
         as_json: bool, heatmap_dir: str | None, source: str | None, store: str | None,
         target_rate: float, provisional_rate: float, allow_weak: bool, min_rsa_bits: int,
         min_ec_bits: int, coverage: str) -> None:
    """One forensic verdict per image (DICOM, PNG, JPEG; folders recursively): authentic,
    suspicious, synthetic, tampered or unverifiable, with reasons. Exit 0 if every image is
    authentic, 1 otherwise. With --source, unsigned images of a source without enough
    known-real images are unverifiable (not judged)."""
    from radguard.dicom.io import iter_dicom_paths
    from radguard.forensics.scan import ScanResult, scan_file, write_heatmap
    from radguard.forensics.synthetic import load_detector
    from radguard.provenance.trust import TrustStore

    trust = TrustStore.from_paths(trust_paths) if trust_paths else None
    policy = _policy(allow_weak, min_rsa_bits, min_ec_bits)
    key = None
    if key_path:
        from radguard.watermark import load_key

        key = load_key(key_path)
    detector = load_detector()
    point = None
    if source is None and store is not None:
        raise click.BadParameter("--store is read only with --source", param_hint="--store")
    if source is not None:
        from radguard.cli.forensics import note_unknown_source, open_scores

        scores = open_scores(store, target_rate, provisional_rate, create=False)
        note_unknown_source(scores, source)
        point = scores.point(source)
    files = list(iter_dicom_paths([p for p in paths if Path(p).exists()]))
    missing = [p for p in paths if not Path(p).exists()]
    if not files and not missing:
        raise RadguardError("no input files found")
    out_dir = Path(heatmap_dir) if heatmap_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    all_ok = not missing
    for p in missing:
        _print_scan(ScanResult(p, reasons=[f"{p}: no such file or folder"]), as_json)
    with _progress(len(files), "scanning") as progress:
        task = progress.add_task("scan", total=len(files))
        for i, f in enumerate(files):
            result = scan_file(f, trust=trust, watermark_key=key, detector=detector,
                               keep_pixels=out_dir is not None, policy=policy,
                               coverage=Coverage(coverage), point=point)
            if out_dir and result.synthetic is not None:
                target = out_dir / f"{i:05d}-{f.stem}.heatmap.png"
                write_heatmap(result, target)
                result.reasons.append(f"heat map: {target}")
            all_ok &= result.verdict == "authentic"
            _print_scan(result, as_json)
            progress.advance(task)
    sys.exit(0 if all_ok else 1)


def _print_scan(result: Any, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    colour = _VERDICT_COLOUR.get(result.verdict, "red")
    score = result.synthetic_score
    shown = f"  synthetic score {score:.2f}" if score is not None else ""
    click.echo(f"{click.style(result.verdict.upper(), fg=colour, bold=True):<25} "
               f"{result.path}{shown}")
    for reason in result.reasons:
        click.echo(f"    {reason}")


