"""Packaging: ``pip install radguard`` without extras signs and verifies, and a command whose
extra is missing says which one to install.

The acceptance test builds the package into a bare virtual environment (no system site
packages: no torch, MONAI, Dask, FastAPI, psycopg, onnxruntime, pynetdicom) and runs the
``radguard`` console script there. The mapping test simulates a missing module in a
subprocess of this environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from radguard.cli.common import EXTRAS, extra_message, missing_extra

from .conftest import NIH_DX

ROOT = Path(__file__).resolve().parents[1]
#: this tree's radguard first, whatever the subprocess's working folder
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
#: the bare venv sees only what it installed
BARE_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_missing_extra_maps_known_modules() -> None:
    assert missing_extra(ModuleNotFoundError("x", name="torch")) == "ai"
    assert missing_extra(ModuleNotFoundError("x", name="torch.nn")) == "ai"
    assert missing_extra(ModuleNotFoundError("x", name="pynetdicom")) == "gateway"
    assert missing_extra(ModuleNotFoundError("x", name="distributed")) == "scale"
    assert missing_extra(ModuleNotFoundError("x", name="no_such_thing")) is None
    assert missing_extra(ImportError("cannot import name 'x'")) is None
    assert set(EXTRAS.values()) <= {"ai", "gateway", "scale", "onnx"}
    assert extra_message("triage", "ai") == \
        "radguard triage needs the 'ai' extra: pip install 'radguard[ai]'"


def _run_without(modules: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``radguard ARGS`` in a subprocess where ``modules`` cannot be imported: a finder
    first on sys.meta_path raises ModuleNotFoundError for them, as when they are not
    installed (a None entry in sys.modules would also make libraries that probe
    sys.modules, such as scipy's array API checks, see a broken module)."""
    code = ("import sys\n"
            "class Missing:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] in {modules!r}:\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Missing())\n"
            "from radguard.cli import main\n"
            "sys.argv[0] = 'radguard'\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=120)


def test_missing_extra_exits_2_with_one_line(tmp_path: Path) -> None:
    result = _run_without(["torch", "monai", "onnxruntime"], "triage", "card", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == \
        "radguard triage needs the 'ai' extra: pip install 'radguard[ai]'"
    result = _run_without(["dask", "distributed"], "audit-archive", str(tmp_path),
                          cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == \
        "radguard audit-archive needs the 'scale' extra: pip install 'radguard[scale]'"


def test_unknown_import_error_stays_internal(tmp_path: Path) -> None:
    """An ImportError of a module no extra provides is a bug (exit 3), not a missing extra."""
    code = ("import sys\n"
            "from radguard.cli import main\n"
            "@main.command('boom')\n"
            "def boom():\n"
            "    import radguard_no_such_module  # noqa: F401\n"
            "sys.argv[0] = 'radguard'\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True,
                            text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert result.returncode == 3, result.stderr
    assert "internal error (ModuleNotFoundError" in result.stderr


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with ``pip install radguard`` (core dependencies only), built from a
    copy of the sources so the build leaves nothing in the work tree."""
    base = tmp_path_factory.mktemp("bare")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "radguard", source / "radguard",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = base / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env)
    install = subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", str(source)],
                             capture_output=True, text=True, env=BARE_ENV, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    return env


def test_bare_install_signs_and_verifies(bare_env: Path, tmp_path: Path) -> None:
    """The acceptance test of the extras: no torch, yet keys, sign and verify work; triage
    names the 'ai' extra."""
    radguard = str(bare_env / "bin" / "radguard")
    python = str(bare_env / "bin" / "python")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([radguard, *args], capture_output=True, text=True, cwd=tmp_path,
                              env=BARE_ENV, timeout=300)

    for module in ("torch", "monai", "dask", "fastapi", "uvicorn", "psycopg", "onnxruntime",
                   "pynetdicom"):
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True,
                               text=True, env=BARE_ENV)
        assert probe.returncode != 0, f"{module} is importable in the bare install"

    ca = run("keys", "ca", "--name", "Packaging Test CA", "-o", "ca")
    assert ca.returncode == 0, ca.stderr
    device = run("keys", "device", "--station", "DX Room 1", "--ca-key", "ca.key.pem",
                 "--ca-cert", "ca.cert.pem", "-o", "device")
    assert device.returncode == 0, device.stderr
    signed = run("sign", str(NIH_DX), "-o", "signed.dcm", "--key", "device.key.pem",
                 "--cert", "device.cert.pem")
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.startswith("signed  ")
    verified = run("verify", "signed.dcm", "--trust", "ca.cert.pem")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("VALID")

    for command in (["watermark", "keygen", "-o", "wm.key"],
                    ["watermark", "embed", str(NIH_DX), "-o", "marked.dcm", "--key", "wm.key",
                     "--identity", "DX Room 1"],
                    ["watermark", "check", "marked.dcm", "--key", "wm.key"],
                    ["deid", str(NIH_DX), "-o", "deid"]):
        done = run(*command)
        assert done.returncode == 0, f"{command}: {done.stdout}{done.stderr}"
    audit = run("dicom", "audit", str(NIH_DX))
    assert audit.returncode in (0, 1), audit.stderr  # findings, not a missing dependency
    assert "extra" not in audit.stderr

    triage = run("triage", "predict", str(NIH_DX))
    assert triage.returncode == 2, triage.stdout + triage.stderr
    assert triage.stderr.strip() == \
        "radguard triage needs the 'ai' extra: pip install 'radguard[ai]'"
