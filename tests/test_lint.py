"""The code base stays ruff-clean (style, imports, type hints on public functions) and the
library packages mypy-clean ([tool.mypy] in pyproject.toml)."""

import importlib.util
import shutil
import subprocess
import sys

from tests.conftest import REPO


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    assert ruff, "ruff missing: run scripts/install.sh --dev"
    result = subprocess.run([ruff, "check", "radguard", "tests", "benchmarks", "scripts"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    assert importlib.util.find_spec("mypy"), "mypy missing: run scripts/install.sh --dev"
    # the files and flags are pyproject.toml's; the cache in .mypy_cache keeps reruns fast
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
