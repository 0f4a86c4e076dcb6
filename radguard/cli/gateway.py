"""``radguard serve``, ``radguard user ...``, ``radguard demo``: thin wrappers over
:mod:`radguard.gateway` (the 'gateway' extra) and :mod:`radguard.demo`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from radguard.cli.common import _read_passphrase
from radguard.cli.governance import _audit_log

__all__ = ["demo", "serve", "user"]


def _check_processes(_ctx: click.Context, _param: click.Parameter,
                     value: str | None) -> int | str | None:
    """--check-processes: "auto" or a whole number 0-32."""
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) > 32:
        raise click.BadParameter(f'{value!r}: "auto" or a number 0-32')
    return int(value)


@click.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML configuration (see radguard/gateway/config.py for every key).")
@click.option("--data-dir", help="Store folder (default radguard-data).")
@click.option("--dicom-port", type=click.IntRange(0, 65535),
              help="C-STORE/C-ECHO port (default 11112; 0 picks a free one).")
@click.option("--http-port", type=click.IntRange(0, 65535), help="HTTP port (default 8080).")
@click.option("--ae-title", help="Our AE title (default RADGUARD).")
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--forward", "forward_dimse", help="PACS to forward to, AE@host:port.")
@click.option("--db-url", help="PostgreSQL URL for the index and queue (default: SQLite in "
                                "the data folder).")
@click.option("--check-processes", callback=_check_processes, metavar="auto|N",
              help="Run the checks in N separate processes (default auto: one per core, at "
                   "most 4, none on a single core; 0: in the gateway process).")
def serve(config_path: str | None, data_dir: str | None, dicom_port: int | None,
          http_port: int | None, ae_title: str | None, host: str | None,
          forward_dimse: str | None, db_url: str | None,
          check_processes: int | str | None) -> None:
    """Run the gateway: receive (C-STORE), verify, scan, triage, quarantine or forward.
    Stops cleanly on Ctrl-C or SIGTERM; a restart resumes unfinished work."""
    import signal
    import threading

    from radguard.gateway import Gateway, load_config

    config = load_config(config_path, data_dir=data_dir, dicom_port=dicom_port,
                         http_port=http_port, ae_title=ae_title, host=host,
                         forward_dimse=forward_dimse, db_url=db_url,
                         check_processes=check_processes)
    gateway = Gateway(config)
    gateway.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"radguard gateway {config.ae_title} listening for DICOM on "
               f"{config.host}:{gateway.dicom.port}; worklist and DICOMweb on "
               f"http://{config.host}:{gateway.http_port}/ ; store {config.data_dir}", err=True)
    for layer, state in gateway.pipeline.layers().items():
        click.echo(f"  {layer}: {state}", err=True)
    stop.wait()
    click.echo("stopping...", err=True)
    gateway.stop()


@click.group()
def user() -> None:
    """Gateway users (roles: technologist, radiologist, admin, auditor) and their tokens."""


def _data_dir_option(func):  # noqa: ANN001
    func = click.option("--db-url", help="PostgreSQL URL, when the gateway uses one.")(func)
    return click.option("--data-dir", default="radguard-data", show_default=True,
                        help="The gateway's store folder.")(func)


@user.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["technologist", "radiologist", "admin", "auditor"]),
              required=True)
@click.option("--password-file", type=click.Path(dir_okay=False),
              help="File whose first line is the password (default: asked for).")
@_data_dir_option
def user_add(name: str, role: str, password_file: str | None, data_dir: str,
             db_url: str | None) -> None:
    """Create a user, or reset one's password and role (which revokes its tokens)."""
    from radguard.gateway.auth import Users
    from radguard.gateway.store import Store

    if password_file:
        password = (_read_passphrase(password_file) or b"").decode()
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    revoked = Users(Store(data_dir, db_url)).add(name, role, password)
    _audit_log(str(Path(data_dir) / "audit.jsonl")).append(
        "user.add", name, {"role": role, **({"tokens_revoked": revoked} if revoked else {})})
    click.echo(f"user {name} ({role}) saved" + (f"; {revoked} token(s) revoked" if revoked
                                                 else ""))


@user.command("token")
@click.argument("name")
@click.option("--days", type=click.IntRange(1, 365), default=30, show_default=True)
@_data_dir_option
def user_token(name: str, days: int, data_dir: str, db_url: str | None) -> None:
    """Issue a bearer token (printed once; radguard keeps only its hash)."""
    from radguard.gateway.auth import Users
    from radguard.gateway.store import Store

    token = Users(Store(data_dir, db_url)).issue_token(name, days)
    _audit_log(str(Path(data_dir) / "audit.jsonl")).append("user.token", name, {"days": days})
    click.echo(token)


@user.command("revoke")
@click.argument("name")
@_data_dir_option
def user_revoke(name: str, data_dir: str, db_url: str | None) -> None:
    """Revoke every token of a user (its web sessions end with their next request)."""
    from radguard.gateway.auth import Users
    from radguard.gateway.store import Store

    revoked = Users(Store(data_dir, db_url)).revoke_all(name)
    _audit_log(str(Path(data_dir) / "audit.jsonl")).append("user.revoke", name,
                                                           {"tokens": revoked})
    click.echo(f"user {name}: {revoked} token(s) revoked")


@user.command("remove")
@click.argument("name")
@_data_dir_option
def user_remove(name: str, data_dir: str, db_url: str | None) -> None:
    """Delete a user and all its tokens (its web sessions end at once)."""
    from radguard.gateway.auth import Users
    from radguard.gateway.store import Store

    revoked = Users(Store(data_dir, db_url)).remove(name)
    _audit_log(str(Path(data_dir) / "audit.jsonl")).append("user.remove", name,
                                                           {"tokens": revoked})
    click.echo(f"user {name} removed ({revoked} token(s) revoked)")


@click.command()
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

