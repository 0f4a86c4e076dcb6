"""``radguard keys``, ``radguard sign``, ``radguard verify``: thin wrappers over
:mod:`radguard.provenance` (keys, certificates, PS3.15 signatures, trust)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from radguard.cli.common import (
    _err,
    _passphrase_option,
    _policy,
    _policy_options,
    _progress,
    _read_passphrase,
    _workers_option,
)
from radguard.errors import KeyMaterialError, RadguardError
from radguard.provenance.keys import describe_name
from radguard.provenance.profiles import Coverage
from radguard.provenance.verify import VerificationReport, name_list

__all__ = ["keys", "sign", "verify"]


# -- keys ---------------------------------------------------------------------------------

@click.group()
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


def _issue(identity: Any, out: str, algorithm: str | None, days: int | None,
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


@click.command()
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



@click.command()
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

