"""Every README command that needs no server still works as written (issue 27).

The ```bash blocks of README.md are split into commands (``\\`` continuations, heredocs,
full-line and trailing comments; environment assignments stay in the command, which runs in
bash) and each block is run in order, as a new user would from the repository root: in
``TMP/repo``, with ``TMP/shared`` a link to the shared data so that ``../shared/data`` resolves,
HOME and radguard's default stores inside TMP, and ``radguard`` on PATH running this checkout
(the console script's entry point from pyproject.toml, not whatever is installed).

A command is run unless it matches SKIP (each entry says why). Usage synopses
(``PATH...``, ``[--json]``, ``a|b``) are not runnable: every ``--flag`` they name must be in
the subcommand's ``--help``. A command must exit 0, or the code its trailing comment
documents (``# INVALID, exit 1``). A block that uses files an earlier block makes (the PKI of
the walkthrough) runs that block first (PREREQUISITES); the few inputs the README leaves to the
reader (a folder of known-real images, dataset folders, DICOM files to de-identify) are made
by FIXTURES from the shared data.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO, SHARED

README = REPO / "README.md"
TIMEOUT = 240  # seconds per command

# (regex searched in the command, reason). First match wins; anything else is run.
SKIP: list[tuple[str, str]] = [
    # the first block: install + demo, install + the test suite itself
    (r"scripts/install\.sh", "installs system packages (apt, npm) and runs the demo or pytest"),
    (r"\bpython -m pytest\b", "runs the test suite (recursion)"),
    (r"\bpip install\b", "installs packages"),
    (r"\bdocker\b", "needs docker"),
    # servers
    (r"\bradguard (serve|demo)\b", "starts the gateway (a server)"),
    (r"\b(storescu|echoscu|findscu|movescu|getscu)\b", "needs a running gateway"),
    (r"\bcurl\b.*localhost", "needs a running gateway"),
    (r"\baudit-archive https?://", "needs a running DICOMweb server (Orthanc)"),
    # slow
    (r"\bradguard triage train\b", "trains a model (minutes on CPU; tested in tests/triage)"),
    (r"\bbenchmarks/", "benchmark (minutes; figures in benchmarks/RESULTS.md)"),
]

# heading of a block -> headings of the blocks whose outputs it uses (run first, same folder)
WALKTHROUGH = "Two-minute walkthrough"
WATERMARKS = "Watermarks (reversible identity mark, tamper localisation, traceable exports)"
PREREQUISITES: dict[str, list[str]] = {
    WATERMARKS: [WALKTHROUGH],  # pki/dx3.cert.pem
    "Forensics: one verdict per image": [WALKTHROUGH, WATERMARKS],  # signed.dcm, marked.dcm
    "Governance (datasets, audits, de-identification, audit log)": [WALKTHROUGH],  # pki/dx3.*
}


def _link_images(src: Path, dest: Path, names: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dest / name).symlink_to(src / name)


def _known_real(repo: Path) -> None:
    """known-real/: 200 NIH radiographs (one source; 199 make it judged, provisionally);
    new-images/: 3 more."""
    names = sorted(p.name for p in (SHARED / "cxr-nih" / "images").iterdir())
    _link_images(SHARED / "cxr-nih" / "images", repo / "known-real", names[:200])
    _link_images(SHARED / "cxr-nih" / "images", repo / "new-images", names[-3:])


def _datasets(repo: Path) -> None:
    """data/v1: 6 NIH images with their labels; data/v2: one removed, one added, one
    relabelled. in/: two DICOM files to de-identify."""
    labels = (SHARED / "cxr-nih" / "labels.csv").read_text().splitlines()
    header, rows = labels[0], labels[1:8]
    images = SHARED / "cxr-nih" / "images"
    v1, v2 = rows[:6], rows[1:7]
    first = v2[0].split(",")
    first[1] = "pneumonia" if first[1] == "normal" else "normal"
    v2[0] = ",".join(first)
    for name, chosen in (("v1", v1), ("v2", v2)):
        folder = repo / "data" / name
        folder.mkdir(parents=True)
        for row in chosen:
            shutil.copy(images / row.split(",")[0], folder)
        (folder / "labels.csv").write_text("\n".join([header, *chosen]) + "\n")
    (repo / "in").mkdir()
    shutil.copy(SHARED / "dicom" / "nhsx" / "nih_dx.dcm", repo / "in" / "nih_dx.dcm")
    shutil.copy(SHARED / "dicom" / "pydicom-data-MR2_UNCR.dcm", repo / "in" / "mr.dcm")


# heading -> what it makes in TMP/repo before the block runs
FIXTURES = {
    "Per-source calibration: provenance first, statistics second": _known_real,
    "Governance (datasets, audits, de-identification, audit log)": _datasets,
}


@dataclass
class Command:
    text: str  # as bash runs it (continuations joined, trailing comment removed)
    line: int  # README line of its first line
    comment: str = ""

    @property
    def expected_exit(self) -> int:
        found = re.search(r"\bexit (\d+)\b", self.comment)
        return int(found.group(1)) if found else 0


@dataclass
class Block:
    heading: str
    line: int
    commands: list[Command] = field(default_factory=list)


def _split_comment(line: str) -> tuple[str, str]:
    """Code and trailing comment: the first ``#`` outside quotes that starts a word."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _commands(lines: list[str], first_line: int) -> list[Command]:
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        code, comment = _split_comment(lines[i])
        start = i
        i += 1
        if not code.strip():
            continue
        while code.endswith("\\") and i < len(lines):
            more, more_comment = _split_comment(lines[i])
            code = code[:-1].rstrip() + " " + more.strip()
            comment = " ".join(filter(None, [comment, more_comment]))
            i += 1
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", code)
        if heredoc:
            body = []
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            code = "\n".join([code, *body, heredoc.group(1)])
            i += 1
        commands.append(Command(code.strip(), first_line + start, comment))
    return commands


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    heading, body, fence = "(top)", [], 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if fence:
            if line.strip() == "```":
                blocks.append(Block(heading, fence, _commands(body, fence + 1)))
                fence = 0
            else:
                body.append(line)
        elif line.strip() == "```bash":
            fence, body = number, []
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def skip_reason(command: Command) -> str | None:
    for pattern, reason in SKIP:
        if re.search(pattern, command.text):
            return reason
    return None


def is_synopsis(command: Command) -> bool:
    """A usage line, not a command: ``PATH...``, ``[--option]`` or ``a|b`` alternatives."""
    if "<<" in command.text:
        return False
    return bool(re.search(r"\w\.\.\.|\[-|\s\|\s+--|\w\|\w", command.text))


def _environment(tmp: Path) -> dict[str, str]:
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["radguard"]
    module, function = entry.split(":")
    (bin_dir / "radguard").write_text(
        f"#!/bin/sh\nexec {sys.executable} -c 'import sys; sys.argv[0] = \"radguard\"; "
        f"from {module} import {function}; {function}()' \"$@\"\n")
    (bin_dir / "radguard").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RADGUARD_") and k != "XDG_DATA_HOME"}
    (tmp / "home").mkdir()
    env.update(HOME=str(tmp / "home"), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


def _run(command: Command, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command.text], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == command.expected_exit, (
        f"README.md line {command.line}: exit {result.returncode}, expected "
        f"{command.expected_exit}\n$ {command.text}\n--- stdout\n{result.stdout[-3000:]}"
        f"\n--- stderr\n{result.stderr[-3000:]}")


def _check_synopsis(command: Command, cwd: Path, env: dict[str, str]) -> None:
    words = command.text.split()
    path = []
    for word in words[1:]:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
            break
        path.append(word)
    result = subprocess.run([words[0], *path, "--help"], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, f"README.md line {command.line}: {command.text}\n{result}"
    for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command.text))):
        assert re.search(rf"(?<![\w-]){flag}\b", result.stdout), (
            f"README.md line {command.line}: {flag} is not an option of "
            f"`{' '.join([words[0], *path])}`\n$ {command.text}")


BLOCKS = readme_blocks()
BY_HEADING = {block.heading: block for block in BLOCKS}


def test_readme_parsed():
    """The parser sees the README's blocks; the first two commands (install + demo, install +
    tests) stay first and are never run."""
    commands = [c for block in BLOCKS for c in block.commands]
    assert len(BLOCKS) >= 8 and len(commands) >= 40
    assert "scripts/install.sh" in commands[0].text and "radguard demo" in commands[0].text
    assert "--dev" in commands[1].text and "pytest" in commands[1].text
    assert all(skip_reason(c) for c in commands[:2])
    assert all(h in BY_HEADING for needs in PREREQUISITES.values() for h in needs)
    assert set(PREREQUISITES) | set(FIXTURES) <= set(BY_HEADING)


def test_command_splitting():
    lines = [
        "# a full-line comment",
        'RADGUARD_DEBUG=1 radguard keys ca --name "A # B" -o pki/ca  # trailing',
        "radguard verify x.dcm \\",
        "    --trust ca.pem      # INVALID, exit 1",
        "",
        "python - <<'PY'",
        "print(1)  # kept: inside the heredoc",
        "PY",
        "radguard scan PATH... [--json]",
    ]
    commands = _commands(lines, 10)
    assert [c.text for c in commands] == [
        'RADGUARD_DEBUG=1 radguard keys ca --name "A # B" -o pki/ca',
        "radguard verify x.dcm --trust ca.pem",
        "python - <<'PY'\nprint(1)  # kept: inside the heredoc\nPY",
        "radguard scan PATH... [--json]",
    ]
    assert [c.line for c in commands] == [11, 12, 15, 18]
    assert [c.expected_exit for c in commands] == [0, 1, 0, 0]
    assert [is_synopsis(c) for c in commands] == [False, False, False, True]
    assert skip_reason(Command("radguard serve --config gw.toml", 1)) is not None
    assert skip_reason(Command("radguard triage card --model chest", 1)) is None


def test_synopsis_flags_are_checked(tmp_path: Path) -> None:
    env = _environment(tmp_path)
    _check_synopsis(Command("radguard triage predict PATH... [--json] [--sr-dir D]", 1),
                    tmp_path, env)
    with pytest.raises(AssertionError, match="--no-such-flag is not an option"):
        _check_synopsis(Command("radguard triage predict PATH... [--no-such-flag]", 1),
                        tmp_path, env)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"L{b.line}" for b in BLOCKS])
def test_readme_block(block: Block, tmp_path: Path) -> None:
    if not any(skip_reason(c) is None for c in block.commands):
        pytest.skip("every command of the block is skipped: "
                    + "; ".join(sorted({skip_reason(c) or "" for c in block.commands})))
    if any("dcmsign" in c.text for c in block.commands) and shutil.which("dcmsign") is None:
        pytest.fail("dcmsign not found: run scripts/install.sh (apt-get install dcmtk)")
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "shared").symlink_to(SHARED.parent, target_is_directory=True)
    env = _environment(tmp_path)
    if block.heading in FIXTURES:
        FIXTURES[block.heading](repo)
    for needed in PREREQUISITES.get(block.heading, []):
        for command in BY_HEADING[needed].commands:
            if skip_reason(command) is None and not is_synopsis(command):
                _run(command, repo, env)
    for command in block.commands:
        if skip_reason(command) is not None:
            continue
        if is_synopsis(command):
            _check_synopsis(command, repo, env)
        else:
            _run(command, repo, env)
