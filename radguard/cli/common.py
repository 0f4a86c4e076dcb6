"""Options and helpers shared by the command modules of :mod:`radguard.cli`, and the map
from a missing optional dependency to the extra that installs it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from radguard.errors import KeyMaterialError
from radguard.provenance.policy import (
    DEFAULT_POLICY,
    EC_BITS_RANGE,
    RSA_BITS_RANGE,
    AlgorithmPolicy,
)
from radguard.provenance.profiles import Coverage

PASSPHRASE_ENV = "RADGUARD_KEY_PASSPHRASE"

#: Top-level modules of the optional dependencies, and the extra that installs each:
#: ``pip install radguard`` alone signs, verifies, watermarks, audits headers and
#: de-identifies; the AI, the gateway and archive-scale audits need their extra.
EXTRAS: dict[str, str] = {
    "torch": "ai", "torchvision": "ai", "monai": "ai", "onnxruntime": "ai",
    "highdicom": "ai", "onnx": "onnx",
    "fastapi": "gateway", "starlette": "gateway", "uvicorn": "gateway",
    "pynetdicom": "gateway", "jinja2": "gateway", "jwt": "gateway", "psycopg": "gateway",
    "psycopg_pool": "gateway", "multipart": "gateway",
    "dask": "scale", "distributed": "scale",
}


def missing_extra(exc: ImportError) -> str | None:
    """The extra whose absence caused ``exc`` (a module of a known optional dependency not
    installed), or None for any other import error."""
    name = getattr(exc, "name", None) or ""
    return EXTRAS.get(name.split(".")[0])


def extra_message(command: str, extra: str) -> str:
    """The one line a command prints when its extra is not installed."""
    return f"radguard {command} needs the '{extra}' extra: pip install 'radguard[{extra}]'"


def _err(message: str) -> None:
    click.echo(f"radguard: error: {message}", err=True)


# -- passphrases ---------------------------------------------------------------------------

def _read_passphrase(path: str | None, *, env: str = PASSPHRASE_ENV) -> bytes | None:
    """From a file (first line) or the environment; never from the command line itself,
    where other users could read it in the process list."""
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise KeyMaterialError(f"{path}: cannot read passphrase file ({exc.strerror})") from exc
        if not text or not text[0]:
            raise KeyMaterialError(f"{path}: passphrase file is empty")
        return text[0].encode("utf-8")
    value = os.environ.get(env)
    return value.encode("utf-8") if value else None


_workers_option = click.option(
    "--workers", type=click.IntRange(1, 64), default=None,
    help="Files processed in parallel (default: one per core, at most 4).",
    callback=lambda _ctx, _param, value: value or _default_workers(),
)


def _default_workers() -> int:
    from radguard.concurrency import default_workers

    return default_workers()


_passphrase_option = click.option(
    "--passphrase-file", type=click.Path(dir_okay=False),
    help=f"File whose first line is the key passphrase (or set {PASSPHRASE_ENV}).",
)


def _progress(total: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # on stderr, which it checks: on stdout it would add a blank line to piped output and
    # turn a closed pipe (``| head``) into rich's own exit 1 instead of our quiet 141
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                    console=Console(stderr=True), transient=True,
                    disable=not sys.stderr.isatty() or total < 2)


# -- signature policy ----------------------------------------------------------------------

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
