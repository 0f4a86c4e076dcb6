"""The ``radguard`` command line.

Every command prints a one-line error and exits non-zero on bad input; tracebacks are shown
only with ``RADGUARD_DEBUG=1``. Exit codes: 0 success, 1 a check failed (e.g. a file is not
validly signed), 2 bad usage or bad input, or a file that cannot be read or written (no
permission, read-only file system, file too large, disk full: outputs are written atomically,
so nothing half-written is left), 3 internal error, 130 interrupted, 141 the reader of the
output went away (``radguard verify ... | head``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from radguard import __version__
from radguard.cli_common import (
    _passphrase_option,
    _progress,
    _read_passphrase,
    _workers_option,
)
from radguard.cli_forensics import calibration_options
from radguard.cli_forensics import register as _register_forensics
from radguard.errors import KeyMaterialError, RadguardError
from radguard.postgres import is_postgres_url
from radguard.provenance.keys import describe_name
from radguard.provenance.policy import (
    DEFAULT_POLICY,
    EC_BITS_RANGE,
    RSA_BITS_RANGE,
    AlgorithmPolicy,
)
from radguard.provenance.profiles import Coverage
from radguard.provenance.verify import VerificationReport, name_list


def _err(message: str) -> None:
    click.echo(f"radguard: error: {message}", err=True)


#: SQLite primary result codes that mean the database file cannot be read or written
#: (permission, read-only, I/O error, disk full, cannot open), not a bug in a query.
_SQLITE_STORAGE_ERRORS = frozenset({3, 8, 10, 13, 14})


def _os_error_message(exc: OSError) -> str:
    """One line for a file that cannot be read or written: which file, why, and the errno
    name (EACCES, EROFS, EFBIG, ENOSPC...)."""
    reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    code = errno.errorcode.get(exc.errno) if isinstance(exc.errno, int) else None
    if code:
        reason += f" ({code})"
    name = exc.filename2 if exc.filename2 is not None else exc.filename
    if name is None:
        return f"cannot read or write a file: {reason}; nothing half-written was left"
    path = Path(os.fsdecode(name))
    if path.name.startswith(".") and path.name.endswith(".tmp"):
        # the atomic writer's temporary file (.NAME.random.tmp): name the real output
        path = path.with_name(path.name[1:-4].rsplit(".", 1)[0])
    return f"{path}: {reason}"


class _Group(click.Group):
    """Turns RadguardError, and files that cannot be read or written, into a one-line
    message and exit code 2; hides tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:  # noqa: ANN401
        try:
            return super().invoke(ctx)
        except RadguardError as exc:
            _err(str(exc))
            ctx.exit(2)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _err("interrupted")
            ctx.exit(130)
        except BrokenPipeError:
            # the reader of our output is gone: say nothing more (stdout is dead too)
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except OSError as exc:
            if os.environ.get("RADGUARD_DEBUG"):
                raise
            _err(_os_error_message(exc))
            ctx.exit(2)
        except Exception as exc:
            if os.environ.get("RADGUARD_DEBUG"):
                raise
            if isinstance(exc, sqlite3.OperationalError) and \
                    (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_STORAGE_ERRORS:
                _err(f"database file cannot be used: {exc} "
                     f"({getattr(exc, 'sqlite_errorname', 'SQLITE_ERROR')})")
                ctx.exit(2)
            _err(f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                 "rerun with RADGUARD_DEBUG=1 for details")
            ctx.exit(3)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="radguard")
def main() -> None:
    """radguard: keep radiology images and the AI that reads them trustworthy."""


# -- keys ---------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """Create keys and X.509 certificates (a local CA, devices, technologists)."""


def _key_paths(out: str, force: bool) -> tuple[Path, Path]:
    prefix = Path(out)
    key_path = prefix.parent / f"{prefix.name}.key.pem"
    cert_path = prefix.parent / f"{prefix.name}.cert.pem"
    for p in (key_path, cert_path):
        if p.exists() and not force:
            raise KeyMaterialError(f"{p} exists; refusing to overwrite a key (use --force)")
    return key_path, cert_path


def _common_key_options(func: Callable[..., Any]) -> Callable[..., Any]:
    from radguard.provenance.keys import KEY_ALGORITHMS

    options = [
        click.option("--out", "-o", required=True,
                     help="Path prefix: writes PREFIX.key.pem (mode 0600) and PREFIX.cert.pem."),
        click.option("--algorithm", type=click.Choice(KEY_ALGORITHMS), default=None,
                     help="Key type (default rsa2048; rsa3072 for a CA). ecdsa-p256 is "
                          "non-standard for DICOM: it signs only with --profile none."),
        click.option("--days", type=click.IntRange(1, 36500), default=None,
                     help="Certificate validity in days."),
        click.option("--organization", help="Institution (certificate O=)."),
        _passphrase_option,
        click.option("--force", is_flag=True, help="Overwrite existing files."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@keys.command("ca")
@click.option("--name", required=True, help="CA name, e.g. 'St Elsewhere Radiology CA'.")
@_common_key_options
def keys_ca(name: str, out: str, algorithm: str | None, days: int | None,
            organization: str | None, passphrase_file: str | None, force: bool) -> None:
    """Create a local certification authority for devices and technologists."""
    from radguard.provenance.keys import create_ca, save_certificate, save_private_key

    key_path, cert_path = _key_paths(out, force)
    passphrase = _read_passphrase(passphrase_file)
    key, cert = create_ca(name, organization=organization, days=days or 3650,
                          algorithm=algorithm or "rsa3072")
    save_private_key(key, key_path, passphrase)
    save_certificate(cert, cert_path)
    click.echo(f"CA key:         {key_path} (0600{', encrypted' if passphrase else ''})")
    click.echo(f"CA certificate: {cert_path}  ({describe_name(cert.subject)})")


def _issue(identity: Any, out: str, algorithm: str | None, days: int | None,  # noqa: ANN401
           passphrase_file: str | None, force: bool, ca_key: str | None, ca_cert: str | None,
           ca_passphrase_file: str | None) -> None:
    from radguard.provenance.keys import (
        create_signer,
        load_certificates,
        load_private_key,
        save_certificate,
        save_private_key,
    )

    key_path, cert_path = _key_paths(out, force)
    passphrase = _read_passphrase(passphrase_file)
    issuer_key = issuer_cert = None
    if ca_key or ca_cert:
        if not (ca_key and ca_cert):
            raise KeyMaterialError("--ca-key and --ca-cert go together")
        issuer_key = load_private_key(ca_key, _read_passphrase(ca_passphrase_file,
                                                               env="RADGUARD_CA_PASSPHRASE"))
        issuer_cert = load_certificates(ca_cert)[0]
    key, cert = create_signer(identity, ca_key=issuer_key, ca_cert=issuer_cert,
                              days=days or 825, algorithm=algorithm or "rsa2048")
    save_private_key(key, key_path, passphrase)
    save_certificate([cert, issuer_cert] if issuer_cert is not None else cert, cert_path)
    issuer = describe_name(issuer_cert.subject) if issuer_cert is not None else "self-signed"
    click.echo(f"key:         {key_path} (0600{', encrypted' if passphrase else ''})")
    click.echo(f"certificate: {cert_path}  ({describe_name(cert.subject)}; issuer: {issuer})")


_ca_options = [
    click.option("--ca-key", type=click.Path(dir_okay=False), help="Issuing CA's key."),
    click.option("--ca-cert", type=click.Path(dir_okay=False), help="Issuing CA's certificate."),
    click.option("--ca-passphrase-file", type=click.Path(dir_okay=False),
                 help="Passphrase file for the CA key (or set RADGUARD_CA_PASSPHRASE)."),
]


def _with_ca_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_ca_options):
        func = option(func)
    return func


@keys.command("device")
@click.option("--station", required=True, help="Station name of the modality, e.g. 'DX Room 3'.")
@click.option("--serial", help="Device serial number.")
@_common_key_options
@_with_ca_options
def keys_device(station: str, serial: str | None, out: str, algorithm: str | None,
                days: int | None, organization: str | None, passphrase_file: str | None,
                force: bool, ca_key: str | None, ca_cert: str | None,
                ca_passphrase_file: str | None) -> None:
    """Create a signing key for an acquisition device (modality)."""
    from radguard.provenance.keys import Identity

    identity = Identity(station, "device", organization, serial)
    _issue(identity, out, algorithm, days, passphrase_file, force, ca_key, ca_cert,
           ca_passphrase_file)


@keys.command("technologist")
@click.option("--name", required=True, help="Technologist's name.")
@click.option("--staff-id", help="Staff or badge ID.")
@_common_key_options
@_with_ca_options
def keys_technologist(name: str, staff_id: str | None, out: str, algorithm: str | None,
                      days: int | None, organization: str | None, passphrase_file: str | None,
                      force: bool, ca_key: str | None, ca_cert: str | None,
                      ca_passphrase_file: str | None) -> None:
    """Create a signing key for a technologist (signatures linked to a person)."""
    from radguard.provenance.keys import Identity

    identity = Identity(name, "technologist", organization, staff_id)
    _issue(identity, out, algorithm, days, passphrase_file, force, ca_key, ca_cert,
           ca_passphrase_file)


@keys.command("show")
@click.argument("cert", type=click.Path(dir_okay=False))
def keys_show(cert: str) -> None:
    """Print a certificate's subject, issuer, validity and fingerprint."""
    from cryptography.hazmat.primitives import hashes

    from radguard.provenance.keys import load_certificates

    for c in load_certificates(cert):
        click.echo(f"subject:     {describe_name(c.subject)}")
        click.echo(f"issuer:      {describe_name(c.issuer)}")
        click.echo(f"valid:       {c.not_valid_before_utc:%Y-%m-%d} .. "
                   f"{c.not_valid_after_utc:%Y-%m-%d}")
        click.echo(f"sha256:      {c.fingerprint(hashes.SHA256()).hex(':')}")


# -- sign ---------------------------------------------------------------------------------

def _parse_tags(values: tuple[str, ...]) -> list[int] | None:
    if not values:
        return None
    tags = []
    for value in values:
        text = value.strip().strip("()").replace(" ", "")
        tag = tag_for_keyword(text)
        if tag is None:
            try:
                group, elem = text.split(",")
                tag = Tag(int(group, 16), int(elem, 16))
            except ValueError as exc:
                raise click.BadParameter(f"{value!r} is neither a keyword nor gggg,eeee") from exc
        tags.append(int(tag))
    return tags


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(),
              help="Output file (one input file) or folder (several files or folders).")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False))
@click.option("--cert", "cert_path", required=True, type=click.Path(dir_okay=False),
              help="Signer certificate (PEM; may be followed by its CA chain).")
@click.option("--profile", type=click.Choice(["base", "creator", "authorization", "none"]),
              default="base", show_default=True, help="PS3.15 security profile.")
@click.option("--mac", type=click.Choice(["sha256", "sha384", "sha512"]), default="sha256",
              show_default=True, help="MAC (hash) algorithm.")
@click.option("--purpose", type=click.IntRange(1, 18),
              help="Digital Signature Purpose code (ASTM E1762: 1 author, 14 source, ...).")
@click.option("--tag", "tags", multiple=True,
              help="Sign only this element (keyword or gggg,eeee); repeatable. Default: all.")
@click.option("--tsa", help="RFC 3161 time-stamping authority URL for a certified timestamp.")
@click.option("--fsync/--no-fsync", default=False, show_default=True,
              help="fsync each output (survives power loss; outputs are always written "
                   "atomically, so a crash never leaves a partial file).")
@_workers_option
@_passphrase_option
def sign(inputs: tuple[str, ...], out: str, key_path: str, cert_path: str, profile: str,
         mac: str, purpose: int | None, tags: tuple[str, ...], tsa: str | None, fsync: bool,
         workers: int, passphrase_file: str | None) -> None:
    """Add a DICOM PS3.15 digital signature to files or whole folders."""
    from radguard.provenance.keys import load_signer
    from radguard.provenance.sign import BatchResult, plan_outputs, sign_paths
    from radguard.provenance.timestamp import http_timestamper

    signer = load_signer(key_path, cert_path, _read_passphrase(passphrase_file))
    options: dict[str, Any] = {"profile": profile, "mac": mac, "purpose": purpose,
                               "tags": _parse_tags(tags), "durable": fsync}
    if tsa:
        options["timestamper"] = http_timestamper(tsa)
    for path in inputs:
        if not Path(path).exists():
            raise RadguardError(f"{path}: no such file or folder")
    total = len(plan_outputs(inputs, out))
    if not total:
        raise RadguardError("no input files found")
    with _progress(total, "signing") as progress:
        task = progress.add_task("sign", total=total)

        def report(result: BatchResult) -> None:
            if result.info is not None:
                info = result.info
                click.echo(f"signed  {result.source} -> {result.destination}  (MAC ID "
                           f"{info.mac_id}, {info.profile}, {info.mac_algorithm}, "
                           f"{len(info.covered)} elements"
                           f"{', timestamped' if info.timestamped else ''})")
            else:
                _err(str(result.error))
            progress.advance(task)

        results = sign_paths(inputs, out, signer, workers=workers, on_result=report, **options)
    failures = sum(r.error is not None for r in results)
    if total > 1:
        click.echo(f"{total - failures} signed, {failures} failed")
    if failures:
        sys.exit(2 if failures == total else 1)


# -- verify -------------------------------------------------------------------------------

def _policy_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--allow-weak / --min-rsa-bits / --min-ec-bits: the signature algorithm policy, with
    the defaults of :data:`~radguard.provenance.policy.DEFAULT_POLICY`; --coverage: what
    signatures must cover to vouch for an image (as ``[signatures] coverage``)."""
    options = [
        click.option("--allow-weak", is_flag=True, default=DEFAULT_POLICY.allow_weak,
                     help="Accept weak signatures (MD5 or SHA-1 MAC, short keys) as valid; "
                          "they are still labelled weak-allowed. Default: status weak."),
        click.option("--min-rsa-bits", type=click.IntRange(*RSA_BITS_RANGE),
                     default=DEFAULT_POLICY.min_rsa_bits, show_default=True,
                     help="Shorter RSA signer keys are weak."),
        click.option("--min-ec-bits", type=click.IntRange(*EC_BITS_RANGE),
                     default=DEFAULT_POLICY.min_ec_bits, show_default=True,
                     help="Smaller elliptic-curve signer keys are weak."),
        click.option("--coverage", type=click.Choice([c.value for c in Coverage]),
                     default=Coverage.IMAGE.value, show_default=True,
                     help="What valid signatures must cover to vouch for an image "
                          "(pixels_covered): image = what it shows and whose it is; pixels "
                          "= what it shows only (the patient's identity may be unsigned)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _policy(allow_weak: bool, min_rsa_bits: int, min_ec_bits: int) -> AlgorithmPolicy:
    return AlgorithmPolicy(allow_weak=allow_weak, min_rsa_bits=min_rsa_bits,
                           min_ec_bits=min_ec_bits)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--trust", "trust_paths", multiple=True, type=click.Path(),
              help="Trusted CA or signer certificate(s): PEM/DER files or folders; repeatable. "
                   "Add the TSA's CA to trust certified timestamps.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
@_policy_options
@_workers_option
def verify(paths: tuple[str, ...], trust_paths: tuple[str, ...], as_json: bool,
           allow_weak: bool, min_rsa_bits: int, min_ec_bits: int, coverage: str,
           workers: int) -> None:
    """Verify DICOM signatures; exit 0 only if every file is validly signed by a trusted
    signer. Only signatures in the top-level data set count: one inside a sequence item is
    reported but vouches for that item only."""
    from radguard.dicom.io import iter_dicom_paths
    from radguard.provenance.trust import TrustStore
    from radguard.provenance.verify import verify_paths

    trust = TrustStore.from_paths(trust_paths) if trust_paths else None
    policy = _policy(allow_weak, min_rsa_bits, min_ec_bits)
    missing = [p for p in paths if not Path(p).exists()]
    all_ok = not missing
    for p in missing:
        _print_report(VerificationReport(path=p, status="error",
                                         error=f"{p}: no such file or folder"), as_json)
    present = [p for p in paths if Path(p).exists()]
    total = len(list(iter_dicom_paths(present)))
    if not total and not missing:
        raise RadguardError("no input files found")
    with _progress(total, "verifying") as progress:
        task = progress.add_task("verify", total=total)
        for report in verify_paths(present, trust, workers=workers, policy=policy,
                                   coverage=Coverage(coverage)):
            all_ok &= report.ok
            _print_report(report, as_json)
            progress.advance(task)
    if trust is None and not as_json:
        click.echo("note: no --trust given, so no signer can be trusted", err=True)
    sys.exit(0 if all_ok else 1)


def _print_report(report: VerificationReport, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(report.to_dict()))
        return
    colour = {"valid": "green", "untrusted": "yellow"}.get(report.status, "red")
    click.echo(f"{click.style(report.status.upper(), fg=colour, bold=True):<20} {report.path}")
    if report.error:
        click.echo(f"    {report.error}")
    for sig in report.signatures:
        where = f" in {sig.location} (vouches for that item only)" if sig.location else ""
        when = f"{sig.signed_at:%Y-%m-%d %H:%M:%SZ}" if sig.signed_at else "?"
        key = f"{sig.key_type} {sig.key_bits}" if sig.key_type else "?"
        click.echo(f"    signature {sig.mac_id}{where}: {sig.status} - {sig.reason}")
        click.echo(f"      signer {sig.signer or '?'}; {sig.mac_algorithm or '?'}, {key}; "
                   f"signed {when}; profiles {', '.join(sig.profiles) or 'none'}")
        if sig.timestamp is not None:
            ts = sig.timestamp
            click.echo(f"      certified timestamp {ts.time:%Y-%m-%d %H:%M:%SZ} by {ts.tsa}: "
                       f"{ts.reason}" if ts.time else f"      certified timestamp: {ts.reason}")
    if not any(sig.intact for sig in report.top_level):
        return
    if report.uncovered:
        click.echo(f"    NOT covered by any signature: {name_list(report.uncovered)}")
    if report.status == "valid" and not report.pixels_covered:
        click.echo("    image NOT vouched for (not covered but changes what it shows or "
                   f"means): {name_list(report.pixels_uncovered) or 'no pixel data'}")


# -- dicom --------------------------------------------------------------------------------

@main.group()
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


# -- evaluate -----------------------------------------------------------------------------

@main.command()
@click.argument("predictions", type=click.Path(dir_okay=False))
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
              help="Labels CSV (id, label) when the predictions carry no label column.")
@click.option("--id-column", help="Column naming each case in the predictions and labels "
                                  "[default: id, or file where there is no id column].")
@click.option("--positive", help="The label value that is positive (e.g. pneumonia) when "
                                 "labels are text; 0/1 labels need none.")
@click.option("--by", default="", help="Comma-separated columns for subgroup analysis.")
@click.option("--compare", "compare_path", type=click.Path(dir_okay=False),
              help="Predictions of an external site, compared at the same threshold.")
@click.option("--compare-labels", "compare_labels_path", type=click.Path(dir_okay=False),
              help="Labels CSV for the --compare predictions (same --id-column, --positive).")
@click.option("--threshold", type=float, help="Operating threshold (default: Youden's J).")
@click.option("--bootstrap", is_flag=True, help="Also give a stratified bootstrap AUC CI.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Write the self-contained HTML report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON summary.")
def evaluate(predictions: str, labels_path: str | None, id_column: str | None,
             positive: str | None, by: str, compare_path: str | None,
             compare_labels_path: str | None, threshold: float | None, bootstrap: bool,
             out_path: str | None, as_json: bool) -> None:
    """AUC with DeLong CIs, metrics at a threshold, calibration, subgroups, external sites."""
    from radguard.evaluation.report import evaluate as run
    from radguard.evaluation.report import format_p, read_predictions, to_json, write_report

    if compare_labels_path and not compare_path:
        raise click.UsageError("--compare-labels goes with --compare")
    preds = read_predictions(predictions, labels_path, id_column=id_column, positive=positive)
    other = read_predictions(compare_path, compare_labels_path, id_column=id_column,
                             positive=positive) if compare_path else None
    columns = [c.strip() for c in by.split(",") if c.strip()]
    result = run(preds, threshold=threshold, by=columns, compare=other, bootstrap=bootstrap)
    if out_path:
        write_report(result, out_path)
    if as_json:
        click.echo(to_json(result))
        return
    auc = result["auc"]
    at = result["at_threshold"]
    click.echo(f"{result['cases']} cases, {result['positives']} positive")
    click.echo(f"AUC {auc['auc']:.3f} (95% CI {auc['low']:.3f}-{auc['high']:.3f}, DeLong)")
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        ci = at[name]
        click.echo(f"{name:<12} {ci['value']:.3f} ({ci['low']:.3f}-{ci['high']:.3f}) at "
                   f"threshold {result['threshold']:.4g}")
    if other is not None:
        d = result["external"]["auc_difference"]
        click.echo(f"external AUC change {-d['difference']:+.3f} "
                   f"({-d['high']:+.3f} to {-d['low']:+.3f}), {format_p(d['p_value'])}")
    if out_path:
        click.echo(f"report: {out_path}")


# -- reader-study -------------------------------------------------------------------------

@main.group("reader-study")
def reader_study() -> None:
    """Multi-reader multi-case (MRMC) ROC reader studies."""


@reader_study.command("analyze")
@click.argument("ratings", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the JSON summary.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Write a self-contained HTML report (per-reader AUC plot) here.")
@click.option("--reference", help="Modality every difference is taken against "
                                  "(default: the first one in the CSV).")
@click.option("--method", type=click.Choice(["jackknife", "delong"]), default="jackknife",
              show_default=True, help="Covariance estimate of the reader AUCs (ORH).")
@click.option("--analysis", type=click.Choice(["orh", "dbm"]), default="orh",
              show_default=True, help="Obuchowski-Rockette-Hillis or Dorfman-Berbaum-Metz.")
@click.option("--design", type=click.Choice(["rrrc", "frrc", "rrfc"]), default="rrrc",
              show_default=True, help="Generalisation summarised in the JSON: random "
                                      "readers and cases, fixed readers, or fixed cases.")
def reader_study_analyze(ratings: str, as_json: bool, html_path: str | None,
                         reference: str | None, method: str, analysis: str,
                         design: str) -> None:
    """Compare modalities in a fully crossed reader study (CSV columns reader, modality,
    case, truth, rating): empirical AUC, ORH or DBM with Hillis ddf."""
    from radguard.evaluation import mrmc

    result = mrmc.analyze(mrmc.read_ratings(ratings), method=method, analysis=analysis,
                          reference=reference, design=design)
    if html_path:
        mrmc.write_html(result, html_path)
    click.echo(mrmc.to_json(result) if as_json else mrmc.format_table(result))
    if html_path and not as_json:
        click.echo(f"report: {html_path}")


# -- monitor ------------------------------------------------------------------------------

@main.group()
def monitor() -> None:
    """Drift and performance monitoring with sequential alarms (state in SQLite)."""


_db_option = click.option("--db", "db_path", default="radguard-monitor.db", show_default=True,
                          type=click.Path(dir_okay=False), help="Monitoring database.")


def _read_table(path: str) -> tuple[list[str], list[dict[str, str]]]:
    from radguard.evaluation.report import read_csv_rows

    return read_csv_rows(path)


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
    import numpy as np

    from radguard.monitoring import Monitor
    from radguard.monitoring.features import METADATA_FIELDS

    fields, rows = _read_table(reference)
    candidates = [f for f in fields if f not in ("id", "score", "label", "site")]

    def numeric(column: str) -> bool:
        try:
            [float(r[column]) for r in rows]
        except ValueError:
            return False
        return True

    # acquisition metadata is categorical even where it looks numeric (KVP "120"): the
    # gateway observes it as metadata, never as an image feature
    names = [f for f in candidates if f not in METADATA_FIELDS and numeric(f)]
    categorical = [f for f in candidates if f not in names]  # manufacturer, view...
    try:
        x = np.array([[float(r[n]) for n in names] for r in rows])
        scores = np.array([float(r["score"]) for r in rows]) if "score" in fields else None
        labels = np.array([int(r["label"]) for r in rows]) if "label" in fields else None
    except ValueError as exc:
        raise RadguardError(f"{reference}: non-numeric value ({exc})") from exc
    metadata = [{c: r[c] for c in categorical} for r in rows] if categorical else None
    mon = Monitor(db_path)
    thresholds = mon.fit_reference(x, names, scores=scores, labels=labels, metadata=metadata,
                                   false_alarms_per=budget, threshold=threshold, drop=drop,
                                   model_version=model_version)
    click.echo(f"reference: {len(rows)} studies, features {', '.join(names)}"
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

    _existing_db(db_path)
    mon = Monitor(db_path, audit_log=AuditLog(audit_path))
    fields, rows = _read_table(stream)
    count = 0
    known_meta = set((mon.meta.get("metadata") or {}).keys())
    for r in rows:
        features = {k: v for k, v in r.items()
                    if k not in ("id", "score", "label", "site") and k not in known_meta}
        metadata = {k: r[k] for k in known_meta if k in r}
        score = float(r["score"]) if r.get("score") not in (None, "") else None
        for alarm in mon.observe(r.get("id") or f"{stream}:{count}", features, score=score,
                                 site=r.get("site") or "default", metadata=metadata):
            _print_alarm(alarm)
        if r.get("label") not in (None, ""):
            for alarm in mon.add_label(r.get("id") or f"{stream}:{count}", int(r["label"])):
                _print_alarm(alarm)
        count += 1
    click.echo(f"{count} studies ingested; {mon.seq} in total")


def _print_alarm(alarm: Any) -> None:  # noqa: ANN401 - a monitoring.Alarm
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
    from radguard.monitoring import Monitor, MonitorError

    _existing_db(db_path)
    fields, rows = _read_table(labels)
    for column in (id_column, label_column):
        if column not in fields:
            raise RadguardError(f"{labels}: no column {column!r} (columns: "
                                f"{', '.join(fields)})")
    mon = Monitor(db_path, audit_log=AuditLog(audit_path))
    waiting = mon.status()["labels_waiting_for_their_study"]
    applied, refused = 0, 0
    for line, r in enumerate(rows, start=2):
        value = (r.get(label_column) or "").strip()
        if positive is not None:
            label = 1 if value == positive else 0
        elif value in ("0", "1"):
            label = int(value)
        else:
            refused += 1
            _err(f"{labels}:{line}: label {value!r} is not 0 or 1 (say which value is "
                 "positive with --positive)")
            continue
        study = (r.get(id_column) or "").strip()
        if not study:
            refused += 1
            _err(f"{labels}:{line}: no study id")
            continue
        try:
            for alarm in mon.add_label(study, label):
                _print_alarm(alarm)
            applied += 1
        except MonitorError as exc:
            refused += 1
            _err(f"{labels}:{line}: {exc}")
    now_waiting = mon.status()["labels_waiting_for_their_study"]
    click.echo(f"{applied} labels taken ({int(now_waiting) - int(waiting)} wait for their "
               f"study), {refused} refused")
    if refused:
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


# -- watermark ----------------------------------------------------------------------------

@main.group()
def watermark() -> None:
    """Invisible, reversible watermarks: identity in the pixels, tamper localisation,
    robust marks on exported copies."""


_wm_key_option = click.option("--key", "key_path", required=True,
                              type=click.Path(dir_okay=False),
                              help="Watermark key file (from 'radguard watermark keygen').")


@watermark.command("keygen")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing key.")
def watermark_keygen(out: str, force: bool) -> None:
    """Create a random watermark key (hex, mode 0600)."""
    from radguard.watermark.keys import generate_key_file

    key = generate_key_file(out, force=force)
    click.echo(f"watermark key: {out} (0600, fingerprint {key.fingerprint})")


def _load_pixels_or_dataset(path: str) -> tuple[Any, Any, int]:  # noqa: ANN401
    """(dataset or None, pixels or None, bits) for a DICOM or raster input."""
    from radguard.dicom.io import read_dataset
    from radguard.images import is_dicom_path, read_grey

    if is_dicom_path(path):
        return read_dataset(path), None, 0
    pixels, bits = read_grey(path)
    return None, pixels, bits


@watermark.command("embed")
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@_wm_key_option
@click.option("--payload-from-cert", "cert_path", type=click.Path(dir_okay=False),
              help="Put this certificate's subject (device / technologist) in the payload.")
@click.option("--identity", help="Identity text for the payload (instead of a certificate).")
def watermark_embed(source: str, out: str, key_path: str, cert_path: str | None,
                    identity: str | None) -> None:
    """Embed the reversible watermark (DICOM in, DICOM out; or 8/16-bit PNG in and out)."""
    from radguard.dicom.io import write_dataset
    from radguard.images import write_grey
    from radguard.provenance.keys import describe_subject, load_certificates
    from radguard.watermark import embed_dataset, embed_frame, load_key
    from radguard.watermark.scheme import Identity

    key = load_key(key_path)
    signer = identity or ""
    if cert_path:
        signer = describe_subject(load_certificates(cert_path)[0])
    ds, pixels, bits = _load_pixels_or_dataset(source)
    if ds is not None:
        marked = embed_dataset(ds, key, signer=signer)
        write_dataset(marked, out)
        click.echo(f"watermarked {source} -> {out} (new derived instance "
                   f"{marked.SOPInstanceUID}; Explicit VR Little Endian; sign it now if "
                   "signatures are required)")
        return
    frame, params = embed_frame(pixels, key, Identity(signer), lo=0, hi=(1 << bits) - 1,
                                bits_stored=bits)
    write_grey(out, frame, bits)
    click.echo(f"watermarked {source} -> {out} ({params})")


@watermark.command("check")
@click.argument("source", type=click.Path())
@_wm_key_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.option("--overlay", type=click.Path(dir_okay=False),
              help="Write a PNG with the changed regions outlined.")
def watermark_check(source: str, key_path: str, as_json: bool, overlay: str | None) -> None:
    """Check the watermark: which regions changed, and what the payload says.
    Exit 0 if intact, 1 if anything changed."""
    from radguard.dicom.pixels import pixel_array, pixel_info
    from radguard.images import render_overlay
    from radguard.watermark import check_dataset, check_frame, load_key
    from radguard.watermark.dicom import DatasetCheck

    key = load_key(key_path)
    ds, pixels, bits = _load_pixels_or_dataset(source)
    invert = False
    if ds is not None:
        report = check_dataset(ds, key)
        frame0 = pixel_array(ds)
        frame0 = frame0[0] if frame0.ndim == 3 else frame0
        invert = pixel_info(ds).photometric == "MONOCHROME1"
    else:
        report = DatasetCheck([check_frame(pixels, key, lo=0, hi=(1 << bits) - 1)])
        frame0 = pixels
    result = {"path": source, **report.to_dict()}
    if overlay:
        render_overlay(frame0, report.frames[0].regions, overlay, invert=invert)
        result["overlay"] = overlay
    if as_json:
        click.echo(json.dumps(result))
    else:
        state = click.style("INTACT", fg="green", bold=True) if report.intact else \
            click.style("CHANGED", fg="red", bold=True)
        click.echo(f"{state}  {source}")
        payload = result["payload"]
        if payload:
            vouched = "" if payload["authenticated"] else " (NOT authenticated)"
            click.echo(f"    payload{vouched}: signer {payload['signer'] or '-'}; SOP Instance "
                       f"UID digest {payload['sop_instance_uid_digest'] or '-'}; acquired "
                       f"{payload['acquired'] or '-'}")
        for region, frame in zip(result["regions"], result["region_frames"], strict=True):
            click.echo(f"    changed region {region} (frame {frame})")
        for problem in result["problems"]:
            click.echo(f"    {problem}")
    sys.exit(0 if report.intact else 1)


@watermark.command("restore")
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False))
@_wm_key_option
def watermark_restore(source: str, out: str, key_path: str) -> None:
    """Remove the watermark, restoring the original pixels bit for bit."""
    from radguard.dicom.io import write_dataset
    from radguard.images import write_grey
    from radguard.watermark import load_key, restore_dataset, restore_frame

    key = load_key(key_path)
    ds, pixels, bits = _load_pixels_or_dataset(source)
    if ds is not None:
        write_dataset(restore_dataset(ds, key), out)
    else:
        original, _identity = restore_frame(pixels, key, lo=0, hi=(1 << bits) - 1)
        write_grey(out, original, bits)
    click.echo(f"restored {source} -> {out} (original pixels, verified by the embedded MAC)")


@watermark.command("export")
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="PNG or JPEG file to write.")
@_wm_key_option
@click.option("--quality", type=click.IntRange(50, 100), default=90, show_default=True,
              help="JPEG quality (for .jpg/.jpeg outputs).")
@click.option("--registry", type=click.Path(dir_okay=False), default="radguard-exports.jsonl",
              show_default=True, help="Export registry (JSON lines) that maps IDs back.")
def watermark_export(source: str, out: str, key_path: str, quality: int,
                     registry: str) -> None:
    """Export an 8-bit copy carrying a robust, traceable export ID."""
    import io as _io

    from PIL import Image

    from radguard.dicom.io import peek, read_dataset
    from radguard.dicom.pixels import pixel_info
    from radguard.fileio import atomic_write_bytes
    from radguard.images import display_frame
    from radguard.watermark import embed_export_mark, load_key, new_export_id, register_export

    key = load_key(key_path)
    ds = read_dataset(source)
    if pixel_info(ds).samples_per_pixel != 1:
        raise RadguardError(f"{source}: only monochrome images can be exported with a mark")
    grey = display_frame(ds)
    export_id = new_export_id()
    marked = embed_export_mark(grey, key, export_id)
    buf = _io.BytesIO()
    fmt = "JPEG" if Path(out).suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(marked).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    atomic_write_bytes(out, buf.getvalue())
    register_export(registry, export_id, {
        "sop_instance_uid": str(peek(ds, "SOPInstanceUID", "") or ""),
        "study_instance_uid": str(peek(ds, "StudyInstanceUID", "") or ""),
        "source": source, "file": out})
    click.echo(f"exported {source} -> {out} (export ID {export_id:012x}, registered in "
               f"{registry})")


@watermark.command("trace")
@click.argument("image", type=click.Path(dir_okay=False))
@_wm_key_option
@click.option("--registry", type=click.Path(dir_okay=False), default="radguard-exports.jsonl",
              show_default=True)
@click.option("--json", "as_json", is_flag=True)
def watermark_trace(image: str, key_path: str, registry: str, as_json: bool) -> None:
    """Read the export ID from an exported (or leaked, recompressed, resized) copy."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from radguard.watermark import decode_export_mark, load_key, lookup_export

    key = load_key(key_path)
    try:
        with Image.open(image) as im:
            pixels = np.array(im.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise RadguardError(f"{image}: not a readable image") from exc
    mark = decode_export_mark(pixels, key)
    entry = lookup_export(registry, mark.export_id) if mark.crc_ok else None
    result = {"path": image, "found": mark.crc_ok, "export_id": mark.hex_id if mark.crc_ok
              else None, "confidence": round(mark.confidence, 3), "registry_entry": entry}
    if as_json:
        click.echo(json.dumps(result))
    elif mark.crc_ok:
        where = (f"instance {entry['sop_instance_uid']} exported {entry['exported_at']}"
                 if entry else "not in the registry")
        click.echo(f"export ID {mark.hex_id} ({where})")
    else:
        click.echo("no export mark found (wrong key, or not an exported copy)")
    sys.exit(0 if mark.crc_ok else 1)


@dicom.command("audit")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def dicom_audit(paths: tuple[str, ...], as_json: bool) -> None:
    """Header consistency checks (UIDs, dates, pixels vs header, provenance flags), per file
    and across the files given. Exit 1 if any medium or high finding."""
    from radguard.dicom.io import iter_dicom_paths, read_dataset
    from radguard.forensics import check_collection, check_metadata

    files = list(iter_dicom_paths(paths))
    if not files:
        raise RadguardError("no input files found")
    per_file: dict[str, list[dict[str, str]]] = {}
    loaded = []
    with _progress(len(files), "auditing") as progress:
        task = progress.add_task("audit", total=len(files))
        for f in files:
            try:
                ds = read_dataset(f, stop_before_pixels=False)
                per_file[str(f)] = [x.to_dict() for x in check_metadata(ds)]
                loaded.append((str(f), ds))
            except RadguardError as exc:
                per_file[str(f)] = [{"code": "unreadable", "severity": "high",
                                     "message": str(exc)}]
            progress.advance(task)
    for name, finding in check_collection(loaded):
        per_file[name].append(finding.to_dict())
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


@main.command()
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
        from radguard.cli_forensics import note_unknown_source, open_scores

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


def _print_scan(result: Any, as_json: bool) -> None:  # noqa: ANN401
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


# -- triage -------------------------------------------------------------------------------

@main.group()
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
    from radguard.images import read_pixels
    from radguard.triage.model import load_model
    from radguard.triage.results import write_results

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
                image = read_pixels(f)
                pixels, modality, ds = image.pixels, image.modality, image.dataset
                prediction = model.predict(pixels, modality=modality, path=str(f))
                record = prediction.to_dict()
                scored.append({"id": f.name, "path": str(f), "score": prediction.probability,
                               "suspicion": prediction.suspicion,
                               "positive": int(prediction.positive),
                               "model": model.card.name, "version": model.card.version})
                if out_dir:
                    record.update(write_results(model, prediction, pixels, ds,
                                                out_dir / f"{i:05d}-{f.stem}"))
            except RadguardError as exc:
                all_ok = False
                record = {"path": str(f), "probability": None, "suspicion": None,
                          "model": model.card.name, "version": model.card.version,
                          "error": str(exc)}
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

        write_csv(csv_path, scored, ["id", "path", "score", "suspicion", "positive", "model",
                                      "version"])
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


# -- demo ---------------------------------------------------------------------------------

@main.command()
@click.option("--workdir", default="radguard-demo", show_default=True, type=click.Path(),
              help="Folder for the demo's keys, images and gateway store (created).")
@click.option("--walkthrough", is_flag=True,
              help="Instead: the two-minute provenance walkthrough (sign, tamper, verify).")
@click.option("--input", "input_path", type=click.Path(dir_okay=False),
              help="With --walkthrough: DICOM file to use (default: the NIH chest DX).")
@click.option("--wait/--no-wait", default=None,
              help="Keep serving after the batch until Ctrl-C (default: only when run from a "
                   "terminal, so scripts and CI finish).")
@click.option("--dicom-port", type=click.IntRange(0, 65535), default=11112, show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--reset/--keep", default=True, show_default=True,
              help="--reset: a fresh demo store every run (what an earlier run left in "
                   "--workdir is deleted; a folder the demo did not make only after you "
                   "confirm); --keep: add this run's images to it.")
def demo(workdir: str, walkthrough: bool, input_path: str | None, wait: bool | None,
         dicom_port: int, http_port: int, reset: bool) -> None:
    """Start the gateway on the embedded default, send it real radiographs (signed,
    tampered, synthetic-labelled, unsigned) and print where to open the worklist."""
    if walkthrough:
        from radguard.demo import run_demo

        ok = run_demo(Path(workdir), Path(input_path) if input_path else None, click.echo)
        sys.exit(0 if ok else 1)
    from radguard.gateway.demo import run_gateway_demo

    if wait is None:
        wait = sys.stdin.isatty() and sys.stdout.isatty()
    # a folder the demo did not make is wiped only on a person's yes at a terminal
    confirm = (lambda q: click.confirm(q, default=False)) if sys.stdin.isatty() else None
    ok = run_gateway_demo(Path(workdir), click.echo, wait=wait, dicom_port=dicom_port,
                          http_port=http_port, reset=reset, confirm=confirm)
    sys.exit(0 if ok else 1)


from radguard.cli_governance import register as _register_governance  # noqa: E402

_register_governance(main)
_register_forensics(main)

if __name__ == "__main__":  # pragma: no cover
    main()
