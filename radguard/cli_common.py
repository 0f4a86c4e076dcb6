"""Options and helpers shared by the command modules (``cli``, ``cli_governance``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from radguard.errors import KeyMaterialError

PASSPHRASE_ENV = "RADGUARD_KEY_PASSPHRASE"


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


def _progress(total: int, label: str):  # noqa: ANN202
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    # on stderr, which it checks: on stdout it would add a blank line to piped output and
    # turn a closed pipe (``| head``) into rich's own exit 1 instead of our quiet 141
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                    console=Console(stderr=True), transient=True,
                    disable=not sys.stderr.isatty() or total < 2)
