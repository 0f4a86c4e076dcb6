"""The code base stays ruff-clean (style, imports, type hints on public functions)."""

import shutil
import subprocess

from tests.conftest import REPO


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    assert ruff, "ruff missing: run scripts/install.sh --dev"
    result = subprocess.run([ruff, "check", "radguard", "tests", "benchmarks", "scripts"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
